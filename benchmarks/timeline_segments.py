"""Does a timeline follow the segments of a long video? The demo model on concatenated built-in clips.

Each trial renders six fresh clips of six different classes of the built-in benchmark (16 frames, 64 px, 8 fps:
the demo's clip format; seeds no training or validation clip uses), writes them one after the other as one mp4
(96 frames, 12 s) and runs ``VideoClassifier.timeline`` over it with the trained demo model. A segment counts as
right when the timeline's argmax there is the segment's class, read two ways:

* aligned: the window that covers exactly the segment (window 16 frames = 2 s, stride 4);
* centred: the mean probabilities of every window whose centre lies in the segment (stride 4: four windows,
  two of them half in a neighbouring segment), what a reader of the plot sees without knowing the boundaries.

    make demo                                   # trains runs/demo/pks4 (about 9 minutes on 2 cores)
    python benchmarks/timeline_segments.py      # writes benchmarks/timeline_segments.md (+ .png of trial 0)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pks4.api import VideoClassifier
from pks4.data.synth import CLASSES, ENCODER_OPTIONS, PAIRS, render_clip, sample_params, write_video

HERE = Path(__file__).resolve().parent
SEGMENT, SIZE, FPS = 16, 64, 8.0


def long_video(path: Path, trial: int) -> list[int]:
    """Write six clips of six distinct classes (drawn with seed ``trial``) as one video; return their labels."""
    rng = np.random.default_rng([1000, trial])
    labels = [int(c) for c in rng.permutation(len(CLASSES))[:6]]
    clips = []
    for k, label in enumerate(labels):
        params = sample_params(np.random.default_rng([1000, trial, k]), PAIRS[label // 2][0], SEGMENT, SIZE)
        clips.append(render_clip(label, params, SEGMENT, SIZE))
    write_video(path, np.concatenate(clips), FPS, crf=None, options=ENCODER_OPTIONS)
    return labels


def read_segments(tl, labels: list[int]) -> dict[str, list[int]]:
    """Argmax per segment, aligned window and centred windows."""
    aligned, centred = [], []
    for k in range(len(labels)):
        aligned.append(int(tl.probs[tl.starts.index(k * SEGMENT)].argmax()))
        inside = [i for i, s in enumerate(tl.starts) if k * SEGMENT <= s + tl.window // 2 < (k + 1) * SEGMENT]
        centred.append(int(tl.probs[inside].mean(0).argmax()))
    return {"aligned": aligned, "centred": centred}


def _val_top1(clf: VideoClassifier) -> str:
    metrics = clf.spec.training.get("metrics")
    return f"{metrics['last_val_top1']:.1f}% at the end" if metrics else "not recorded"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo/pks4")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "timeline_segments.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    clf = VideoClassifier.from_pretrained(args.run, device="cpu")
    rows, totals, start = [], {"aligned": 0, "centred": 0}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            path = Path(tmp) / f"trial{trial}.mp4"
            labels = long_video(path, trial)
            tl = clf.timeline(path, SEGMENT, 4)
            if trial == 0:
                tl.plot(Path(args.out).with_suffix(".png"))
            got = read_segments(tl, labels)
            right = {k: sum(a == b for a, b in zip(v, labels)) for k, v in got.items()}
            for k in totals:
                totals[k] += right[k]
            rows.append(f"| {trial} | {', '.join(CLASSES[c] for c in labels)} | {right['aligned']}/6 | "
                        f"{right['centred']}/6 | {', '.join(CLASSES[c] for c in got['centred'])} |")
    n = 6 * args.trials
    lines = ["# Timeline of concatenated clips: the demo model's argmax per segment", "",
             f"Reproduce: `make demo` then `python benchmarks/timeline_segments.py --run {args.run} --trials "
             f"{args.trials}`", "",
             f"Six fresh 16-frame clips of six distinct classes per trial, one 96-frame video at 8 fps; timeline "
             f"window 16 frames (2 s), stride 4, one 8x1x1 view per window; {time.perf_counter() - start:.0f} s "
             "in all on the 2-core CPU.", "",
             f"The model: {args.run}, validation top-1 {_val_top1(clf)} during training (one view; its own "
             "`metrics.jsonl`).", "",
             "| trial | segment classes | right, aligned window | right, centred windows | centred argmax |",
             "|---|---|---|---|---|", *rows, "",
             f"In all: aligned {totals['aligned']}/{n} ({100 * totals['aligned'] / n:.1f}%), centred "
             f"{totals['centred']}/{n} ({100 * totals['centred'] / n:.1f}%). Target: at least 5 of 6 per video.", "",
             f"![trial 0]({Path(args.out).with_suffix('.png').name})"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
