"""The video-text model (Li et al. §4.4, UMT recipe): the four objectives against hand-computed values, and the
masked and unmasked visual paths."""
import math

import pytest
import torch

from _text_fixtures import tiny_text_config, tiny_text_folder
from pks4.engine.pretrain import TeacherConfig, build_teacher
from pks4.models.registry import create_model
from pks4.models.video_text import (IGNORE, LossWeights, VideoTextConfig, VideoTextModel, contrastive_loss,
                                    mask_caption_tokens, matching_loss, mlm_loss, sample_hard_negatives)
from pks4.models.videomamba_pretrain import MaskedAlignmentStudent, masked_alignment_loss
from pks4.weights.bert import build_text_encoder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_text_folder(tmp_path_factory.mktemp("text"))


def _model(folder, visual="videomamba_li_micro", teacher_dim=128, masked=True, **cfg):
    text, tok = build_text_encoder(tiny_text_config(folder))
    overrides = dict(embed_dim=32, depth=2, image_size=32, num_frames=4) if visual.startswith("videomamba") else \
        dict(image_size=32, patch_size=8, width=32, heads=2, layers=2, output_dim=32, num_frames=4)
    net = create_model(visual, **overrides)
    model = VideoTextModel(net, text, VideoTextConfig(embed_dim=16, **cfg), mask_id=tok.mask_id,
                           special_ids=(tok.pad_id, tok.cls_id, tok.sep_id), teacher_dim=teacher_dim)
    model.set_masked(masked)
    return model, tok


def _teacher():
    return build_teacher(TeacherConfig(arch="tiny"), log=lambda msg: None)


def _log_softmax_row(row, j):
    return row[j] - math.log(sum(math.exp(x) for x in row))


# ---- the objectives by hand ---------------------------------------------------------------------------
def test_contrastive_loss_by_hand():
    v = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside: (1, 0), (0, 1)
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    sim = [[2.0, 1.2], [0.0, 1.6]]  # cos / 0.5
    v2t = -(_log_softmax_row(sim[0], 0) + _log_softmax_row(sim[1], 1)) / 2
    cols = [[sim[0][0], sim[1][0]], [sim[0][1], sim[1][1]]]
    t2v = -(_log_softmax_row(cols[0], 0) + _log_softmax_row(cols[1], 1)) / 2
    assert float(contrastive_loss(v, t, 0.5)) == pytest.approx((v2t + t2v) / 2, rel=1e-6)
    # both captions of one video: every pair is a positive, each target 1/2
    same = -sum(0.5 * _log_softmax_row(row, j) for row in sim for j in (0, 1)) / 2
    same_t = -sum(0.5 * _log_softmax_row(col, j) for col in cols for j in (0, 1)) / 2
    assert float(contrastive_loss(v, t, 0.5, torch.tensor([7, 7]))) == pytest.approx((same + same_t) / 2, rel=1e-6)


def test_contrastive_loss_gradients_match_finite_differences():
    v = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    temp = torch.tensor(0.3, dtype=torch.double, requires_grad=True)
    ids = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda a, b, c: contrastive_loss(a, b, c, ids).double(), (v, t, temp))


def test_matching_loss_by_hand():
    pos = torch.tensor([[0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    want = -(_log_softmax_row([0.0, 1.0], 1) + _log_softmax_row([1.0, 0.0], 0) + _log_softmax_row([2.0, 0.0], 0)) / 3
    assert float(matching_loss(pos, neg)) == pytest.approx(want, rel=1e-6)


def test_hard_negatives_never_pair_a_video_with_itself_and_follow_the_similarities():
    sim = torch.tensor([[5.0, 3.0, 1.0, 0.0], [3.0, 5.0, 1.0, 0.0], [0.0, 0.0, 5.0, 2.0], [1.0, 0.0, 0.0, 5.0]])
    ids = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 show the same video
    gen = torch.Generator().manual_seed(0)
    texts, videos = zip(*(sample_hard_negatives(sim, ids, generator=gen) for _ in range(2000)))
    texts, videos = torch.stack(texts), torch.stack(videos)  # (draws, 4)
    assert not (ids[texts] == ids).any() and not (ids[videos] == ids).any()
    # video 0 draws among texts 2, 3 with probability softmax([1, 0]) = 0.731 / 0.269
    assert (texts[:, 0] == 2).float().mean() == pytest.approx(math.exp(1) / (math.exp(1) + 1), abs=0.03)
    uniform = torch.stack([sample_hard_negatives(sim, ids, hard=False, generator=gen)[0] for _ in range(2000)])
    assert (uniform[:, 0] == 2).float().mean() == pytest.approx(0.5, abs=0.04)
    huge = sample_hard_negatives(sim * 1e4, ids, generator=gen)  # no underflow to an all-zero row
    assert not (ids[huge[0]] == ids).any()


def test_matching_needs_two_videos_in_a_batch():
    with pytest.raises(ValueError, match="at least two different videos"):
        sample_hard_negatives(torch.zeros(2, 2), torch.tensor([3, 3]))


def test_mask_caption_tokens_follows_berts_rules():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 40), generator=gen)
    ids[:, 0], ids[:, 30], ids[:, 31:] = 2, 3, 0  # [CLS] words [SEP] [PAD]...
    attn = (ids != 0).long()
    masked, labels = mask_caption_tokens(ids, attn, 0.5, mask_id=4, vocab_size=100, special_ids=(0, 2, 3),
                                         generator=gen)
    chosen = labels != IGNORE
    assert not chosen[:, [0, 30]].any() and not chosen[:, 31:].any()  # specials and padding never
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert chosen[:, 1:30].float().mean() == pytest.approx(0.5, abs=0.03)
    assert (masked[chosen] == 4).float().mean() == pytest.approx(0.8, abs=0.03)
    kept = (masked[chosen] == ids[chosen]).float().mean()  # 10% kept (+ random ids that hit themselves)
    assert kept == pytest.approx(0.1, abs=0.03)


def test_mlm_loss_by_hand_and_with_nothing_masked():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]], requires_grad=True)
    labels = torch.tensor([[IGNORE, 2]])
    assert float(mlm_loss(logits, labels).detach()) == pytest.approx(-_log_softmax_row([0.5, 0.0, -1.0], 2), rel=1e-6)
    none = mlm_loss(logits, torch.full((1, 2), IGNORE))
    none.backward()
    assert float(none.detach()) == 0.0 and logits.grad is not None and torch.isfinite(logits.grad).all()


# ---- the model -------------------------------------------------------------------------------------------
def test_visible_path_with_every_token_equals_the_full_forward(folder):
    model, _ = _model(folder)
    model.eval()
    clip = torch.randn(2, 4, 3, 32, 32)
    every = torch.arange(1 + 4 * 16).expand(2, -1)
    full, visible = model.encode_visual(clip), model.encode_visual(clip, every)
    torch.testing.assert_close(visible.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(visible.pooled, full.pooled, atol=1e-5, rtol=1e-5)


def test_masking_keeps_half_of_an_image_and_a_fifth_of_a_video(folder):
    model, _ = _model(folder)
    keep_video, _ = model.choose_visible(torch.randn(2, 4, 3, 32, 32), None)
    keep_image, _ = model.choose_visible(torch.randn(2, 1, 3, 32, 32), None)
    assert keep_video.shape == (2, 1 + 4 * round(16 * 0.2)) and keep_image.shape == (2, 1 + 16 // 2)
    assert (keep_image[:, 0] == 0).all() and (keep_image[:, 1:] >= 1).all()  # CLS always visible
    topk, _ = _model(folder, mask_sample=False)
    first, second = (topk.choose_visible(torch.randn(1, 4, 3, 32, 32), None)[0] for _ in range(2))
    assert not torch.equal(first, second)  # no teacher: random, even where a teacher's top-k was asked for


def test_model_losses_are_the_objectives_on_its_features(folder):
    model, tok = _model(folder, mask_sample=False)  # top-k masking: the same tokens in both computations
    model.eval()
    teacher = _teacher()
    clip = torch.randn(3, 4, 3, 32, 32)
    tokens = tok(["a red dial turns clockwise", "a blue disc fades in", "a red dial"], 16)
    ids = torch.tensor([0, 1, 0])
    torch.manual_seed(5)
    out = model.losses(clip, tokens, ids, teacher)
    assert set(out) == {"vtc", "vtm", "mlm", "uta"}
    keep, _ = model.choose_visible(clip, teacher)
    visual = model.encode_visual(clip, keep)
    hidden = model.text(tokens.input_ids, tokens.attention_mask)
    vtc = contrastive_loss(model.embed_visual(visual), model.embed_text(hidden), model.temp, ids)
    torch.testing.assert_close(out["vtc"], vtc)
    # UTA = the masked-alignment loss of the existing pretraining on the same model, decoder and mask
    student = MaskedAlignmentStudent(model.visual, 128, mask_ratio=0.8, sample=False)
    student.decoder.load_state_dict(model.decoder.state_dict())
    torch.testing.assert_close(out["uta"], masked_alignment_loss(student, teacher, clip))


def test_loss_weights_switch_objectives_and_scale_them(folder):
    model, tok = _model(folder, teacher_dim=None, weights=LossWeights(vtc=2.0, vtm=0.0, mlm=0.0, uta=0.0))
    model.eval()
    clip, tokens = torch.randn(2, 4, 3, 32, 32), tok(["a red dial", "a blue disc"], 16)
    torch.manual_seed(0)
    out = model.losses(clip, tokens)
    assert set(out) == {"vtc"}
    torch.manual_seed(0)
    keep, _ = model.choose_visible(clip, None)
    v = model.embed_visual(model.encode_visual(clip, keep))
    t = model.embed_text(model.text(tokens.input_ids, tokens.attention_mask))
    torch.testing.assert_close(out["vtc"], 2.0 * contrastive_loss(v, t, model.temp))


def test_unmasked_phase_runs_every_token_without_alignment(folder):
    model, tok = _model(folder, masked=False)
    out = model.losses(torch.randn(2, 4, 3, 32, 32), tok(["a red dial", "a blue disc"], 16), teacher=_teacher())
    assert set(out) == {"vtc", "vtm", "mlm"}


def test_temperature_is_learnable_and_clamped(folder):
    model, tok = _model(folder, masked=False)
    with torch.no_grad():
        model.temp.fill_(5.0)
    out = model.losses(torch.randn(2, 4, 3, 32, 32), tok(["a red dial", "a blue disc"], 16))
    assert float(model.temp.detach()) == pytest.approx(0.5)
    sum(out.values()).backward()
    assert model.temp.grad is not None and model.temp.grad != 0


def test_other_registered_encoders_train_unmasked(folder):
    model, tok = _model(folder, visual="vit_tiny_avgpool", masked=False, teacher_dim=None)
    out = model.losses(torch.randn(2, 4, 3, 32, 32), tok(["a red dial", "a blue disc"], 16))
    sum(out.values()).backward()
    assert model.visual.backbone.conv1.weight.grad is not None
    with pytest.raises(ValueError, match="masking needs a VideoMamba"):
        _model(folder, visual="vit_tiny_avgpool", masked=True)


