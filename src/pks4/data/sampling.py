"""Which frames and which crops make a clip: segment (SSV2/TSN) and dense (Kinetics) sampling, test views.

All functions return plain Python ints so the results are easy to golden-test and to log. Indices are always
inside ``[0, num_total)``: when a video has fewer frames than the clip asks for, indices repeat.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ViewSpec",
    "parse_views",
    "segment_indices",
    "dense_indices",
    "spatial_crop_boxes",
    "rng_from_torch",
]


@dataclass(frozen=True)
class ViewSpec:
    """Test views as written in papers: ``frames x clips x crops`` (e.g. PKS4 reports SSV2 at 8x3x1)."""

    frames: int
    clips: int = 1
    crops: int = 1

    def __post_init__(self) -> None:
        if min(self.frames, self.clips, self.crops) < 1:
            raise ValueError(f"ViewSpec needs positive frames/clips/crops, got {self}")

    @property
    def num_views(self) -> int:
        return self.clips * self.crops

    def __str__(self) -> str:
        return f"{self.frames}x{self.clips}x{self.crops}"


def parse_views(text: str) -> ViewSpec:
    """``"8x2x3"`` -> ViewSpec(frames=8, clips=2, crops=3); ``"8"`` and ``"8x2"`` leave the rest at 1."""
    m = re.fullmatch(r"\s*(\d+)(?:\s*[x×*]\s*(\d+))?(?:\s*[x×*]\s*(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse views {text!r}: expected FRAMESxCLIPSxCROPS such as '8x2x3'")
    frames, clips, crops = (int(g) if g else 1 for g in m.groups())
    return ViewSpec(frames, clips, crops)


def rng_from_torch(generator: torch.Generator | None = None) -> np.random.Generator:
    """A NumPy generator seeded from torch's RNG.

    DataLoader workers reseed torch (and ``random``) per worker but not NumPy's global state, so drawing the
    seed from torch keeps workers from sampling identical frames.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


def _check(num_total: int, num_frames: int) -> None:
    if num_total < 1:
        raise ValueError(f"cannot sample from a video with {num_total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def segment_indices(
    num_total: int,
    num_frames: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> list[int]:
    """TSN / SSV2 sampling: split the video into ``num_frames`` equal segments, take one frame from each.

    Segment ``i`` covers ``[floor(i L / T), floor((i+1) L / T))``. Training draws a uniform random frame in
    each segment independently (the "random frame gap" of the PKS4 paper, §4.1); testing takes the frame at
    fraction ``(clip_index + 0.5) / num_clips`` of each segment, so one clip uses the segment centres and
    several clips interleave evenly. With ``L < T`` segments are shorter than a frame and indices repeat.
    """
    _check(num_total, num_frames)
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index {clip_index} outside [0, {num_clips})")
    seg = num_total / num_frames
    if train:
        rng = rng if rng is not None else rng_from_torch()
        out = []
        for i in range(num_frames):
            lo = math.floor(i * seg)
            hi = max(lo + 1, math.floor((i + 1) * seg))
            out.append(int(rng.integers(lo, hi)))
    else:
        frac = (clip_index + 0.5) / num_clips
        out = [math.floor((i + frac) * seg) for i in range(num_frames)]
    return [min(max(i, 0), num_total - 1) for i in out]


def dense_indices(
    num_total: int,
    num_frames: int,
    stride: int,
    *,
    train: bool,
    clip_index: int = 0,
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Kinetics sampling: ``num_frames`` frames ``stride`` apart inside a window of ``num_frames * stride``.

    Training places the window at a uniform random start; testing places ``num_clips`` windows with starts
    ``floor((k + 0.5) * (L - W + 1) / num_clips)`` (evenly spaced, a single clip in the middle). A video
    shorter than the window falls back to segment sampling over the whole video (frames repeat when
    ``L < num_frames``), rather than padding with copies of the last frame.
    """
    _check(num_total, num_frames)
    if stride < 1:
        raise ValueError(f"dense stride must be >= 1, got {stride}")
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index {clip_index} outside [0, {num_clips})")
    window = num_frames * stride
    if num_total < window:
        return segment_indices(num_total, num_frames, train=train, rng=rng, clip_index=clip_index,
                               num_clips=num_clips)
    room = num_total - window + 1  # number of valid start positions
    if train:
        rng = rng if rng is not None else rng_from_torch()
        start = int(rng.integers(0, room))
    else:
        start = math.floor((clip_index + 0.5) * room / num_clips)
    return [start + i * stride for i in range(num_frames)]


def spatial_crop_boxes(
    height: int, width: int, size: int | tuple[int, int], num_crops: int
) -> list[tuple[int, int, int, int]]:
    """``num_crops`` boxes ``(top, left, h, w)`` of ``size`` inside an ``height x width`` frame.

    One crop is the centre; several are spread evenly along the longer side (3 = start, centre, end, the
    usual "3 crops" test protocol), centred along the shorter one.
    """
    ch, cw = (size, size) if isinstance(size, int) else size
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} does not fit in a {height}x{width} frame; resize the short side first")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    centre_top, centre_left = (height - ch) // 2, (width - cw) // 2
    if num_crops == 1:
        return [(centre_top, centre_left, ch, cw)]
    boxes = []
    for k in range(num_crops):
        if height > width:
            boxes.append(((k * (height - ch)) // (num_crops - 1), centre_left, ch, cw))
        else:
            boxes.append((centre_top, (k * (width - cw)) // (num_crops - 1), ch, cw))
    return boxes
