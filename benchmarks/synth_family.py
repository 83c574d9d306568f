"""The from-scratch recipe on every kind of the benchmark family, over several training seeds.

For each kind (``pks4 data synth --kind``), each training seed and each model (tiny PKS4 and the frame-average
baseline), one ``pks4 train RECIPE`` run from flags alone, through the real engine: the command names only the
data, the model, the seed and the output folder. Each run is its own niced process with one thread, at most
``--jobs`` at a time, and its CPU time is the process's user + system seconds (the CPU is shared, so wall time
says little). Accuracy is the last epoch's validation top-1 of the run's evaluated weights (the EMA when the recipe
keeps one) with the recipe's ``eval.val_views``: no epoch is picked on the validation set.

    .venv/bin/python benchmarks/synth_family.py --out /tmp/family --md benchmarks/synth_family.md

A run whose ``result.json`` exists is not run again, so an interrupted sweep continues where it stopped.
``data.cache_decoded=true`` and ``--workers 0`` keep each run in one process; they change the CPU cost, not the
clips (every item's crop and frame offsets come from its own seed).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pks4.data.synth import KINDS, SynthSplits, generate_synth
from pks4.recipes import FROM_SCRATCH_RECIPE

MODELS = {"pks4_vit_tiny": "tiny PKS4", "vit_tiny_avgpool": "frame-average baseline"}


@dataclass
class Job:
    """One training run: ``pks4 train`` with ``args`` after the recipe, into ``out``."""

    key: str
    out: Path
    args: list[str]
    meta: dict = field(default_factory=dict)


def pks4_command(command: str = "train") -> list[str]:
    """``pks4 COMMAND`` from the environment running this script."""
    return [str(Path(sys.executable).with_name("pks4")), command]


def run_job(job: Job) -> dict:
    """Run ``job`` (niced, one thread), or read its earlier result; returns the result dict."""
    done = job.out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    job.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "10", *pks4_command(), *job.args, "--out", str(job.out), "--workers", "0",
           "--set", "data.cache_decoded=true", "--set", "train.progress=false", "--set", "train.tensorboard=false"]
    start = time.time()
    with open(job.out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{job.key}: exit {os.waitstatus_to_exitcode(status)}; see {job.out / 'log.txt'}")
    result = {"key": job.key, **job.meta, **read_run(job.out), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "wall_s": round(time.time() - start, 1), "command": " ".join(cmd[3:])}
    done.write_text(json.dumps(result, indent=1))
    print(f"{job.key}: top-1 {result['top1']:.1f}  ({result['cpu_s']:.0f} CPU s)", flush=True)
    return result


def read_run(run: Path) -> dict:
    """Per-epoch validation top-1, the last one, and the last evaluation's per-class accuracy."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r for r in rows if r["kind"] == "val"]
    with open(run / "confusion_matrix.csv") as fh:
        table = list(csv.reader(fh))[1:]
    per_class = {r[0]: 100.0 * int(r[1 + i]) / max(1, sum(int(v) for v in r[1:])) for i, r in enumerate(table)}
    return {"top1": val[-1]["top1"], "curve": [round(r["top1"], 2) for r in val], "per_class": per_class,
            "steps": val[-1]["step"]}


def run_all(jobs: list[Job], parallel: int, done_only: bool = False) -> list[dict]:
    """Every job's result; with ``done_only``, only the results already on disk (nothing is trained)."""
    if done_only:
        return [json.loads((j.out / "result.json").read_text()) for j in jobs if (j.out / "result.json").is_file()]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(run_job, jobs))


def mean_sd(values: list[float]) -> str:
    """Mean ± sample standard deviation (0 for one value); "not run" for none."""
    if not values:
        return "not run"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def kind_data(args: argparse.Namespace, out: Path, kind: str) -> SynthSplits:
    """The data set of ``kind`` under ``out/data``, deterministic in ``--data-seed`` (written once: a second call
    with the same settings finds it in place)."""
    return generate_synth(out / "data" / kind, kind=kind, seed=args.data_seed, size=args.size, num_frames=args.frames,
                          num_train_per_class=args.train_per_class, num_val_per_class=args.val_per_class)


def family_jobs(args: argparse.Namespace, out: Path) -> list[Job]:
    jobs = []
    for kind in args.kinds:
        data = kind_data(args, out, kind)
        for model in args.models:
            for seed in args.seeds:
                jobs.append(Job(f"{kind}/{model}/seed{seed}", out / "runs" / kind / model / f"seed{seed}",
                                [args.recipe, "--train-list", str(data.train), "--val-list", str(data.val),
                                 "--labels", str(data.labels), "--model", model, "--seed", str(seed),
                                 *[x for s in args.set for x in ("--set", s)]],
                                dict(kind=kind, model=model, seed=seed)))
    return jobs


def kinds_table(kinds: list[str]) -> list[str]:
    lines = ["| kind | what | classes (forward / reversed) |", "|---|---|---|"]
    for name in kinds:
        kind = KINDS[name]
        pairs = ", ".join(f"{fwd} / {bwd}" for _, fwd, bwd in kind.pairs)
        lines.append(f"| `{name}` | {kind.description} | {pairs} |")
    return lines


def family_table(results: list[dict], kinds: list[str], models: list[str]) -> list[str]:
    head = " | ".join(f"{MODELS.get(m, m)}: top-1 mean ± sd (seeds) | CPU s" for m in models)
    lines = [f"| kind | classes | {head} |", "|---|---|" + "---|---|" * len(models)]
    for kind in kinds:
        cells = []
        for model in models:
            rs = sorted((r for r in results if r["kind"] == kind and r["model"] == model), key=lambda r: r["seed"])
            seeds = " / ".join(f"{r['top1']:.1f}" for r in rs)
            cpu = f"{statistics.mean(r['cpu_s'] for r in rs):.0f}" if rs else "-"
            cells.append(f"{mean_sd([r['top1'] for r in rs])} ({seeds}) | {cpu}")
        lines.append(f"| `{kind}` | {len(KINDS[kind].classes)} | {' | '.join(cells)} |")
    return lines


def pair_table(results: list[dict], kinds: list[str], model: str) -> list[str]:
    """Mean per-pair accuracy of ``model`` (both classes of each pair), to show which pair a kind's errors are in."""
    lines = ["| kind | per pair: mean top-1 over seeds (%) |", "|---|---|"]
    for kind in kinds:
        rs = [r for r in results if r["kind"] == kind and r["model"] == model]
        if not rs:
            continue
        cells = []
        for _, fwd, bwd in KINDS[kind].pairs:
            acc = statistics.mean((r["per_class"][fwd] + r["per_class"][bwd]) / 2 for r in rs)
            cells.append(f"{fwd}/{bwd} {acc:.0f}")
        lines.append(f"| `{kind}` | {', '.join(cells)} |")
    return lines


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options both drivers share: which kinds, which seeds, the data, how many runs at a time, the output."""
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    p.add_argument("--md", help="write the markdown tables here")
    p.add_argument("--done-only", action="store_true", help="train nothing: tabulate the runs already finished")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/synth_family", help="data and runs go here (not into the repository)")
    p.add_argument("--recipe", default=FROM_SCRATCH_RECIPE, help="a YAML file or a packaged recipe's name")
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    add_common_args(p)
    args = p.parse_args()
    out = Path(args.out)
    results = run_all(family_jobs(args, out), args.jobs, args.done_only)
    (out / "family.json").write_text(json.dumps(results, indent=1))
    lines = (kinds_table(args.kinds) + [""] + family_table(results, args.kinds, args.models) + [""]
             + pair_table(results, args.kinds, args.models[0]))
    command = "python benchmarks/synth_family.py " + " ".join(sys.argv[1:])
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} cores shared, torch threads 1 per run.",
              f"Command: `{command}`", f"One run: `pks4 train {results[0]['command'].split(' train ', 1)[-1]}`"]
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
