"""Token geometry: how a batch of frames becomes tokens, passed to a model's ``forward`` as an argument.

StretchySnake (its §4.2) runs one set of weights at many clip shapes: the patch size p and the token grid change
from batch to batch while the stored patch kernel and position embeddings keep their shapes. A
:class:`TokenGeometry` names the patch size and grid of one forward pass; the embedding then

* fits each frame to the grid (:func:`fit_to_grid`: centre-crop, or edge-pad, to grid * p pixels),
* convolves it with the stored kernel resized to p x p (Eq. 4, :func:`pks4.layers.posembed.resize_patch_kernel`),
* and the model adds its position embeddings resized to the token grid (Eq. 5-6).

Everything is plain differentiable tensor code, so the stored weights train through the resize, and since the
geometry travels as an argument (never as state on a module) it also holds when activation checkpointing
recomputes a block in the backward pass. :class:`NativeGeometry` is what a model's weights are stored for.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from pks4.layers.posembed import resize_patch_kernel

__all__ = ["KERNEL_RESIZES", "TokenGeometry", "NativeGeometry", "token_grid", "fit_to_grid", "patch_embed"]

KERNEL_RESIZES = ("bicubic", "pi")


@dataclass(frozen=True)
class TokenGeometry:
    """How a batch of frames becomes tokens, passed to the model's forward as an argument.

    ``TokenGeometry()`` (neither patch nor grid set) is the model's plain embedding, which needs frames whose
    sides are multiples of the stored patch size.
    """

    patch: int | None = None  # embed with patch x patch patches (None: the model's stored patch size)
    grid: int | None = None  # tokens along the shorter frame side (None: floor(side / patch));
    # frames are centre-cropped / edge-padded to grid * patch
    kernel_resize: str = "bicubic"  # "bicubic" (StretchySnake Eq. 4) | "pi" (FlexiViT pseudo-inverse)

    def __post_init__(self) -> None:
        for name in ("patch", "grid"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"TokenGeometry.{name}={value!r}; expected a positive int or None")
            object.__setattr__(self, name, int(value))  # numpy integers from a sampler become plain ints
        if self.kernel_resize not in KERNEL_RESIZES:
            raise ValueError(f"TokenGeometry.kernel_resize={self.kernel_resize!r}; expected one of {KERNEL_RESIZES}")

    @property
    def is_plain(self) -> bool:
        """True when nothing is set: the stored patch size, the grid the frame size gives."""
        return self.patch is None and self.grid is None

    def layout(self, height: int, width: int, stored_patch: int) -> tuple[int, tuple[int, int]]:
        """(patch, (gh, gw)) for a height x width frame and a model whose kernel is stored_patch wide."""
        patch = self.patch or stored_patch
        return patch, token_grid(height, width, patch, self.grid)


@dataclass(frozen=True)
class NativeGeometry:
    """What a model's weights are stored for."""

    frames: int
    size: int
    patch: int
    tubelet: int = 1

    @property
    def grid(self) -> int:
        """Tokens along a side at the stored size and patch."""
        return self.size // self.patch


def token_grid(h: int, w: int, patch: int, grid: int | None = None) -> tuple[int, int]:
    """Token grid (gh, gw) of an h x w frame: ``grid`` along the shorter side (aspect kept), else floor(side / p)."""
    if grid is None:
        if min(h, w) < patch:
            raise ValueError(f"frame {h}x{w} is smaller than the patch size {patch}")
        return h // patch, w // patch
    if h <= w:
        return grid, max(1, int(round(grid * w / h)))
    return max(1, int(round(grid * h / w))), grid


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


def patch_embed(x: Tensor, weight: Tensor, bias: Tensor | None, patch: int, grid_hw: tuple[int, int],
                kernel_resize: str = "bicubic") -> Tensor:
    """Patch embedding at any patch size (StretchySnake Eq. 4): the stored kernel resized to ``patch``.

    Args:
        x: images (N, C, H, W) for a 2-D kernel (D, C, p0, p0), or clips (B, C, T, H, W) for a tubelet kernel
            (D, C, kt, p0, p0), whose temporal stride is kt.
        grid_hw: the token grid; the frames are fitted to grid * patch pixels first.
    Returns:
        (N, D, gh, gw) or (B, D, T / kt, gh, gw).
    """
    if weight.shape[-1] != patch:
        weight = resize_patch_kernel(weight, patch, kernel_resize)
    x = fit_to_grid(x, grid_hw, patch).to(weight.dtype)
    if weight.ndim == 4:
        return F.conv2d(x, weight, bias, stride=patch)
    return F.conv3d(x, weight, bias, stride=(weight.shape[2], patch, patch))
