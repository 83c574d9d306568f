"""Frame-order perturbation for testing temporal reliance (Park et al. §5.2, Table 1).

A model that treats a video as a bag of frames scores the same on reordered clips; one that reads the
temporal flow degrades as the order is disrupted more. Park et al.'s orders for frames 1..8:

    sequential   1 2 3 4 5 6 7 8
    blockwise    5 6 7 8 1 2 3 4    the two halves swapped
    pairwise     1 2 7 8 5 6 3 4    frames grouped in twos: first pair kept, the other pairs in reverse order
    interleaved  1 8 2 7 3 6 4 5    alternately from the front and from the back

For other lengths the same rules apply: blockwise puts frames [T//2, T) first; pairwise groups (0, 1),
(2, 3), ... (an odd last frame forms its own group); interleaved takes front, back, front, ...
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FRAME_ORDERS", "frame_order_indices", "perturb_frame_order"]

FRAME_ORDERS = ("sequential", "blockwise", "pairwise", "interleaved")


def frame_order_indices(num_frames: int, mode: str) -> list[int]:
    """0-based source frame for each output position, e.g. interleaved with 8 frames -> [0, 7, 1, 6, 2, 5, 3, 4]."""
    if mode not in FRAME_ORDERS:
        raise ValueError(f"unknown frame order {mode!r}; expected one of {FRAME_ORDERS}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames = list(range(num_frames))
    if mode == "sequential":
        return frames
    if mode == "blockwise":
        half = num_frames // 2
        return frames[half:] + frames[:half]
    if mode == "pairwise":
        pairs = [frames[i:i + 2] for i in range(0, num_frames, 2)]
        return [f for pair in pairs[:1] + pairs[:0:-1] for f in pair]
    order, lo, hi = [], 0, num_frames - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order


def perturb_frame_order(clip: Tensor, mode: str) -> Tensor:
    """Reorder the frames (dim 1) of a clip batch (B, T, ...) by ``mode`` (one of FRAME_ORDERS)."""
    if clip.dim() < 2:
        raise ValueError(f"expected a clip batch (B, T, ...), got shape {tuple(clip.shape)}")
    index = torch.tensor(frame_order_indices(clip.shape[1], mode), device=clip.device)
    return clip.index_select(1, index)
