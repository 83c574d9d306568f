"""What the single PKS4 module costs: PKS4-B/16 vs the bare frame-wise CLIP ViT-B/16, 8 frames at 224.

Both models run in the same process on the same clip (batch 1, no_grad), alternating, one warm-up each, then
``--repeats`` timed passes each; the overhead is the ratio of the medians. The module alone is also timed on
the token tensor it sees after block 8 (1, 8, 197, 768). FLOPs are counted with and without attention (the
second is the convention of PKS4's published numbers).

    python benchmarks/pks4_overhead.py             # writes benchmarks/pks4_overhead.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pks4.engine.profile import FlopConvention, count_flops
from pks4.models.registry import create_model

HERE = Path(__file__).resolve().parent


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(repeats: int) -> dict:
    torch.manual_seed(0)
    pks4 = create_model("pks4_vit_b16").eval()
    vit = create_model("vit_b16_avgpool").eval()
    vit.backbone.load_state_dict(pks4.backbone.state_dict())
    x = torch.randn(1, 8, 3, 224, 224)
    tokens = torch.randn(1, 8, 197, 768)
    times: dict[str, list[float]] = {"pks4": [], "vit": [], "module": []}
    with torch.no_grad():
        calls = {"pks4": lambda: pks4(x), "vit": lambda: vit(x), "module": lambda: pks4.module(tokens, (14, 14))}
        for fn in calls.values():
            fn()  # warm-up (also builds the native scan kernel once)
        for _ in range(repeats):
            for name, fn in calls.items():
                times[name].append(_once(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {}
    for label, conv in (("with attention", FlopConvention()), ("without attention", FlopConvention(False))):
        flops[label] = (count_flops(pks4, 8, 224, 1, conv).total / 1e9, count_flops(vit, 8, 224, 1, conv).total / 1e9)
    return {"median_ms": med, "all_ms": times, "flops": flops, "threads": torch.get_num_threads()}


def write(res: dict, path: Path, repeats: int) -> None:
    med = res["median_ms"]
    lines = ["# PKS4 module overhead (ViT-B/16, 8 frames, 224x224, batch 1)", "",
             "Reproduce: `python benchmarks/pks4_overhead.py`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {res['threads']} torch "
             f"threads; other jobs shared the CPU. Median of {repeats} alternating passes after one warm-up.", "",
             "| measure | frame-wise ViT-B/16 (baseline) | PKS4-B/16 | ratio |", "|---|---|---|---|",
             f"| forward wall time (ms) | {med['vit']:.0f} | {med['pks4']:.0f} | {med['pks4'] / med['vit']:.3f} |"]
    for label, (p, v) in res["flops"].items():
        lines.append(f"| GFLOPs {label} | {v:.2f} | {p:.2f} | {p / v:.3f} |")
    lines += ["", f"The module alone on its (1, 8, 197, 768) input: {med['module']:.0f} ms "
              f"({med['module'] / med['vit']:.3f} of the ViT forward).", "",
              "All timed passes (ms): " + "; ".join(f"{k}: " + ", ".join(f"{t:.0f}" for t in v)
                                                   for k, v in res["all_ms"].items())]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "pks4_overhead.md"))
    args = p.parse_args()
    res = measure(args.repeats)
    write(res, Path(args.out), args.repeats)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
