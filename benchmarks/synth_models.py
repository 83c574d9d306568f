"""Both VideoMambas next to PKS4 and the frame-average baseline on the built-in temporal benchmark.

The data and the recipe are those of ``pks4 demo`` (``src/pks4/configs/demo.yaml``): Something-Something-like
synthetic videos whose classes come in time-reversed pairs, 8 frames at 64 x 64, the same training recipe for
every model (the ``run`` section), the same evaluation views. Every model goes through the real path:
:func:`pks4.engine.train.train` then :func:`pks4.engine.infer.evaluate_checkpoint`. The micro VideoMambas are
``videomamba_li_micro`` (Li et al.: 1x8x8 tubelets, separable position embedding, spatial-first bidirectional
scan) and ``videomamba_park_micro`` (Park et al.: 2x8x8 tubelets, joint position embedding, spatio-temporal
reversal), both d 64 with 4 blocks. Each model is also evaluated with the frames reordered (Park et al.
Table 1): a model that reads time loses accuracy, the frame average cannot.

Run: ``.venv/bin/python benchmarks/synth_models.py --out runs/synth_models --md benchmarks/synth_models.md``
(``--set run.train.epochs=1`` for a smoke run; any key of the demo preset can be overridden).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pks4.data.frame_order import FRAME_ORDERS
from pks4.data.synth import generate_synth
from pks4.engine.config import ModelConfig
from pks4.engine.demo import DemoConfig, load_demo_config
from pks4.engine.infer import evaluate_checkpoint
from pks4.engine.train import train
from pks4.models.registry import count_parameters, create_model

MODELS = {"videomamba_li_micro": "VideoMamba (Li et al.), micro",
          "videomamba_park_micro": "VideoMamba (Park et al.), micro",
          "pks4_vit_tiny": "PKS4, tiny",
          "vit_tiny_avgpool": "frame-average baseline, tiny"}


def run_model(cfg: DemoConfig, name: str, splits: Any, out: Path, orders: list[str]) -> dict[str, Any]:
    """Train ``name`` with the demo recipe, then evaluate it per frame order through the one inference path."""
    data = replace(cfg.run.data, root=str(splits.root), train=str(splits.train), val=str(splits.val),
                   labels=str(splits.labels))
    run = replace(cfg.run, model=ModelConfig(name=name), data=data, out=str(out / name))
    start = time.perf_counter()
    result = train(run, log=lambda msg: print(f"[{name}] {msg}", flush=True))
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"model": name, "train_steps": result.global_step, "train_seconds": round(seconds, 1)}
    for order in orders:
        metrics = evaluate_checkpoint(out / name, views=cfg.eval_views(), num_workers=cfg.run.train.num_workers,
                                      frame_order=order, out_dir=out / name if order == "sequential" else None)
        row[order] = metrics
        print(f"[{name}] frame order {order}: top-1 {metrics['top1']:.1f}", flush=True)
    size, frames = cfg.run.data.size, cfg.run.data.num_frames
    with torch.device("meta"):
        model = create_model(name, image_size=size, num_frames=frames, num_classes=splits.num_classes)
    row["params_m"] = round(count_parameters(model) / 1e6, 3)
    return row


def markdown(report: dict[str, Any], orders: list[str], command: str) -> str:
    head = "| model | registry name | params (M) | top-1 (%) | top-5 (%) | mean-class (%) | " + \
        " | ".join(f"top-1 {o} (%)" for o in orders if o != "sequential") + " | train time (s) |"
    lines = ["# VideoMamba (Li, Park), PKS4 and the frame-average baseline on the temporal benchmark", "",
             f"Machine: {report['machine']}. 1-minute load average {report['load_start']:.2f} at the start, "
             f"{report['load_end']:.2f} at the end; {report['seconds']:.0f} s in total.", "",
             f"Command: `{command}`", "",
             "Data and recipe of `pks4 demo` (`src/pks4/configs/demo.yaml`): synthetic Something-Something-like "
             "videos, 10 classes in time-reversed pairs, 400 training / 120 validation clips, 8 frames at 64 x 64; "
             f"every model trained from scratch with the same recipe ({report['epochs']} epochs, batch "
             f"{report['batch_size']}, AdamW lr {report['lr']:g}, cosine), evaluated with views {report['views']} "
             "through `evaluate_checkpoint`. The frame-order columns reorder every clip's frames before the model "
             "(Park et al. Table 1); 'top-1' is the sequential order.", "",
             head, "|" + "---|" * (6 + len(orders))]
    for row in report["rows"]:
        seq = row["sequential"]
        perturbed = " | ".join(f"{row[o]['top1']:.1f}" for o in orders if o != "sequential")
        lines.append(f"| {MODELS.get(row['model'], row['model'])} | `{row['model']}` | {row['params_m']:.2f} | "
                     f"{seq['top1']:.1f} | {seq['top5']:.1f} | {seq['mean_class']:.1f} | {perturbed} | "
                     f"{row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/synth_models")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo preset key")
    p.add_argument("--no-frame-orders", action="store_true", help="evaluate the sequential order only")
    p.add_argument("--md", help="write the markdown report here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_demo_config(None, args.set)
    orders = ["sequential"] if args.no_frame_orders else list(FRAME_ORDERS)
    out = Path(args.out)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    splits = generate_synth(out / "data", seed=cfg.seed, **cfg.synth)
    rows = [run_model(cfg, name, splits, out, orders) for name in args.models]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = {"rows": rows, "views": cfg.eval_views(), "epochs": cfg.run.train.epochs, "batch_size": cfg.run.train.batch_size,
              "lr": cfg.run.optim.lr, "seconds": round(time.perf_counter() - start, 1), "load_start": load_start,
              "load_end": os.getloadavg()[0],
              "machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
                         "threads)"}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    command = "python " + " ".join(["benchmarks/synth_models.py", *sys.argv[1:]])
    text = markdown(report, orders, command)
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
