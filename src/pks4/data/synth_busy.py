"""Kind ``busy``: a group of objects moving over a busy, moving background, among drifting distractors.

Two or three identical objects (same shape, colour and size, each with an orientation dot) move together: right
or left, down or up, towards or away from the camera (growing or shrinking), or fade in or out. Behind them a
busy procedural texture drifts in a random direction at up to 30% of the group's speed, and one to three
distractor shapes of other colours drift in random directions at up to 30% of it. The drifts are drawn the same
way for every class, so their directions say nothing about the class; only the group's motion does. This is the
setting in which a tiny model trained from scratch separated appearance changes well but barely the direction of
motion over a textured background.
"""
from __future__ import annotations

import numpy as np

from .synth_scene import SHAPES, SynthKind, camera_jitter, finish_frames, paint, random_colour, random_texture, \
    view_grid

PAIRS = (
    ("move_x", "group_moving_right", "group_moving_left"),
    ("move_y", "group_moving_down", "group_moving_up"),
    ("scale", "group_approaching", "group_receding"),
    ("fade", "group_appearing", "group_disappearing"),
)


def _random_velocity(rng: np.random.Generator, speed: float) -> np.ndarray:
    angle = float(rng.uniform(0, 2 * np.pi))
    return speed * float(rng.uniform(0, 1)) * np.array([np.cos(angle), np.sin(angle)])


def _group(rng: np.random.Generator, pair: str, size: int, s: float, travel: float):
    """Start centres (n, 2), end offset (2,), radii at start and end, of the moving group.

    Each member starts anywhere its whole path stays in the frame, at least 2.2 radii from the others where the
    room allows (up to 30 draws each), so the members read as separate objects."""
    n = int(rng.integers(2, 4))
    r0 = r1 = float(rng.uniform(6, 8)) * s
    if pair == "scale":
        r0, r1 = float(rng.uniform(5, 6)) * s, float(rng.uniform(12, 14)) * s
    shift = np.array({"move_x": (travel, 0.0), "move_y": (0.0, travel)}.get(pair, (0.0, 0.0)))
    lo = np.full(2, max(r0, r1) + 2 * s)
    room = np.maximum(size - 2 * lo - shift, 0)
    centres: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(30):
            c = lo + rng.uniform(0, 1, size=2) * room
            if all(np.hypot(*(c - o)) >= 2.2 * r0 for o in centres):
                break
        centres.append(c)
    return np.array(centres), shift, r0, r1


def render(pair: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Forward clip of ``pair``: the group moves right / down across 50-70% of the frame, grows 2-2.8x, or
    fades in from nothing."""
    s, steps = size / 64.0, max(num_frames - 1, 1)
    travel = float(rng.uniform(0.5, 0.7)) * size
    centres, shift, r0, r1 = _group(rng, pair, size, s, travel)
    shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng)
    marker = random_colour(rng, val=(0.1, 0.3))
    spin = float(rng.uniform(0, 360))
    texture = random_texture(rng, s, contrast=float(rng.uniform(14, 22)))
    speed = travel / steps
    drift = _random_velocity(rng, 0.3 * speed)
    distractors = [(SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng), float(rng.uniform(3.5, 6)) * s,
                    rng.uniform(0, size, size=2), _random_velocity(rng, 0.3 * speed))
                   for _ in range(int(rng.integers(1, 4)))]
    shake, noise = camera_jitter(rng, num_frames), float(rng.uniform(2, 5))
    out = np.empty((num_frames, size, size, 3))
    for i in range(num_frames):
        a = i / steps
        xs, ys = view_grid(size, tuple(float(v) for v in shake[i]))
        frame = texture(xs - drift[0] * i, ys - drift[1] * i)
        for d_shape, d_colour, d_r, d_start, d_vel in distractors:
            paint(frame, xs, ys, d_shape, d_colour, d_r, *(d_start + d_vel * i))
        r = r0 * (r1 / r0) ** a  # geometric growth looks like constant approach speed
        alpha = a if pair == "fade" else 1.0
        for cx, cy in centres + shift * a:
            paint(frame, xs, ys, shape, colour, r, cx, cy, spin, alpha, marker)
        out[i] = frame
    return finish_frames(out, rng, noise)


KIND = SynthKind(
    name="busy",
    description="a group of objects over a busy drifting texture among drifting distractors",
    pairs=PAIRS,
    render=render,
    flip_pairs=(("group_moving_right", "group_moving_left"),),
    # 1: objects of radius 4.5-6.5 px on a texture of contrast 20-35 drifting at up to 40%: 54% after 12 epochs;
    # 2: approaching from radius 3.5-4.5 px, where the group is as faint as one fading in: the two pairs mixed up
    version=3,
)
