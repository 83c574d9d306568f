"""StretchySnake flexible training as the loop uses it: a sampled batch shape becomes the model's token geometry.

The data half (modes, batch sampler, datasets) is tested in test_flex_sampler.py; the model side (token geometry
as a forward argument) in test_geometry.py and test_model_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pks4.data.flex_sampler import FlexConfig, resolve_flex_config, sample_shape
from pks4.layers.geometry import NativeGeometry, TokenGeometry
from pks4.models.base import geometry_for
from pks4.models.registry import create_model

TINY_VIT = dict(width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3)
TINY_VM = dict(embed_dim=32, depth=2)


@pytest.mark.parametrize("name,kw", [("pks4_vit_tiny", TINY_VIT), ("videomamba_li_micro", TINY_VM)])
def test_static_tokens_keeps_the_token_grid(name, kw):
    model = create_model(name, **kw)
    seen = []
    cfg = resolve_flex_config(FlexConfig(mode="static_tokens", frames=(2, 4), sizes=(16, 24, 40, 48)), model)
    assert (cfg.base_patch, cfg.base_size, cfg.native_grid) == (8, 64, 8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        shape = sample_shape(cfg, rng)
        geometry = TokenGeometry(patch=shape.patch, grid=shape.grid, kernel_resize=cfg.kernel_resize)
        with torch.no_grad():
            if name.startswith("pks4"):
                tokens = model.backbone.embed(torch.randn(1, 3, shape.size, shape.size), geometry)
                seen.append(tokens.shape[1] - 1)
            else:
                tokens, grid = model.embed(torch.randn(1, shape.frames, 3, shape.size, shape.size), geometry)
                seen.append(grid[1] * grid[2])
    assert set(seen) == {64}


def test_flex_config_reads_the_models_native_geometry_and_refuses_other_modules():
    model = create_model("videomamba_li_micro", **TINY_VM)
    assert model.native_geometry() == NativeGeometry(frames=8, size=64, patch=8, tubelet=1)
    cfg = resolve_flex_config(FlexConfig(mode="temporal"), model, base_frames=4)
    assert (cfg.base_frames, cfg.base_size, cfg.base_patch, cfg.tubelet) == (4, 64, 8, 1)
    with pytest.raises(TypeError, match="does not implement the video-model contract"):
        geometry_for(torch.nn.Linear(2, 2), 8, 64)
