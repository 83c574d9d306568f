"""Kind ``sweep``: the whole frame changes, as under a moving camera or changing light.

A busy procedural texture with a few solid shapes fixed on it fills the frame; the class is what happens to the
whole view: it slides right or left (``sweeping_*``), down or up, zooms in or out about a random point, brightens
or darkens, or a second scene is wiped in from the left or the right. There is no foreground object to track:
every patch carries the same evidence, and the texture is as contrasty as the shapes, so the motion has to be read
from texture, not from one clean edge. Nuisances: hand-held shake, sensor noise, a small drift across the main
direction of a sweep, a random overall exposure (except for the brightness pair, whose change it is).
"""
from __future__ import annotations

import numpy as np

from .synth_scene import SHAPES, SynthKind, camera_jitter, finish_frames, paint, random_colour, random_texture, \
    view_grid

PAIRS = (
    ("sweep_x", "sweeping_right", "sweeping_left"),
    ("sweep_y", "sweeping_down", "sweeping_up"),
    ("zoom", "zooming_in", "zooming_out"),
    ("light", "brightening", "darkening"),
    ("wipe", "wiping_right", "wiping_left"),
)


def _scene(rng: np.random.Generator, size: int, s: float):
    """Texture plus 4-7 solid shapes at fixed scene positions; returns a function drawing it at (xs, ys)."""
    texture = random_texture(rng, s, contrast=float(rng.uniform(25, 40)))
    shapes = [(SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng), float(rng.uniform(4, 8)) * s,
               float(rng.uniform(-0.5, 1.5)) * size, float(rng.uniform(-0.5, 1.5)) * size,
               float(rng.uniform(0, 360))) for _ in range(int(rng.integers(4, 8)))]

    def draw(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        img = texture(xs, ys)
        for shape, colour, r, x, y, angle in shapes:
            paint(img, xs, ys, shape, colour, r, x, y, angle)
        return img
    return draw


def render(pair: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """Forward clip of ``pair``: content moves right / down, zooms in, brightens, or a new scene enters from the
    left. Sweeps cover 50-80% of the frame, zooms magnify 2.5-3.5x, light goes from 30-45% to full."""
    s, steps = size / 64.0, max(num_frames - 1, 1)
    draw, other = _scene(rng, size, s), _scene(rng, size, s)
    travel = float(rng.uniform(0.5, 0.8)) * size
    drift = travel * float(np.tan(np.deg2rad(rng.uniform(-10, 10))))
    magnify = float(rng.uniform(2.5, 3.5))
    centre = tuple(size / 2 + float(rng.uniform(-1, 1)) * size / 6 for _ in range(2))
    dark = float(rng.uniform(0.3, 0.45))
    exposure = 1.0 if pair == "light" else float(rng.uniform(0.75, 1.1))
    slant = float(np.tan(np.deg2rad(rng.uniform(-15, 15))))
    shake, noise = camera_jitter(rng, num_frames), float(rng.uniform(2, 6))
    out = np.empty((num_frames, size, size, 3))
    for i in range(num_frames):
        a = i / steps
        jx, jy = (float(v) for v in shake[i])
        if pair in ("sweep_x", "sweep_y"):
            along, across = (0.5 - a) * travel, (0.5 - a) * drift  # the camera moves against the content
            offset = (along + jx, across + jy) if pair == "sweep_x" else (across + jx, along + jy)
            frame = draw(*view_grid(size, offset))
        elif pair == "zoom":
            frame = draw(*view_grid(size, (jx, jy), zoom=magnify ** a, centre=centre))
        else:
            xs, ys = view_grid(size, (jx, jy))
            frame = draw(xs, ys)
            if pair == "light":
                frame = frame * (dark + (1 - dark) * a)
            elif pair == "wipe":  # a slanted edge crosses the frame from left to right, the new scene behind it
                edge = -2 * s + a * (size + 4 * s) + (ys - jy - size / 2) * slant
                frame = np.where((xs - jx < edge)[..., None], other(xs, ys), frame)
        out[i] = frame * exposure
    return finish_frames(out, rng, noise)


KIND = SynthKind(
    name="sweep",
    description="whole-frame motion over a busy texture: sweeps, zoom, light, wipes",
    pairs=PAIRS,
    render=render,
    flip_pairs=(("sweeping_right", "sweeping_left"), ("wiping_right", "wiping_left")),
)
