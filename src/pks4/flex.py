"""StretchySnake, the model half: any-size inference and the patch hook of flexible training (its section 4.2).

The data half (modes, shape sampling, the batch sampler, datasets at a sampled shape) is
:mod:`pks4.data.flex_sampler`. Here a model is made to embed a batch with its sampled patch size and token grid,
differentiably, through :mod:`pks4.layers.posembed` (so the stored weights train through the resize):

* the patch-embedding kernel w (Eq. 4): bicubic resize (the paper) or FlexiViT's pseudo-inverse resize;
* the spatial position embedding p_s (Eq. 5): bicubic, done by the models themselves for any token grid;
* the temporal position embedding p_t (Eq. 6): linear, done by the models themselves for any T.

Pieces: :func:`flex_patch` / :func:`set_patch_size` (the model embeds with the batch's patch size and token
grid) and :func:`inference_shape` (the shape to evaluate a checkpoint at any (T, H) with).

The patch hook changes no model file and no parameter name: it shadows a few bound methods on the model
instance (``conv1.forward`` and ``grid_size`` of a CLIP tower; ``embed`` of VideoMamba) and removes them on
exit, so checkpoints, ``state_dict`` and DDP see the same module tree. It takes the model itself, never a
DistributedDataParallel wrapper.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from pks4.data.flex_sampler import FlexShape, _patch_shape, static_token_patch
from pks4.layers.posembed import resize_patch_kernel

__all__ = ["PATCH_POLICIES", "native_geometry", "flex_patch", "set_patch_size", "inference_shape", "fit_to_grid"]

PATCH_POLICIES = ("native", "static_tokens")


# ---- the model's native geometry ------------------------------------------------------------------------------
def _clip_tower(model: nn.Module) -> nn.Module | None:
    from pks4.models.clip_vit import CLIPVisionTransformer

    if isinstance(model, CLIPVisionTransformer):
        return model
    tower = getattr(model, "backbone", None)
    return tower if isinstance(tower, CLIPVisionTransformer) else None


def _videomamba(model: nn.Module) -> nn.Module | None:
    try:
        from pks4.models.videomamba import VideoMamba
    except ImportError:  # a build without VideoMamba
        return None
    return model if isinstance(model, VideoMamba) else None


def native_geometry(model: nn.Module) -> dict[str, int]:
    """``{"patch", "size", "frames", "tubelet"}`` the model's weights are stored for."""
    tower, vm = _clip_tower(model), _videomamba(model)
    if tower is not None:
        frames = int(getattr(getattr(model, "config", None), "num_frames", 8))
        return {"patch": tower.cfg.patch_size, "size": tower.cfg.image_size, "frames": frames, "tubelet": 1}
    if vm is not None:
        c = vm.config
        return {"patch": c.patch_size, "size": c.image_size, "frames": c.num_frames, "tubelet": c.tubelet}
    raise TypeError(f"flexible patch embedding does not know {type(model).__name__}: expected a CLIP-tower "
                    f"model (attribute .backbone) or VideoMamba")


# ---- the patch hook ---------------------------------------------------------------------------------------------
def fit_to_grid(x: Tensor, grid_hw: tuple[int, int], patch: int) -> Tensor:
    """Centre-crop or edge-pad the last two dims of ``x`` to (gh * patch, gw * patch)."""
    th, tw = grid_hw[0] * patch, grid_hw[1] * patch
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    top, left = (h - th) // 2, (w - tw) // 2
    if th <= h and tw <= w:
        return x[..., top:top + th, left:left + tw]
    lead = x.shape[:-2]
    pads = (max(0, -left), max(0, tw - w + max(0, -left)), max(0, -top), max(0, th - h + max(0, -top)))
    x = F.pad(x.reshape(-1, 1, h, w), pads, mode="replicate").reshape(*lead, h + pads[2] + pads[3], -1)
    return fit_to_grid(x, grid_hw, patch)  # pad done; crop whatever dimension was too large


def _grid_for(h: int, w: int, patch: int, grid: int | None) -> tuple[int, int]:
    """Token grid of an h x w frame: ``grid`` along the shorter side (aspect kept), else floor(side / patch)."""
    if grid is None:
        if min(h, w) < patch:
            raise ValueError(f"frame {h}x{w} is smaller than the patch size {patch}")
        return h // patch, w // patch
    if h <= w:
        return grid, max(1, int(round(grid * w / h)))
    return max(1, int(round(grid * h / w))), grid


def _install_clip(tower: nn.Module, patch: int, grid: int | None, method: str) -> Callable[[], None]:
    """Shadow the CLIP tower's ``conv1.forward`` and ``grid_size``: the rest of ``embed`` (CLS, bicubic
    position embedding for the grid, ln_pre) and every model built on the tower run unchanged."""
    conv, native = tower.conv1, tower.cfg.patch_size

    def conv_forward(images: Tensor) -> Tensor:
        gh, gw = _grid_for(images.shape[-2], images.shape[-1], patch, grid)
        w = conv.weight if patch == native else resize_patch_kernel(conv.weight, patch, method)
        return F.conv2d(fit_to_grid(images, (gh, gw), patch), w, conv.bias, stride=patch)  # Eq. 4, flexed kernel

    def grid_size(height: int, width: int) -> tuple[int, int]:
        return _grid_for(height, width, patch, grid)

    conv.forward, tower.grid_size = conv_forward, grid_size

    def undo() -> None:
        del conv.forward, tower.grid_size

    return undo


def _install_videomamba(vm: nn.Module, patch: int, grid: int | None, method: str) -> Callable[[], None]:
    """Shadow VideoMamba's ``embed``: tubelet Conv3d with a flexed kernel, then the model's own position
    embeddings for the resulting (n_t, h, w) grid (bicubic p_s, linear p_t, or Park's joint embedding)."""
    c = vm.config
    proj = vm.patch_embed.proj

    def embed(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 5 or x.shape[2] != c.in_chans or x.shape[1] % c.tubelet:
            raise ValueError(f"{vm.model_name} expects clips (B, T, {c.in_chans}, H, W) with T divisible by the "
                             f"tubelet {c.tubelet}, got {tuple(x.shape)}")
        gh, gw = _grid_for(x.shape[-2], x.shape[-1], patch, grid)
        w = proj.weight if patch == c.patch_size else resize_patch_kernel(proj.weight, patch, method)
        clip = fit_to_grid(x, (gh, gw), patch).transpose(1, 2).to(w.dtype)  # (B, C, T, H, W)
        tokens = F.conv3d(clip, w, proj.bias, stride=(c.tubelet, patch, patch))  # (B, D, n_t, h, w)
        n_t = tokens.shape[2]
        tokens = tokens.flatten(2).transpose(1, 2)  # 'b d t h w -> b (t h w) d', spatial-first
        return vm.with_positions_and_cls(tokens, n_t, (gh, gw)), (n_t, gh, gw)

    vm.embed = embed

    def undo() -> None:
        del vm.embed

    return undo


def set_patch_size(model: nn.Module, patch: int | None, grid: int | None = None, method: str = "bicubic"
                   ) -> Callable[[], None]:
    """Make ``model`` embed with ``patch`` x ``patch`` patches until the returned ``undo()`` is called.

    ``grid`` fixes the token grid along the shorter frame side (static tokens); None takes floor(H / patch).
    ``patch=None`` with ``grid=None`` changes nothing. Returns the undo function.
    """
    if patch is None and grid is None:
        return lambda: None
    geo = native_geometry(model)
    patch = geo["patch"] if patch is None else int(patch)
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    tower, vm = _clip_tower(model), _videomamba(model)
    if tower is not None:
        if "forward" in vars(tower.conv1):
            raise RuntimeError("a patch size is already set on this model; undo it first")
        return _install_clip(tower, patch, grid, method)
    if "embed" in vars(vm):
        raise RuntimeError("a patch size is already set on this model; undo it first")
    return _install_videomamba(vm, patch, grid, method)


@contextlib.contextmanager
def flex_patch(model: nn.Module, shape: FlexShape | int | None, method: str = "bicubic") -> Iterator[nn.Module]:
    """``with flex_patch(model, batch["shape"]): logits = model(video)``.

    ``shape``: a :class:`FlexShape` (its patch and grid are used), a patch size, or None (no change).
    The resize runs inside the forward, so gradients reach the stored kernel and position embeddings.
    """
    if isinstance(shape, FlexShape):
        undo = set_patch_size(model, shape.patch, shape.grid, method)
    else:
        undo = set_patch_size(model, shape, None, method)
    try:
        yield model
    finally:
        undo()


def inference_shape(model: nn.Module, frames: int, size: int, policy: str | int = "native") -> FlexShape:
    """The shape to run ``model`` at on frames x size x size clips.

    ``policy``: "native" keeps the stored patch size (the grid follows the size; the paper's evaluation
    protocol), "static_tokens" flexes the patch to keep the native grid (how static-tokens training sees
    every size), or an int patch size.
    """
    geo = native_geometry(model)
    if isinstance(policy, int) or (isinstance(policy, str) and policy.isdigit()):
        p = int(policy)
        return FlexShape(frames, size, *_patch_shape(size, p))
    if policy == "native":
        return FlexShape(frames, size, *_patch_shape(size, geo["patch"]))
    if policy == "static_tokens":
        return static_token_patch(size, geo["size"] // geo["patch"])._replace(frames=frames)
    raise ValueError(f"patch policy {policy!r}; expected one of {PATCH_POLICIES} or a patch size")

