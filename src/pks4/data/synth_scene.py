"""Building blocks of the synthetic benchmark family: the contract of a kind, textures, shapes and the camera.

A *kind* (:class:`SynthKind`) is a set of classes in time-reversed pairs plus one function that renders the
forward member of a pair from a random generator. The backward member is always the forward clip played
backwards (:func:`render_pair_clip`), so within a pair both classes draw their frame *sets* from the same
distribution and only the order of the frames tells them apart. Every kind builds its scenes from the pieces
below; none of them draws anything that depends on the class except through the forward motion itself.

All pixel quantities are written for 64 px frames and scale with the frame size (``s = size / 64``); motions are
given as fractions of the clip, so the same scene spans 8 or 32 frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "SHAPES", "JITTER", "SynthKind", "render_pair_clip", "hsv_to_rgb", "random_colour", "muted_background",
    "Texture", "random_texture", "shape_mask", "paint", "paint_ellipse", "camera_jitter", "view_grid",
    "finish_frames",
]

SHAPES = ("square", "triangle", "cross", "ell", "disc", "diamond")
JITTER = 2  # camera shake in pixels; canvases are rendered this much larger on every side

# (pair, rng, num_frames, size) -> forward clip (T, size, size, 3) uint8
RenderFn = Callable[[str, np.random.Generator, int, int], np.ndarray]


@dataclass(frozen=True)
class SynthKind:
    """One benchmark of the family: classes in time-reversed pairs and the renderer of their forward clips.

    ``pairs`` holds (pair, forward class, backward class); class ``2k`` is the forward member of pair ``k`` and
    class ``2k + 1`` the same clip reversed. ``flip_pairs`` are the classes a horizontal flip turns into each
    other. ``sizes`` and ``frames`` are the inclusive ranges the renderer can draw.
    """

    name: str
    description: str
    pairs: tuple[tuple[str, str, str], ...]
    render: RenderFn
    flip_pairs: tuple[tuple[str, str], ...] = ()
    sizes: tuple[int, int] = (32, 256)
    frames: tuple[int, int] = (8, 64)
    version: int = 1  # bump when the pixels a seed gives change, so cached folders are regenerated

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(name for _, fwd, bwd in self.pairs for name in (fwd, bwd))

    def ranges(self) -> str:
        """'32-256 px, 8-64 frames': what this kind can draw."""
        return f"{self.sizes[0]}-{self.sizes[1]} px, {self.frames[0]}-{self.frames[1]} frames"


def render_pair_clip(kind: SynthKind, label: int, rng: np.random.Generator, num_frames: int,
                     size: int) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of class ``label``: the forward clip of its pair, reversed for odd labels.

    With the same ``rng`` state the two classes of a pair get exactly the same frames in opposite orders.
    """
    if not 0 <= label < len(kind.classes):
        raise ValueError(f"synth kind {kind.name!r}: label {label} out of range [0, {len(kind.classes)})")
    frames = kind.render(kind.pairs[label // 2][0], rng, num_frames, size)
    return frames[::-1].copy() if label % 2 else frames


# ---- colours and backgrounds -------------------------------------------------------------------------------
def hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(round(c * 255)) for c in rgb)


def random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.65, 1.0),
                  val: tuple[float, float] = (0.8, 1.0)) -> tuple[int, int, int]:
    """A colour of random hue; the default ranges give the saturated, bright colours of foreground objects."""
    return hsv_to_rgb(float(rng.uniform()), float(rng.uniform(*sat)), float(rng.uniform(*val)))


def muted_background(seed: int, n: int) -> np.ndarray:
    """Muted texture (n, n, 3) float: coarse colour blobs plus fine grain, darker than the objects."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(5, 5, 3))
    grid = np.linspace(0, 4, n)
    i0 = np.clip(grid.astype(int), 0, 3)
    f = (grid - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # (n, 5, 3)
    img = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # (n, n, 3)
    base = rng.uniform(40, 110, size=3)
    grain = rng.normal(0, 10, size=(n, n, 1))
    return base + 50 * (img - 0.5) + grain


@dataclass(frozen=True)
class Texture:
    """A procedural colour texture: a sum of plane waves, defined at every real (x, y), so a camera can pan or
    zoom over it without resampling a pixel grid."""

    freqs: np.ndarray  # (K, 2) cycles per pixel along x and y
    phases: np.ndarray  # (K,)
    colours: np.ndarray  # (K, 3) amplitude per channel
    base: np.ndarray  # (3,)

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Colour (H, W, 3) float at the points (xs, ys) of shape (H, W)."""
        arg = xs[..., None] * self.freqs[:, 0] + ys[..., None] * self.freqs[:, 1]  # (H, W, K)
        return self.base + np.cos(2 * np.pi * arg + self.phases) @ self.colours


def random_texture(rng: np.random.Generator, s: float, contrast: float, waves: int = 8) -> Texture:
    """Waves with periods of 6-40 px (at 64 px frames, times ``s``); ``contrast`` is the amplitude of each wave
    (grey levels), so 25-40 gives a busy texture as strong as the objects' edges.

    The orientations are spread evenly over the half circle (one wave per sector): a texture dominated by one
    grating would hide any motion along its stripes (the aperture problem), and a sweep's direction with it.
    """
    periods = np.exp(rng.uniform(np.log(6.0), np.log(40.0), size=waves)) * s
    angles = (np.arange(waves) + rng.uniform(0, 1, size=waves)) * np.pi / waves
    freqs = np.stack([np.cos(angles), np.sin(angles)], axis=1) / periods[:, None]
    colours = contrast * rng.uniform(0.6, 1.0, size=(waves, 1)) * rng.uniform(0.5, 1.0, size=(waves, 3))
    return Texture(freqs, rng.uniform(0, 2 * np.pi, size=waves), colours, rng.uniform(70, 150, size=3))


# ---- shapes ------------------------------------------------------------------------------------------------
def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's own unit frame (u right, v down, radius 1)."""
    au, av_ = np.abs(u), np.abs(v)
    if shape == "square":
        return np.maximum(au, av_) <= 0.85
    if shape in ("disc", "dial"):
        return u * u + v * v <= 1.0
    if shape == "diamond":
        return au + av_ <= 1.1
    if shape == "triangle":  # pointing up in its own frame
        return (v <= 0.8) & (v >= -1.0 + 1.8 * au)
    if shape == "cross":
        return ((au <= 0.35) & (av_ <= 1.0)) | ((au <= 1.0) & (av_ <= 0.35))
    if shape == "ell":
        return ((u >= -0.9) & (u <= -0.2) & (av_ <= 0.95)) | ((u >= -0.9) & (u <= 0.9) & (v >= 0.3) & (v <= 0.95))
    raise ValueError(f"unknown synth shape {shape!r}; expected one of {SHAPES + ('dial',)}")


def paint(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, shape: str, color, r: float, cx: float, cy: float,
          angle: float = 0.0, alpha: float = 1.0, marker=None) -> None:
    """Draw one shape (rotated by ``angle`` degrees clockwise on screen) into ``canvas`` in place."""
    t = np.deg2rad(angle)
    dx, dy = (xs - cx) / r, (ys - cy) / r
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    inside = shape_mask(shape, u, v)
    canvas[inside] = (1 - alpha) * canvas[inside] + alpha * np.asarray(color, dtype=np.float64)
    if marker is None:
        return
    if shape == "dial":  # a hand from the centre to the rim: its whole length sweeps across patches
        mark = (np.abs(u) <= 0.3) & (v <= 0) & (v >= -1.0)
    else:  # an off-centre dot makes every shape show its orientation
        mark = u ** 2 + (v + 0.6) ** 2 <= 0.3 ** 2
    canvas[mark] = (1 - alpha) * canvas[mark] + alpha * np.asarray(marker, dtype=np.float64)


def paint_ellipse(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, cx: float, cy: float, ra: float,
                  rb: float, angle: float) -> None:
    """A filled ellipse with half-axes ``ra`` (along ``angle`` degrees) and ``rb``, in place."""
    t = np.deg2rad(angle)
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    canvas[(u / ra) ** 2 + (v / rb) ** 2 <= 1.0] = np.asarray(color, dtype=np.float64)


# ---- camera ------------------------------------------------------------------------------------------------
def camera_jitter(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Per-frame camera offsets (T, 2) in [-JITTER, JITTER] px: hand-held shake, the same in both directions."""
    return rng.integers(-JITTER, JITTER + 1, size=(num_frames, 2))


def view_grid(size: int, offset: tuple[float, float] = (0.0, 0.0), zoom: float = 1.0,
              centre: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scene coordinates (xs, ys), each (size, size), of the pixels of a camera looking at ``centre`` (default the
    frame centre) magnified ``zoom`` times and shifted by ``offset``: pixel p sees centre + (p - size/2) / zoom +
    offset."""
    cx, cy = centre if centre is not None else (size / 2, size / 2)
    pix = np.arange(size, dtype=np.float64) - size / 2
    xs, ys = np.meshgrid(cx + pix / zoom + offset[0], cy + pix / zoom + offset[1])
    return xs, ys


def finish_frames(frames: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add sensor noise (independent per frame and pixel, std ``noise``) and quantise to uint8."""
    if noise > 0:
        frames = frames + rng.normal(0, noise, size=frames.shape[:-1] + (1,))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)
