"""PKS4 Table 5's ablation ladder on the built-in temporal benchmark.

Baseline (frame average) -> + KS4 -> + KS4 + KPE(var) -> + KS4 + KPE(var + corr), each trained with the demo's
recipe (``src/pks4/configs/demo.yaml``) through the real engine and evaluated through the shared inference path.
The full model runs twice: with psi_corr per position (the paper's parameter counts) and as the demo preset has it
(``corr_context``: each position also reads its neighbours' correlation scores).

    .venv/bin/python benchmarks/ablation_ladder.py [--out runs/ladder] [--set run.train.epochs=...]

Writes ``benchmarks/ablation_ladder.md`` (table + command) and ``runs/ladder/ladder.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pks4.data.synth import generate_synth
from pks4.engine.config import ModelConfig
from pks4.engine.demo import load_demo_config, train_and_evaluate
from pks4.models.registry import count_parameters, create_model

LADDER = [
    ("Baseline (frame average)", dict(use_module=False)),
    ("+ KS4", dict(use_var=False, use_corr=False)),
    ("+ KS4 + KPE(var)", dict(use_corr=False)),
    ("+ KS4 + KPE(var + corr), per-position psi_corr", dict(corr_context=1)),  # Table 5's own parameterisation
    ("+ KS4 + KPE(var + corr)", dict()),  # the demo preset: psi_corr reads a 3x3 neighbourhood (corr_context)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ladder")
    parser.add_argument("--set", action="append", default=[], help="demo preset override, e.g. run.train.epochs=4")
    parser.add_argument("--report", default=str(Path(__file__).with_name("ablation_ladder.md")))
    args = parser.parse_args()
    cfg = load_demo_config(None, args.set)
    out = Path(args.out)
    splits = generate_synth(out / "data", seed=cfg.seed, **cfg.synth)
    base = cfg.pks4_model
    rows = []
    for i, (label, switches) in enumerate(LADDER):
        start = time.perf_counter()
        overrides = {**base.overrides, **switches}
        model = ModelConfig(name=base.name, overrides=overrides, num_classes=base.num_classes)
        result = train_and_evaluate(cfg, f"step{i}", model, splits, out)
        params = count_parameters(create_model(base.name, num_classes=splits.num_classes, **overrides))
        rows.append(dict(method=label, params=params, top1=result["top1"], top5=result["top5"],
                         seconds=round(time.perf_counter() - start, 1)))
        print(rows[-1], flush=True)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1))
    lines = ["# PKS4 Table 5 ladder on the built-in temporal benchmark", "",
             f"Model `{base.name}` ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}),"
             f" demo recipe, views {cfg.eval_views()}; overrides: {args.set or 'none'}.", "",
             "| method | params | top-1 (%) | top-5 (%) | train+eval s |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['params'] / 1e6:.3f}M | {r['top1']:.1f} | {r['top5']:.1f} | {r['seconds']:.0f} |"
              for r in rows]
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/ablation_ladder.py`", ""]
    Path(args.report).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
