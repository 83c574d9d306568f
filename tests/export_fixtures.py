"""Tiny models of every family with trained-like weights, shared by the export tests."""
import torch

from pks4.models.registry import create_model

FRAMES, SIZE = 4, 32
CLIP_TINY = dict(image_size=SIZE, patch_size=8, width=32, heads=2, layers=2, output_dim=32)
VIDEOMAMBA_TINY = dict(image_size=SIZE, depth=2, embed_dim=32, num_frames=FRAMES)
# One tiny model per family (key -> registry name, its arguments, how many scans (directions) its graph must hold
# as loops); the causal PKS4 of live video too, whose KPE and CLS route read past frames only.
FAMILIES = {
    "pks4_vit_tiny": ("pks4_vit_tiny", dict(CLIP_TINY, insert_layer=1), 1),
    "pks4_vit_tiny_causal": ("pks4_vit_tiny", dict(CLIP_TINY, insert_layer=1, causal=True), 1),
    "videomamba_li_micro": ("videomamba_li_micro", VIDEOMAMBA_TINY, 4),
    "videomamba_park_micro": ("videomamba_park_micro", VIDEOMAMBA_TINY, 4),
    "vit_tiny_avgpool": ("vit_tiny_avgpool", CLIP_TINY, 0),
    "vit_tiny_joint": ("vit_tiny_joint", dict(CLIP_TINY, num_frames=FRAMES), 0),
    "stadapter_vit_tiny": ("stadapter_vit_tiny", dict(CLIP_TINY, adapter_dim=16), 0),
}


def trained_like(key: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of one family (a key of FAMILIES) with every weight moved off its initial value: the residual
    branches that start at zero (PKS4's phi and scanner out_proj, ST-Adapter's up projection) would hide what feeds
    them."""
    torch.manual_seed(seed)
    name, arguments, _ = FAMILIES[key]
    model = create_model(name, **{**arguments, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def random_clips(*batches: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"batch {b}": torch.randn(b, FRAMES, 3, SIZE, SIZE, generator=gen) for b in batches}
