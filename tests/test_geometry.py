"""Token geometry (pks4.layers.geometry) and the policies that choose one (pks4.models.base.geometry_for)."""
import pytest
import torch
import torch.nn.functional as F

from pks4.layers.geometry import NativeGeometry, TokenGeometry, fit_to_grid, patch_embed, token_grid
from pks4.layers.posembed import resize_patch_kernel
from pks4.models.base import AtGeometry, at_geometry, geometry_for
from pks4.models.registry import create_model

TINY_VIT = dict(width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3)
TINY_VM = dict(embed_dim=32, depth=2)


def _vit(**kw):
    return create_model("pks4_vit_tiny", **{**TINY_VIT, **kw})


# ---- the pieces ------------------------------------------------------------------------------------------------
def test_fit_to_grid_crops_and_pads_centrally():
    x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    assert fit_to_grid(x, (2, 2), 4).shape[-2:] == (8, 8)
    assert fit_to_grid(x, (2, 2), 4)[0, 0, 0].tolist() == list(range(1, 9))
    padded = fit_to_grid(x, (3, 3), 4)
    assert padded.shape[-2:] == (12, 12) and padded[0, 0, 0, 0] == 0 and padded[0, 0, 0, -1] == 9


def test_token_grid_keeps_the_aspect_along_the_shorter_side():
    assert token_grid(48, 64, 8) == (6, 8)  # floor(side / p)
    assert token_grid(30, 30, 8) == (3, 3)
    assert token_grid(48, 96, 12, grid=4) == (4, 8)  # 4 along the shorter side, the aspect kept
    assert token_grid(96, 48, 12, grid=4) == (8, 4)
    with pytest.raises(ValueError, match="smaller than the patch size 16"):
        token_grid(8, 32, 16)


@pytest.mark.parametrize("method", ["bicubic", "pi"])
def test_patch_embed_is_a_conv_with_the_resized_kernel(method):
    torch.manual_seed(0)
    w2, b = torch.randn(5, 3, 8, 8), torch.randn(5)
    x = torch.randn(2, 3, 30, 30)
    out = patch_embed(x, w2, b, 6, (5, 5), method)
    torch.testing.assert_close(out, F.conv2d(x, resize_patch_kernel(w2, 6, method), b, stride=6))
    # a tubelet kernel: temporal stride = its depth, the frames fitted to the grid first
    w3 = torch.randn(5, 3, 2, 8, 8)
    clip = torch.randn(1, 3, 4, 26, 26)
    out3 = patch_embed(clip, w3, None, 6, (4, 4), method)
    ref = F.conv3d(clip[..., 1:25, 1:25], resize_patch_kernel(w3, 6, method), stride=(2, 6, 6))
    assert out3.shape == (1, 5, 2, 4, 4)
    torch.testing.assert_close(out3, ref)
    assert patch_embed(x[..., :24, :24], w2, b, 8, (3, 3)).shape == (2, 5, 3, 3)  # stored size: plain conv


def test_pi_resize_keeps_patch_responses_when_upsampling():
    # FlexiViT's PI-resize: <resize(x), PI(w)> = <x, w> for every patch x when the kernel grows
    model = _vit()
    w = model.backbone.conv1.weight
    geometry = TokenGeometry(patch=12, grid=1, kernel_resize="pi")
    x = torch.randn(5, 3, 8, 8)
    up = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    with torch.no_grad():
        patch, grid = model.backbone.token_layout(12, 12, geometry)
        flexed = patch_embed(up, w, None, patch, grid, geometry.kernel_resize).flatten(1)
    torch.testing.assert_close(flexed, F.conv2d(x, w).flatten(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(patch=0), "patch=0"), (dict(grid=-2), "grid=-2"), (dict(patch=2.5), "patch=2.5"),
    (dict(patch=True), "patch=True"), (dict(kernel_resize="nearest"), "kernel_resize='nearest'"),
])
def test_token_geometry_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        TokenGeometry(**bad)


def test_token_geometry_and_native_geometry_basics():
    import numpy as np

    g = TokenGeometry(patch=np.int64(12), grid=np.int64(4))
    assert type(g.patch) is int and g == TokenGeometry(12, 4) and not g.is_plain
    assert TokenGeometry().is_plain and TokenGeometry().layout(48, 64, 8) == (8, (6, 8))
    assert TokenGeometry(grid=4).layout(48, 48, 8) == (8, (4, 4))
    assert NativeGeometry(frames=8, size=224, patch=16).grid == 14


# ---- the CLIP tower's embedding ------------------------------------------------------------------------------------
def test_clip_tower_embeds_with_the_flexed_kernel_and_position_embedding():
    tower = _vit().backbone.eval()
    geometry = TokenGeometry(patch=6, grid=5)
    x = torch.randn(3, 3, 30, 30)
    assert tower.grid_size(30, 30, geometry) == (5, 5)
    with torch.no_grad():
        tokens = tower.embed(x, geometry)
        patches = F.conv2d(x, resize_patch_kernel(tower.conv1.weight, 6), stride=6).flatten(2).transpose(1, 2)
        want = torch.cat([tower.class_embedding.expand(3, 1, -1), patches], 1) + tower.pos_embed_for((5, 5))
    torch.testing.assert_close(tokens, tower.ln_pre(want))
    assert tower.grid_size(32, 32) == (4, 4)  # nothing stays set: the next plain call is the stored patch
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tower.embed(x)


# ---- policies ------------------------------------------------------------------------------------------------------
def test_geometry_for_every_policy():
    model = _vit()  # stored: 64 px, patch 8, an 8 x 8 grid
    assert geometry_for(model, 8, 96, "static_tokens") == TokenGeometry(patch=12, grid=8)
    assert geometry_for(model, 8, 96, "native") == TokenGeometry(patch=8, grid=12)
    assert geometry_for(model, 8, 96, 16) == geometry_for(model, 8, 96, "16") == TokenGeometry(patch=16, grid=6)
    assert geometry_for(model, 8, 96, "native", kernel_resize="pi").kernel_resize == "pi"
    park = create_model("videomamba_park_micro", **TINY_VM)
    assert geometry_for(park, 4, 32, "native") == TokenGeometry(patch=8, grid=4)


def test_geometry_for_bad_inputs_name_what_is_wrong():
    model = _vit()
    with pytest.raises(ValueError, match="patch policy 'bogus'"):
        geometry_for(model, 8, 64, "bogus")
    with pytest.raises(ValueError, match="patch size 80 must be between 1 and the frame size 64"):
        geometry_for(model, 8, 64, 80)
    with pytest.raises(ValueError, match="frames=3: expected a positive multiple of the tubelet 2"):
        geometry_for(create_model("videomamba_park_micro", **TINY_VM), 3, 64)
    with pytest.raises(TypeError, match="Linear does not implement the video-model contract"):
        geometry_for(torch.nn.Linear(2, 2), 8, 64)


def test_one_set_of_weights_runs_at_many_shapes():
    model = _vit().eval()
    outs = []
    for t, h, policy in [(2, 32, "native"), (4, 48, "native"), (8, 64, "static_tokens"), (4, 40, "static_tokens"),
                         (3, 24, 6)]:
        with torch.no_grad():
            outs.append(model(torch.randn(2, t, 3, h, h), geometry=geometry_for(model, t, h, policy)))
    assert all(o.shape == (2, 10) and torch.isfinite(o).all() for o in outs)


def test_at_geometry_passes_the_geometry_on_every_call():
    model = _vit().eval()
    geometry = TokenGeometry(patch=12, grid=4)
    view = at_geometry(model, geometry)
    assert isinstance(view, AtGeometry) and at_geometry(model, None) is model
    assert view.num_classes == model.num_classes and next(view.parameters()) is next(model.parameters())
    x = torch.randn(1, 2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x, geometry=geometry))
        torch.testing.assert_close(view.forward_features(x), model.forward_features(x, geometry=geometry))
    view.train()
    assert model.training
