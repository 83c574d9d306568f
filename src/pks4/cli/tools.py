"""``pks4 data check|synth|captions``, ``pks4 models``, ``pks4 profile`` and ``pks4 demo``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import checks

__all__ = ["add_parsers"]


def _data_check_cmd(args: argparse.Namespace) -> int:
    from pks4.data.datasets import DataConfig, check_dataset

    cfg = DataConfig(root=args.root or "", format=args.format)
    report = check_dataset(args.path, cfg)
    print(report.to_text())
    return 0 if report.ok else 1


def _data_synth_cmd(args: argparse.Namespace) -> int:
    from pks4.data.synth import check_request, generate_synth
    from pks4.engine.rundir import check_destination

    for flag, value in (("--train-per-class", args.train_per_class), ("--val-per-class", args.val_per_class)):
        if value < 0:
            raise ValueError(f"data synth {flag} {value}: expected at least 0")
    check_request(args.kind, args.frames, args.size, frames_name="data synth --frames", size_name="data synth --size")
    check_destination(args.out_dir, option="OUT_DIR", what="dataset folder", min_free=0)  # before any video
    splits = generate_synth(args.out_dir, kind=args.kind, seed=args.seed, num_train_per_class=args.train_per_class,
                            num_val_per_class=args.val_per_class, num_frames=args.frames, size=args.size)
    print(f"wrote {splits.num_classes} classes of kind {args.kind} to {splits.root}: train list {splits.train}, "
          f"val list {splits.val}")
    return 0


def _data_captions_cmd(args: argparse.Namespace) -> int:
    from pks4.data.synth_captions import write_synth_captions

    files = write_synth_captions(args.synth_dir)
    print("wrote " + ", ".join(str(f) for f in files.values()))
    if not args.no_vocab:
        from pks4.models.text import build_vocab  # needs the text extra (transformers, tokenizers)

        texts = [c for f in files.values() for e in json.loads(f.read_text()) for c in e["caption"]]
        print(f"wrote {build_vocab(texts, Path(args.synth_dir) / 'text')}")
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    import torch

    from pks4.models.registry import count_parameters, create_model, get_spec, list_models

    rows = []
    for name in list_models():
        try:
            with torch.device("meta"):  # parameter counts without allocating a ViT-L
                n = f"{count_parameters(create_model(name)) / 1e6:.2f}M"
        except (ValueError, TypeError, RuntimeError) as exc:  # one broken entry must not hide the others
            n = f"error: {exc}"
        rows.append((name, n, get_spec(name).description))
    width = max(len(r[0]) for r in rows)
    print(f"{'name':<{width}}  {'params':>8}  description")
    for name, params, desc in rows:
        print(f"{name:<{width}}  {params:>8}  {desc}")
    return 0


def _demo_cmd(args: argparse.Namespace) -> int:
    if args.task == "video-text":
        from pks4.engine.video_text_demo import load_video_text_demo_config, run_video_text_demo

        out = args.out or "runs/demo_video_text"
        report = run_video_text_demo(load_video_text_demo_config(args.config, list(args.set or [])), out,
                                     resume=args.resume, overwrite=args.overwrite)
        print((Path(out) / "report.md").read_text(), end="")
        return 0
    from pks4.engine.demo import load_demo_config, run_demo

    report = run_demo(load_demo_config(args.config, list(args.set or [])), args.out or "runs/demo",
                      resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(report))
    return int(report.get("exit_code", 0))


def _training_compute_cmd(args: argparse.Namespace, frames: int | None, convention: Any) -> int:
    from pks4.engine.profile import TRAINING_FLOP_MULTIPLIER, build_model, training_compute

    if args.epochs is None or args.dataset_size is None:
        raise ValueError("--training-compute needs --epochs and --dataset-size")
    frames = frames or getattr(build_model(args.model, device="meta").config, "num_frames", 8)
    size = args.size or 224
    multiplier = args.flop_multiplier if args.flop_multiplier is not None else TRAINING_FLOP_MULTIPLIER
    eflops = training_compute(args.model, frames, args.epochs, args.dataset_size, size, multiplier,
                              args.visible_fraction, convention)
    report = {"model": args.model, "frames": frames, "size": size, "epochs": args.epochs,
              "dataset_size": args.dataset_size, "multiplier": multiplier,
              "visible_fraction": args.visible_fraction, "training_eflops": eflops}
    print(json.dumps(report) if args.json else f"{args.model}: {eflops:.4f} EFLOPs of training compute")
    return 0


def _profile_cmd(args: argparse.Namespace) -> int:
    """``pks4 profile``: print the profile (or the training compute) of one registered model."""
    from pks4.data.sampling import parse_views
    from pks4.engine.profile import FlopConvention, build_model, format_profile, profile_model

    convention = FlopConvention(count_attention=not args.no_attention_flops,
                                count_mamba_inner=not args.no_mamba_inner_flops)
    views = parse_views(args.views) if args.views else None
    frames = args.frames or (views.frames if views else None)
    if args.training_compute:
        return _training_compute_cmd(args, frames, convention)
    device = "meta" if args.flops_only else args.device
    model = build_model(args.model, frames=frames, size=args.size, num_classes=args.num_classes, device=device)
    if not args.flops_only:  # the timed forward allocates: refuse first one that would not fit
        from pks4.engine.infer import check_memory
        from pks4.engine.profile import native_size

        frames = frames or getattr(getattr(model, "config", None), "num_frames", 8)
        check_memory(model, frames, args.size or native_size(model), args.batch, chunk=args.batch, where="profile")
    r = profile_model(model, frames=frames, size=args.size, batch=args.batch, views=views, train=args.train,
                      repeats=args.repeats, warmup=args.warmup, convention=convention, timing=not args.flops_only)
    print(json.dumps(r) if args.json else format_profile(r))
    return 0


def _add_profile(sub: Any) -> None:
    p = sub.add_parser("profile", help="parameters, FLOPs, latency, memory and training compute of a model")
    p.add_argument("model", metavar="MODEL", help="registered model name (see `pks4 models`)")
    p.add_argument("--frames", type=checks.integer(1), help="frames per view (default: from --views, else the "
                   "model's)")
    p.add_argument("--size", type=checks.integer(1), help="input resolution (default: the model's)")
    p.add_argument("--num-classes", type=checks.integer(1))
    p.add_argument("--views", default=None, type=checks.views,
                   help="FRAMESxCLIPSxCROPS, e.g. 8x2x3 (gflops_total = x clips x crops)")
    p.add_argument("--batch", type=checks.integer(1), default=1, help="clips per forward pass for latency and memory")
    p.add_argument("--train", action="store_true", help="also time one training step and its peak memory")
    p.add_argument("--repeats", type=checks.integer(1), default=5, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=checks.integer(0), default=1)
    p.add_argument("--device", default="cpu", type=checks.device, help="cpu | cuda | cuda:N")
    p.add_argument("--flops-only", action="store_true", help="skip timing and memory (counts on the meta device)")
    p.add_argument("--no-attention-flops", action="store_true",
                   help="leave attention out of the FLOPs (the convention of PKS4's published GFLOPs)")
    p.add_argument("--no-mamba-inner-flops", action="store_true",
                   help="count only Mamba in/out projections (the convention of VideoMamba's published GFLOPs)")
    p.add_argument("--training-compute", action="store_true", help="print total training EFLOPs instead")
    p.add_argument("--epochs", type=checks.number(0, above=True), help="training epochs (with --training-compute)")
    p.add_argument("--dataset-size", type=checks.integer(1), help="training clips per epoch (with "
                   "--training-compute)")
    p.add_argument("--flop-multiplier", type=checks.number(0, above=True), default=None,
                   help="training FLOPs per clip = this x forward FLOPs (default 6, PKS4 Table 2)")
    p.add_argument("--visible-fraction", type=checks.number(0, above=True, high=1), default=1.0,
                   help="masked pretraining: fraction of tokens seen, in (0, 1]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_profile_cmd)


def _add_data(sub: Any) -> None:
    from pks4.data.datasets import dataset_formats  # noqa: PLC0415

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    chk = data.add_parser("check", help="verify a list file or folder before training")
    chk.add_argument("path", metavar="LIST_OR_DIR")
    chk.add_argument("--root", help="root the list's paths are relative to")
    chk.add_argument("--format", default="auto", choices=dataset_formats(),
                     help="annotation format (default auto: detected, and the choice is printed)")
    chk.set_defaults(func=_data_check_cmd)
    syn = data.add_parser("synth", help="write the built-in temporal benchmark")
    syn.add_argument("out_dir", metavar="OUT_DIR")
    syn.add_argument("--kind", default="classic", help="which benchmark of the family: classic (default), sweep, "
                     "busy, occlusion, dynamics (see pks4.data.synth)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--train-per-class", type=int, default=40, help="training clips per class (default 40)")
    syn.add_argument("--val-per-class", type=int, default=12, help="validation clips per class (default 12)")
    syn.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    syn.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    syn.set_defaults(func=_data_synth_cmd)
    cap = data.add_parser("captions", help="caption the built-in benchmark (captions_<split>.json, text/vocab.txt)")
    cap.add_argument("synth_dir", metavar="SYNTH_DIR", help="a folder written by `pks4 data synth`")
    cap.add_argument("--no-vocab", action="store_true", help="do not write SYNTH_DIR/text/vocab.txt (the captions' "
                     "words, for a small text encoder)")
    cap.set_defaults(func=_data_captions_cmd)


def add_parsers(sub: Any) -> None:
    """``data``, ``models``, ``profile`` and ``demo``."""
    _add_data(sub)
    sub.add_parser("models", help="registered models and parameter counts").set_defaults(func=_models_cmd)
    _add_profile(sub)
    demo = sub.add_parser("demo", help="synthetic benchmark: tiny PKS4 vs frame-average baseline on CPU (or, with "
                          "--task video-text, zero-shot text-to-video retrieval)")
    demo.add_argument("--out", help="output folder (default: runs/demo, runs/demo_video_text)")
    demo.add_argument("--task", choices=("classify", "video-text"), default="classify",
                      help="classify: the temporal benchmark's classes (default); video-text: captions naming an "
                      "order of events, retrieval against the frame average")
    demo.add_argument("--config", help="demo preset YAML (default: the packaged demo.yaml / demo_video_text.yaml)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset key")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    demo.add_argument("--overwrite", action="store_true", help="move an earlier demo in --out aside (nothing is "
                      "deleted) and start afresh")
    demo.set_defaults(func=_demo_cmd)
