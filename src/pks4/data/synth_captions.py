"""Captions for the built-in temporal benchmark (:mod:`pks4.data.synth`), for video-text training and retrieval.

Every video gets one sentence per paraphrase of its class (three each), naming the moving object's colour,
e.g. "a red object moves from left to right". The two classes of a time-reversed pair share their
paraphrases word for word except for the direction ("... from left to right" / "... from right to left",
"grows as it comes closer" / "shrinks as it moves away"), so telling a caption from its reversed twin takes
the order of the frames: exactly what a frame-average encoder cannot see.

The colour is read from the video itself (the generator's parameters are not stored): the hue of the
bright, saturated pixels in the frame that shows most of them -- the object is drawn saturated and bright,
the background muted, distractors paler and its marker dark. A class without templates (a kind this file
does not know yet) is described from its name ("a red object, moving sideways").

Captions are written next to the benchmark's lists as ``captions_<split>.json`` in the ``json`` layout of
:mod:`pks4.data.captions` (paths relative to the benchmark folder).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .captions import write_caption_json
from .datasets import read_class_names
from .video import read_sampled

__all__ = ["CAPTION_TEMPLATES", "COLOUR_NAMES", "object_colour", "class_captions", "write_synth_captions"]

# Paraphrase k of a class and paraphrase k of its time-reversed twin differ only in the direction words.
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "moving_right": ("a {c} object moves from left to right", "a {c} shape slides towards the right side",
                     "something {c} travels across the frame to the right"),
    "moving_left": ("a {c} object moves from right to left", "a {c} shape slides towards the left side",
                    "something {c} travels across the frame to the left"),
    "moving_down": ("a {c} object moves from top to bottom", "a {c} shape slides downwards",
                    "something {c} travels down the frame"),
    "moving_up": ("a {c} object moves from bottom to top", "a {c} shape slides upwards",
                  "something {c} travels up the frame"),
    "approaching": ("a {c} object grows as it comes closer", "a {c} shape gets bigger and bigger",
                    "something {c} approaches the camera"),
    "receding": ("a {c} object shrinks as it moves away", "a {c} shape gets smaller and smaller",
                 "something {c} recedes from the camera"),
    "rotating_clockwise": ("a {c} dial turns clockwise", "the hand of a {c} dial sweeps clockwise",
                           "a {c} disc spins in the clockwise direction"),
    "rotating_counterclockwise": ("a {c} dial turns counterclockwise", "the hand of a {c} dial sweeps counterclockwise",
                                  "a {c} disc spins in the counterclockwise direction"),
    "appearing": ("a {c} object fades in", "a {c} shape slowly becomes visible", "something {c} appears"),
    "disappearing": ("a {c} object fades out", "a {c} shape slowly becomes invisible", "something {c} disappears"),
}
# Hue sectors in degrees (start of each sector) and their names; red wraps around 360.
COLOUR_NAMES: tuple[tuple[float, str], ...] = ((0, "red"), (15, "orange"), (45, "yellow"), (70, "green"),
                                               (160, "cyan"), (200, "blue"), (260, "purple"), (300, "pink"),
                                               (345, "red"))
_MIN_SATURATION = 0.62  # objects are drawn at 0.65-1.0, distractors at 0.2-0.6
_MIN_VALUE = 0.76  # objects at 0.8-1.0; the muted background and dark markers stay below


def _hue_name(hue_degrees: float) -> str:
    name = COLOUR_NAMES[0][1]
    for start, label in COLOUR_NAMES:
        if hue_degrees >= start:
            name = label
    return name


def object_colour(frames: np.ndarray) -> str:
    """Name of the dominant bright, saturated colour of uint8 frames (T, H, W, 3); "" when there is none."""
    rgb = np.asarray(frames, dtype=np.float64) / 255.0
    top, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(top > 0, (top - low) / np.maximum(top, 1e-9), 0.0)
    vivid = (saturation >= _MIN_SATURATION) & (top >= _MIN_VALUE)  # (T, H, W)
    counts = vivid.reshape(len(rgb), -1).sum(axis=1)
    if counts.max() == 0:
        return ""
    t = int(counts.argmax())  # the frame showing most of the object (fades: its opaque end)
    r, g, b = (rgb[t][..., k][vivid[t]] for k in range(3))
    # hue of each vivid pixel, then the circular mean so reds on both sides of 0 degrees agree
    hue = np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    mean = np.degrees(np.arctan2(np.sin(hue).mean(), np.cos(hue).mean())) % 360.0
    return _hue_name(mean)


def class_captions(class_name: str, colour: str) -> list[str]:
    """The captions of one video of ``class_name`` whose object is ``colour`` ("" = unknown colour)."""
    templates = CAPTION_TEMPLATES.get(class_name)
    if templates is None:  # a kind this file does not know: described from its name
        words = class_name.replace("_", " ")
        templates = (f"a {{c}} object, {words}", f"something {{c}} {words}", f"a {{c}} shape {words}")
    return [" ".join(t.format(c=colour).split()) for t in templates]


def _list_entries(list_file: Path) -> list[tuple[str, int]]:
    entries = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            entries.append((rel, int(label)))
    return entries


def write_synth_captions(root: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> dict[str, Path]:
    """Caption every video of a benchmark folder written by :func:`pks4.data.synth.generate_synth`.

    Writes ``captions_<split>.json`` next to ``<split>.txt`` and returns {split: file}. Decodes each video
    once to read its object's colour (about 10 ms per 16-frame 64x64 clip).
    """
    root = Path(root)
    classes = read_class_names(root / "classes.txt")
    unknown = sorted({c for c in classes if c not in CAPTION_TEMPLATES})
    if unknown:
        warnings.warn(f"{root / 'classes.txt'}: no caption templates for {unknown}; described from their names",
                      stacklevel=2)
    out = {}
    for split in splits:
        list_file = root / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: no such list; is {root} a folder written by `pks4 data synth`?")
        videos, captions = [], []
        for rel, label in _list_entries(list_file):
            frames, _ = read_sampled(str(root / rel), lambda total: list(range(total)))
            videos.append(rel)
            captions.append(class_captions(classes[label], object_colour(frames.numpy())))
        out[split] = write_caption_json(root / f"captions_{split}.json", videos, captions)
    return out
