"""Causal vs non-causal tiny PKS4 on the built-in benchmark: top-1 per training seed, and for causal runs the
running prediction's top-1 after each of the 8 frames.

The runs are the demo preset's PKS4 half (``pks4 demo`` trains PKS4 first, then the frame-average baseline,
which this comparison does not need: ``pks4.engine.demo.train_and_evaluate`` alone), one training seed each,
1 thread, two at a time:

    OMP_NUM_THREADS=1 pks4 demo --out runs/plain_s1 --set run.train.seed=1
    OMP_NUM_THREADS=1 pks4 demo --out runs/causal_s1 --set run.train.seed=1 --set pks4_model.overrides.causal=true
    OMP_NUM_THREADS=1 pks4 demo --out runs/half_s1 --set run.train.seed=1 --set pks4_model.overrides.causal=true \
        --set pks4_model.overrides.causal_offsets=past_half

Every run is evaluated here through the shared inference path (the demo's views, 8x2x1: softmax per view,
then the mean). For a causal run, ``forward_running`` gives the logits after every frame of each view; the
top-1 after t frames averages the views' probabilities the same way, so after all 8 frames it is the
evaluation's top-1.

    python benchmarks/causal_accuracy.py --group "non-causal" runs/plain_s{1,2,3}/pks4 \
        --group "causal" runs/causal_s{1,2,3}/pks4 --group "causal, past_half" runs/half_s{1,2}/pks4
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pks4.data.datasets import build_dataset, collate_skip_bad
from pks4.data.sampling import parse_views
from pks4.engine.checkpoint import load_model_from_checkpoint
from pks4.engine.demo import load_demo_config
from pks4.engine.infer import aggregate_views, evaluate_checkpoint

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def running_top1(run: Path, views: str) -> list[float]:
    """Percent top-1 of the running prediction after 1, 2, ..., T frames (views averaged as in evaluation)."""
    model, cfg, _ = load_model_from_checkpoint(run)
    spec = parse_views(views)
    dataset = build_dataset(replace(cfg.data, cache_decoded=False), "val", train=False, views=spec)
    hits = torch.zeros(spec.frames)
    count = 0
    for batch in DataLoader(dataset, batch_size=16, collate_fn=collate_skip_bad):
        clips = batch["video"]  # (N, V, T, 3, H, W)
        n, v = clips.shape[:2]
        logits = model.forward_running(clips.flatten(0, 1)).view(n, v, spec.frames, -1)
        for t in range(spec.frames):
            hits[t] += (aggregate_views(logits[:, :, t]).argmax(-1) == batch["label"]).sum()
        count += n
    return (100.0 * hits / count).tolist()


def _weak_classes(run: Path, views: str) -> tuple[dict, dict[str, float]]:
    """The evaluation's metrics and the classes it gets below 90% right (from its confusion matrix)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate_checkpoint(run, views=views, num_workers=0, out_dir=tmp)
        with open(Path(tmp) / "confusion_matrix.csv") as fh:
            rows = list(csv.reader(fh))
    names, weak = rows[0][1:], {}
    for row in rows[1:]:
        counts = [int(c) for c in row[1:]]
        if sum(counts) and counts[names.index(row[0])] < 0.9 * sum(counts):
            weak[row[0]] = round(100.0 * counts[names.index(row[0])] / sum(counts), 1)
    return metrics, weak


def _seed(run: Path) -> str:
    name = run.parent.name if run.name == "pks4" else run.name
    return name.rsplit("_s", 1)[-1]


def measure(groups: list[list[str]], reported: list[list[str]], views: str) -> dict:
    """``groups``: [label, run dir, ...] each; ``reported``: [label, seed=top1, ...] from earlier runs."""
    res: dict = {"views": views, "groups": {}, "reported": {}, "running": {}, "weak": {}}
    for label, *runs in groups:
        res["groups"][label] = {}
        for run in map(Path, runs):
            metrics, weak = _weak_classes(run, views)
            res["groups"][label][_seed(run)], res["samples"] = metrics["top1"], metrics["samples"]
            res["weak"][f"{label}, seed {_seed(run)}"] = weak
            print(label, run, metrics, weak, flush=True)
            if load_model_from_checkpoint(run)[0].config.causal:
                res["running"][f"{label}, seed {_seed(run)}"] = running_top1(run, views)
    for label, *pairs in reported:
        res["reported"][label] = {k: float(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    return res


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} | {spread:.1f} | {min(values):.1f}-{max(values):.1f}"


def _accuracy_table(res: dict) -> list[str]:
    rows = {label: (values, {}) for label, values in res["groups"].items()}
    for label, values in res["reported"].items():  # earlier runs complete a group's seeds, marked with *
        measured = rows.setdefault(label, ({}, {}))[0]
        rows[label][1].update({s: v for s, v in values.items() if s not in measured})
    seeds = sorted({s for measured, earlier in rows.values() for s in (*measured, *earlier)})
    lines = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | range |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for label, (measured, earlier) in rows.items():
        cells = [f"{measured[s]:.1f}" if s in measured else f"{earlier[s]:.1f}*" if s in earlier else "-"
                 for s in seeds]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_summary([*measured.values(), *earlier.values()])} |")
    return lines


def write(res: dict, path: Path, command: str) -> None:
    lines = ["# Causal PKS4 on the built-in benchmark", "", f"Reproduce: `{command}` (runs as in the script's "
             "docstring)", "", f"Top-1 (%), validation set ({res['samples']} clips), views {res['views']}"
             + ("; * = an earlier run of the unchanged preset, not re-evaluated here" if res["reported"] else "")
             + ":", ""] + _accuracy_table(res)
    if res["running"]:
        frames = len(next(iter(res["running"].values())))
        lines += ["", "Causal runs, top-1 (%) of the running prediction after t frames (the same views; t = "
                  f"{frames} is the table's top-1):", "", "| run | " + " | ".join(f"t={t + 1}" for t in range(frames))
                  + " |", "|---|" + "---|" * frames]
        lines += [f"| {run} | " + " | ".join(f"{a:.1f}" for a in accs) + " |" for run, accs in res["running"].items()]
    lines += ["", "Classes a run gets below 90% right (top-1 per class, %):", ""]
    lines += [f"- {run}: " + (", ".join(f"{c} {a:.1f}" for c, a in weak.items()) or "none")
              for run, weak in res["weak"].items()]
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                   help="a row: its label, then run dirs named like NAME_s<seed>[/pks4] (repeatable)")
    p.add_argument("--reported", nargs="+", action="append", default=[], metavar=("LABEL", "SEED=TOP1"),
                   help="top-1 of earlier runs for a row's other seeds, marked as such (repeatable)")
    p.add_argument("--views", default=load_demo_config().eval_views())
    p.add_argument("--out", type=Path, default=HERE / "causal_accuracy.md")
    p.add_argument("--command", default="python benchmarks/causal_accuracy.py --group ... (see the docstring)",
                   help="the command line to print as the way to reproduce the file")
    p.add_argument("--note", default="", help="a paragraph to end the file with")
    args = p.parse_args()
    torch.manual_seed(0)
    write(measure(args.group, args.reported, args.views), args.out, args.command)
    if args.note:
        with open(args.out, "a") as fh:
            fh.write(f"\n{args.note}\n")


if __name__ == "__main__":
    main()
