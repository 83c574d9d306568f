"""What checking a video's header against its packets costs: sparse decoding before and after.

``pks4.data.video`` now demuxes (without decoding) the last keyframe interval of every file to check that the
header's frame count holds before it seeks to the frames a clip needs. This script times the clip read of the
current reader against the reader of a baseline commit (the one before the check), on the same files, in one
run, interleaved, so the ratio is free of machine drift; the time is the reading process's CPU time (one decoding
thread), the median over the repeats:

    .venv/bin/python benchmarks/decode_check.py [--baseline fe215d4] [--repeats 15] [--out benchmarks/decode_check.md]

Files: a 10 s 340x256 30 fps clip (the size NOTES.md measures) as H.264 mp4 (x264's default keyframe interval, and
a keyframe every 12 frames, where sparse decoding skips the most and a fixed cost shows the most) and as VP9 webm
(keyframe every 60 frames), and an SSV2-like 3 s 24 fps VP9 webm; each read takes 8 or 32 frames at the centre of
8 / 32 segments, as evaluation does.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pks4.data import video as current
from pks4.data.sampling import segment_indices
from pks4.data.synth import write_video

ROOT = Path(__file__).resolve().parents[1]


def baseline_reader(rev: str, tmp: Path):
    """``pks4.data.video`` as it was at ``rev``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/pks4/data/video.py"], check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "video_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("video_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["video_baseline"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def moving_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A textured pattern drifting one pixel per frame: real motion for the encoder, cheap to make."""
    base = np.random.default_rng(seed).integers(0, 255, (h // 8 + 2, w // 8 + t // 8 + 2, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(base, 8, 0), 8, 1)
    return np.stack([big[:h, i:i + w] for i in range(t)])


def make_files(tmp: Path) -> dict[str, Path]:
    ten = moving_frames(300, 256, 340)
    ssv2 = moving_frames(72, 240, 320, seed=1)
    vp9 = {"deadline": "realtime", "cpu-used": "8", "g": "60"}
    return {
        "mp4 H.264 10 s 340x256": write_video(tmp / "ten.mp4", ten, 30),
        "mp4 H.264 10 s 340x256, keyframe every 12": write_video(tmp / "ten_g12.mp4", ten, 30, options={"g": "12"}),
        "webm VP9 10 s 340x256": write_video(tmp / "ten.webm", ten, 30, codec="libvpx-vp9", options=vp9),
        "webm VP9 3 s 320x240 (SSV2-like)": write_video(tmp / "ssv2.webm", ssv2, 24, codec="libvpx-vp9",
                                                         options=vp9),
    }


def time_open(reader, path: Path) -> float:
    """Opening alone: the baseline's open, or the current open with the header check (no frame decoded)."""
    begin = time.process_time()
    if hasattr(reader, "_Source"):
        reader._Source(path).close()
    else:
        reader._open(path).close()
    return time.process_time() - begin


def time_read(reader, path: Path, frames: int) -> float:
    # CPU time of this process: decoding runs on one thread, and the 2 shared cores of the development machine
    # make wall time mostly a measure of the other jobs
    begin = time.process_time()
    reader.read_sampled(path, lambda n: segment_indices(n, frames, train=False))
    return time.process_time() - begin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="fe215d4", help="commit whose video reader is the baseline")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, help="write the table here as markdown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before = baseline_reader(args.baseline, tmp)
        files = make_files(tmp)
        rows = []
        for name, path in files.items():
            opened = {"before": [], "after": []}
            for _ in range(args.repeats):
                opened["before"].append(time_open(before, path))
                opened["after"].append(time_open(current, path))
            b, a = statistics.median(opened["before"]), statistics.median(opened["after"])
            rows.append(f"| {name} | open only | {b * 1e3:.2f} | {a * 1e3:.2f} | {a / b:.2f} |")
            print(rows[-1], flush=True)
            for frames in (8, 32):
                got = {"before": [], "after": []}
                for _ in range(args.repeats):  # interleaved: both readers see the same machine state
                    got["before"].append(time_read(before, path, frames))
                    got["after"].append(time_read(current, path, frames))
                b, a = statistics.median(got["before"]), statistics.median(got["after"])
                rows.append(f"| {name} | {frames} | {b * 1e3:.1f} | {a * 1e3:.1f} | {a / b:.3f} |")
                print(rows[-1], flush=True)
    table = "\n".join(["| file | frames read | before (CPU ms, median) | after (CPU ms, median) | after / before |",
                       "|---|---|---|---|---|", *rows])
    if args.out:
        title = ("# Checking a video's header against its packets: clip-read cost before / after\n\n"
                 f"Baseline: the reader of commit {args.baseline}; {args.repeats} interleaved repeats; CPU time of the "
                 "reading process (decoding runs on one thread). \"open only\" opens the file (after: with the header "
                 "check) and decodes nothing. Reproduce with\n\n")
        args.out.write_text(f"{title}```\n{' '.join(['.venv/bin/python', *sys.argv])}\n```\n\n{table}\n")


if __name__ == "__main__":
    main()
