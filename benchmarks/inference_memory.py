"""How close the inference-memory estimate is to real forwards, and what the check costs `pks4 predict` / `eval`.

``pks4.engine.profile.inference_peak_bytes`` runs a model on the meta device (nothing allocated) and counts every
intermediate from the operator that makes it until it is freed; eval, predict, the protocols and `pks4 profile`
refuse a run whose estimate exceeds the free memory. Per model and shape this script measures, in one run:

* the estimate and the time it takes (after a first call, which imports torch's dynamo: meta kernels need it);
* the plain reference ``live_peak_bytes``: a real CPU forward counted the same way;
* the resident memory a real forward adds in a fresh process (peak RSS sampled every millisecond, minus the RSS
  before the forward): what the operating system sees, allocator slack included;
* the first ``check_memory`` call in a fresh process (the one-time import included), median of 3.

    .venv/bin/python benchmarks/inference_memory.py [--out benchmarks/inference_memory.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from pks4.engine.profile import build_model, inference_peak_bytes, live_peak_bytes

CASES = [  # (model, frames, size, clips per forward)
    ("pks4_vit_tiny", 8, 224, 8),
    ("vit_b16_avgpool", 8, 224, 2),
    ("pks4_vit_b16", 8, 224, 2),
    ("vit_b16_joint", 8, 224, 1),
    ("videomamba_small", 8, 224, 2),
]

_COLD = """
import json, sys, torch
from pks4.engine.profile import PeakMemory, build_model
torch.set_num_threads(1)
name, frames, size, batch = sys.argv[1], *map(int, sys.argv[2:])
model = build_model(name, frames=frames, size=size).eval()
x = torch.randn(batch, frames, 3, size, size)
with torch.no_grad(), PeakMemory(torch.device("cpu")) as mem:
    model(x)
print(json.dumps(mem.peak_mb))
"""

_FIRST_CHECK = """
import sys, time, torch
from pks4.engine.infer import check_memory
from pks4.models.registry import create_model
model = create_model("pks4_vit_tiny", num_classes=10, image_size=32, num_frames=4).eval()
start = time.perf_counter()
check_memory(model, 4, 32, 4)
print(time.perf_counter() - start)
"""


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def measure(name: str, frames: int, size: int, batch: int) -> dict:
    torch.set_num_threads(1)
    model = build_model(name, frames=frames, size=size).eval()
    inference_peak_bytes(model, frames, size, batch)  # the first call pays the one-time import
    start = time.perf_counter()
    estimate = inference_peak_bytes(model, frames, size, batch)
    seconds = time.perf_counter() - start
    reference = live_peak_bytes(model, torch.randn(batch, frames, 3, size, size))
    cold = subprocess.run([sys.executable, "-c", _COLD, name, str(frames), str(size), str(batch)], check=True,
                          capture_output=True, text=True).stdout
    return {"model": name, "shape": f"{batch} x {frames} x {size}", "estimate": estimate, "seconds": seconds,
            "reference": reference, "rss_mib": json.loads(cold)}


def first_check_seconds(repeats: int = 3) -> float:
    runs = [float(subprocess.run([sys.executable, "-c", _FIRST_CHECK], check=True, capture_output=True,
                                 text=True).stdout) for _ in range(repeats)]
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table as markdown here")
    args = ap.parse_args()
    rows = [measure(*case) for case in CASES]
    first = first_check_seconds()
    lines = ["| model | clips x frames x px | estimate (MiB) | estimate takes (s) | real forward, same count (MiB) | "
             "estimate / real | RSS a cold forward adds (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {_mib(r['estimate'])} | {r['seconds']:.2f} | "
                     f"{_mib(r['reference'])} | {r['estimate'] / r['reference']:.3f} | {r['rss_mib']:.1f} |")
    lines += ["", f"First `check_memory` call in a fresh process (pks4_vit_tiny, 4 x 32 px; the import of torch's "
                  f"dynamo that meta kernels trigger included): {first:.2f} s, median of 3."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Inference memory: the estimate against real forwards\n\n"
                     "Produced by `.venv/bin/python benchmarks/inference_memory.py --out "
                     "benchmarks/inference_memory.md` (1 CPU thread per forward).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
