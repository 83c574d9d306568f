"""StretchySnake, the model half (pks4.flex): the patch hook and any-size inference (the data half is
test_flex_sampler.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pks4.data.flex_sampler import FlexConfig, FlexShape, resolve_flex_config, sample_shape
from pks4.engine._geometry_bridge import contract_view
from pks4.flex import fit_to_grid, flex_patch, inference_shape, native_geometry, set_patch_size
from pks4.layers.posembed import resize_patch_kernel
from pks4.models.registry import create_model

TINY_VIT = dict(width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3)
TINY_VM = dict(embed_dim=32, depth=2)


def _vit(**kw):
    return create_model("pks4_vit_tiny", **{**TINY_VIT, **kw})


# ---- the patch hook ----------------------------------------------------------------------------------------------
def test_fit_to_grid_crops_and_pads_centrally():
    x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    assert fit_to_grid(x, (2, 2), 4).shape[-2:] == (8, 8)
    assert fit_to_grid(x, (2, 2), 4)[0, 0, 0].tolist() == list(range(1, 9))
    padded = fit_to_grid(x, (3, 3), 4)
    assert padded.shape[-2:] == (12, 12) and padded[0, 0, 0, 0] == 0 and padded[0, 0, 0, -1] == 9


@pytest.mark.parametrize("name,kw", [("pks4_vit_tiny", TINY_VIT), ("videomamba_li_micro", TINY_VM),
                                     ("videomamba_park_micro", TINY_VM)])
def test_native_shape_gives_the_plain_forward(name, kw):
    model = create_model(name, **kw).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with flex_patch(model, inference_shape(model, 4, 32, "native")):
            flexed = model(x)
    torch.testing.assert_close(flexed, plain, rtol=1e-5, atol=1e-5)


def test_flexed_clip_conv_equals_a_conv_with_the_resized_kernel():
    model = _vit().eval()
    x = torch.randn(3, 3, 30, 30)
    with flex_patch(model, FlexShape(1, 30, 6, 5)):
        out = model.backbone.conv1(x)
        assert model.backbone.grid_size(30, 30) == (5, 5)
    ref = torch.nn.functional.conv2d(x, resize_patch_kernel(model.backbone.conv1.weight, 6), stride=6)
    torch.testing.assert_close(out, ref)
    assert "forward" not in vars(model.backbone.conv1)  # the hook is gone after the block


@pytest.mark.parametrize("name,kw,kernel,pos", [
    ("pks4_vit_tiny", TINY_VIT, "backbone.conv1.weight", "backbone.positional_embedding"),
    ("videomamba_li_micro", TINY_VM, "patch_embed.proj.weight", "temporal_pos_embedding"),
    ("videomamba_park_micro", TINY_VM, "patch_embed.proj.weight", "pos_embed"),
])
@pytest.mark.parametrize("method", ["bicubic", "pi"])
def test_gradients_reach_the_stored_kernel_and_position_embeddings(name, kw, kernel, pos, method):
    model = create_model(name, **kw)
    params = dict(model.named_parameters())
    # 24 px at patch 6 -> a 4 x 4 grid (native 8 x 8), 6 frames (native 8): kernel, p_s and p_t all resized
    x = torch.randn(2, 6, 3, 24, 24)
    with flex_patch(model, FlexShape(6, 24, 6, 4), method=method):
        model(x).square().sum().backward()
    assert params[kernel].grad is not None and params[kernel].grad.abs().sum() > 0
    assert params[pos].grad is not None and params[pos].grad.abs().sum() > 0
    assert params[kernel].shape[-1] == 8  # the stored kernel keeps its size


@pytest.mark.parametrize("name,kw", [("pks4_vit_tiny", TINY_VIT), ("videomamba_li_micro", TINY_VM)])
def test_static_tokens_keeps_the_token_grid(name, kw):
    model = create_model(name, **kw)
    seen = []
    cfg = resolve_flex_config(FlexConfig(mode="static_tokens", frames=(2, 4), sizes=(16, 24, 40, 48)),
                              contract_view(model))
    assert (cfg.base_patch, cfg.base_size, cfg.native_grid) == (8, 64, 8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        shape = sample_shape(cfg, rng)
        with torch.no_grad(), flex_patch(model, shape):
            if name.startswith("pks4"):
                tokens = model.backbone.embed(torch.randn(1, 3, shape.size, shape.size))
                seen.append(tokens.shape[1] - 1)
            else:
                tokens, grid = model.embed(torch.randn(1, shape.frames, 3, shape.size, shape.size))
                seen.append(grid[1] * grid[2])
    assert set(seen) == {64}


def test_pi_resize_mode_keeps_patch_responses_when_upsampling():
    # FlexiViT's PI-resize: <resize(x), PI(w)> = <x, w> for every patch x when the kernel grows
    model = _vit()
    w = model.backbone.conv1.weight
    x = torch.randn(5, 3, 8, 8)
    up = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    with torch.no_grad(), flex_patch(model, FlexShape(1, 12, 12, 1), method="pi"):
        flexed = model.backbone.conv1(up).flatten(1)
    torch.testing.assert_close(flexed, torch.nn.functional.conv2d(x, w).flatten(1), rtol=1e-4, atol=1e-4)


def test_one_set_of_weights_runs_at_many_shapes():
    model = _vit().eval()
    outs = []
    for t, h, policy in [(2, 32, "native"), (4, 48, "native"), (8, 64, "static_tokens"), (4, 40, "static_tokens"),
                         (3, 24, 6)]:
        with torch.no_grad(), flex_patch(model, inference_shape(model, t, h, policy)):
            outs.append(model(torch.randn(2, t, 3, h, h)))
    assert all(o.shape == (2, 10) and torch.isfinite(o).all() for o in outs)
    assert inference_shape(model, 8, 96, "static_tokens") == FlexShape(8, 96, 12, 8)
    assert inference_shape(model, 8, 96, "native") == FlexShape(8, 96, 8, 12)


def test_set_patch_size_is_undoable_and_refuses_nesting():
    model = create_model("videomamba_li_micro", **TINY_VM)
    undo = set_patch_size(model, 4)
    with pytest.raises(RuntimeError, match="already set"):
        set_patch_size(model, 6)
    undo()
    assert "embed" not in vars(model)
    assert native_geometry(model) == {"patch": 8, "size": 64, "frames": 8, "tubelet": 1}
    with pytest.raises(TypeError, match="does not know"):
        native_geometry(torch.nn.Linear(2, 2))
