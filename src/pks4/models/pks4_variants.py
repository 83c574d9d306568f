"""Registered PKS4 variants and their frame-average baselines (PKS4 Table 5's "Baseline").

L/14 inserts the module after block 16 of 24: the paper states block 8 for the 12-block B/16 and Table 6 shows
that the relative depth matters (middle-to-late is best), so the same 2/3 depth is kept for the deeper tower.
The tiny variants (a few million parameters, 64x64 input, 8x8 patches) exist for tests and the CPU demo.
"""
from __future__ import annotations

from dataclasses import replace

from pks4.models.clip_vit import CLIP_VIT_B16, CLIP_VIT_L14, CLIP_VIT_TINY
from pks4.models.pks4 import PKS4Config, PKS4Model
from pks4.models.registry import ModelSpec

TINY_BACKBONE = replace(CLIP_VIT_TINY, image_size=64, patch_size=8, width=128, layers=4, heads=2, output_dim=128)

def _spec(defaults: dict, description: str) -> ModelSpec:
    return ModelSpec(PKS4Model, PKS4Config, defaults, description, checkpoint="clip_tower")


MODELS = {
    "pks4_vit_b16": _spec(dict(backbone=CLIP_VIT_B16, insert_layer=8), "PKS4 on CLIP ViT-B/16, module after block 8"),
    "pks4_vit_l14": _spec(dict(backbone=CLIP_VIT_L14, insert_layer=16),
                          "PKS4 on CLIP ViT-L/14, module after block 16"),
    "pks4_vit_tiny": _spec(dict(backbone=TINY_BACKBONE, insert_layer=2, num_classes=10, context_frames=4,
                                corr_window=5), "tiny PKS4 for tests and the CPU demo"),
    "vit_b16_avgpool": _spec(dict(backbone=CLIP_VIT_B16, use_module=False),
                             "CLIP ViT-B/16 per frame + temporal average pooling"),
    "vit_l14_avgpool": _spec(dict(backbone=CLIP_VIT_L14, use_module=False),
                             "CLIP ViT-L/14 per frame + temporal average pooling"),
    "vit_tiny_avgpool": _spec(dict(backbone=TINY_BACKBONE, use_module=False, num_classes=10),
                              "tiny frame-average baseline"),
}
