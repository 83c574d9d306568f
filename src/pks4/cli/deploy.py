"""``pks4 export-pretrained`` (a run as the Hub layout: config.json + model.safetensors + README.md) and
``pks4 serve`` (the web page): using a trained model outside the training tree."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parsers"]


def _export_pretrained_cmd(args: argparse.Namespace) -> int:
    from pks4.api import VideoClassifier

    out = VideoClassifier.from_pretrained(args.source, device="cpu").save_pretrained(args.out)
    print(f"wrote {out}/config.json, model.safetensors and README.md")
    return 0


def _serve_cmd(args: argparse.Namespace) -> int:
    from pks4.errors import UserError
    from pks4.web import missing_web_modules

    missing = missing_web_modules()
    if missing:
        raise UserError(f"pks4 serve needs the web extra (missing: {', '.join(missing)}); install it with "
                        "pip install 'pks4[web]'")
    from pks4.web import serve

    return serve(args.source, host=args.host, port=args.port, examples=args.examples, window=args.window,
                 stride=args.stride, device=args.device, amp=args.amp)


def add_parsers(sub: Any) -> None:
    """``export-pretrained`` and ``serve``."""
    ex = sub.add_parser("export-pretrained", help="write a trained model as config.json + model.safetensors "
                        "+ README.md (the Hub layout), loadable with VideoClassifier.from_pretrained")
    ex.add_argument("source", metavar="RUN", help="run dir, checkpoint, or a folder from export-pretrained")
    ex.add_argument("out", metavar="OUT", help="folder to write (created if needed)")
    ex.set_defaults(func=_export_pretrained_cmd)
    sv = sub.add_parser("serve", help="a web page to classify uploaded videos (needs: pip install 'pks4[web]')")
    sv.add_argument("source", metavar="RUN", help="run dir, checkpoint, or a folder from export-pretrained")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--examples", help="folder of videos the page offers to pick from")
    sv.add_argument("--window", default="2s", help="timeline window for long videos (frames or seconds)")
    sv.add_argument("--stride", default="1s", help="timeline stride (frames or seconds)")
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    sv.add_argument("--amp", default="auto", help="auto | fp32 | bf16 | fp16")
    sv.set_defaults(func=_serve_cmd)
