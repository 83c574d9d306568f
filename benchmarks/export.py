"""``pks4 export`` on every model family and format: the max abs logit difference against PyTorch (fp32), graph
size, scan loops, export time and file size, each file loaded in a fresh process without pks4 (without torch too
for ONNX).

Each model is a registered tiny variant (as registered: 8 frames at 64 px; Park's tubelet 2) with seeded
trained-like weights (every parameter moved by 0.05 * N(0, 1), so the residual branches that start at zero carry
their inputs), saved as a Hub folder with two test views, then exported through :func:`pks4.engine.export.
export_run`, the path of the command: the check feeds seeded random clips (batch 1 and 3) and the two test views of
a built-in benchmark clip decoded through the run's own preprocessing. ``--big`` measures VideoMamba-Ti at 8 x 224
instead (L = 1569 tokens per scan, 48 scans): the graph stays one loop per scan.

    python benchmarks/export.py          # writes benchmarks/export.md
    python benchmarks/export.py --big    # writes benchmarks/export_big.md
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pks4.data.datasets import DataConfig
from pks4.engine.export import FORMATS, ExportOptions, export_run
from pks4.engine.pretrained import InferenceSpec, save_pretrained
from pks4.models.registry import create_model

HERE = Path(__file__).resolve().parent
FAMILIES = {  # registry name (a word after it tells apart two settings of one model) -> (family, overrides)
    "pks4_vit_tiny": ("PKS4", {}),
    "pks4_vit_tiny causal": ("PKS4, causal (live video)", dict(causal=True)),
    "videomamba_li_micro": ("VideoMamba (Li et al.)", {}),
    "videomamba_park_micro": ("VideoMamba (Park et al.)", {}),
    "vit_tiny_avgpool": ("frame-average ViT", {}),
    "vit_tiny_joint": ("joint space-time ViT", {}),
    "stadapter_vit_tiny": ("ST-Adapter", {}),
}
BIG = {"videomamba_tiny": ("VideoMamba-Ti (Li et al.), 8 x 224", dict(num_classes=400))}


def hub_folder(key: str, overrides: dict, root: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(key.split()[0], **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    native = model.native_geometry()
    spec = InferenceSpec([f"class_{i}" for i in range(model.num_classes)], views=f"{native.frames}x2x1",
                         data=DataConfig(num_frames=native.frames, size=native.size, short_side=native.size))
    return save_pretrained(model, spec, root / key.replace(" ", "_"))


def measure(models: dict, root: Path) -> list[dict]:
    rows = []
    for name, (family, overrides) in models.items():
        folder = hub_folder(name, overrides, root)
        for fmt, suffix in FORMATS.items():
            out = root / f"{name.replace(' ', '_')}{suffix}"
            start = time.perf_counter()
            report = export_run(folder, out, ExportOptions(format=fmt))
            rows.append(dict(family=family, name=name, format=fmt, report=report, mib=out.stat().st_size / 2**20,
                             total_s=time.perf_counter() - start))
            print(f"{name} {fmt}: max abs diff {report.max_abs_diff:.3g}", flush=True)
    return rows


def write(rows: list[dict], path: Path, command: str, big: bool) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = ("a long sequence (L = 1569 per scan) in every format" if big else "every family and format")
    lines = [f"# pks4 export: {title} against PyTorch (fp32)", "",
             f"Reproduce: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; other jobs shared the "
             f"CPU (load average {load:.1f} at the end), so the seconds are indicative only.", "",
             "Max abs diff: the largest |logit difference| over seeded random clips (batch 1 and 3) and the two test "
             "views of a built-in benchmark clip decoded through the run's preprocessing, the file run in a fresh "
             "process that could not import pks4 (nor torch, for ONNX). Graph nodes: top level (ONNX, "
             "ExportedProgram) or inlined (TorchScript); scan loops: ONNX `Scan`, `higher_order.scan`, "
             "TorchScript `prim::Loop`, one per scan direction.", "",
             "| family | model | format | input | max abs diff | top-1 same | graph nodes | scan loops | export s | "
             "export + check s | MiB | runs with |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rep = r["report"]
        same = all(c.same_top1 for c in rep.checks)
        lines.append(f"| {r['family']} | {r['name']} | {r['format']} | {' x '.join(map(str, rep.input_shape))} | "
                     f"{rep.max_abs_diff:.2e} | {'yes' if same else 'no'} | {rep.graph_nodes} | {rep.scan_loops} | "
                     f"{rep.seconds:.1f} | {r['total_s']:.1f} | {r['mib']:.2f} | {rep.needs} |")
    worst = max(r["report"].max_abs_diff for r in rows)
    lines += ["", f"Largest difference over all rows: {worst:.2e} (the bound asked for: 1e-4)."]
    if not big:
        lines += ["", "A long sequence (VideoMamba-Ti at 8 x 224, 48 scans of 1569 steps, still one loop each): "
                  "`export_big.md` (`python benchmarks/export.py --big`)."]
    lines += ["", "Versions: " + ", ".join(f"{m} {_version(m)}" for m in ("onnx", "onnxscript", "onnxruntime"))]
    path.write_text("\n".join(lines) + "\n")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="VideoMamba-Ti at 8 x 224 instead (minutes on 2 cores)")
    ap.add_argument("--out", default=None, help="default: benchmarks/export.md (export_big.md with --big)")
    args = ap.parse_args()
    args.out = args.out or str(HERE / ("export_big.md" if args.big else "export.md"))
    models = BIG if args.big else FAMILIES
    with tempfile.TemporaryDirectory(prefix="pks4-export-bench-") as tmp:
        rows = measure(models, Path(tmp))
    write(rows, Path(args.out), "python benchmarks/export.py" + (" --big" if args.big else ""), args.big)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
