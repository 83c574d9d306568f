"""The video-model contract (pks4.models.base.VideoModel) over every registered model at tiny sizes: shapes,
token geometry honoured (equal to a model re-stored for that geometry), gradients through a flexed patch into
the stored kernel and position embeddings, and geometry under activation checkpointing."""
import copy
import dataclasses

import pytest
import torch

from pks4.layers.geometry import NativeGeometry, TokenGeometry
from pks4.models.base import VideoModel
from pks4.models.clip_vit import CLIPVisionConfig
from pks4.models.registry import get_spec, list_models, model_from_config
from pks4.models.registry import create_model

TINY_TOWER = dict(image_size=32, patch_size=8, width=32, heads=1, layers=2, output_dim=24)
TINY_VM = dict(embed_dim=32, depth=2, image_size=32, patch_size=8)
FRAMES = 4


def tiny(name: str, **kw) -> torch.nn.Module:
    """Registered model ``name`` shrunk to a few thousand parameters (32 px frames, 8 px patches)."""
    fields = {f.name for f in dataclasses.fields(get_spec(name).config_cls)}
    if "backbone" in fields:
        over = dict(backbone=CLIPVisionConfig(**TINY_TOWER), num_frames=FRAMES, num_classes=5)
        over |= {k: v for k, v in dict(insert_layer=1, corr_window=3, adapter_dim=8, freeze_backbone=False).items()
                 if k in fields}
    else:
        over = dict(TINY_VM, num_frames=FRAMES, num_classes=5)
    torch.manual_seed(0)
    return create_model(name, **{**over, **kw})


def _clip(b: int = 2, t: int = FRAMES, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _stored(model) -> tuple[str, list[str]]:
    """The stored patch kernel and position embeddings of a model, by name."""
    names = [n for n, _ in model.named_parameters()]
    kernel = next(n for n in names if n.endswith(("conv1.weight", "patch_embed.proj.weight")))
    pos = [n for n in names if n.endswith(("positional_embedding", "pos_embed", "temporal_pos_embedding",
                                           "temporal_embedding"))]
    return kernel, pos


ALL = list_models()


@pytest.mark.parametrize("name", ALL)
def test_contract_and_shapes(name):
    model = tiny(name).eval()
    assert isinstance(model, VideoModel) and model.model_name == name and model.num_classes == 5
    x = _clip()
    with torch.no_grad():
        logits, feat = model(x), model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feat), logits)
        torch.testing.assert_close(model(x, geometry=TokenGeometry()), logits)  # nothing set: the plain path
    assert logits.shape == (2, 5) and feat.ndim == 2 and feat.shape[0] == 2
    native = model.native_geometry()
    assert (native.frames, native.size, native.patch) == (FRAMES, 32, 8) and native.tubelet in (1, 2)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    assert all(0 <= model.layer_id(n) <= model.num_layers + 1 for n, _ in model.named_parameters())
    assert model.is_new_parameter("head.weight") and not model.is_new_parameter(_stored(model)[0])


@pytest.mark.parametrize("name", ALL)
def test_geometry_equals_a_model_restored_for_it(name):
    """model(x, geometry=(p, g)) at g * p px == the model re-stored (resize) at patch p, size g * p, run plain:
    both resize the kernel and the position embeddings with the same functions, one per call, one in place."""
    model = tiny(name).eval()
    t = 2 * FRAMES  # another clip length too: temporal embeddings follow it
    x = _clip(t=t, size=36)
    restored = copy.deepcopy(model)
    restored.resize(frames=t, size=36, patch=12)
    assert restored.native_geometry() == dataclasses.replace(model.native_geometry(), frames=t, size=36, patch=12)
    with torch.no_grad():
        flexed = model(x, geometry=TokenGeometry(patch=12, grid=3))
        torch.testing.assert_close(restored(x), flexed, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(flexed, model(x[..., 2:34, 2:34]), atol=1e-4)  # the stored patch: another input
    # the re-stored config rebuilds the re-stored model (what a checkpoint of a fine-tune at 36 px holds)
    rebuilt = model_from_config(name, dataclasses.asdict(restored.config)).eval()
    rebuilt.load_state_dict(restored.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), restored(x))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("method", ["bicubic", "pi"])
def test_gradients_reach_the_stored_kernel_and_position_embeddings(name, method):
    model = tiny(name)
    params = dict(model.named_parameters())
    kernel, pos = _stored(model)
    # 24 px at patch 6 -> a 4 x 4 grid (stored 4 x 4 at 8 px), 6 frames (stored 4): kernel, p_s and p_t resized
    model(_clip(t=6, size=24), geometry=TokenGeometry(patch=6, grid=4, kernel_resize=method)).square().sum().backward()
    assert params[kernel].grad is not None and params[kernel].grad.abs().sum() > 0
    assert params[kernel].shape[-1] == 8  # the stored kernel keeps its size
    for name_ in pos:
        assert params[name_].grad is not None and params[name_].grad.abs().sum() > 0, name_


@pytest.mark.parametrize("name", ALL)
def test_geometry_holds_through_checkpoint_recomputation(name):
    """Activation checkpointing re-runs the blocks in the backward pass, outside any context: the gradients
    equal those of the stored-activation run only if the recomputation sees the same token grid."""
    geometry = TokenGeometry(patch=12, grid=3)
    grads = []
    for checkpointing in (False, True):
        model = tiny(name)
        model.set_grad_checkpointing(checkpointing)
        loss = model(_clip(size=36), geometry=geometry).square().sum()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["pks4_vit_tiny", "videomamba_park_micro"])
def test_resize_rejects_bad_values(name):
    model = tiny(name)
    with pytest.raises(ValueError, match="frames=0"):
        model.resize(frames=0)
    with pytest.raises(ValueError, match="multiple of"):
        model.resize(size=36)  # 36 px is no multiple of the stored 8 px patch
    if model.native_geometry().tubelet == 2:
        with pytest.raises(ValueError, match="multiple of the tubelet 2"):
            model.resize(frames=5)
    assert model.native_geometry() == NativeGeometry(FRAMES, 32, 8, model.native_geometry().tubelet)  # unchanged
