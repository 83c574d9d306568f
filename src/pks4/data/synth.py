"""The built-in temporal benchmarks: a family of small Something-Something-like datasets written as real mp4 files.

Every kind of the family has classes in time-reversed pairs. A video of the second class of a pair is rendered
exactly like one of the first class and then played backwards, so both classes draw their frames from the same
distribution of frame SETS: a model that averages per-frame features cannot tell a pair apart (it is at chance
within each pair, <= 50% overall), while a model that sees temporal order can. This is the property SSV2 is
built around ("temporal-heavy", PKS4 paper §4) in a form that trains on a laptop in minutes.

The kinds (``pks4 data synth OUT --kind NAME``; :data:`KINDS`):

* ``classic`` (the default, the demo's benchmark): one object moving right / left, down / up, approaching /
  receding, rotating clockwise / counter-clockwise, appearing / disappearing, over a muted texture with static
  distractors and camera jitter; rotating objects are dials (a disc with a hand).
* ``sweep`` (``synth_sweep``): the whole frame sweeps, zooms, brightens or is wiped, over a busy texture.
* ``busy`` (``synth_busy``): a group of objects over a busy drifting texture among drifting distractors.
* ``occlusion`` (``synth_occlusion``): hiding behind a wall, covering, filling, stacking.
* ``dynamics`` (``synth_dynamics``): speeding up, stretching, extending, splitting.

Every random choice flows from ``seed``, so the same seed gives the same files.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from . import synth_busy, synth_dynamics, synth_occlusion, synth_sweep
from .synth_scene import JITTER as _JITTER
from .synth_scene import SHAPES, SynthKind, hsv_to_rgb as _hsv_to_rgb, muted_background as _background, \
    paint as _paint, render_pair_clip

__all__ = [
    "CLASSES",
    "FLIP_PAIRS",
    "KINDS",
    "SynthKind",
    "SynthParams",
    "SynthSplits",
    "ENCODER_OPTIONS",
    "write_video",
    "sample_params",
    "render_clip",
    "render_pair_clip",
    "get_kind",
    "check_request",
    "generate_synth",
]

# Pairs (played forward, played backward); class index 2k is the forward member of pair k.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("translate_x", "moving_right", "moving_left"),
    ("translate_y", "moving_down", "moving_up"),
    ("scale", "approaching", "receding"),
    ("rotate", "rotating_clockwise", "rotating_counterclockwise"),
    ("fade", "appearing", "disappearing"),
)
CLASSES: tuple[str, ...] = tuple(name for _, fwd, bwd in PAIRS for name in (fwd, bwd))
# A horizontal flip turns these classes into each other (for the "swap" flip mode).
FLIP_PAIRS: tuple[tuple[str, str], ...] = (
    ("moving_right", "moving_left"),
    ("rotating_clockwise", "rotating_counterclockwise"),
)
# Every frame coded alone at a constant quantiser: identical frames then decode identically wherever they sit in
# the clip, so the pair property (same frames, reversed order) holds for the decoded files too, and compression
# artefacts cannot leak the playing direction to an order-blind model.
ENCODER_OPTIONS = {"x264-params": "keyint=1:qp=14"}


def write_video(
    path: str | os.PathLike,
    frames_uint8,
    fps: float,
    codec: str = "libx264",
    *,
    crf: int | None = 12,
    rotation: int = 0,
    timestamps: Sequence[float] | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode ``frames_uint8`` (T, H, W, 3) RGB, or (T, H, W) / (T, H, W, 1) grayscale, into ``path``.

    The container follows the suffix (.mp4, .mkv, .webm, .avi). libx264 writes yuv420p, or yuv444p when a side
    is odd (4:2:0 needs even sizes); ``codec="ffv1"`` keeps grayscale as gray. ``rotation`` stores a display
    matrix (counter-clockwise degrees); ``timestamps`` (seconds, increasing) make a variable-frame-rate
    file; ``options`` go to the encoder (e.g. ``{"g": "4"}`` for a keyframe every 4 frames).
    Encoding runs on one thread so the bytes are the same on every machine.
    """
    arr = np.asarray(frames_uint8)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise ValueError(f"write_video({path}): expected uint8 (T,H,W,3) or (T,H,W), got {arr.dtype} {arr.shape}")
    gray_in = arr.ndim == 3
    t, h, w = arr.shape[:3]
    if timestamps is not None and len(timestamps) != t:
        raise ValueError(f"write_video({path}): {len(timestamps)} timestamps for {t} frames")
    pix_fmt = _pix_fmt(codec, h, w, gray_in)
    if gray_in and pix_fmt != "gray":
        arr, gray_in = np.repeat(arr[..., None], 3, axis=-1), False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.thread_count = 1
        if codec == "libx264":
            rate = {"crf": str(crf)} if crf is not None else {}
            stream.options = {**rate, "preset": "veryfast", **(options or {})}
        elif options:
            stream.options = dict(options)
        if rotation:
            stream.set_display_rotation(rotation)
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(arr[i], format="gray" if gray_in else "rgb24")
            if timestamps is not None:
                frame.pts, frame.time_base = int(round(timestamps[i] * 1000)), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _pix_fmt(codec: str, h: int, w: int, gray: bool) -> str:
    if codec == "ffv1":
        return "gray" if gray else "yuv444p"
    if codec in ("libx264", "mpeg4", "libvpx", "libvpx-vp9") and (h % 2 or w % 2):
        if codec != "libx264":
            raise ValueError(f"codec {codec} needs even frame sizes, got {h}x{w}; use libx264 or ffv1")
        return "yuv444p"
    return "yuv420p"


@dataclass(frozen=True)
class SynthParams:
    """Everything random about one video; rendering is a pure function of these and the class's pair."""

    shape: str
    color: tuple[int, int, int]
    marker: tuple[int, int, int]
    radius0: float  # object half-size at the first frame (px)
    radius1: float  # ... and at the last (differs only for the scale pair)
    start: tuple[float, float]  # object centre (x, y) at the first frame, canvas pixels
    velocity: tuple[float, float]  # px per frame (translate pairs)
    angle0: float  # degrees
    spin: float  # degrees per frame, positive = clockwise on screen
    background_seed: int
    distractors: tuple[tuple[str, tuple[int, int, int], float, float, float], ...]  # shape, colour, r, x, y
    jitter: tuple[tuple[int, int], ...]  # camera offset per frame


def sample_params(rng: np.random.Generator, kind: str, num_frames: int, size: int) -> SynthParams:
    """Random scene for one video of pair ``kind`` ("translate_x", "translate_y", "scale", "rotate", "fade").

    Motion is large so that a small model learns it quickly: moving objects are small and cross 70-95% of the
    free width of the frame (about 2.5-3 px per frame at 64 px and 16 frames); rotating objects are large dials
    (a disc with a hand from its centre to its rim, 15-22 degrees per frame); approaching objects grow about 3x.
    The whole path stays inside the frame.

    Why a dial: a uniformly coloured shape shows its rotation only along its edges, a 4-fold symmetric one
    (square, cross) turning 30-44 degrees between sampled frames looks almost as much like the opposite turn, and
    a small off-centre dot was too little evidence: the tiny demo model stayed at chance within the rotation pair
    even when trained on that pair alone (500 steps), and reached 100% on the dial in the same budget.
    """
    s = size / 64.0  # all pixel quantities are tuned at 64 px and scale with the frame
    steps = max(num_frames - 1, 1)
    r = float(rng.uniform(7, 10.5)) * s
    if kind in ("translate_x", "translate_y"):
        r = float(rng.uniform(5, 7)) * s
    elif kind == "rotate":
        r = float(rng.uniform(18, 22)) * s  # the hand's sweep must span patches, or direction is invisible
    r0 = r1 = r
    vx = vy = 0.0
    if kind == "scale":
        r0, r1 = float(rng.uniform(4, 6)) * s, float(rng.uniform(14, 19)) * s
    margin = max(r0, r1) + _JITTER
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    if kind in ("translate_x", "translate_y"):
        speed = float(rng.uniform(0.7, 0.95)) * (size - 2 * margin) / steps
        lo = margin
        hi = size - margin - speed * steps
        pos = float(rng.uniform(lo, max(lo, hi)))
        if kind == "translate_x":
            cx, vx = pos, speed
        else:
            cy, vy = pos, speed
    hue = float(rng.uniform())
    hue_m = (hue + 0.5) % 1.0
    distractors = tuple(
        (SHAPES[int(rng.integers(len(SHAPES)))], _hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.2, 0.6)),
                                                             float(rng.uniform(0.4, 0.8))),
         float(rng.uniform(2.5, 5)) * s, float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        for _ in range(int(rng.integers(1, 4)))
    )
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if kind == "rotate":
        shape = "dial"
    return SynthParams(
        shape=shape,
        color=_hsv_to_rgb(hue, float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.8, 1.0))),
        marker=_hsv_to_rgb(hue_m, 1.0, float(rng.uniform(0.1, 0.3))),
        radius0=r0, radius1=r1, start=(cx, cy), velocity=(vx, vy),
        angle0=float(rng.uniform(0, 360)),
        spin=float(rng.uniform(15, 22)) if kind == "rotate" else 0.0,
        background_seed=int(rng.integers(2**31)),
        distractors=distractors,
        jitter=tuple((int(a), int(b)) for a, b in rng.integers(-_JITTER, _JITTER + 1, size=(num_frames, 2))),
    )


def _render_forward(kind: str, p: SynthParams, num_frames: int, size: int) -> np.ndarray:
    n = size + 2 * _JITTER
    scene = _background(p.background_seed, n)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64) - _JITTER
    for shape, color, r, x, y in p.distractors:
        _paint(scene, xs, ys, shape, color, r, x, y)
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    steps = max(num_frames - 1, 1)
    for i in range(num_frames):
        a = i / steps
        frame = scene.copy()
        r = p.radius0 * (p.radius1 / p.radius0) ** a  # geometric growth looks like constant approach speed
        cx, cy = p.start[0] + p.velocity[0] * i, p.start[1] + p.velocity[1] * i
        alpha = a if kind == "fade" else 1.0
        _paint(frame, xs, ys, p.shape, p.color, r, cx, cy, p.angle0 + p.spin * i, alpha, p.marker)
        jx, jy = p.jitter[i]
        crop = frame[_JITTER + jy:_JITTER + jy + size, _JITTER + jx:_JITTER + jx + size]
        out[i] = np.clip(crop, 0, 255).astype(np.uint8)
    return out


def render_clip(label: int, params: SynthParams, num_frames: int, size: int) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of class ``label``; the second class of a pair is the first reversed."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"synth label {label} out of range [0, {len(CLASSES)})")
    kind = PAIRS[label // 2][0]
    frames = _render_forward(kind, params, num_frames, size)
    return frames[::-1].copy() if label % 2 else frames


def _render_classic(pair: str, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    return _render_forward(pair, sample_params(rng, pair, num_frames, size), num_frames, size)


CLASSIC = SynthKind(
    name="classic",
    description="one object translating, scaling, rotating or fading over a muted texture (the demo's benchmark)",
    pairs=PAIRS,
    render=_render_classic,
    flip_pairs=FLIP_PAIRS,
    sizes=(16, 512),
    frames=(1, 256),
    version=4,
)
KINDS: dict[str, SynthKind] = {k.name: k for k in (CLASSIC, synth_sweep.KIND, synth_busy.KIND,
                                                   synth_occlusion.KIND, synth_dynamics.KIND)}


def _available() -> str:
    return "; ".join(f"{k.name} ({k.ranges()})" for k in KINDS.values())


def get_kind(name: str) -> SynthKind:
    """The registered kind ``name``; an unknown name is a ValueError listing every kind and what it draws."""
    if name not in KINDS:
        raise ValueError(f"unknown synth kind {name!r}; available kinds: {_available()}")
    return KINDS[name]


def check_request(kind: str, num_frames: int, size: int, *, frames_name: str = "num_frames",
                  size_name: str = "size") -> SynthKind:
    """The kind ``kind`` if it can draw clips of ``num_frames`` x ``size`` px, else a ValueError that names the
    option (``frames_name`` / ``size_name``: e.g. "--frames" on the command line) and lists what is available."""
    spec = get_kind(kind)
    for name, value, (low, high), unit in ((frames_name, num_frames, spec.frames, "frames"),
                                           (size_name, size, spec.sizes, "px")):
        if not low <= value <= high:
            bound = f"at least {low}" if value < low else f"at most {high}"
            raise ValueError(f"{name} {value}: kind {kind!r} draws {low}-{high} {unit} (expected {bound}); "
                             f"available kinds: {_available()}")
    return spec


@dataclass(frozen=True)
class SynthSplits:
    """Where ``generate_synth`` put things: lists are ``path label`` lines relative to ``root``."""

    root: Path
    train: Path
    val: Path
    labels: Path
    flip_pairs: Path
    num_classes: int
    size: int = 64

    def data_config(self, **overrides):
        """A DataConfig for this benchmark: full-frame clips, flips that swap the left/right and
        clockwise/counter-clockwise labels, mild crops (a tight crop can cut the moving object out)."""
        from .datasets import DataConfig

        settings = dict(format="list", root=str(self.root), train=str(self.train), val=str(self.val),
                        labels=str(self.labels), num_frames=8, size=self.size, short_side=self.size,
                        flip="swap", flip_pairs=str(self.flip_pairs), scale=(0.5, 1.0))
        settings.update(overrides)
        return DataConfig(**settings)


def generate_synth(
    out_dir: str | os.PathLike,
    *,
    kind: str = "classic",
    seed: int = 0,
    num_train_per_class: int = 40,
    num_val_per_class: int = 12,
    num_frames: int = 16,
    size: int = 64,
    fps: float = 8.0,
) -> SynthSplits:
    """Write benchmark ``kind`` under ``out_dir`` and return its (absolute) paths; deterministic in ``seed``.

    Layout: ``{train,val}/<class>/<class>_<k>.mp4``, ``train.txt``/``val.txt`` (``path label``),
    ``classes.txt`` (one name per line) and ``flip_pairs.txt`` (class names a horizontal flip swaps).
    A ``manifest.json`` written last records the settings; a folder whose manifest matches is reused as is.
    Defaults (classic: 10 classes, 400 train / 120 val videos of 16 x 64 x 64) generate in a few seconds.
    An unknown kind, or a frame count or size the kind cannot draw, is a ValueError listing the kinds.
    """
    spec = check_request(kind, num_frames, size)
    for name, value in (("num_train_per_class", num_train_per_class), ("num_val_per_class", num_val_per_class)):
        if value < 0:
            raise ValueError(f"{name} {value}: expected at least 0")
    root = Path(out_dir).resolve()  # a run config that names these lists must work from any folder
    settings = dict(kind=kind, seed=seed, num_train_per_class=num_train_per_class,
                    num_val_per_class=num_val_per_class, num_frames=num_frames, size=size, fps=fps,
                    classes=list(spec.classes), version=spec.version)
    splits = SynthSplits(root, root / "train.txt", root / "val.txt", root / "classes.txt",
                         root / "flip_pairs.txt", len(spec.classes), size)
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return splits
    root.mkdir(parents=True, exist_ok=True)
    for split_id, (split, per_class) in enumerate((("train", num_train_per_class), ("val", num_val_per_class))):
        lines = []
        for label, name in enumerate(spec.classes):
            for k in range(per_class):
                rng = np.random.default_rng([seed, split_id, label, k])
                rel = f"{split}/{name}/{name}_{k:03d}.mp4"
                write_video(root / rel, render_pair_clip(spec, label, rng, num_frames, size), fps, crf=None,
                            options=ENCODER_OPTIONS)
                lines.append(f"{rel} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    splits.labels.write_text("\n".join(spec.classes) + "\n")
    swaps = [f"{a} {b}" for a, b in spec.flip_pairs] or [f"# kind {kind}: a horizontal flip changes no class"]
    splits.flip_pairs.write_text("\n".join(swaps) + "\n")
    manifest.write_text(json.dumps(settings, indent=1))
    return splits


def params_to_dict(p: SynthParams) -> dict:
    """Plain-dict view of the parameters (for logs and reproducibility notes)."""
    return asdict(p)
