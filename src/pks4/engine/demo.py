"""``pks4 demo``: the built-in temporal benchmark, a tiny PKS4 and the frame-average baseline, on the CPU.

Both models are trained with the same recipe (the ``run`` section of the preset) and evaluated through the
shared inference path, so the gap between them is the temporal modelling alone (the point of PKS4 Table 5).
The settings are a preset (``configs/demo.yaml``), not code.

The demo folder is a run directory (:mod:`pks4.engine.rundir`): locked while the demo runs, never written over
(``--overwrite`` moves an earlier demo aside, ``--resume`` continues one). Ctrl-C or SIGTERM stops the whole demo:
a training in progress saves a checkpoint first, no report is written from partial runs, and the result says how
to continue (``pks4 demo --out DIR --resume``: data kept, finished trainings not repeated).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from pks4.engine.config import (ConfigError, ModelConfig, RunConfig, apply_overrides, build_section, config_to_dict,
                                parse_yaml, read_yaml)
from pks4.engine.rundir import atomic_write_text

__all__ = ["DemoConfig", "DemoStopped", "DEMO_MARKERS", "load_demo_config", "run_demo", "train_and_evaluate"]


@dataclass
class DemoConfig:
    """Preset of ``pks4 demo``."""

    seed: int = 0
    synth: dict[str, Any] = field(default_factory=dict)  # keyword arguments of pks4.data.synth.generate_synth
    views: Optional[str] = None  # evaluation views of both models; None = the recipe's run.eval.views
    run: RunConfig = field(default_factory=RunConfig)  # shared training recipe; data paths are filled in
    pks4_model: ModelConfig = field(default_factory=lambda: ModelConfig(name="pks4_vit_tiny"))
    baseline_model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_tiny_avgpool"))
    parallel: bool = False  # train the two models at the same time, each on half of the cores (measured slower on 2 cores)

    def eval_views(self) -> str:
        """The views both models are tested with."""
        return self.views or self.run.eval.views


def load_demo_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DemoConfig:
    """The packaged ``demo.yaml`` (or ``path``) with ``key=value`` overrides (e.g. ``run.train.epochs=2``)."""
    values = (read_yaml(path, "demo preset") if path else
              parse_yaml((resources.files("pks4") / "configs" / "demo.yaml").read_text(), "demo.yaml")) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'demo.yaml'}: expected a mapping at the top level")
    return apply_overrides(build_section(DemoConfig, values), list(overrides or []))


class DemoStopped(Exception):
    """Ctrl-C or SIGTERM reached the demo (``signum``); any training in progress has saved its checkpoint."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(f"{signal.Signals(signum).name}{f' during {where}' if where else ''}")
        self.signum, self.where = signum, where

    def __reduce__(self) -> tuple:  # raised in a parallel training's process, re-raised in the demo's
        return DemoStopped, (self.signum, self.where)


@contextmanager
def _stop_on_signals(forward: bool = False) -> Iterator[None]:
    """SIGINT / SIGTERM raise :class:`DemoStopped` while the demo is not training (the training loop installs its
    own handler, which saves first, and puts this one back). ``forward``: pass the signal on, once, to this
    process's children (the parallel trainings, which sit in their own process group)."""
    def stop(signum: int, frame: Any) -> None:
        if forward:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signum)
        raise DemoStopped(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def train_and_evaluate(cfg: DemoConfig, key: str, model: ModelConfig, splits: Any, out: Path,
                       resume: bool = False) -> dict[str, Any]:
    """Train ``model`` with the preset's recipe on ``splits`` into ``out/key`` (with ``resume`` from its latest
    checkpoint); evaluate it with the demo's views. A training stopped by a signal raises :class:`DemoStopped`."""
    from pks4.engine.infer import evaluate_checkpoint
    from pks4.engine.train import train

    data = replace(cfg.run.data, root=str(splits.root), train=str(splits.train), val=str(splits.val),
                   labels=str(splits.labels))
    run = replace(cfg.run, model=model, data=data, out=str(out / key))
    result = train(run, resume="auto" if resume else None, log=lambda msg: print(f"[{key}] {msg}", flush=True))
    if result.status == "interrupted":
        raise DemoStopped(result.exit_code - 128, f"the {key} training (checkpoint saved at step {result.global_step})")
    metrics = evaluate_checkpoint(out / key, views=cfg.eval_views(), out_dir=out / key,
                                  num_workers=cfg.run.train.num_workers)
    return {"model": model.name, **metrics, "train_steps": result.global_step}


def _plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bar_ax, curve_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["pks4", "baseline"]
    bar_ax.bar(names, [report[n]["top1"] for n in names], color=["tab:orange", "tab:gray"])
    bar_ax.set(ylabel="validation top-1 (%)", ylim=(0, 100), title=f"views {report['views']}")
    for name in names:
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        val = [r for r in rows if r["kind"] == "val"]
        curve_ax.plot([r["epoch"] for r in val], [r["top1"] for r in val], marker="o", label=name)
    curve_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="during training (1 view)")
    curve_ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)


def _markdown(report: dict[str, Any], cfg: DemoConfig) -> str:
    lines = ["# pks4 demo: temporal benchmark", "",
             "Synthetic Something-Something-like videos (classes in time-reversed pairs); both models trained "
             "with the same recipe, evaluated with the same views.", "",
             "| model | registry name | top-1 (%) | top-5 (%) | mean-class (%) |", "|---|---|---|---|---|"]
    for key in ("pks4", "baseline"):
        r = report[key]
        lines.append(f"| {key} | {r['model']} | {r['top1']:.1f} | {r['top5']:.1f} | {r['mean_class']:.1f} |")
    lines += ["", f"Views {report['views']}, {report['seconds']:.0f} s in total.", "", "![results](report.png)",
              "", "Preset:", "", "```yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _train_in_child(threads: int, *args: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    with _stop_on_signals():
        return train_and_evaluate(*args)


def _train_both(cfg: DemoConfig, splits: Any, out: Path, resume: bool) -> dict[str, Any]:
    jobs = (("pks4", cfg.pks4_model), ("baseline", cfg.baseline_model))
    if not (cfg.parallel and (os.cpu_count() or 1) >= 2):
        return {key: train_and_evaluate(cfg, key, model, splits, out, resume) for key, model in jobs}
    # Two processes with half the cores each (an option: on 2 cores it measured slower than running the
    # two trainings one after the other, because both processes also prepare their own batches).
    threads = max(1, (os.cpu_count() or 2) // 2)
    # Each in its own process group: a terminal's Ctrl-C reaches the demo alone, which passes it on once.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=os.setpgrp) as pool:
        futures = {key: pool.submit(_train_in_child, threads, cfg, key, model, splits, out, resume)
                   for key, model in jobs}
        return {key: f.result() for key, f in futures.items()}


DEMO_MARKERS = ("report.json", "pks4", "baseline")  # what shows that a folder holds a demo


def run_demo(cfg: DemoConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False
             ) -> dict[str, Any]:
    """Generate the data, train and evaluate both models; write report.json, report.md and report.png.

    ``out_dir`` is guarded as a run directory (``resume`` continues a demo there, ``overwrite`` moves one aside).
    Stopped by SIGINT / SIGTERM, nothing more is trained or written: the result is ``{"status": "interrupted",
    "exit_code": 128 + signal, "resume": <the command that continues>}``."""
    from pks4.data.synth import generate_synth
    from pks4.engine.rundir import guarded_run_dir

    start = time.perf_counter()
    out = Path(out_dir)
    again = f"pks4 demo --out {out} --resume"
    with guarded_run_dir(out, resume="auto" if resume else None, overwrite=overwrite, markers=DEMO_MARKERS,
                         resume_flag="--resume"), _stop_on_signals(forward=cfg.parallel):
        try:
            splits = generate_synth(out / "data", seed=cfg.seed, **cfg.synth)
            report: dict[str, Any] = {"views": cfg.eval_views(), **_train_both(cfg, splits, out, resume)}
        except DemoStopped as stop:
            print(f"demo interrupted ({stop}); nothing more was trained or written. Continue it with `{again}`",
                  file=sys.stderr, flush=True)
            return {"status": "interrupted", "exit_code": 128 + stop.signum, "resume": again}
        report["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1))
        _plot(report, out)
        atomic_write_text(out / "report.md", _markdown(report, cfg))
    return report
