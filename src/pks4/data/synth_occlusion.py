"""Kind ``occlusion``: things going out of sight and coming into view, among several objects.

An object slides behind a wall and is hidden (``hiding``; reversed: ``emerging``), a panel slides over a resting
object (``covering`` / ``uncovering``), a container fills or empties, or an object is lowered onto a block and
rests there (``stacking``; reversed: it rests, then lifts off). Directions of the slides are random (left or
right), so a class is never a direction of motion alone: it is what is visible before and after. A muted texture
lies behind, and one to three distractor shapes drift slowly in random directions.
"""
from __future__ import annotations

import numpy as np

from .synth_scene import JITTER, SHAPES, SynthKind, camera_jitter, finish_frames, muted_background, paint, \
    random_colour, view_grid

PAIRS = (
    ("hide", "hiding", "emerging"),
    ("cover", "covering", "uncovering"),
    ("fill", "filling", "emptying"),
    ("stack", "stacking", "unstacking"),
)


def _panel(frame: np.ndarray, xs: np.ndarray, ys: np.ndarray, box: tuple[float, float, float, float], colour,
           s: float) -> None:
    """A flat panel (x0, x1, y0, y1) with darker horizontal seams every 6 px, drawn in front, in place."""
    x0, x1, y0, y1 = box
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    seam = np.mod(ys, 6 * s) < 1.2 * s
    frame[inside] = np.asarray(colour, dtype=np.float64)
    frame[inside & seam] = 0.6 * np.asarray(colour, dtype=np.float64)


def _path(pair: str, rng: np.random.Generator, size: int, s: float, r: float):
    """(start, end) centre of the moving object, or of the panel's leading edge, for the slide pairs."""
    side = 1.0 if rng.uniform() < 0.5 else -1.0  # +1: the motion runs to the right
    y = float(rng.uniform(r + 2 * s, size - r - 2 * s))
    if pair == "hide":  # ends centred behind a wall near the far side
        end = size / 2 + side * float(rng.uniform(0.15, 0.3)) * size
        start = end - side * float(rng.uniform(0.45, 0.6)) * size
        start = float(np.clip(start, r + s, size - r - s))
        return (start, y), (end, y), side
    x = float(rng.uniform(0.35, 0.65)) * size  # "cover": the object rests; the panel's edge crosses it
    return (x, y), (x, y), side


def render(pair: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Forward clip of ``pair``: hiding, covering, filling or stacking."""
    s, steps = size / 64.0, max(num_frames - 1, 1)
    n = size + 2 * JITTER
    scene = muted_background(int(rng.integers(2**31)), n)
    r = float(rng.uniform(6, 8.5)) * s
    shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng)
    marker = random_colour(rng, val=(0.1, 0.3))
    wall = random_colour(rng, sat=(0.1, 0.4), val=(0.45, 0.7))
    start, end, side = _path(pair, rng, size, s, r)
    wall_half = r + float(rng.uniform(2, 5)) * s
    box_w, box_h = float(rng.uniform(0.35, 0.5)) * size, float(rng.uniform(0.5, 0.7)) * size
    box_x, box_y = (float(rng.uniform(2 * s, size - v - 2 * s)) for v in (box_w, box_h))
    full = float(rng.uniform(0.85, 0.95))
    block = (float(rng.uniform(0.3, 0.7)) * size, float(rng.uniform(0.72, 0.85)) * size)  # base centre (stack)
    rest_at = float(rng.uniform(0.55, 0.7))  # fraction of the clip after which the stacked object rests
    distractors = [(SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng, val=(0.6, 0.9)),
                    float(rng.uniform(3, 5)) * s, rng.uniform(0, size, size=2),
                    rng.uniform(-0.15, 0.15, size=2) * size / steps) for _ in range(int(rng.integers(1, 4)))]
    shake, noise = camera_jitter(rng, num_frames), float(rng.uniform(2, 5))
    out = np.empty((num_frames, size, size, 3))
    for i in range(num_frames):
        a = i / steps
        jx, jy = (int(v) for v in shake[i])
        xs, ys = view_grid(size, (jx, jy))
        frame = scene[JITTER + jy:JITTER + jy + size, JITTER + jx:JITTER + jx + size].copy()
        for d_shape, d_colour, d_r, d_start, d_vel in distractors:
            paint(frame, xs, ys, d_shape, d_colour, d_r, *(d_start + d_vel * i))
        if pair == "hide":
            x = start[0] + (end[0] - start[0]) * a
            paint(frame, xs, ys, shape, colour, r, x, start[1], 0.0, 1.0, marker)
            _panel(frame, xs, ys, (end[0] - wall_half, end[0] + wall_half, -JITTER, size + JITTER), wall, s)
        elif pair == "cover":  # the panel's leading edge runs from the frame border to past the object
            paint(frame, xs, ys, shape, colour, r, start[0], start[1], 0.0, 1.0, marker)
            target = start[0] + side * (r + 3 * s)
            lead = (0.0 if side > 0 else float(size)) + (target - (0.0 if side > 0 else size)) * a
            box = (-size - JITTER, lead, -JITTER, size + JITTER) if side > 0 else (lead, 2 * size, -JITTER, size + JITTER)
            _panel(frame, xs, ys, box, wall, s)
        elif pair == "fill":
            level = box_y + box_h * (1 - full * a)
            _panel(frame, xs, ys, (box_x, box_x + box_w, level, box_y + box_h), colour, s)
            _outline(frame, xs, ys, (box_x, box_x + box_w, box_y, box_y + box_h), wall, 1.5 * s)
        else:  # stack: lowered at constant speed from near the top onto the block, then resting
            _panel(frame, xs, ys, (block[0] - 2 * r, block[0] + 2 * r, block[1], block[1] + 2.5 * r), wall, s)
            top = r + 2 * s
            y = top + (block[1] - r - top) * min(a / rest_at, 1.0)
            paint(frame, xs, ys, shape, colour, r, block[0], y, 0.0, 1.0, marker)
        out[i] = frame
    return finish_frames(out, rng, noise)


def _outline(frame: np.ndarray, xs: np.ndarray, ys: np.ndarray, box: tuple[float, float, float, float], colour,
             width: float) -> None:
    """An open-topped container: left, right and bottom walls of ``width`` px around ``box``, in place."""
    x0, x1, y0, y1 = box
    walls = (((xs >= x0 - width) & (xs < x0)) | ((xs >= x1) & (xs < x1 + width))) & (ys >= y0) & (ys < y1 + width)
    walls |= (xs >= x0 - width) & (xs < x1 + width) & (ys >= y1) & (ys < y1 + width)
    frame[walls] = np.asarray(colour, dtype=np.float64)


KIND = SynthKind(
    name="occlusion",
    description="out of sight and into view: hiding behind a wall, covering, filling, stacking",
    pairs=PAIRS,
    render=render,
)
