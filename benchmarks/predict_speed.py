"""Prediction throughput on the CPU, fp32 against bf16 autocast, measured in the same run.

Two measurements, each alternating fp32 and bf16 passes after one warm-up of each, reported as medians:

* the whole prediction path of ``pks4 predict`` / ``VideoClassifier`` (decode, views, model, aggregation) for the
  demo's tiny PKS4 (the trained ``runs/demo/pks4`` when it exists, else the same architecture with seeded weights:
  speed does not depend on the weights) over the built-in benchmark's validation clips, 8x2x1 views;
* the model forward alone for PKS4-B/16 at 8 x 224 (batch 1), the paper's model.

It also reports how far bf16 moves the answers: the largest probability difference and the share of clips whose
top-1 changes. ``resolve_amp("auto")`` keeps fp32 on the CPU unless bf16 is faster here.

    python benchmarks/predict_speed.py            # writes benchmarks/predict_speed.md
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pks4.api import VideoClassifier
from pks4.data.synth import generate_synth
from pks4.engine.demo import load_demo_config
from pks4.engine.infer import run_views
from pks4.engine.pretrained import InferenceSpec
from pks4.models.registry import create_model

HERE = Path(__file__).resolve().parent


def _demo_classifier(dtype: str, run: Path) -> VideoClassifier:
    if (run / "checkpoints").is_dir():
        return VideoClassifier.from_pretrained(run, device="cpu", dtype=dtype, views="8x2x1")
    cfg = load_demo_config()
    torch.manual_seed(0)
    model = create_model(cfg.pks4_model.name, num_classes=10, **cfg.pks4_model.overrides)
    data = dataclasses.replace(cfg.run.data, num_frames=8)
    return VideoClassifier(model, InferenceSpec([str(i) for i in range(10)], data, "8x2x1"), device="cpu",
                           dtype=dtype)


def _alternate(calls: dict, repeats: int) -> dict[str, list[float]]:
    for fn in calls.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def predict_path(videos: list[str], run: Path, repeats: int) -> dict:
    clfs = {dtype: _demo_classifier(dtype, run) for dtype in ("fp32", "bf16")}
    times = _alternate({k: (lambda c=c: c.scores(videos)) for k, c in clfs.items()}, repeats)
    p32, p16 = clfs["fp32"].scores(videos), clfs["bf16"].scores(videos)
    return {"times": times, "clips": len(videos), "trained": (run / "checkpoints").is_dir(),
            "max_prob_diff": float((p32 - p16).abs().max()),
            "top1_changed": float((p32.argmax(1) != p16.argmax(1)).double().mean())}


def base_forward(repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model("pks4_vit_b16", num_classes=174).eval()
    x = torch.randn(1, 1, 8, 3, 224, 224)
    calls = {"fp32": lambda: run_views(model, x), "bf16": lambda: run_views(model, x, amp_dtype=torch.bfloat16)}
    times = _alternate(calls, repeats)
    diff = (run_views(model, x).softmax(-1) - run_views(model, x, amp_dtype=torch.bfloat16).softmax(-1)).abs().max()
    return {"times": times, "clips": 1, "max_prob_diff": float(diff)}


def write(res: dict, path: Path, args: argparse.Namespace) -> None:
    rows = []
    for label, r in (("demo tiny PKS4, whole predict path (decode + 8x2x1 views + model)", res["path"]),
                     ("PKS4-B/16, 8x224, model forward (batch 1, one view)", res["base"])):
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        t32, t16 = r["times"]["fp32"], r["times"]["bf16"]
        apart = "yes" if max(t32) < min(t16) or max(t16) < min(t32) else "no"
        rows.append(f"| {label} | {r['clips'] / med['fp32']:.2f} | {r['clips'] / med['bf16']:.2f} | "
                    f"{med['fp32'] / med['bf16']:.3f} | {apart} | {r['max_prob_diff']:.4f} |")
    p = res["path"]
    lines = ["# Prediction speed on the CPU: fp32 vs bf16 autocast", "",
             f"Reproduce: `python benchmarks/predict_speed.py --repeats {args.repeats} --base-repeats "
             f"{args.base_repeats}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; other jobs shared the CPU "
             f"(load average {os.getloadavg()[0]:.1f} at the end). Medians of alternating passes after one warm-up "
             "each; bf16 is autocast (weights stay fp32).", "",
             "| what | fp32 clips/s | bf16 clips/s | bf16 speed-up (fp32 time / bf16 time) | every pass of one "
             "dtype faster than every pass of the other | max prob. diff |",
             "|---|---|---|---|---|---|", *rows, "",
             "Where the passes of the two dtypes overlap, the load of other jobs moved the times more than the dtype "
             "did, and the ratio is not significant.", "",
             f"The predict path scored {p['clips']} validation clips of the built-in benchmark per pass with "
             f"{'the trained demo model (runs/demo/pks4)' if p['trained'] else 'seeded weights (no runs/demo)'}; "
             f"bf16 changed the top-1 of {100 * p['top1_changed']:.1f}% of them.", "",
             "All timed passes (s): " + "; ".join(f"{name} {k}: " + ", ".join(f"{t:.2f}" for t in v)
                                                  for name, r in res.items() for k, v in r["times"].items())]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of the predict path per dtype")
    ap.add_argument("--base-repeats", type=int, default=3, help="timed PKS4-B/16 forwards per dtype")
    ap.add_argument("--run", default="runs/demo/pks4", help="trained demo run (optional)")
    ap.add_argument("--out", default=str(HERE / "predict_speed.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        splits = generate_synth(Path(tmp) / "synth", seed=0, num_train_per_class=0, num_val_per_class=4)
        videos = [str(splits.root / line.split()[0]) for line in splits.val.read_text().splitlines()]
        res = {"path": predict_path(videos, Path(args.run), args.repeats), "base": base_forward(args.base_repeats)}
    write(res, Path(args.out), args)
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
