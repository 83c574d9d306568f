"""The ``pks4`` command line: thin sub-commands over the engine.

    pks4 train CONFIG.yaml [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 train --model NAME --train-list FILE --val-list FILE --data-root DIR --num-classes K --frames T ...
    pks4 pretrain CONFIG.yaml [--teacher CLIP_WEIGHTS] [--set key=value ...] [--out DIR] [--resume auto|PATH]
    pks4 eval --checkpoint CKPT_OR_RUNDIR [--data LIST] [--views 8x2x3] [--frame-order ORDER] [--json]
              [--frames T] [--size S] [--patch-policy native|static_tokens|P]
    pks4 eval --checkpoint CKPT_OR_RUNDIR --grid frames=8,16,32,64 size=96,128,224 [--out DIR]
    pks4 predict VIDEO... --checkpoint CKPT_OR_RUNDIR [--topk 5] [--json] [--frames T] [--size S]
    pks4 retrieval | linear-probe | embed --checkpoint CKPT_OR_RUNDIR [--frames T] [--size S] ...
    pks4 data check LIST_OR_DIR | pks4 data synth OUT_DIR [--kind NAME] [--seed N] [--train-per-class N] ...
    pks4 models | pks4 demo [--out DIR]

Bad input (missing files, unreadable videos, unknown config keys, checkpoints that do not fit) ends with one
line ``pks4: error: <file or key>: <problem>`` and a non-zero exit code; set PKS4_TRACEBACK=1 to see the trace.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

# `pks4 train` flags that stand for config keys, so a run needs no YAML file.
_TRAIN_FLAGS = {
    "model": ("model.name", str), "train_list": ("data.train", str), "val_list": ("data.val", str),
    "data_root": ("data.root", str), "labels": ("data.labels", str), "num_classes": ("model.num_classes", int), "frames": ("data.num_frames", int),
    "size": ("data.size", int), "epochs": ("train.epochs", int), "batch_size": ("train.batch_size", int),
    "lr": ("optim.lr", float), "device": ("train.device", str), "workers": ("train.num_workers", int),
    "amp": ("train.amp", str), "seed": ("train.seed", int),
}


def _train_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.config import load_config
    from pks4.engine.train import train

    sets = [f"{key}={getattr(args, flag)}" for flag, (key, _) in _TRAIN_FLAGS.items()
            if getattr(args, flag) is not None]
    if args.skip_bad_videos:
        sets.append("data.skip_bad_videos=true")
    if args.out:
        sets.append(f"out={args.out}")
    cfg = load_config(args.config, sets + list(args.set or []))
    result = train(cfg, resume=args.resume)
    best = f"{result.best_top1:.2f}" if result.best_top1 is not None else "n/a"
    print(f"{result.status}: {result.global_step} steps, best val top-1 {best}; run dir {result.run_dir}")
    return result.exit_code


def _eval_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.infer import evaluate_checkpoint

    if args.grid:
        from pks4.engine.protocols import run_grid

        if args.frames or args.size:
            raise ValueError("--grid evaluates every frames=... x size=... cell; drop --frames/--size")
        return run_grid(args)
    report = evaluate_checkpoint(args.checkpoint, data_list=args.data, data_root=args.data_root,
                                 views=args.views, batch_size=args.batch_size, out_dir=args.out,
                                 device=args.device, num_workers=args.workers, frame_order=args.frame_order,
                                 frames=args.frames, size=args.size, patch_policy=args.patch_policy)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}  mean-class {report['mean_class']:.2f}"
              f"  views {report['views']}  frame order {report['frame_order']}  ({report['samples']} videos)"
              f"  {report['size']} px, patch {report['patch_policy']}")
    return 0


def _pretrain_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.pretrain import load_pretrain_config, pretrain

    sets = [f"out={args.out}"] if args.out else []
    if args.teacher:
        sets.append(f"teacher.path={args.teacher}")
    cfg = load_pretrain_config(args.config, sets + list(args.set or []))
    result = pretrain(cfg, resume=args.resume)
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    print(f"{result.status}: {result.global_step} steps, last loss {loss}; run dir {result.run_dir}")
    return result.exit_code


def _predict_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.infer import predict_checkpoint

    results = predict_checkpoint(args.checkpoint, args.videos, views=args.views, topk=args.topk,
                                 device=args.device, frames=args.frames, size=args.size,
                                 patch_policy=args.patch_policy)
    for res in results:
        if args.json:
            print(json.dumps(res))
        else:
            best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in res["topk"])
            print(f"{res['path']}: {best}")
    return 0


def _data_check_cmd(args: argparse.Namespace) -> int:
    from pks4.data.datasets import DataConfig, check_dataset

    cfg = DataConfig(root=args.root) if args.root else DataConfig()
    report = check_dataset(args.path, cfg)
    print(report.to_text())
    return 0 if report.ok else 1


def _data_synth_cmd(args: argparse.Namespace) -> int:
    from pks4.data.synth import check_request, generate_synth

    for flag, value in (("--train-per-class", args.train_per_class), ("--val-per-class", args.val_per_class)):
        if value < 0:
            raise ValueError(f"data synth {flag} {value}: expected at least 0")
    check_request(args.kind, args.frames, args.size, frames_name="data synth --frames", size_name="data synth --size")
    splits = generate_synth(args.out_dir, kind=args.kind, seed=args.seed, num_train_per_class=args.train_per_class,
                            num_val_per_class=args.val_per_class, num_frames=args.frames, size=args.size)
    print(f"wrote {splits.num_classes} classes of kind {args.kind} to {splits.root}: train list {splits.train}, "
          f"val list {splits.val}")
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    from pks4.models.registry import count_parameters, create_model, get_spec, list_models

    rows = []
    for name in list_models():
        try:
            with _meta_device():
                n = f"{count_parameters(create_model(name)) / 1e6:.2f}M"
        except (ValueError, TypeError, RuntimeError) as exc:  # one broken entry must not hide the others
            n = f"error: {exc}"
        rows.append((name, n, get_spec(name).description))
    width = max(len(r[0]) for r in rows)
    print(f"{'name':<{width}}  {'params':>8}  description")
    for name, params, desc in rows:
        print(f"{name:<{width}}  {params:>8}  {desc}")
    return 0


def _meta_device():
    import torch

    return torch.device("meta")  # parameter counts without allocating a ViT-L


def _demo_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.demo import load_demo_config, run_demo

    report = run_demo(load_demo_config(args.config, list(args.set or [])), args.out)
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every sub-command."""
    p = argparse.ArgumentParser(prog="pks4", description="Efficient video understanding with PKS4 and SSMs.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_pretrain(sub)
    ev = sub.add_parser("eval", help="multi-view evaluation of a checkpoint or run directory")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file/dir or run dir (uses its best)")
    ev.add_argument("--data", help="list file to evaluate (default: the run's validation list)")
    ev.add_argument("--data-root", help="root the list's paths are relative to")
    ev.add_argument("--views", help="FRAMESxCLIPSxCROPS (default: the run's eval.views)")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--out", help="write confusion_matrix.csv/.png here")
    ev.add_argument("--frame-order", help="reorder each view's frames (Park et al. Table 1): sequential | "
                    "blockwise | pairwise | interleaved")
    _add_common(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _add_shape(ev)
    ev.set_defaults(func=_eval_cmd)
    pr = sub.add_parser("predict", help="top-k classes of video files (multi-view)")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--views", help="FRAMESxCLIPSxCROPS (default: the run's eval.views)")
    _add_common(pr, workers=False)
    pr.add_argument("--json", action="store_true", help="one JSON object per video")
    _add_shape(pr, grid=False)
    pr.set_defaults(func=_predict_cmd)
    from pks4.engine.protocols import add_protocol_parsers  # noqa: PLC0415

    add_protocol_parsers(sub)
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    chk = data.add_parser("check", help="verify a list file or folder before training")
    chk.add_argument("path", metavar="LIST_OR_DIR")
    chk.add_argument("--root", help="root the list's paths are relative to")
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
    sub.add_parser("models", help="registered models and parameter counts").set_defaults(func=_models_cmd)
    demo = sub.add_parser("demo", help="synthetic benchmark: tiny PKS4 vs frame-average baseline on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", help="demo preset YAML (default: the packaged demo.yaml)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset key")
    demo.set_defaults(func=_demo_cmd)
    from pks4.engine.profile import add_profile_parser  # noqa: PLC0415 (keeps `pks4 --help` import-light)

    add_profile_parser(sub)
    return p


def _add_shape(p: argparse.ArgumentParser, grid: bool = True) -> None:
    """Any clip length / frame size from one checkpoint (StretchySnake), and for eval the frames x size grid."""
    p.add_argument("--frames", type=int, help="frames per view (default: the run's eval.views)")
    p.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    if grid:
        from pks4.engine.protocols import add_grid_arguments  # noqa: PLC0415

        add_grid_arguments(p)  # --grid, --grid-metric, --patch-policy
    else:
        p.add_argument("--patch-policy", default="native",
                       help="native (stored patch) | static_tokens (patch scaled to keep the token grid) | N")


def _add_common(p: argparse.ArgumentParser, workers: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if workers:
        p.add_argument("--workers", type=int, default=2, help="data-loading processes")


def _add_train(sub: Any) -> None:
    tr = sub.add_parser("train", help="train from a YAML recipe and/or flags")
    tr.add_argument("config", nargs="?", help="YAML recipe (e.g. one from `pks4 recipes` / src/pks4/configs)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    tr.add_argument("--out", help="run directory (config key `out`)")
    tr.add_argument("--resume", help="'auto' (latest valid checkpoint in --out) or a checkpoint path")
    tr.add_argument("--skip-bad-videos", action="store_true", help="skip unreadable videos, list them at the end")
    for flag, (key, typ) in _TRAIN_FLAGS.items():
        tr.add_argument("--" + flag.replace("_", "-"), type=typ, default=None, help=f"= --set {key}=...")
    tr.set_defaults(func=_train_cmd)


def _add_pretrain(sub: Any) -> None:
    pt = sub.add_parser("pretrain", help="masked-alignment pretraining of a VideoMamba against a frozen CLIP")
    pt.add_argument("config", nargs="?", help="YAML recipe (e.g. configs/videomamba_middle_pretrain_k400.yaml)")
    pt.add_argument("--teacher", help="CLIP vision weights (OpenAI, open_clip or Hugging Face); without it the "
                    "teacher is randomly initialised (pipeline tests only)")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    pt.add_argument("--out", help="run directory (config key `out`)")
    pt.add_argument("--resume", help="'auto' (latest valid checkpoint in --out) or a checkpoint path")
    pt.set_defaults(func=_pretrain_cmd)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pks4.data.video import DataError
    from pks4.engine.checkpoint import CheckpointError
    from pks4.engine.config import ConfigError
    from pks4.engine.train import TrainingError

    return (DataError, CheckpointError, ConfigError, TrainingError, FileNotFoundError, KeyError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pks4`` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pks4: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if os.environ.get("PKS4_TRACEBACK") or not isinstance(exc, _expected_errors()):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"pks4: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
