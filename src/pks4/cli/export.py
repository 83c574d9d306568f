"""``pks4 export``: a trained model as one ONNX, TorchScript or ExportedProgram file, checked against PyTorch
(:mod:`pks4.engine.export`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pks4.cli.checks import number

__all__ = ["add_parsers"]


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or an int >= 1")
    return int(text)


def _export_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.export import ExportOptions, export_run

    options = ExportOptions(format=args.format, scan=args.scan, batch=args.batch, check=not args.no_check,
                            check_video=args.check_video, tolerance=args.tolerance, overwrite=args.overwrite)
    report = export_run(args.source, args.out, options)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    if not report.passed:
        print(f"pks4: the exported file differs from PyTorch by up to {report.max_abs_diff:.3g}, more than "
              f"--tolerance {report.tolerance:g}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub: Any) -> None:
    """``export``."""
    from pks4.engine.export import FORMATS, SCAN_FORMS

    ex = sub.add_parser("export", help="write a trained model as ONNX, TorchScript or an ExportedProgram and check "
                        "it against PyTorch (ONNX needs: pip install 'pks4[export]')")
    ex.add_argument("source", metavar="RUN", help="run dir, checkpoint, or a folder from export-pretrained")
    ex.add_argument("out", metavar="OUT", help="file to write (model.onnx, model.pt, model.pt2)")
    ex.add_argument("--format", required=True, choices=tuple(FORMATS),
                    help="onnx (runs with onnxruntime alone), torchscript (torch alone), exported-program "
                    "(torch.export .pt2, torch alone)")
    ex.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                    help="batch dimension of the input: dynamic (default) or a fixed size")
    ex.add_argument("--scan", choices=SCAN_FORMS, default="portable",
                    help="portable (default): the selective scan as one loop of plain operators; op: the "
                    "pks4::selective_scan custom op (exported-program only; loading then needs pks4)")
    ex.add_argument("--check-video", metavar="VIDEO",
                    help="video whose test views the check runs (default: a built-in benchmark clip)")
    ex.add_argument("--no-check", action="store_true", help="write the file without comparing it with PyTorch")
    ex.add_argument("--tolerance", type=number(0, above=True), default=1e-4,
                    help="max abs logit difference the check accepts (default 1e-4; exit code 1 above it)")
    ex.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.set_defaults(func=_export_cmd)
