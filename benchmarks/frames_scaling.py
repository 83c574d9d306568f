"""Cost versus clip length: FLOPs, CPU time and peak memory from 8 to 128 frames (PKS4 §1's linearity claim).

Four models at ONE reduced scale so a CPU can run 128 frames: width 192, 4 blocks, 112x112 input (7x7 = 49
patches per frame), 10 classes. PKS4 (module after block 2, 9x9 correlation window, 4 context frames), a
VideoMamba-S-style bidirectional Mamba over all tokens (d 192, 4 blocks), the frame-average ViT, and the
joint space-time attention ViT (TimeSformer-joint). Each model runs in its own process, frames in increasing
order, with glibc's mmap threshold fixed at 64 KiB so every freed tensor goes back to the OS: peak memory =
RSS growth during the first forward pass at that length (no_grad, batch 1; one untimed 8-frame pass first);
time = median of 5 passes per length, taken round-robin over the lengths.

    python benchmarks/frames_scaling.py            # writes benchmarks/frames_scaling.md and .png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

FRAMES = (8, 16, 32, 64, 128)
MODELS = ("pks4", "videomamba", "frame_avg", "joint")
HERE = Path(__file__).resolve().parent


def build(kind: str):
    from pks4.models.clip_vit import CLIPVisionConfig
    from pks4.models.registry import create_model

    backbone = CLIPVisionConfig(image_size=112, patch_size=16, width=192, layers=4, heads=3, output_dim=192)
    if kind == "pks4":
        return create_model("pks4_vit_tiny", backbone=backbone, insert_layer=2, corr_window=9, num_classes=10)
    if kind == "frame_avg":
        return create_model("pks4_vit_tiny", backbone=backbone, use_module=False, insert_layer=0, num_classes=10)
    if kind == "joint":
        return create_model("vit_tiny_joint", backbone=backbone, num_frames=8, num_classes=10)
    return create_model("videomamba_small", embed_dim=192, depth=4, image_size=112, num_classes=10)


def worker(kind: str, repeats: int) -> None:
    """Print one JSON line per frame count. Memory: first pass at each length, lengths in increasing order.
    Time: the lengths are timed round-robin, ``repeats`` rounds, so a change in the machine's load hits every
    length alike; the median per length is reported."""
    import torch

    from pks4.engine.profile import PeakMemory, count_flops, time_call

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(kind).eval()
    clips = {t: torch.randn(1, t, 3, 112, 112) for t in FRAMES}
    rows = {}
    with torch.no_grad():
        model(clips[FRAMES[0]])  # one-time allocations (kernel build, thread pools) stay out of the first point
        for t in FRAMES:
            with PeakMemory(clips[t].device) as mem:
                model(clips[t])
            rows[t] = {"model": kind, "frames": t, "gflops": count_flops(model, t, 112).total / 1e9,
                       "peak_mb": mem.peak_mb, "all_ms": []}
        for _ in range(repeats):
            for t in FRAMES:
                rows[t]["all_ms"] += time_call(lambda: model(clips[t]), clips[t].device, 0, 1)
    for t in FRAMES:
        rows[t]["ms"] = statistics.median(rows[t]["all_ms"])
        print(json.dumps(rows[t]), flush=True)


def run_model(kind: str, repeats: int, timeout: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", kind, "--repeats", str(repeats)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env).stdout
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def write_results(rows: list[dict], out: Path, cmd: str) -> None:
    by = {(r["model"], r["frames"]): r for r in rows}
    lines = ["# Cost versus frames", "", f"Reproduce: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread; "
             "other jobs shared the CPU, so times carry some noise (ratios are within one run).", "",
             "Scale: width 192, 4 blocks, 112x112 (49 patches/frame), batch 1, no_grad. FLOPs = multiply-adds, "
             "attention, scan and correlation included. Ratios are to the same model at 8 frames.", "",
             "| model | frames | GFLOPs | x8f | time ms | x8f | peak MiB | x8f |", "|---|---|---|---|---|---|---|---|"]
    for kind in MODELS:
        base = by.get((kind, FRAMES[0]), {})
        for t in FRAMES:
            r = by.get((kind, t), {})
            if "error" in r or not r:
                lines.append(f"| {kind} | {t} | {r.get('error', 'missing')} | | | | | |")
                continue
            ratio = lambda k: r[k] / base[k] if base.get(k) else float("nan")  # noqa: E731
            lines.append(f"| {kind} | {t} | {r['gflops']:.2f} | {ratio('gflops'):.1f} | {r['ms']:.0f} | "
                         f"{ratio('ms'):.1f} | {r['peak_mb']:.0f} | {ratio('peak_mb'):.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(by, out.with_suffix(".png"))


def plot(by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("gflops", "ms", "peak_mb"), ("GFLOPs", "CPU time (ms)", "peak memory (MiB)")):
        for kind in MODELS:
            pts = [(t, by[(kind, t)][key]) for t in FRAMES if key in by.get((kind, t), {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", metavar="MODEL")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--out", default=str(HERE / "frames_scaling"))
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    rows = []
    for kind in MODELS:
        rows += run_model(kind, args.repeats, args.timeout)
        print("\n".join(json.dumps(r) for r in rows if r["model"] == kind), flush=True)
    write_results(rows, Path(args.out), "python benchmarks/frames_scaling.py")


if __name__ == "__main__":
    main()
