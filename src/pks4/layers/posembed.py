"""Resizing of position embeddings and patch-embedding kernels: the one implementation in pks4.

Used by weight loading (a checkpoint trained at another resolution), any-resolution inference, VideoMamba
and StretchySnake flexible training, which "flexes" the patch kernel (its Eq. 4), the spatial position
embedding (Eq. 5) and the temporal one (Eq. 6) by interpolation. Every function is built from
differentiable torch ops, so gradients reach the stored (unresized) weights during flexible training.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "resize_pos_embed_2d",
    "resize_temporal_pos_embed",
    "resize_patch_kernel",
    "inflate_patch_kernel",
    "pi_resize_matrix",
]

_ALIGNABLE = {"linear", "bilinear", "bicubic", "trilinear"}


def _interp_kwargs(mode: str, antialias: bool) -> dict:
    kwargs: dict = {"mode": mode}
    if mode in _ALIGNABLE:
        # align_corners=False treats values as cell centres, which is what a patch grid is.
        kwargs["align_corners"] = False
    if antialias:
        kwargs["antialias"] = True
    return kwargs


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Bicubic weights in bf16/fp16 visibly distort embeddings; interpolate in at least fp32.
    return torch.promote_types(dtype, torch.float32)


def _pair(hw: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(hw, int):
        return hw, hw
    h, w = hw
    return int(h), int(w)


def resize_pos_embed_2d(
    pos: torch.Tensor,
    new_hw: int | tuple[int, int],
    old_hw: tuple[int, int] | None = None,
    num_prefix: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resize a ViT position embedding to a new patch grid (StretchySnake Eq. 5 flexing).

    Args:
        pos: (num_prefix + H*W, D) or (1, num_prefix + H*W, D); prefix rows (CLS, ...) come first and are
            kept as they are; the grid is flattened row-major (spatial index = h * W + w).
        new_hw: target grid (H', W') or a side length.
        old_hw: source grid; inferred as a square when None.
        num_prefix: number of leading non-grid tokens.
        mode: any ``F.interpolate`` mode ("bicubic" as in CLIP/StretchySnake, "bilinear", ...).
        antialias: low-pass when shrinking (bilinear/bicubic only).
    Returns: a tensor of the input's rank and dtype with num_prefix + H'*W' rows.
    """
    if pos.ndim == 3 and pos.shape[0] == 1:
        return resize_pos_embed_2d(pos[0], new_hw, old_hw, num_prefix, mode, antialias).unsqueeze(0)
    if pos.ndim != 2:
        raise ValueError(f"position embedding must be (N, D) or (1, N, D), got shape {tuple(pos.shape)}")
    n_grid = pos.shape[0] - num_prefix
    if old_hw is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(
                f"position embedding of shape {tuple(pos.shape)} with {num_prefix} prefix token(s) has "
                f"{n_grid} grid rows, not a square; pass old_hw"
            )
        old_hw = (side, side)
    oh, ow = _pair(old_hw)
    if oh * ow != n_grid:
        raise ValueError(f"old_hw {(oh, ow)} needs {oh * ow} grid rows, position embedding has {n_grid}")
    nh, nw = _pair(new_hw)
    prefix, grid = pos[:num_prefix], pos[num_prefix:]
    d = pos.shape[1]
    grid = grid.to(_compute_dtype(pos.dtype)).reshape(1, oh, ow, d).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=(nh, nw), **_interp_kwargs(mode, antialias))
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=0)


def resize_temporal_pos_embed(pos: torch.Tensor, new_t: int, mode: str = "linear") -> torch.Tensor:
    """Resize a temporal position embedding (1, T, D) or (T, D) to new_t steps (StretchySnake Eq. 6 flexing,
    1-D linear interpolation)."""
    if pos.ndim == 2:
        return resize_temporal_pos_embed(pos.unsqueeze(0), new_t, mode)[0]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"temporal position embedding must be (1, T, D) or (T, D), got {tuple(pos.shape)}")
    x = pos.to(_compute_dtype(pos.dtype)).transpose(1, 2)  # (1, D, T)
    x = F.interpolate(x, size=int(new_t), **_interp_kwargs(mode, False))
    return x.transpose(1, 2).to(pos.dtype)


@functools.lru_cache(maxsize=64)
def pi_resize_matrix(
    old_hw: tuple[int, int], new_hw: tuple[int, int], input_mode: str = "bilinear", antialias: bool = False
) -> torch.Tensor:
    """The (old_h*old_w, new_h*new_w) float64 matrix M of FlexiViT's PI-resize: w_new = w_flat @ M.

    With R the linear map that resizes an image patch x (``vec(resize(x)) = R vec(x)``), PI-resize picks
    w_new = pinv(R^T) w, the minimum-norm solution of R^T w_new = w. For upsampling R^T has full row rank,
    so <resize(x), w_new> = <x, w> holds exactly for every x; for downsampling it holds in least squares.
    """
    (oh, ow), (nh, nw) = old_hw, new_hw
    basis = torch.eye(oh * ow, dtype=torch.float64).reshape(oh * ow, 1, oh, ow)
    rt = F.interpolate(basis, size=(nh, nw), **_interp_kwargs(input_mode, antialias))  # rows = R^T
    rt = rt.reshape(oh * ow, nh * nw)
    return torch.linalg.pinv(rt).T.contiguous()  # (old, new)


def resize_patch_kernel(
    w: torch.Tensor,
    new_hw: int | tuple[int, int],
    method: str = "bicubic",
    input_mode: str = "bilinear",
    antialias: bool = False,
) -> torch.Tensor:
    """Resize the spatial size of a patch-embedding kernel (StretchySnake Eq. 4 flexing).

    Args:
        w: (D, C, kh, kw) or (D, C, kt, kh, kw); only the last two dims change.
        new_hw: target (kh', kw') or a side length.
        method: "bicubic" (interpolate the kernel like an image, as StretchySnake does) or "pi" (FlexiViT's
            pseudo-inverse resize, which keeps the patch response <x, w> for patches resized by
            ``input_mode``; see ``pi_resize_matrix``).
    """
    if w.ndim not in (4, 5):
        raise ValueError(f"patch kernel must be (D, C, kh, kw) or (D, C, kt, kh, kw), got {tuple(w.shape)}")
    lead, (oh, ow) = w.shape[:-2], w.shape[-2:]
    nh, nw = _pair(new_hw)
    flat = w.reshape(-1, oh, ow).to(_compute_dtype(w.dtype))  # (M, kh, kw)
    if method == "bicubic":
        out = F.interpolate(flat.unsqueeze(0), size=(nh, nw), **_interp_kwargs("bicubic", antialias))[0]
    elif method == "pi":
        m = pi_resize_matrix((oh, ow), (nh, nw), input_mode, antialias).to(device=w.device, dtype=flat.dtype)
        out = flat.reshape(flat.shape[0], oh * ow) @ m
    else:
        raise ValueError(f"unknown kernel resize method {method!r}; expected 'bicubic' or 'pi'")
    return out.reshape(*lead, nh, nw).to(w.dtype)


def inflate_patch_kernel(w2d: torch.Tensor, kt: int, mode: str = "repeat_avg") -> torch.Tensor:
    """Inflate a 2-D patch kernel (D, C, kh, kw) to a 3-D tubelet kernel (D, C, kt, kh, kw).

    "repeat_avg" copies the kernel over time and divides by kt, so a static clip gives the image response;
    "center" puts the kernel on the middle frame (kt // 2) and zeros elsewhere, so the 3-D conv starts as
    the 2-D one applied to that frame.
    """
    if w2d.ndim != 4:
        raise ValueError(f"2-D patch kernel must be (D, C, kh, kw), got {tuple(w2d.shape)}")
    if kt < 1:
        raise ValueError(f"temporal kernel size must be >= 1, got {kt}")
    if mode == "repeat_avg":
        return w2d.unsqueeze(2).expand(-1, -1, kt, -1, -1) / kt
    if mode == "center":
        zeros = torch.zeros_like(w2d).unsqueeze(2)
        parts = [w2d.unsqueeze(2) if t == kt // 2 else zeros for t in range(kt)]
        return torch.cat(parts, dim=2)
    raise ValueError(f"unknown inflation mode {mode!r}; expected 'repeat_avg' or 'center'")
