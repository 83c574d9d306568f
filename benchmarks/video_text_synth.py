"""Video-text retrieval on the captioned events benchmark: temporal encoders against the frame average, 3 seeds.

The benchmark and the recipe are those of ``pks4 demo --task video-text`` (:mod:`pks4.engine.video_text_demo`,
``configs/demo_video_text.yaml``): captions that name the order of three colour events, 1,200 training clips,
120 held-out clips holding every order of every colour set once. Each encoder is trained through the one training
loop (``pks4 pretrain --task video-text``) with each seed (the seed draws the data, the initialisation and the
batches), then scored on the held-out clips: text-to-video and video-to-text R@1/5/10 and median rank, and the
reversed-pair test. The table gives mean and spread (sample standard deviation) over the seeds, and the ratio of
each encoder's t2v R@1 to the frame average's (per seed, then averaged).

Run (one encoder per process; at most two at a time on a shared machine)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/video_text_synth.py --out OUT --encoders temporal
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/video_text_synth.py --out OUT --encoders baseline
    .venv/bin/python benchmarks/video_text_synth.py --out OUT --table benchmarks/video_text_synth.md

``--set KEY=VALUE`` overrides the preset (e.g. ``run.train.epochs=2`` for a smoke run); ``--encoders`` takes
``temporal``, ``baseline``, ``pks4`` (the demo's PKS4 preset) or a registry name with ``--overrides``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from pks4.data.synth_events import generate_events
from pks4.engine.config import ModelConfig, config_to_dict
from pks4.engine.video_text_demo import (FRAME_AVERAGE_CEILING, event_vocabulary, load_video_text_demo_config,
                                         train_and_score)

# The demo's PKS4 preset (configs/demo.yaml) as a visual encoder.
PKS4 = ModelConfig(name="pks4_vit_tiny", overrides=dict(patch_size=8, width=64, heads=2, layers=3, output_dim=64,
                                                        insert_layer=1, zero_init_residual=False, corr_window=3,
                                                        corr_context=3, var_ratio=1.0))
KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "v2t_r1", "v2t_r5", "v2t_r10", "v2t_mdr", "reversed_pair",
        "reversed_pair_matching_head", "train_cpu_s", "train_wall_s")


def _encoder(name: str, cfg: Any, overrides: str) -> ModelConfig:
    known = {"temporal": cfg.temporal_model, "baseline": cfg.baseline_model, "pks4": PKS4}
    return known.get(name) or ModelConfig(name=name, overrides=yaml.safe_load(overrides or "{}"))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for seed in args.seeds:
        cfg = load_video_text_demo_config(args.preset, list(args.set or []) + [f"seed={seed}"])
        splits = generate_events(out / f"data_seed{seed}", seed=seed, **cfg.events)
        text = event_vocabulary(out / "text").parent
        for name in args.encoders:
            key = f"{name}_seed{seed}"
            row = train_and_score(cfg, key, _encoder(name, cfg, args.overrides), splits, text, out)
            row |= {"encoder": name, "seed": seed, "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
                    "preset": config_to_dict(cfg)}
            (out / f"{key}.json").write_text(json.dumps(row, indent=1))
            print(f"[{key}] {json.dumps({k: row.get(k) for k in KEYS})}", flush=True)


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(out: Path, md: Path, argv: list[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    by_encoder: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_encoder.setdefault(r["encoder"], []).append(r)
    base = {r["seed"]: r["t2v_r1"] for r in by_encoder.get("baseline", [])}
    lines = ["| encoder | seeds | t2v R@1 | R@5 | R@10 | MdR | v2t R@1 | R@5 | R@10 | MdR | reversed pair, similarity "
             "(%) | reversed pair, matching head (%) | t2v R@1 / frame average | train CPU s |", "|" + "---|" * 14]
    for name, rs in by_encoder.items():
        ratios = [r["t2v_r1"] / base[r["seed"]] for r in rs if base.get(r["seed"])]
        cells = [_stats([r[k] for r in rs]) for k in KEYS[:10]]
        lines.append(f"| {name} ({rs[0]['model']}) | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {_stats(ratios) if ratios else '-'} | {_stats([r['train_cpu_s'] for r in rs])} |")
    lines += ["", "Per seed:", "", "| encoder | seed | t2v R@1 | R@5 | R@10 | MdR | reversed pair (%) | "
              "t2v R@1 / frame average | train CPU s | train wall s | load at end |", "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["encoder"], r["seed"])):
        ratio = f"{r['t2v_r1'] / base[r['seed']]:.2f}" if base.get(r["seed"]) else "-"
        lines.append(f"| {r['encoder']} | {r['seed']} | {r['t2v_r1']:.1f} | {r['t2v_r5']:.1f} | {r['t2v_r10']:.1f} | "
                     f"{r['t2v_mdr']:g} | {r['reversed_pair']:.1f} | {ratio} | {r['train_cpu_s']:.0f} | "
                     f"{r['train_wall_s']:.0f} | {r['load']:.1f} |")
    head = (f"Command: `.venv/bin/python benchmarks/video_text_synth.py {' '.join(argv)}`; machine "
            f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch threads "
            f"{rows[0]['threads'] if rows else '?'}. Chance t2v R@1 0.83%; frame average's best R@1 "
            f"{FRAME_AVERAGE_CEILING:.1f}%.\n\n")
    md.write_text(head + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/video_text_synth")
    p.add_argument("--preset", help="demo preset YAML (default: the packaged demo_video_text.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset key")
    p.add_argument("--encoders", nargs="+", default=["temporal", "baseline"])
    p.add_argument("--overrides", default="", help="YAML overrides of a registry-named encoder")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--table", help="only write the table of the runs in --out to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.table:
        table(Path(args.out), Path(args.table), list(argv if argv is not None else sys.argv[1:]))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
