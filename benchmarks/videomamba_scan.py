"""VideoMamba-S on the CPU: the fast selective scan against the reference scan, in the same run.

Whole-model forward (no grad) and forward + backward of ``videomamba_small`` (d 384, d_inner 768, 24 blocks,
1x16x16 tubelets) at batch 1, 224 x 224, 8 and 16 frames (L = 1569 / 3137 tokens), once with the default
scan (``scan_backend="auto"``: the native CPU kernel) and once with ``scan_backend="ref"`` (the plain
sequential loop that is the oracle of the fast paths). Everything else in the model is the same code.

The reference loop takes seconds per block, so both paths are also timed on a model cut to ``--ref-blocks``
blocks (same width, same tokens); the speed-up is read at equal block counts. Time: best of ``--repeats``
after one warm-up (the reference path: one warm-up-free run on the cut model, it is long enough).
Peak memory: the process's peak resident set above its resident set before the call (VmHWM reset through
/proc/self/clear_refs), the model's weights excluded.

Run: ``.venv/bin/python benchmarks/videomamba_scan.py --wait-load 2.5 --md benchmarks/videomamba_scan.md``
(``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import best_ms, peak_extra_mib  # noqa: E402  (the memory probe of the scan benchmark)

from pks4.models.registry import create_model  # noqa: E402


@dataclass
class Row:
    frames: int
    tokens: int
    path: str
    blocks: int
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_mib: float
    fwd_bwd_mib: float


def model_fns(frames: int, blocks: int, backend: str, size: int):
    torch.manual_seed(0)
    model = create_model("videomamba_small", num_frames=frames, depth=blocks, scan_backend=backend,
                         image_size=size)
    clip = torch.randn(1, frames, 3, size, size)

    def fwd() -> None:
        with torch.no_grad():
            model(clip)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(clip).sum().backward()

    return fwd, fwd_bwd


def measure(frames: int, blocks: int, backend: str, repeats: int, size: int) -> Row:
    fwd, fwd_bwd = model_fns(frames, blocks, backend, size)
    if backend == "ref":  # seconds per block: one run each, the memory probe is the timed run
        t = time.perf_counter()
        mem_f = peak_extra_mib(fwd)
        t_f = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        mem_fb = peak_extra_mib(fwd_bwd)
        t_fb = (time.perf_counter() - t) * 1e3
    else:
        mem_f = peak_extra_mib(fwd)  # doubles as the warm-up
        t_f = best_ms(fwd, repeats)
        mem_fb = peak_extra_mib(fwd_bwd)
        t_fb = best_ms(fwd_bwd, repeats)
    tokens = 1 + frames * (size // 16) ** 2
    return Row(frames, tokens, "reference" if backend == "ref" else "fast", blocks, t_f, t_fb, mem_f, mem_fb)


def wait_for_load(limit: float, max_wait_s: float = 600.0) -> float:
    """Sleep until the 1-minute load average is below ``limit`` (at most ``max_wait_s``); return it."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] >= limit and time.time() < deadline:
        time.sleep(15)
    return os.getloadavg()[0]


def table(rows: list[Row]) -> str:
    fast = {(r.frames, r.blocks): r for r in rows if r.path == "fast"}
    lines = ["| frames | tokens | path | blocks | forward (ms) | fwd+bwd (ms) | fwd speed-up | fwd+bwd speed-up "
             "| peak extra MiB fwd | peak extra MiB fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = fast.get((r.frames, r.blocks)) if r.path == "reference" else None
        up_f = f"x{r.fwd_ms / ref.fwd_ms:.0f}" if ref else ""
        up_fb = f"x{r.fwd_bwd_ms / ref.fwd_bwd_ms:.0f}" if ref else ""
        lines.append(f"| {r.frames} | {r.tokens} | {r.path} | {r.blocks} | {r.fwd_ms:.0f} | "
                     f"{r.fwd_bwd_ms:.0f} | {up_f} | {up_fb} | {r.fwd_mib:.0f} | {r.fwd_bwd_mib:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    p.add_argument("--ref-blocks", type=int, default=2, help="blocks of the cut model both paths run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-load", type=float, default=None, help="wait for the 1-min load average to drop below")
    p.add_argument("--md", help="also write the report (machine, command, table) to this markdown file")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 frames, 1 block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    frames, ref_blocks, size = (args.frames, args.ref_blocks, 224) if not args.quick else ([2], 1, 64)
    load_start = wait_for_load(args.wait_load) if args.wait_load else os.getloadavg()[0]
    rows = []
    for t in frames:
        rows.append(measure(t, 24 if not args.quick else 2, "auto", args.repeats, size))
        rows.append(measure(t, ref_blocks, "auto", args.repeats, size))
        rows.append(measure(t, ref_blocks, "ref", args.repeats, size))
        print(table(rows), flush=True)
    load_end = os.getloadavg()[0]
    report = render(args, rows, load_start, load_end, size)
    print(report)
    if args.md:
        Path(args.md).write_text(report)


def render(args: argparse.Namespace, rows: list[Row], load_start: float, load_end: float, size: int) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    command = "python " + " ".join(["benchmarks/videomamba_scan.py", *sys.argv[1:]])
    return "\n".join([
        "# VideoMamba-S on the CPU: fast scan vs reference scan", "",
        f"Machine: {cpu}, {os.cpu_count()} cores visible, {args.threads} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}. 1-minute load average {load_start:.2f} when timing started, "
        f"{load_end:.2f} when it ended.", "",
        f"Command: `{command}`", "",
        f"Batch 1, {size} x {size}, fp32, `videomamba_small` (d 384, d_inner 768, d_state 16). 'fast' = "
        "`scan_backend=\"auto\"` (native CPU kernel), 'reference' = `scan_backend=\"ref\"` (sequential loop). "
        f"The reference path runs a model cut to {rows[-1].blocks} block(s) (same width and tokens); the fast "
        "path is timed both at full depth (24) and at that cut, and speed-ups compare equal block counts. "
        "Times: fast = best of the repeats after a warm-up; reference = a single run. Peak extra MiB = peak "
        "resident set above the resident set before the call (weights excluded).", "",
        table(rows), ""])


if __name__ == "__main__":
    main()
