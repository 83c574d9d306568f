"""VideoMamba (Li et al. and Park et al.): models, scan orders, position embeddings, checkpoints,
frame-order perturbation and the pretraining objectives, all at tiny sizes."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pks4.data.frame_order import FRAME_ORDERS, frame_order_indices, perturb_frame_order
from pks4.layers.posembed import resize_pos_embed_2d, resize_temporal_pos_embed
from pks4.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
from pks4.models.registry import count_parameters, create_model, list_models, model_from_config
from pks4.models.videomamba import (MODELS, SCAN_ORDERS, VideoMambaConfig, _plan, resize_joint_pos_embed,
                                    scan_orders, sinusoidal_pos_embed)
from pks4.models.videomamba_pretrain import (DistillProjector, MaskedAlignmentStudent, attention_guided_mask,
                                             cosine_alignment_loss, pretrain_step, self_distillation_loss)
from pks4.weights import CheckpointError
from pks4.weights.videomamba import joint_pos_from_image, load_videomamba_checkpoint

MICRO = ["videomamba_li_micro", "videomamba_park_micro"]
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "pks4" / "configs"


def _clip(b=2, t=8, size=64):
    return torch.randn(b, t, 3, size, size)


# ---- models -----------------------------------------------------------------------------------------------
def test_all_variants_registered():
    assert set(MODELS) <= set(list_models())


@pytest.mark.parametrize("name", MICRO)
def test_micro_forward_backward_and_interface(name):
    model = create_model(name, depth=2)
    x = _clip(t=4)
    logits = model(x)
    assert logits.shape == (2, model.num_classes)
    assert model.forward_features(x).shape == (2, model.config.embed_dim)
    logits.logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["cls_token"] == 0 and ids["layers.1.mixer.A_b_log"] == 2 and ids["head.weight"] == 3
    assert {"cls_token", "pos_embed", "layers.0.mixer.A_log", "layers.0.mixer.D_b"} <= model.no_weight_decay()
    assert model.is_new_parameter("head.bias") and not model.is_new_parameter("norm_f.weight")
    rebuilt = model_from_config(name, dataclasses.asdict(model.config))
    assert count_parameters(rebuilt) == count_parameters(model)


@pytest.mark.parametrize("name, millions, tol", [("videomamba_tiny", 7.03, 0.01), ("videomamba_small", 25.57, 0.01),
                                                 ("videomamba_middle", 73.88, 0.01), ("videomamba_park", 26.3, 0.02)])
def test_parameter_counts(name, millions, tol):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_model(name, num_classes=400)
    assert model.config.num_frames == (16 if name == "videomamba_park" else 8)
    assert abs(count_parameters(model) / 1e6 - millions) <= tol * millions


def test_official_key_names():
    keys = set(create_model("videomamba_li_micro", depth=1).state_dict())
    mixer = {f"layers.0.mixer.{k}" for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                             "dt_proj.weight", "dt_proj.bias", "A_log", "D", "conv1d_b.weight",
                                             "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                                             "dt_proj_b.bias", "A_b_log", "D_b", "out_proj.weight")}
    other = {"cls_token", "pos_embed", "temporal_pos_embedding", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "layers.0.norm.weight", "norm_f.weight", "head.weight", "head.bias"}
    assert keys == mixer | other


def test_grad_checkpointing_gives_the_same_gradients():
    model = create_model("videomamba_li_micro", depth=2)
    x = _clip(b=1, t=2)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_embedding_layout_is_spatial_first_and_temporal_not_on_cls():
    model = create_model("videomamba_li_micro", depth=1, num_frames=2)
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()
    x = _clip(b=1, t=2)
    tokens, (n_t, gh, gw) = model.embed(x)
    n = gh * gw
    assert tokens.shape == (1, 1 + n_t * n, model.config.embed_dim)
    conv = F.conv2d(x[0, 1], model.patch_embed.proj.weight[:, :, 0], model.patch_embed.proj.bias, stride=8)
    expected = conv.flatten(1).t() + model.pos_embed[0, 1:] + model.temporal_pos_embedding[0, 1]
    torch.testing.assert_close(tokens[0, 1 + n:], expected)  # frame 1 follows all of frame 0
    torch.testing.assert_close(tokens[0, 0], (model.cls_token + model.pos_embed[:, :1])[0, 0])


# ---- scan orders ------------------------------------------------------------------------------------------
def test_scan_orders_are_permutations_with_cls_first_forward_last_backward():
    for scan in SCAN_ORDERS:
        pairs = scan_orders(scan, 3, 4)
        assert len(pairs) == (2 if scan == "spatiotemporal_v2" else 1)
        for fwd, bwd in pairs:
            assert sorted(fwd.tolist()) == list(range(13)) == sorted(bwd.tolist())
            assert fwd[0] == 0 and bwd[-1] == 0


def test_scan_orders_golden():
    # two frames of three tokens: canonical positions [[1, 2, 3], [4, 5, 6]], CLS = 0
    golden = {
        "spatial_first": [([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0])],
        "spatiotemporal_reversal": [([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0])],
        "spatial_reversal": [([0, 1, 2, 3, 4, 5, 6], [3, 2, 1, 6, 5, 4, 0])],
        "temporal_reversal": [([0, 1, 2, 3, 4, 5, 6], [4, 5, 6, 1, 2, 3, 0])],
        "temporal_first": [([0, 1, 4, 2, 5, 3, 6], [6, 3, 5, 2, 4, 1, 0])],
        "spatiotemporal_v1": [([0, 1, 2, 3, 4, 5, 6], [6, 3, 5, 2, 4, 1, 0])],
        "spatiotemporal_v2": [([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]),
                              ([0, 1, 4, 2, 5, 3, 6], [6, 3, 5, 2, 4, 1, 0])],
    }
    for scan, pairs in golden.items():
        got = [(f.tolist(), b.tolist()) for f, b in scan_orders(scan, 2, 3)]
        assert got == pairs, scan


def _reference_mix(mixer, u, pairs):
    """Each direction scanned over its own visiting order, outputs put back at their positions."""
    out = 0
    for fwd, bwd in pairs:
        x, z = mixer.in_proj(u).transpose(1, 2).chunk(2, dim=1)
        y = torch.zeros_like(x)
        y[..., fwd] = mixer._scan_direction(x[..., fwd], z[..., fwd], "")
        y[..., bwd] += mixer._scan_direction(x[..., bwd], z[..., bwd], "_b")
        out = out + mixer.out_proj(y.transpose(1, 2))
    return out / len(pairs)


@pytest.mark.parametrize("scan", SCAN_ORDERS)
def test_block_mixing_follows_the_scan_order(scan):
    model = create_model("videomamba_li_micro", depth=1, embed_dim=16, scan=scan)
    block = model.layers[0]
    u = torch.randn(2, 7, 16)
    pairs = scan_orders(scan, 2, 3)
    plans = [_plan(f, b, u.device) for f, b in pairs]
    torch.testing.assert_close(block.mix(u, plans), _reference_mix(block.mixer, u, pairs), atol=1e-5, rtol=1e-4)


# ---- position embeddings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["separable", "joint", "sinusoidal", "none"])
def test_position_embedding_options(kind):
    model = create_model("videomamba_park_micro", pos_embed=kind, depth=1)
    names = set(dict(model.named_parameters()))
    assert ("pos_embed" in names) == (kind in ("separable", "joint"))
    assert ("temporal_pos_embedding" in names) == (kind == "separable")
    if kind == "joint":
        assert model.pos_embed.shape == (1, 4 * 64, 64)  # 8 frames / tubelet 2, 8x8 grid
    assert model(_clip(b=1, t=8)).shape == (1, 10)
    assert model(_clip(b=1, t=4, size=48)).shape == (1, 10)  # other frame count and resolution


def test_sinusoidal_table_golden():
    table = sinusoidal_pos_embed(3, 4)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(table[2], torch.tensor([torch.sin(torch.tensor(2.0)), torch.cos(torch.tensor(2.0)),
                                                  torch.sin(torch.tensor(0.02)), torch.cos(torch.tensor(0.02))]))


def test_joint_pos_from_image_golden():
    spatial = torch.tensor([[0.0, 2.0], [4.0, 6.0]])  # N = 2 tokens, D = 2
    expand = joint_pos_from_image(spatial, 2, "expand")[0]
    assert expand.tolist() == [[0, 2], [4, 6], [0, 2], [4, 6]]
    # each row stretched to 4 channels ([0, .5, 1.5, 2] for [0, 2]) and split into (t0, t1) halves
    dim = joint_pos_from_image(spatial, 2, "interpolate_dim")[0]
    assert dim.tolist() == [[0, 0.5], [4, 4.5], [1.5, 2], [5.5, 6]]
    # token axis stretched 2 -> 4 rows ([0, 1, 3, 4] per channel / 2 ...), read as (n, t)
    tok = joint_pos_from_image(spatial, 2, "interpolate_spatial")[0]
    stretched = resize_temporal_pos_embed(spatial, 4)
    assert tok.tolist() == stretched[[0, 2, 1, 3]].tolist()
    for mode in ("expand", "interpolate_dim", "interpolate_spatial"):
        torch.testing.assert_close(joint_pos_from_image(spatial, 1, mode)[0], spatial)


def test_resize_joint_pos_embed_matches_the_separate_resizers():
    spatial, temporal = torch.randn(16, 8), torch.randn(3, 8)
    joint = (temporal[:, None] + spatial[None]).reshape(1, 48, 8)
    out = resize_joint_pos_embed(joint, (3, 4, 4), (5, 6, 6))
    s2 = resize_pos_embed_2d(spatial, (6, 6), (4, 4), num_prefix=0)
    t2 = resize_temporal_pos_embed(temporal, 5)
    torch.testing.assert_close(out[0], (t2[:, None] + s2[None]).reshape(180, 8), atol=1e-5, rtol=1e-5)


# ---- checkpoints ------------------------------------------------------------------------------------------
def _randomised(name, **kw):
    model = create_model(name, depth=2, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_plain_video_checkpoint_round_trip(tmp_path):
    src = _randomised("videomamba_li_micro")
    torch.save(src.state_dict(), tmp_path / "k400.pth")
    dst = create_model("videomamba_li_micro", depth=2).eval()
    report = load_videomamba_checkpoint(dst, tmp_path / "k400.pth")
    assert report.load.complete and not report.conversions and not report.head_reinitialised
    x = _clip(b=1, t=8)
    torch.testing.assert_close(dst(x), src(x))


def _image_checkpoint(model, classes=None):
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "temporal_pos_embedding"}
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][:, :, 0]  # 2-D kernel as released
    if classes is not None:
        sd["head.weight"], sd["head.bias"] = torch.randn(classes, sd["head.weight"].shape[1]), torch.zeros(classes)
    return {"model": sd}


def test_wrapped_image_checkpoint_loads_and_matches(tmp_path):
    src = _randomised("videomamba_li_micro")
    with torch.no_grad():
        src.temporal_pos_embedding.zero_()  # what an image checkpoint implies
    torch.save(_image_checkpoint(src), tmp_path / "in1k.pth")
    dst = create_model("videomamba_li_micro", depth=2).eval()
    report = load_videomamba_checkpoint(dst, tmp_path / "in1k.pth")
    assert report.load.complete and any("inflated" in n for n in report.conversions)
    assert any("temporal_pos_embedding" in n for n in report.conversions)
    x = _clip(b=1, t=8)
    torch.testing.assert_close(dst(x), src(x))


def test_other_frames_and_resolution_are_interpolated(tmp_path):
    src = _randomised("videomamba_li_micro")
    torch.save(src.state_dict(), tmp_path / "k400.pth")
    dst = create_model("videomamba_li_micro", depth=2, num_frames=16, image_size=96).eval()
    report = load_videomamba_checkpoint(dst, tmp_path / "k400.pth")
    assert len(report.conversions) == 2
    torch.testing.assert_close(dst.temporal_pos_embedding, resize_temporal_pos_embed(src.temporal_pos_embedding, 16))
    torch.testing.assert_close(dst.pos_embed, resize_pos_embed_2d(src.pos_embed, (12, 12), (8, 8)))
    x = _clip(b=1, t=16, size=96)  # the source model resizes the same way at run time
    torch.testing.assert_close(dst(x), src(x))


def test_head_of_another_class_count(tmp_path):
    src = _randomised("videomamba_li_micro")
    torch.save(_image_checkpoint(src, classes=1000), tmp_path / "in1k.pth")
    dst = create_model("videomamba_li_micro", depth=2)
    with pytest.raises(CheckpointError, match=r"head.*\(1000, 64\).*reinit_head"):
        load_videomamba_checkpoint(dst, tmp_path / "in1k.pth")
    head = dst.head.weight.detach().clone()
    report = load_videomamba_checkpoint(dst, tmp_path / "in1k.pth", reinit_head=True)
    assert report.head_reinitialised and any("head" in n for n in report.conversions)
    torch.testing.assert_close(dst.head.weight, head)
    torch.testing.assert_close(dst.norm_f.weight, src.norm_f.weight)


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("layers.1.mixer.A_b_log"), "missing keys.*layers.1.mixer.A_b_log"),
    (lambda sd: sd.__setitem__("layers.7.norm.weight", torch.ones(64)), "unexpected keys.*layers.7.norm.weight"),
    (lambda sd: sd.__setitem__("norm_f.weight", torch.ones(32)), r"norm_f.weight: \(32,\) vs \(64,\)"),
    (lambda sd: sd.__setitem__("patch_embed.proj.weight", torch.ones(64, 3, 1, 16, 16)), "patch_embed.proj.weight"),
    (lambda sd: sd.pop("temporal_pos_embedding"), "missing keys.*temporal_pos_embedding"),  # video file: required
])
def test_bad_checkpoints_name_the_key(tmp_path, damage, message):
    sd = create_model("videomamba_li_micro", depth=2).state_dict()
    damage(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        load_videomamba_checkpoint(create_model("videomamba_li_micro", depth=2), tmp_path / "bad.pth")


def test_park_from_li_image_checkpoint(tmp_path):
    src = _randomised("videomamba_li_micro")
    torch.save(_image_checkpoint(src), tmp_path / "in1k.pth")
    park = create_model("videomamba_park_micro", depth=2).eval()
    report = load_videomamba_checkpoint(park, tmp_path / "in1k.pth")
    assert report.load.complete
    w2d = src.patch_embed.proj.weight[:, :, 0]
    torch.testing.assert_close(park.patch_embed.proj.weight, torch.stack([w2d, w2d], dim=2) / 2)
    torch.testing.assert_close(park.pos_embed[0], src.pos_embed[0, 1:].repeat(4, 1))  # expand over n_t = 4
    torch.testing.assert_close(park.cls_token, src.cls_token + src.pos_embed[:, :1])
    # a static tubelet through the inflated kernel gives the image response
    frame = torch.randn(1, 3, 64, 64)
    static = frame[:, :, None].expand(1, 3, 2, 64, 64)
    torch.testing.assert_close(park.patch_embed.proj(static)[:, :, 0], src.patch_embed.proj(frame[:, :, None])[:, :, 0],
                               atol=1e-5, rtol=1e-5)
    # and a Park checkpoint of its own loads back 1:1
    torch.save(park.state_dict(), tmp_path / "park.pth")
    again = create_model("videomamba_park_micro", depth=2).eval()
    assert not load_videomamba_checkpoint(again, tmp_path / "park.pth").conversions
    x = _clip(b=1, t=8)
    torch.testing.assert_close(again(x), park(x))


def test_li_tubelet_inflation_is_centre(tmp_path):
    src = _randomised("videomamba_li_micro")
    torch.save(_image_checkpoint(src), tmp_path / "in1k.pth")
    dst = create_model("videomamba_li_micro", depth=2, tubelet=2)
    load_videomamba_checkpoint(dst, tmp_path / "in1k.pth")
    w = dst.patch_embed.proj.weight
    torch.testing.assert_close(w[:, :, 1], src.patch_embed.proj.weight[:, :, 0])
    assert w[:, :, 0].abs().max() == 0


def _masked_pretraining_checkpoint(model, teacher_dim=96):
    """The official masked-pretraining layout (Li §3.4): the encoder, its final norm as ``norm`` (not ``norm_f``),
    the alignment decoder to the CLIP teacher's width, no head; wrapped as their training script saves it."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head.", "norm_f."))}
    d = model.config.embed_dim
    sd |= {"norm.weight": torch.ones(d), "clip_decoder.0.head.weight": torch.randn(teacher_dim, d),
           "clip_decoder.0.head.bias": torch.zeros(teacher_dim), "clip_decoder.0.norm.weight": torch.ones(teacher_dim),
           "clip_decoder.0.norm.bias": torch.zeros(teacher_dim)}
    return {"model": sd, "epoch": 799}


PRETRAIN_ONLY = ["clip_decoder.0.head.bias", "clip_decoder.0.head.weight", "clip_decoder.0.norm.bias",
                 "clip_decoder.0.norm.weight", "norm.weight"]


def test_masked_pretraining_checkpoint_starts_a_fine_tune(tmp_path, caplog):
    from pks4.weights import create_model as build

    src = _randomised("videomamba_li_micro")
    torch.save(_masked_pretraining_checkpoint(src), tmp_path / "mask_pt.pth")
    with caplog.at_level("WARNING", logger="pks4.weights"):
        model = build("videomamba_li_micro", depth=2, num_classes=7, pretrained=str(tmp_path / "mask_pt.pth"))
    warned = [r.getMessage() for r in caplog.records if "masked-pretraining" in r.getMessage()]
    assert len(warned) == 1 and all(k in warned[0] for k in PRETRAIN_ONLY)  # every dropped key listed, once
    got, want = model.state_dict(), src.state_dict()
    encoder = [k for k in want if not k.startswith(("head.", "norm_f."))]
    assert all(torch.equal(got[k], want[k]) for k in encoder)  # the whole encoder, nothing left at random
    assert torch.equal(got["norm_f.weight"], torch.ones(64)) and got["head.weight"].shape == (7, 64)
    report = load_videomamba_checkpoint(create_model("videomamba_li_micro", depth=2), tmp_path / "mask_pt.pth",
                                        reinit_head=True)
    assert report.dropped == PRETRAIN_ONLY and report.head_reinitialised
    assert report.load.missing == ["norm_f.weight", "head.weight", "head.bias"]


def test_masked_pretraining_checkpoint_with_a_broken_encoder_is_refused(tmp_path):
    ckpt = _masked_pretraining_checkpoint(_randomised("videomamba_li_micro"))
    del ckpt["model"]["layers.1.mixer.dt_proj.weight"]
    ckpt["model"]["layers.1.mixer.extra"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "mask_pt.pth")
    with pytest.raises(CheckpointError, match=r"missing keys.*layers.1.mixer.dt_proj.weight.*unexpected keys.*"
                                              r"layers.1.mixer.extra"):
        load_videomamba_checkpoint(create_model("videomamba_li_micro", depth=2), tmp_path / "mask_pt.pth",
                                   reinit_head=True)


# ---- frame-order perturbation (Park Table 1) --------------------------------------------------------------
def test_frame_orders_golden():
    one_based = {"sequential": [1, 2, 3, 4, 5, 6, 7, 8], "blockwise": [5, 6, 7, 8, 1, 2, 3, 4],
                 "pairwise": [1, 2, 7, 8, 5, 6, 3, 4], "interleaved": [1, 8, 2, 7, 3, 6, 4, 5]}
    for mode, order in one_based.items():
        assert frame_order_indices(8, mode) == [i - 1 for i in order]
    assert frame_order_indices(5, "interleaved") == [0, 4, 1, 3, 2]
    assert frame_order_indices(5, "pairwise") == [0, 1, 4, 2, 3]
    assert frame_order_indices(5, "blockwise") == [2, 3, 4, 0, 1]
    for mode in FRAME_ORDERS:
        for t in range(1, 10):
            assert sorted(frame_order_indices(t, mode)) == list(range(t))
    with pytest.raises(ValueError, match="frame order"):
        frame_order_indices(8, "shuffled")


def test_perturb_frame_order_moves_frames():
    clip = torch.arange(8.0).view(1, 8, 1, 1, 1).expand(2, 8, 3, 2, 2)
    out = perturb_frame_order(clip, "interleaved")
    assert out[1, :, 2, 1, 1].tolist() == [0, 7, 1, 6, 2, 5, 3, 4]


# ---- pretraining objectives -------------------------------------------------------------------------------
def test_cosine_alignment_loss_values():
    a = torch.randn(3, 5, 8)
    assert cosine_alignment_loss(a, 2 * a).abs() < 1e-6
    assert torch.isclose(cosine_alignment_loss(a, -a), torch.tensor(4.0))


def test_self_distillation():
    student = create_model("videomamba_li_micro", depth=2, embed_dim=96)
    teacher = create_model("videomamba_li_micro", depth=2, embed_dim=64)
    projector = DistillProjector(96, 64)
    loss, parts = self_distillation_loss(student, projector, teacher, _clip(t=2), torch.tensor([1, 3]))
    loss.backward()
    assert set(parts) == {"ce", "distill"} and 0 < parts["distill"] < 4
    assert student.patch_embed.proj.weight.grad is not None and projector.proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_guided_mask():
    attn = torch.tensor([[[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.15, 0.05]]])  # B=1, T=2, N=4
    keep = attention_guided_mask(attn, mask_ratio=0.5, sample=False)
    assert keep.tolist() == [[0, 2, 3, 5, 7]]  # CLS, frame 0 patches 1 and 2, frame 1 patches 0 and 2
    sampled = attention_guided_mask(torch.rand(3, 4, 16), mask_ratio=0.75)
    assert sampled.shape == (3, 1 + 4 * 4) and (sampled[:, 0] == 0).all()
    assert all(len(set(row.tolist())) == row.numel() for row in sampled)


def test_visible_path_with_every_token_equals_the_full_forward():
    student = MaskedAlignmentStudent(create_model("videomamba_li_micro", depth=3).eval(), teacher_dim=32)
    x = _clip(b=1, t=2)
    tokens, (n_t, gh, gw) = student.model.embed(x)
    hidden, residual = student.model.forward_blocks(tokens, student.model.scan_plans(n_t, gh * gw, x.device), 0, 2)
    keep = torch.arange(tokens.shape[1])[None]
    torch.testing.assert_close(student.forward_visible(x, keep), residual + hidden)
    park_like = MaskedAlignmentStudent(create_model("videomamba_li_micro", depth=2, scan="temporal_reversal"), 32)
    with pytest.raises(ValueError, match="temporal_reversal"):
        park_like.forward_visible(x, keep)


def test_masked_alignment_pretrain_step():
    clip_cfg = CLIPVisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=1, output_dim=32)
    teacher = CLIPVisionTransformer(clip_cfg)
    student = MaskedAlignmentStudent(create_model("videomamba_li_micro", depth=2), teacher_dim=32)
    loss = pretrain_step(student, teacher, _clip(t=2))
    assert 0 < float(loss.detach()) < 4
    loss.backward()
    assert student.decoder.proj.weight.grad is not None and student.model.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ---- recipes ----------------------------------------------------------------------------------------------
def test_recipes_load_and_name_registered_models():
    from pks4.engine.config import load_config
    from pks4.engine.pretrain import load_pretrain_config

    recipes = sorted(CONFIGS.glob("videomamba_*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:  # fine-tuning recipes are run configs; pretraining recipes have their own sections
        cfg = load_pretrain_config(path, []) if "pretrain" in path.name else load_config(path)
        assert cfg.model.name in MODELS, path.name
        assert set(cfg.model.overrides) <= {f.name for f in dataclasses.fields(VideoMambaConfig)}, path.name
