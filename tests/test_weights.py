"""Checkpoint reading: every CLIP layout built locally, loaded 1:1 and checked against an independent
functional CLIP forward on nn.MultiheadAttention (as OpenAI's code computes it); refusals and errors."""
import dataclasses
import json
import os
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pks4.models.clip_vit import CLIP_VIT_TINY, CLIPVisionTransformer
from pks4.weights import (
    CheckpointError,
    load_pretrained_backbone,
    load_state_dict_strict,
    read_checkpoint_file,
)

CFG = replace(CLIP_VIT_TINY, image_size=32, patch_size=8, layers=2, output_dim=64)  # width 128: 2 heads of 64
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ---- an independent reference of CLIP's vision forward -------------------------------------------------

def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def clip_reference(sd, images, heads, act=_quick_gelu):
    """CLIP VisionTransformer.forward written out on raw OpenAI-named tensors, attention by
    nn.MultiheadAttention in (L, N, D) layout as in OpenAI's code. Returns (ln_post(CLS), embedding)."""
    w = sd["conv1.weight"]
    width, patch = w.shape[0], w.shape[-1]
    ln = lambda x, name: F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)  # noqa: E731
    x = F.conv2d(images, w, stride=patch).reshape(images.shape[0], width, -1).permute(0, 2, 1)
    cls = sd["class_embedding"] + torch.zeros(x.shape[0], 1, width)
    x = ln(torch.cat([cls, x], dim=1) + sd["positional_embedding"], "ln_pre").permute(1, 0, 2)
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(width, heads)
        mha.load_state_dict({k[len(p) + 5:]: v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = ln(x, p + "ln_1")
        x = x + mha(h, h, h, need_weights=False)[0]
        h = act(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    feats = ln(x.permute(1, 0, 2)[:, 0, :], "ln_post")
    return feats, (feats @ sd["proj"] if "proj" in sd else feats)


@pytest.fixture(scope="module")
def vision_sd():
    """Random tiny tower in OpenAI names; LayerNorms perturbed so that a swapped key would show."""
    torch.manual_seed(7)
    sd = CLIPVisionTransformer(CFG).state_dict()
    for k, v in sd.items():
        if "ln" in k or k.endswith("bias"):
            v.copy_(torch.randn_like(v) * 0.1 + (1.0 if k.endswith("weight") else 0.0))
    return {k: v.clone() for k, v in sd.items()}


# ---- writers for every layout -------------------------------------------------------------------------

def _text_tower_keys():
    # a full CLIP file also holds a text tower with the same block names at the top level
    return {"token_embedding.weight": torch.randn(10, 8), "transformer.resblocks.0.attn.in_proj_weight":
            torch.randn(24, 8), "ln_final.weight": torch.ones(8), "text_projection": torch.randn(8, 64),
            "logit_scale": torch.tensor(4.6)}


def _to_hf(sd):
    out = {"embeddings.class_embedding": sd["class_embedding"],
           "embeddings.patch_embedding.weight": sd["conv1.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "pre_layrnorm.weight": sd["ln_pre.weight"], "pre_layrnorm.bias": sd["ln_pre.bias"],
           "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"]}
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(n_layers):
        s, d = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[s + f"attn.in_proj_{kind}"].chunk(3, dim=0)
            out.update({d + f"self_attn.q_proj.{kind}": q, d + f"self_attn.k_proj.{kind}": k,
                        d + f"self_attn.v_proj.{kind}": v,
                        d + f"self_attn.out_proj.{kind}": sd[s + f"attn.out_proj.{kind}"],
                        d + f"layer_norm1.{kind}": sd[s + f"ln_1.{kind}"],
                        d + f"layer_norm2.{kind}": sd[s + f"ln_2.{kind}"],
                        d + f"mlp.fc1.{kind}": sd[s + f"mlp.c_fc.{kind}"],
                        d + f"mlp.fc2.{kind}": sd[s + f"mlp.c_proj.{kind}"]})
    return {k: v.contiguous() for k, v in out.items()}


def _hf_config(path, act="quick_gelu", heads=2):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 128,
                                                  "num_attention_heads": heads, "hidden_act": act,
                                                  "layer_norm_eps": 1e-5}))


def write_openai_state_dict(tmp, sd):
    full = {"visual." + k: v for k, v in sd.items()} | _text_tower_keys()
    full |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    torch.save(full, tmp / "openai.pt")
    return tmp / "openai.pt", {}


class _JitCLIP(nn.Module):
    """Stand-in for OpenAI's released archive: ``visual.*`` + text keys + the JIT-only scalars."""

    def __init__(self, sd):
        super().__init__()
        self.visual = CLIPVisionTransformer(CFG)
        self.visual.load_state_dict(sd)
        self.token_embedding = nn.Embedding(10, 8)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, images):
        return self.visual.encode_image(images) * self.logit_scale.exp()


def write_torchscript(tmp, sd):
    traced = torch.jit.trace(_JitCLIP(sd).eval(), IMAGES, check_trace=False)
    torch.jit.save(traced, str(tmp / "ViT-tiny.pt"))
    return tmp / "ViT-tiny.pt", {}


def write_open_clip_safetensors(tmp, sd):
    save_file({"visual." + k: v.contiguous() for k, v in sd.items()} | _text_tower_keys(),
              str(tmp / "open_clip_model.safetensors"))
    return tmp / "open_clip_model.safetensors", {}


def write_wrapped_ddp(tmp, sd):
    torch.save({"epoch": 3, "state_dict": {"module.visual." + k: v for k, v in sd.items()}}, tmp / "ddp.pth")
    return tmp / "ddp.pth", {}


def write_hf5_vision_model(tmp, sd):
    """transformers 5.x CLIPVisionModel: no prefix, no projection; a config with exact GELU and 4 heads."""
    folder = tmp / "hf5"
    _hf_config(folder, act="gelu", heads=4)
    save_file({k: v for k, v in _to_hf(sd).items()}, str(folder / "model.safetensors"))
    return folder, {"heads": 4, "act": F.gelu, "proj": False}


def write_hf_old_vision_model(tmp, sd):
    """Older CLIPVisionModel .bin: ``vision_model.`` prefix and the position_ids buffer."""
    folder = tmp / "hf_old"
    _hf_config(folder)
    hf = {"vision_model." + k: v for k, v in _to_hf(sd).items()}
    hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(hf, folder / "pytorch_model.bin")
    return folder, {"proj": False}


def write_hf_with_projection(tmp, sd):
    folder = tmp / "hf_proj"
    _hf_config(folder)
    hf = {"vision_model." + k: v for k, v in _to_hf(sd).items()}
    hf["visual_projection.weight"] = sd["proj"].T.contiguous()
    save_file(hf, str(folder / "model.safetensors"))
    return folder, {}


def write_hf_clip_model_file(tmp, sd):
    """A bare full CLIPModel safetensors file (no config next to it): text tower and projections too."""
    hf = {"vision_model." + k: v for k, v in _to_hf(sd).items()}
    hf |= {"visual_projection.weight": sd["proj"].T.contiguous(), "text_projection.weight": torch.randn(64, 8),
           "text_model.embeddings.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6)}
    save_file(hf, str(tmp / "clip.safetensors"))
    return tmp / "clip.safetensors", {}


WRITERS = [write_openai_state_dict, write_torchscript, write_open_clip_safetensors, write_wrapped_ddp,
           write_hf5_vision_model, write_hf_old_vision_model, write_hf_with_projection, write_hf_clip_model_file]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__[len("write_"):])
def test_every_layout_loads_one_to_one_and_equals_clip(tmp_path, vision_sd, writer):
    path, opts = writer(tmp_path, vision_sd)
    model = load_pretrained_backbone(path).eval()
    expected = dict(vision_sd)
    if opts.get("proj") is False:
        expected.pop("proj")
    got = model.state_dict()
    assert set(got) == set(expected)  # 1:1, nothing left at its random initialisation
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert model.cfg.heads == opts.get("heads", 2)
    assert (model.cfg.image_size, model.cfg.patch_size, model.cfg.layers) == (32, 8, 2)
    with torch.no_grad():
        feats, emb = clip_reference(expected, IMAGES, opts.get("heads", 2), opts.get("act", _quick_gelu))
        torch.testing.assert_close(model.forward_features(IMAGES), feats, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_image(IMAGES), emb, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torchscript_archive_output_matches_loaded_tower(tmp_path, vision_sd):
    path, _ = write_torchscript(tmp_path, vision_sd)
    archive = torch.jit.load(str(path))
    model = load_pretrained_backbone(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(archive(IMAGES) / archive.logit_scale.exp(), model.encode_image(IMAGES))


def test_load_at_other_image_size_resizes_position_embedding(tmp_path, vision_sd):
    path, _ = write_open_clip_safetensors(tmp_path, vision_sd)
    native = load_pretrained_backbone(path).eval()
    big = load_pretrained_backbone(path, image_size=48).eval()
    assert big.cfg.image_size == 48 and big.positional_embedding.shape == (1 + 36, 128)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(big.encode_image(x), native.encode_image(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="multiple of patch 8"):
        load_pretrained_backbone(path, image_size=50)


def test_half_precision_openai_file_loads_into_fp32_tower(tmp_path, vision_sd):
    torch.save({"visual." + k: v.half() for k, v in vision_sd.items()}, tmp_path / "fp16.pt")
    model = load_pretrained_backbone(tmp_path / "fp16.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model.conv1.weight, vision_sd["conv1.weight"].half().float(), rtol=0, atol=0)


# ---- refusals and errors ------------------------------------------------------------------------------

def test_wrong_architecture_is_refused_with_its_keys(tmp_path):
    videomamba_like = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
                       "layers.0.mixer.in_proj.weight": torch.zeros(32, 8), "head.weight": torch.zeros(4, 8)}
    torch.save({"model": videomamba_like}, tmp_path / "vm.pth")
    with pytest.raises(CheckpointError, match="not a CLIP vision checkpoint") as err:
        load_pretrained_backbone(tmp_path / "vm.pth")
    assert "cls_token" in str(err.value) and "layers.0.mixer.in_proj.weight" in str(err.value)
    assert str(tmp_path / "vm.pth") in str(err.value)


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, vision_sd):
    sd = {k: v for k, v in vision_sd.items() if k != "ln_post.bias"}
    sd["transformer.resblocks.1.extra_gate"] = torch.zeros(3)
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(256, 128)
    torch.save({"visual." + k: v for k, v in sd.items()}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(tmp_path / "broken.pt")
    msg = str(err.value)
    assert "missing keys" in msg and "ln_post.bias" in msg
    assert "unexpected keys" in msg and "transformer.resblocks.1.extra_gate" in msg
    assert "transformer.resblocks.1.mlp.c_fc.weight: (256, 128) vs (512, 128)" in msg


def test_hf_checkpoint_with_incomplete_qkv_is_refused(tmp_path, vision_sd):
    hf = _to_hf(vision_sd)
    del hf["encoder.layers.1.self_attn.k_proj.bias"]
    save_file(hf, str(tmp_path / "hf.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.self_attn\.k_proj\.bias"):
        load_pretrained_backbone(tmp_path / "hf.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if fmt == "zip":
        torch.save({"model": {"w": torch.zeros(2), "x": _Evil(marker)}}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"w": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        read_checkpoint_file(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_read_checkpoint_file_unwraps_and_reads_legacy_and_sharded(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b": torch.randn(3)}
    torch.save({"model": {"module": {"module." + k: v for k, v in sd.items()}}, "optimizer": {}},
               tmp_path / "nested.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    shard = tmp_path / "sharded"
    shard.mkdir()
    save_file({"a.weight": sd["a.weight"]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({"b": sd["b"]}, str(shard / "model-00002-of-00002.safetensors"))
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    for path in (tmp_path / "nested.pt", tmp_path / "legacy.pt", shard):
        got = read_checkpoint_file(path)
        assert set(got) == set(sd), path
        for k in sd:
            assert torch.equal(got[k], sd[k])


def test_read_checkpoint_file_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint_file(tmp_path / "absent.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="no tensors found; top-level keys: epoch, lr"):
        read_checkpoint_file(tmp_path / "no_tensors.pt")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint_file(tmp_path / "empty_folder")
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_checkpoint_file(tmp_path / "junk.safetensors")


def test_load_state_dict_strict_partial_only_when_allowed(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = model[1].weight.detach().clone()
    sd = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4), "1.weight": torch.ones(5, 4),
          "head.weight": torch.ones(1)}
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, sd, "ckpt.pt")
    msg = str(err.value)
    assert msg.startswith("ckpt.pt: ") and "1.bias" in msg and "head.weight" in msg and "(5, 4) vs (2, 4)" in msg
    with caplog.at_level("WARNING", logger="pks4.weights"):
        report = load_state_dict_strict(model, sd, "ckpt.pt", allow_partial=["1.*", "head.*"])
    assert report.missing == ["1.bias"] and report.unexpected == ["head.weight"]
    assert report.mismatched == [("1.weight", (5, 4), (2, 4))] and not report.complete
    assert "partial load" in caplog.text
    assert torch.equal(model[0].weight, torch.ones(4, 3)) and torch.equal(model[1].weight, before)


# ---- the builder: the checkpoint read first (pks4.weights.create_model) ----------------------------------------

def write_hf_gelu_folder(tmp, sd):
    """transformers' CLIPVisionModelWithProjection of a GELU tower (``hidden_act: gelu``)."""
    folder = tmp / "hf_gelu"
    _hf_config(folder, act="gelu")
    save_file({"vision_model." + k: v for k, v in _to_hf(sd).items()} | {"visual_projection.weight":
              sd["proj"].T.contiguous()}, str(folder / "model.safetensors"))
    return folder


def write_open_clip_laion_folder(tmp, sd):
    """open_clip's hub folder of a LAION-style tower: its config has no ``quick_gelu`` (GELU)."""
    folder = tmp / "open_clip_laion"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
                      "text_cfg": {"context_length": 77, "vocab_size": 10, "width": 8, "heads": 1, "layers": 1}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    torch.save({"visual." + k: v for k, v in sd.items()} | _text_tower_keys(), folder / "open_clip_pytorch_model.bin")
    return folder


GELU_WRITERS = {"hf": write_hf_gelu_folder, "open_clip": write_open_clip_laion_folder}
CLIP = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # (B, T, 3, H, W)


def _tower_alone(sd, act):
    """The reference tower's image embedding of every frame of CLIP: (B, T, D)."""
    with torch.no_grad():
        return clip_reference(sd, CLIP.flatten(0, 1), heads=2, act=act)[1].view(2, 3, -1)


@pytest.mark.parametrize("layout", GELU_WRITERS)
@pytest.mark.parametrize("name", ["pks4_vit_tiny", "vit_tiny_avgpool"])
def test_gelu_tower_loads_into_video_models_with_the_tower_features(tmp_path, vision_sd, layout, name):
    from pks4.weights import create_model

    path = GELU_WRITERS[layout](tmp_path, vision_sd)
    # cls_route="none": with its zero-initialised residuals the PKS4 module starts as the identity (§3.5.2)
    extra = {"cls_route": "none"} if name.startswith("pks4") else {}
    model = create_model(name, pretrained=path, num_classes=3, **extra).eval()
    assert model.config.backbone.quick_gelu is False and model.config.backbone.width == 128
    want = _tower_alone(vision_sd, F.gelu)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.encode_image(CLIP.flatten(0, 1)).view(2, 3, -1), want,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.forward_features(CLIP), want.mean(1), rtol=1e-4, atol=1e-4)
    # What a tower built from the registry config (QuickGELU) gives instead: the bug this guards against.
    wrong = create_model(name, pretrained=path, num_classes=3, quick_gelu=True, force_activation=True, **extra)
    with torch.no_grad():
        assert (wrong.eval().forward_features(CLIP) - want.mean(1)).abs().max() > 1e-3


def test_saved_config_of_a_gelu_model_rebuilds_it(tmp_path, vision_sd):
    from pks4.weights import create_model, model_from_config

    path = write_hf_gelu_folder(tmp_path, vision_sd)
    model = create_model("vit_tiny_avgpool", pretrained=path, num_classes=3).eval()
    saved = dataclasses.asdict(model.config) | {"pretrained": ""}  # as a training checkpoint stores it
    rebuilt = model_from_config("vit_tiny_avgpool", saved).eval()
    rebuilt.load_state_dict(model.state_dict())
    reread = model_from_config("vit_tiny_avgpool", dataclasses.asdict(model.config)).eval()  # names the file
    reread.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(CLIP), model(CLIP))
        torch.testing.assert_close(reread(CLIP), model(CLIP))


def test_requested_tower_options_against_the_checkpoint(tmp_path, vision_sd):
    from pks4.weights import create_model

    gelu = write_hf_gelu_folder(tmp_path, vision_sd)
    with pytest.raises(CheckpointError, match=r"says quick_gelu=False but the model config asks for quick_gelu=True"
                                              r".*force_activation=True") as err:
        create_model("vit_tiny_avgpool", pretrained=gelu, quick_gelu=True)
    assert str(gelu) in str(err.value)
    forced = create_model("vit_tiny_avgpool", pretrained=gelu, quick_gelu=True, force_activation=True)
    assert forced.config.backbone.quick_gelu is True
    with pytest.raises(CheckpointError, match=r"width=64 \(the checkpoint's tensors give 128\)"):
        create_model("vit_tiny_avgpool", pretrained=gelu, width=64, heads=1)
    # a bare state dict states no activation: the request decides, QuickGELU (OpenAI's) otherwise
    bare, _ = write_open_clip_safetensors(tmp_path, vision_sd)
    assert create_model("vit_tiny_avgpool", pretrained=bare).config.backbone.quick_gelu is True
    assert create_model("vit_tiny_avgpool", pretrained=bare, quick_gelu=False).config.backbone.quick_gelu is False
    # another frame size is honoured by resizing the position embedding once; training options pass through
    big = create_model("vit_tiny_joint", pretrained=bare, image_size=48, drop_path=0.1)
    assert big.config.backbone.image_size == 48 and big.backbone.positional_embedding.shape == (37, 128)
    assert big.config.backbone.drop_path == 0.1


def test_pretrained_is_only_read_by_the_builder(tmp_path, vision_sd):
    import pks4
    from pks4.models import registry

    path = write_hf_gelu_folder(tmp_path, vision_sd)
    with pytest.raises(ValueError, match="read by pks4.weights.create_model"):
        registry.create_model("vit_tiny_avgpool", pretrained=str(path))
    with pytest.raises(ValueError, match="read by pks4.weights.create_model"):
        registry.model_from_config("vit_tiny_avgpool", {"pretrained": str(path)})
    with pytest.raises(CheckpointError, match="no such file"):
        pks4.create_model("pks4_vit_tiny", pretrained=tmp_path / "absent.pt")


def test_tower_files_that_say_something_wrong_are_named(tmp_path, vision_sd):
    folder = tmp_path / "hf_tanh"
    _hf_config(folder, act="gelu_new")
    save_file(_to_hf(vision_sd), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="hidden_act='gelu_new'") as err:
        load_pretrained_backbone(folder)
    assert str(folder) in str(err.value)
    oc = write_open_clip_laion_folder(tmp_path, vision_sd)
    (oc / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(CheckpointError, match=r"open_clip_config.json: expected a 'model_cfg' object"):
        load_pretrained_backbone(oc)
    (oc / "open_clip_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"open_clip_config.json: invalid JSON"):
        load_pretrained_backbone(oc)
