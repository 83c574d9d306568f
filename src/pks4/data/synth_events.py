"""A captioned benchmark whose captions name an ORDER of events: "the object turns red, then green, then blue".

Each clip shows one object (at a random place, drifting slowly, over a muted textured background with a few
pale distractors) whose colour changes twice: three events, three different colours of :data:`PALETTE`, each
held for at least a quarter of the clip. The class is the colour sequence: 6 x 5 x 4 = 120 classes. Segment
lengths, drift and place are drawn from distributions that reversing time maps onto themselves, so a clip of a
sequence played backwards is a clip of the reversed sequence as likely as any other, and

* the captions of a clip carry log2(6) bits that only time order reveals: the six orders of a colour set have the
  same frame average, and a frame-average encoder can at best rank a caption's clip among the six clips of its
  colour set, while an encoder that reads time order can rank it first;
* the held-out split is built for that comparison: for each of the 20 colour sets, one clip of each of its six
  orders (120 clips), so the frame average's best text-to-video R@1 is 1/6 of a temporal model's;
* the reversed-pair test (the clip's caption against the same caption with the colours in reverse order) is at
  chance for a frame-average encoder by construction.

The training split draws sequences uniformly (``num_train`` clips). Captions: three paraphrases per clip that
differ only in wording, never in what they say (:func:`event_captions`). Written like the built-in benchmark
(:func:`pks4.data.synth.generate_synth`): ``{train,val}/<class>/<class>_<k>.mp4``, ``train.txt`` / ``val.txt``
(``path label``), ``classes.txt``, ``captions_{train,val}.json`` (the ``captions`` format of
:mod:`pks4.data.captions`) and ``manifest.json`` (a folder whose manifest matches is reused). Every frame is
coded alone at a constant quantiser, as in the built-in benchmark, so the decoded frames of a clip and of its
reversed twin are the same set.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import write_caption_json
from .synth import ENCODER_OPTIONS, write_video

__all__ = ["PALETTE", "SEQUENCES", "EVENTS", "EventSplits", "event_captions", "reversed_captions", "render_events",
           "generate_events"]

# Six hues 60 degrees apart, fully saturated and bright: each is one word and unmistakable at 32 px.
PALETTE: dict[str, tuple[int, int, int]] = {"red": (235, 30, 30), "yellow": (235, 220, 30), "green": (40, 200, 40),
                                            "cyan": (30, 215, 225), "blue": (40, 60, 235), "purple": (200, 40, 220)}
EVENTS = 3  # colour changes per clip + 1
SEQUENCES: tuple[tuple[str, ...], ...] = tuple(itertools.permutations(PALETTE, EVENTS))  # the 120 classes
_TEMPLATES = ("the object turns {a}, then {b}, then {c}", "first it is {a}, then {b}, and {c} at the end",
              "it changes colour from {a} to {b} to {c}")
_MIN_SEGMENT = 4  # frames of each colour (of 16): every 8-frame segment sampling sees every event


def event_captions(sequence: tuple[str, ...]) -> list[str]:
    """The three paraphrases naming the colours of ``sequence`` in order."""
    return [t.format(**dict(zip("abc", sequence))) for t in _TEMPLATES]


def reversed_captions(sequence: tuple[str, ...]) -> list[str]:
    """The captions of the time-reversed clip (the twin of the reversed-pair test)."""
    return event_captions(tuple(reversed(sequence)))


def _segment_lengths(rng: np.random.Generator, frames: int) -> tuple[int, ...]:
    """Uniform over the ways to split ``frames`` into EVENTS parts of at least _MIN_SEGMENT (scaled to the clip):
    a distribution that reversal maps onto itself."""
    low = max(1, _MIN_SEGMENT * frames // 16)
    spare = frames - EVENTS * low
    if spare < 0:
        raise ValueError(f"synth events: {frames} frames cannot hold {EVENTS} events of {low} frames")
    cuts = sorted(rng.choice(spare + EVENTS - 1, EVENTS - 1, replace=False))  # stars and bars
    parts = np.diff([-1, *cuts, spare + EVENTS - 1]) - 1
    return tuple(int(p) + low for p in parts)


@dataclass(frozen=True)
class _Scene:
    shape: str
    radius: float
    start: tuple[float, float]
    drift: tuple[float, float]
    background: np.ndarray  # (size, size, 3) float
    lengths: tuple[int, ...]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted background: a smooth colour field (bilinear upsampling of a 4x4 grid) plus grain, darker than objects."""
    coarse = rng.uniform(40, 120, size=(4, 4, 3))
    t = np.linspace(0, 3, size)
    i = np.minimum(t.astype(int), 2)
    f = (t - i)[:, None, None]
    rows = coarse[i] * (1 - f) + coarse[i + 1] * f  # (size, 4, 3)
    field = rows[:, i] * (1 - f.transpose(1, 0, 2)) + rows[:, i + 1] * f.transpose(1, 0, 2)
    for _ in range(int(rng.integers(1, 4))):  # pale static distractors: grey-ish discs
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 6) * size / 64
        yy, xx = np.mgrid[0:size, 0:size]
        field[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(110, 160)
    return field + rng.normal(0, 6, size=(size, size, 1))


def _inside(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "disc":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    return np.abs(dy) + np.abs(dx) <= 1.1 * r  # diamond


def _scene(rng: np.random.Generator, frames: int, size: int) -> _Scene:
    s = size / 64
    radius = float(rng.uniform(10, 14)) * s
    drift = tuple(float(v) for v in rng.uniform(-0.6, 0.6, size=2) * s)
    span = [abs(d) * (frames - 1) for d in drift]
    start = tuple(float(rng.uniform(radius + 1 + (sp if d < 0 else 0), size - radius - 1 - (sp if d > 0 else 0)))
                  for d, sp in zip(drift, span))
    shape = ("disc", "square", "diamond")[int(rng.integers(3))]
    return _Scene(shape, radius, start, drift, _texture(rng, size), _segment_lengths(rng, frames))


def render_events(sequence: tuple[str, ...], scene: _Scene, frames: int, size: int) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of the object taking the colours of ``sequence`` in turn."""
    colours = [c for colour, n in zip(sequence, scene.lengths) for c in [colour] * n]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        frame = scene.background.copy()
        cx, cy = scene.start[0] + scene.drift[0] * t, scene.start[1] + scene.drift[1] * t
        frame[_inside(scene.shape, yy - cy, xx - cx, scene.radius)] = PALETTE[colours[t]]
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class EventSplits:
    """Where :func:`generate_events` put things (absolute paths)."""

    root: Path
    train: Path
    val: Path
    labels: Path
    train_captions: Path
    val_captions: Path
    num_classes: int = len(SEQUENCES)


def _val_plan() -> list[int]:
    """Class of each held-out clip: for every colour set, each of its orders once (set after set)."""
    index = {seq: k for k, seq in enumerate(SEQUENCES)}
    out = []
    for colours in itertools.combinations(PALETTE, EVENTS):
        out += [index[p] for p in itertools.permutations(colours)]
    return out


def _write_split(root: Path, split: str, labels: list[int], seed: int, frames: int, size: int, fps: float) -> None:
    lines, videos, captions = [], [], []
    for k, label in enumerate(labels):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, k])
        sequence = SEQUENCES[label]
        scene = _scene(rng, frames, size)
        clip = render_events(sequence, scene, frames, size)
        name = "_".join(sequence)
        rel = f"{split}/{name}/{name}_{k:04d}.mp4"
        write_video(root / rel, clip, fps, crf=None, options=ENCODER_OPTIONS)
        lines.append(f"{rel} {label}")
        videos.append(rel)
        captions.append(event_captions(sequence))
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    write_caption_json(root / f"captions_{split}.json", videos, captions)


def generate_events(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 1200, num_frames: int = 16,
                    size: int = 64, fps: float = 8.0) -> EventSplits:
    """Write the benchmark under ``out_dir`` (deterministic in ``seed``; module docstring) and return its paths.
    ``num_train`` clips of uniformly drawn sequences; 120 held-out clips, every order of every colour set once."""
    root = Path(out_dir).resolve()
    settings = dict(kind="events", seed=seed, num_train=num_train, num_frames=num_frames, size=size, fps=fps,
                    version=1)
    splits = EventSplits(root, root / "train.txt", root / "val.txt", root / "classes.txt",
                         root / "captions_train.json", root / "captions_val.json")
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return splits
    root.mkdir(parents=True, exist_ok=True)
    train = np.random.default_rng([seed, 2]).integers(len(SEQUENCES), size=num_train).tolist()
    _write_split(root, "train", train, seed, num_frames, size, fps)
    _write_split(root, "val", _val_plan(), seed, num_frames, size, fps)
    splits.labels.write_text("\n".join("_".join(s) for s in SEQUENCES) + "\n")
    manifest.write_text(json.dumps(settings, indent=1))
    return splits
