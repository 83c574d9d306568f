"""The text encoder (BERT layout, upper layers cross-attending) and its WordPiece tokenizer, on a tiny BERT."""
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from _text_fixtures import tiny_text_config, tiny_text_folder
from pks4.models.text import TextConfig, TextEncoder, build_vocab, load_tokenizer
from pks4.weights import CheckpointError
from pks4.weights.bert import build_text_encoder, load_bert_weights


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_text_folder(tmp_path_factory.mktemp("text"))


def _hf_config(tok, depth=3, width=32):
    return BertConfig(vocab_size=tok.vocab_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=2,
                      intermediate_size=4 * width, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_id)


# ---- tokenizer ------------------------------------------------------------------------------------------
def test_tokenizer_wraps_captions_in_cls_sep_and_pads_to_the_longest(folder):
    tok = load_tokenizer(folder)
    batch = tok(["A red object moves from left to right", "a dial"], max_len=16)
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert ids[0, 0] == tok.cls_id and ids[1, 0] == tok.cls_id
    n1 = int(mask[1].sum())
    assert ids[1, n1 - 1] == tok.sep_id and (ids[1, n1:] == tok.pad_id).all() and (mask[1, n1:] == 0).all()
    assert mask[0].all() and ids[0, -1] == tok.sep_id  # the longest caption sets the length
    assert tok.unk_id not in ids[0].tolist()  # lowercased words of the corpus are all known
    assert batch.truncated == []


def test_tokenizer_cuts_long_captions_and_says_which(folder):
    tok = load_tokenizer(folder)
    long = "a red object moves from left to right " * 5
    batch = tok(["a dial", long], max_len=8)
    assert batch.input_ids.shape[1] == 8 and batch.truncated == [1]
    assert batch.input_ids[1, -1] == tok.sep_id  # cut, but still closed with [SEP]
    assert tok.count_tokens(long) > 8


def test_empty_caption_is_refused(folder):
    tok = load_tokenizer(folder)
    with pytest.raises(ValueError, match="caption 1 of the batch is empty"):
        tok(["a dial", "   "], max_len=8)


def test_vocabulary_folder_without_vocab_txt(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="text folder not found"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        build_text_encoder(TextConfig(path=str(tmp_path), width=32, depth=3, fusion_layer=2, heads=2))


def test_vocabulary_without_special_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nred\n")
    with pytest.raises(ValueError, match=r"vocab.txt: the vocabulary lacks BERT's special tokens \['\[CLS\]'"):
        load_tokenizer(tmp_path)


def test_build_vocab_holds_every_word_and_splits_unseen_ones(tmp_path):
    texts = ["A red dial turns clockwise", "a blue object fades in"]
    a = build_vocab(texts, tmp_path / "a").read_text()
    assert a == build_vocab(list(reversed(texts)), tmp_path / "b").read_text()  # sorted: order-free
    assert a.splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = load_tokenizer(tmp_path / "a")
    assert tok(["a red dial"], max_len=8).input_ids.shape[1] == 5  # [CLS] + three whole words + [SEP]
    pieces = tok._tok.encode("bird").tokens
    assert pieces[1:-1] == ["b", "##i", "##r", "##d"] and tok.unk_id not in tok._tok.encode("bird").ids


@pytest.mark.parametrize("bad, match", [(dict(fusion_layer=3), "fusion_layer"), (dict(heads=5), "divisible"),
                                        (dict(max_len=2), "max_len")])
def test_config_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        TextConfig(**{**dict(width=32, depth=3, fusion_layer=2, heads=2), **bad})


# ---- encoder --------------------------------------------------------------------------------------------
def test_text_only_layers_equal_hugging_face_bert(folder):
    """The reference: HF's own BertModel over the same weights (its own padding mask) = our lower layers."""
    cfg = tiny_text_config(folder)
    encoder, tok = build_text_encoder(cfg)
    ref = BertModel(_hf_config(tok, depth=cfg.fusion_layer), add_pooling_layer=False).eval()
    ours = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("mlm.", "encoder.layer.2."))}
    missing, unexpected = ref.load_state_dict(ours, strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    batch = tok(["a red dial turns clockwise", "a blue object fades in slowly"], max_len=16)
    got = encoder.eval()(batch.input_ids, batch.attention_mask)
    want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_self_attention_is_bidirectional_and_ignores_padding(folder):
    encoder, tok = build_text_encoder(tiny_text_config(folder))
    encoder.eval()
    short = tok(["a red dial"], max_len=16)
    padded = tok(["a red dial", "a red dial turns clockwise and fades"], max_len=16)
    alone = encoder(short.input_ids, short.attention_mask)
    in_batch = encoder(padded.input_ids, padded.attention_mask)[:1, :alone.shape[1]]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)  # padding never leaks in
    changed = short.input_ids.clone()
    changed[0, -2] = tok._tok.token_to_id("blue")  # the last word
    assert (encoder(changed, short.attention_mask)[0, 0] - alone[0, 0]).abs().max() > 1e-4  # [CLS] sees it


def test_fusion_layers_read_the_visual_tokens_and_learn(folder):
    encoder, tok = build_text_encoder(tiny_text_config(folder))
    encoder.eval()
    batch = tok(["a red dial", "a blue disc"], max_len=16)
    hidden = encoder(batch.input_ids, batch.attention_mask)
    visual = torch.randn(2, 5, 32)
    fused = encoder.fuse(hidden, batch.attention_mask, visual)
    other = encoder.fuse(hidden, batch.attention_mask, visual + 1.0)
    assert fused.shape == hidden.shape and (fused - other).abs().max() > 1e-3
    half = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked_out = visual.clone()
    masked_out[0, 3:] = 100.0  # hidden from the cross-attention: no effect
    torch.testing.assert_close(encoder.fuse(hidden, batch.attention_mask, visual, half)[0],
                               encoder.fuse(hidden, batch.attention_mask, masked_out, half)[0])
    fused.sum().backward()
    assert encoder.encoder.layer[2].crossattention.self.key.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not fit text features"):
        encoder.fuse(hidden, batch.attention_mask, torch.randn(2, 5, 16))


def test_mlm_head_is_tied_to_the_word_embeddings(folder):
    encoder, _ = build_text_encoder(tiny_text_config(folder))
    h = torch.randn(1, 3, 32)
    want = encoder.mlm.transform(h) @ encoder.embeddings.word_embeddings.weight.t() + encoder.mlm.bias
    torch.testing.assert_close(encoder.mlm_logits(h), want)
    encoder.mlm_logits(h).sum().backward()
    assert encoder.embeddings.word_embeddings.weight.grad is not None
    assert sum(p.numel() for p in encoder.parameters()) == sum(v.numel() for k, v in encoder.state_dict().items()
                                                              if "position_ids" not in k and "token_type_ids" not in k)


# ---- BERT folders ----------------------------------------------------------------------------------------
def _saved_bert(folder, tmp_path, width=32):
    tok = load_tokenizer(folder)
    torch.manual_seed(1)
    bert = BertForMaskedLM(_hf_config(tok, width=width)).eval()
    out = tmp_path / f"bert_{width}"
    bert.save_pretrained(out)
    (out / "vocab.txt").write_text((folder / "vocab.txt").read_text())
    return bert, out


def test_bert_folder_fills_every_layer_and_only_cross_attention_is_new(folder, tmp_path):
    bert, path = _saved_bert(folder, tmp_path)
    encoder, tok = build_text_encoder(tiny_text_config(path))
    encoder.eval()
    new = load_bert_weights(encoder, path)  # loading again reports the same gaps
    assert new and all(".crossattention." in k and k.startswith("encoder.layer.2.") for k in new)
    torch.testing.assert_close(encoder.encoder.layer[2].output.dense.weight,
                               bert.bert.encoder.layer[2].output.dense.weight)
    batch = tok(["a red dial turns clockwise"], max_len=16)
    ref = BertModel(_hf_config(tok, depth=2), add_pooling_layer=False).eval()
    ref.load_state_dict({k[len("bert."):]: v for k, v in bert.state_dict().items()
                         if k.startswith("bert.") and not k.startswith("bert.encoder.layer.2.")}, strict=False)
    torch.testing.assert_close(encoder(batch.input_ids, batch.attention_mask),
                               ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state,
                               atol=1e-5, rtol=1e-5)
    h = torch.randn(1, 4, 32)
    torch.testing.assert_close(encoder.mlm_logits(h), bert.cls(h), atol=1e-5, rtol=1e-5)


def test_tf_era_bert_names_load(folder, tmp_path):
    bert, path = _saved_bert(folder, tmp_path)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in bert.state_dict().items()}
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    encoder, _ = build_text_encoder(tiny_text_config(path))
    torch.testing.assert_close(encoder.embeddings.LayerNorm.weight, bert.bert.embeddings.LayerNorm.weight)


def test_checkpoint_of_another_width_names_the_file_and_key(folder, tmp_path):
    _, path = _saved_bert(folder, tmp_path, width=64)
    with pytest.raises(CheckpointError, match=r"config.json: hidden_size is 64, but .* text.width=32"):
        build_text_encoder(tiny_text_config(path))
    (path / "config.json").unlink()  # no config: the tensors themselves give it away
    with pytest.raises(CheckpointError, match=r"model.safetensors: key '[\w.]+' holds \((\d+, )?64,?\), the text "
                                              r"encoder expects \((\d+, )?32,?\) \(text.width 32"):
        build_text_encoder(tiny_text_config(path))


def test_encoder_rejects_mismatched_inputs(folder):
    encoder = TextEncoder(tiny_text_config(folder), vocab_size=300)
    with pytest.raises(ValueError, match="one shape"):
        encoder(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
