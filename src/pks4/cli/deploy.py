"""``pks4 export-pretrained`` (a run as the Hub layout: config.json + model.safetensors + README.md),
``pks4 serve`` (the web page) and ``pks4 stream`` (a causal model on a file or a camera, frame by frame): using a
trained model outside the training tree."""
from __future__ import annotations

import argparse
import json
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


def _format(pred: dict[str, Any]) -> str:
    best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in pred["topk"])
    return f"frame {pred['frame']} ({pred['time']:.2f} s): {best}"


def _stream_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.stream import stream_checkpoint

    for pred in stream_checkpoint(args.checkpoint, args.source, topk=args.topk, frame_step=args.frame_step,
                                  every=args.every, max_frames=args.max_frames, size=args.size,
                                  device=args.device):
        print(json.dumps(pred) if args.json else _format(pred), flush=True)
    return 0


def _add_stream(sub: Any) -> None:
    p = sub.add_parser("stream", help="running prediction of a causal model on a video file or a camera")
    p.add_argument("source", metavar="SOURCE", help="video file, or camera device /dev/videoN (or just N)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file/dir or run dir of a causal model")
    p.add_argument("--topk", type=int, default=5, help="classes per prediction (default 5)")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="print the prediction every N model frames, and after the last (default 1)")
    p.add_argument("--frame-step", type=int, default=1, metavar="N",
                   help="feed every N-th decoded frame to the model: the frame rate it was trained at (default 1)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop after N model frames (a camera never ends)")
    p.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="one JSON object per printed prediction")
    p.set_defaults(func=_stream_cmd)


def add_parsers(sub: Any) -> None:
    """``export-pretrained``, ``serve`` and ``stream``."""
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
    _add_stream(sub)
