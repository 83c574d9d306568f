"""Self-distillation (Li et al. §3.3, Fig. 6) on the built-in temporal benchmark: the same student run with the
distillation term on, off, and stopped early, 3 seeds each, tiny VideoMambas on the CPU.

The teacher is a smaller VideoMamba trained first on the same data with the same recipe, for longer (one run of 20
epochs, seed 100: Li et al.'s teacher is "well-trained"); each
student arm then trains with ``train.distill.teacher`` pointing at it (``on``), without it (``off``), or with the term
dropped half-way (``stop``: ``train.distill.stop_epoch``). Recipe: the demo's (``configs/demo.yaml``'s ``run``:
AdamW lr 1e-3, weight average 0.998, label smoothing 0.1, batch 16, 8 frames at 32 px) on a smaller benchmark
(120 training clips per class), evaluated once at the end through the one inference path (views 8x2x1) on the
120 held-out clips. The table gives mean and spread (sample standard deviation) over the seeds.

Run (each arm a process; at most two at a time on a shared machine)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/self_distill.py --out OUT --arms teacher
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/self_distill.py --out OUT --arms off
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/self_distill.py --out OUT --arms on
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/self_distill.py --out OUT --arms stop
    .venv/bin/python benchmarks/self_distill.py --out OUT --table benchmarks/self_distill.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pks4.data.synth import generate_synth
from pks4.engine.config import ModelConfig
from pks4.engine.demo import load_demo_config
from pks4.engine.infer import evaluate_checkpoint
from pks4.engine.train import train

TEACHER = ModelConfig(name="videomamba_li_micro", overrides=dict(embed_dim=48, depth=4, patch_size=8))
STUDENT = ModelConfig(name="videomamba_li_micro", overrides=dict(embed_dim=96, depth=6, patch_size=8))
TEACHER_SEED = 100
VIEWS = "8x2x1"


def _run(out: Path, key: str, model: ModelConfig, seed: int, epochs: int, **distill) -> dict:
    cfg = load_demo_config()
    splits = generate_synth(out / "data", seed=0, num_train_per_class=120, num_val_per_class=12, num_frames=16,
                            size=64)
    data = replace(cfg.run.data, root=str(splits.root), train=str(splits.train), val=str(splits.val),
                   labels=str(splits.labels))
    t = replace(cfg.run.train, seed=seed, epochs=epochs, eval_every=epochs, save_every=epochs, progress=False,
                distill=replace(cfg.run.train.distill, **distill))
    run = replace(cfg.run, model=model, data=data, train=t, out=str(out / key))
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(run, log=lambda msg: print(f"[{key}] {msg}", flush=True))
    timing = {"train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1)}
    metrics = evaluate_checkpoint(out / key, views=VIEWS, num_workers=0, device="cpu")
    return {"key": key, "seed": seed, "top1": metrics["top1"], "top5": metrics["top5"], **timing,
            "steps": result.global_step, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def run_arm(out: Path, arm: str, seeds: list[int], epochs: int, teacher_epochs: int) -> None:
    teacher = out / "teacher"
    for seed in ([TEACHER_SEED] if arm == "teacher" else seeds):
        key = "teacher" if arm == "teacher" else f"{arm}_seed{seed}"
        distill = {} if arm in ("teacher", "off") else {"teacher": str(teacher)}
        if arm == "stop":
            distill["stop_epoch"] = epochs // 2 + 1  # the first half of the epochs distil
        model, n = (TEACHER, teacher_epochs) if arm == "teacher" else (STUDENT, epochs)
        row = _run(out, key, model, seed, n, **distill) | {"arm": arm}
        (out / f"{key}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)


def _stats(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(out: Path, md: Path, argv: list[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = ["| arm | seeds | top-1 (%) | top-5 (%) | train CPU s |", "|---|---|---|---|---|"]
    for arm in ("teacher", "off", "on", "stop"):
        rs = [r for r in rows if r["arm"] == arm]
        if rs:
            lines.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {_stats([r['top1'] for r in rs])} | "
                         f"{_stats([r['top5'] for r in rs])} | {_stats([r['train_cpu_s'] for r in rs])} |")
    md.write_text(f"Command: `.venv/bin/python benchmarks/self_distill.py {' '.join(argv)}`; machine "
                  f"{platform.machine()}, {os.cpu_count()} cores, torch threads {rows[0]['threads'] if rows else '?'}"
                  ".\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/self_distill")
    p.add_argument("--arms", nargs="+", default=["teacher", "off", "on", "stop"],
                   choices=("teacher", "off", "on", "stop"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6, help="of each student run")
    p.add_argument("--teacher-epochs", type=int, default=20, help="the teacher is trained longer: a well-trained one")
    p.add_argument("--table", help="only write the table of the runs in --out to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    if args.table:
        table(out, Path(args.table), list(argv if argv is not None else sys.argv[1:]))
        return 0
    for arm in args.arms:
        run_arm(out, arm, args.seeds, args.epochs, args.teacher_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
