"""Kind ``dynamics``: how a motion unfolds rather than where it goes: speed changes and deformations.

An object starts from rest and speeds up (reversed: it slows down and stops), a disc stretches into a long
ellipse (reversed: it squashes back), a bar grows out of a hub (reversed: it retracts), or a disc splits into two
that move apart (reversed: two merge). Every direction and axis is random, so no class is a direction of motion:
the evidence is the order of "at rest" and "moving", of "round" and "long", of "one" and "two". A muted texture
lies behind, static distractor shapes stand around, and the light flickers from frame to frame.
"""
from __future__ import annotations

import numpy as np

from .synth_scene import JITTER, SHAPES, SynthKind, camera_jitter, finish_frames, muted_background, paint, \
    paint_ellipse, random_colour, view_grid

PAIRS = (
    ("speed", "speeding_up", "slowing_down"),
    ("stretch", "stretching", "squashing"),
    ("extend", "extending", "retracting"),
    ("split", "splitting", "merging"),
)


def _segment(rng: np.random.Generator, size: int, margin: float, length: tuple[float, float]):
    """A start point, unit direction and length (a fraction of ``size`` in ``length``) whose whole segment stays
    ``margin`` px inside the frame; the direction is uniform on the circle."""
    angle = float(rng.uniform(0, 2 * np.pi))
    direction = np.array([np.cos(angle), np.sin(angle)])
    dist = float(rng.uniform(*length)) * size
    lo = margin - np.minimum(direction * dist, 0)
    hi = size - margin - np.maximum(direction * dist, 0)
    start = lo + rng.uniform(0, 1, size=2) * np.maximum(hi - lo, 0)
    return start, direction, dist


def _draw(pair: str, frame: np.ndarray, xs: np.ndarray, ys: np.ndarray, a: float, p: dict) -> None:
    """The moving part of frame at clip fraction ``a`` (0 first frame, 1 last), in place."""
    start, direction, dist, r = p["start"], p["direction"], p["dist"], p["r"]
    if pair == "speed":  # from rest, constant acceleration: distance grows with a^2
        paint(frame, xs, ys, p["shape"], p["colour"], r, *(start + direction * dist * a * a), p["angle"], 1.0,
              p["marker"])
    elif pair == "stretch":  # area kept: one half-axis grows k times while the other shrinks k times
        k = p["aspect"] ** a
        paint_ellipse(frame, xs, ys, p["colour"], *p["centre"], r * k, r / k, p["angle"])
    elif pair == "extend":  # a bar of growing length from a fixed hub
        rel_x, rel_y = xs - start[0], ys - start[1]
        along = rel_x * direction[0] + rel_y * direction[1]
        across = np.abs(-rel_x * direction[1] + rel_y * direction[0])
        frame[(along >= 0) & (along <= dist * a) & (across <= p["thick"])] = np.asarray(p["colour"], float)
        paint(frame, xs, ys, "disc", p["marker"], 1.6 * p["thick"], start[0], start[1])
    else:  # split: two discs of half the area move apart from one point
        for sign in (-1.0, 1.0):
            centre = p["centre"] + sign * direction * 0.5 * p["gap"] * a
            paint(frame, xs, ys, "disc", p["colour"], r / np.sqrt(2), *centre)


def render(pair: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Forward clip of ``pair``: speeding up over 45-65% of the frame, stretching to an aspect of 3-5, a bar
    growing to 40-55% of the frame, or a disc splitting into two 35-50% of the frame apart."""
    s, steps = size / 64.0, max(num_frames - 1, 1)
    r = float(rng.uniform(6, 8.5)) * s
    length = {"speed": (0.45, 0.65), "extend": (0.4, 0.55)}.get(pair, (0.0, 0.0))
    start, direction, dist = _segment(rng, size, r + 2 * s, length)
    p = dict(start=start, direction=direction, dist=dist, r=r, shape=SHAPES[int(rng.integers(len(SHAPES)))],
             colour=random_colour(rng), marker=random_colour(rng, val=(0.1, 0.3)), angle=float(rng.uniform(0, 360)),
             aspect=float(rng.uniform(1.8, 2.2)), thick=float(rng.uniform(2.5, 3.5)) * s,
             gap=float(rng.uniform(0.35, 0.5)) * size)
    reach = max(r * p["aspect"], 0.5 * p["gap"] + r) + 2 * s  # what stretch and split need around their centre
    p["centre"] = rng.uniform(min(reach, size / 2), max(size - reach, size / 2), size=2)
    n = size + 2 * JITTER
    scene = muted_background(int(rng.integers(2**31)), n)
    for _ in range(int(rng.integers(2, 5))):  # static distractors
        paint(scene, *view_grid(n, (-JITTER, -JITTER)), SHAPES[int(rng.integers(len(SHAPES)))],
              random_colour(rng, val=(0.5, 0.8)), float(rng.uniform(2.5, 5)) * s, *rng.uniform(0, size, size=2))
    flicker = 1.0 + rng.normal(0, 0.05, size=num_frames)
    shake, noise = camera_jitter(rng, num_frames), float(rng.uniform(2, 5))
    out = np.empty((num_frames, size, size, 3))
    for i in range(num_frames):
        jx, jy = (int(v) for v in shake[i])
        frame = scene[JITTER + jy:JITTER + jy + size, JITTER + jx:JITTER + jx + size].copy()
        _draw(pair, frame, *view_grid(size, (jx, jy)), i / steps, p)
        out[i] = frame * flicker[i]
    return finish_frames(out, rng, noise)


KIND = SynthKind(
    name="dynamics",
    description="speed changes and deformations: speeding up, stretching, extending, splitting",
    pairs=PAIRS,
    render=render,
)
