"""``pks4 eval`` (also over the frames x size grid), ``pks4 predict`` (also as a timeline of a long video) and
the StretchySnake protocols (``retrieval``, ``linear-probe``, ``embed``): a checkpoint scored through the one
inference path."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parsers"]


def _emit(args: argparse.Namespace, report: dict[str, Any], text: str) -> int:
    print(json.dumps(report) if args.json else text)
    return 0


def _eval_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.infer import evaluate_checkpoint

    if args.grid:
        if args.frames or args.size:
            raise ValueError("--grid evaluates every frames=... x size=... cell; drop --frames/--size")
        return _grid_cmd(args)
    report = evaluate_checkpoint(args.checkpoint, data_list=args.data, data_root=args.data_root,
                                 views=args.views, batch_size=args.batch_size, out_dir=args.out,
                                 device=args.device, num_workers=args.workers, frame_order=args.frame_order,
                                 frames=args.frames, size=args.size, patch_policy=args.patch_policy,
                                 amp=args.amp, progress=not args.quiet)
    return _emit(args, report, f"top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}  mean-class "
                               f"{report['mean_class']:.2f}  views {report['views']}  frame order "
                               f"{report['frame_order']}  ({report['samples']} videos)  {report['size']} px, "
                               f"patch {report['patch_policy']}")


def _grid_cmd(args: argparse.Namespace) -> int:
    """``pks4 eval --checkpoint C --grid frames=... size=... [--out DIR]``: table, CSV and heat map."""
    from pks4.engine.protocols import eval_grid, load_checkpoint_data, parse_grid, patch_policy, write_grid

    frames, sizes = parse_grid(args.grid)
    splits = ("train", "val") if args.grid_metric == "retrieval" else ("val",)
    loaded = load_checkpoint_data(args.checkpoint, splits, device=args.device, data=args.data,
                                  data_root=args.data_root)
    run = loaded.run
    result = eval_grid(loaded.model, loaded.datasets["val"], frames, sizes, policy=patch_policy(args.patch_policy),
                       metric=args.grid_metric, gallery=loaded.datasets.get("train"),
                       batch_size=args.batch_size or 8, num_workers=args.workers,
                       seen=run.flex.trained_cells(run.data.num_frames, run.data.size),
                       kernel_resize=run.flex.kernel_resize, skip_bad=loaded.data_cfg.skip_bad_videos)
    paths = write_grid(result, args.out, "grid") if args.out else {}
    report = {"grid": result.to_rows(), "spread": result.spread, **{k: str(v) for k, v in paths.items()}}
    return _emit(args, report, result.to_markdown())


def _predict_cmd(args: argparse.Namespace) -> int:
    if args.window is not None:
        return _timeline_cmd(args)
    for flag in ("stride", "fps", "csv", "out"):
        if getattr(args, flag) not in (None, False):
            raise ValueError(f"predict --{flag} applies to a timeline only; give --window too")
    from pks4.engine.infer import predict_checkpoint

    results = predict_checkpoint(args.checkpoint, args.videos, views=args.views, topk=args.topk,
                                 device=args.device, frames=args.frames, size=args.size,
                                 patch_policy=args.patch_policy, amp=args.amp, batch_size=args.batch_size,
                                 num_workers=args.workers, progress=not args.quiet)
    for res in results:
        if args.json:
            print(json.dumps(res))
        else:
            best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in res["topk"])
            print(f"{res['path']}: {best}")
    return 0


def _timeline_cmd(args: argparse.Namespace) -> int:
    """``predict --window``: per-window top-k of long videos, printed as text, JSON or CSV; files with --out."""
    from pks4.engine.timeline import timeline_checkpoint

    if args.json and args.csv:
        raise ValueError("predict: give --json or --csv, not both")
    if args.frames or args.size or args.patch_policy != "native":
        raise ValueError("predict --window runs the model at its own --frames/--size; drop them")
    timelines = timeline_checkpoint(args.checkpoint, args.videos, args.window, args.stride, args.fps,
                                    views=args.views, device=args.device, amp=args.amp,
                                    batch_size=args.batch_size, progress=not args.quiet)
    for n, tl in enumerate(timelines):
        if args.out:
            _write_timeline(tl, Path(args.out), args.topk)
        if args.json:
            print(json.dumps(tl.to_dict(args.topk)))
        elif args.csv:
            print(tl.to_csv(args.topk, header=n == 0), end="")
        else:
            _print_timeline(tl, args.topk)
    return 0


def _write_timeline(tl: Any, out: Path, topk: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{Path(tl.path).stem}.timeline"
    Path(f"{stem}.json").write_text(json.dumps(tl.to_dict(topk), indent=1) + "\n")
    Path(f"{stem}.csv").write_text(tl.to_csv(topk))
    tl.plot(f"{stem}.png")


def _print_timeline(tl: Any, topk: int) -> None:
    d = tl.to_dict(topk)
    print(f"{tl.path}: {len(d['windows'])} windows of {tl.window} frames ({d['window_seconds']:g} s), "
          f"stride {tl.stride}, at {tl.fps:g} fps")
    for w in d["windows"]:
        best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in w["topk"])
        print(f"  {w['start']:8.2f} - {w['end']:8.2f} s  {best}")


# ---- the protocols ----------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace, splits: tuple[str, ...]) -> Any:
    from pks4.engine.protocols import load_checkpoint_data

    return load_checkpoint_data(args.checkpoint, splits, device=args.device, data=args.data,
                                train_data=args.train_data, data_root=args.data_root, frames=args.frames,
                                size=args.size)


def _common(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    from pks4.engine.protocols import patch_policy

    return dict(policy=patch_policy(args.patch_policy), batch_size=args.batch_size, num_workers=args.workers,
                kernel_resize=loaded.run.flex.kernel_resize, skip_bad=loaded.data_cfg.skip_bad_videos)


def _retrieval_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.protocols import retrieval

    loaded = _load(args, ("train", "val"))
    cfg = loaded.data_cfg
    res = retrieval(loaded.model, loaded.datasets["train"], loaded.datasets["val"], ks=(1, 5),
                    **_common(args, loaded))
    report = {**res, "frames": cfg.num_frames, "size": cfg.size, "policy": args.patch_policy}
    return _emit(args, report, f"retrieval top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
                               f"({cfg.num_frames} frames, {cfg.size} px, patch {args.patch_policy})")


def _linear_probe_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.protocols import extract_features, linear_probe

    loaded = _load(args, ("train", "val"))
    kw = _common(args, loaded)
    xt, yt, _ = extract_features(loaded.model, loaded.datasets["train"], **kw)
    xv, yv, _ = extract_features(loaded.model, loaded.datasets["val"], **kw)
    res = linear_probe(xt, yt, xv, yv, num_classes=len(loaded.classes), steps=args.steps,
                       weight_decay=args.weight_decay)
    report = {"top1": res.top1, "train_top1": res.train_top1, "frames": loaded.data_cfg.num_frames,
              "size": loaded.data_cfg.size}
    return _emit(args, report, f"linear probe top-1 {res.top1:.2f} (train {res.train_top1:.2f})")


def _embed_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.protocols import embed

    loaded = _load(args, (args.split,))
    paths = embed(loaded.model, loaded.datasets[args.split], args.out, classes=loaded.classes,
                  **_common(args, loaded))
    report = {k: str(v) for k, v in paths.items()}
    return _emit(args, report, "\n".join(f"{k}: {v}" for k, v in report.items()))


# ---- parsers ------------------------------------------------------------------------------------------------------
_POLICY_HELP = "native (stored patch size) | static_tokens (patch scaled to keep the token grid) | N"


def _add_device(p: argparse.ArgumentParser, workers: int | None) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if workers is not None:
        p.add_argument("--workers", type=int, default=workers, help=f"video-decoding processes (default {workers})")


def _add_speed(p: argparse.ArgumentParser) -> None:
    from pks4.engine.infer import AMP_CHOICES  # noqa: PLC0415

    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast dtype; auto = bf16 on a GPU, fp32 on the CPU (bf16 there: 1.26x for PKS4-B/16, "
                   "see benchmarks/predict_speed.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it only shows on a terminal anyway)")


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser("eval", help="multi-view evaluation of a checkpoint or run directory")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file/dir or run dir (uses its best)")
    ev.add_argument("--data", help="list file to evaluate (default: the run's validation list)")
    ev.add_argument("--data-root", help="root the list's paths are relative to")
    ev.add_argument("--views", help="FRAMESxCLIPSxCROPS (default: the run's eval.views)")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--out", help="write confusion_matrix.csv/.png here (with --grid: grid.csv/.md/.png)")
    ev.add_argument("--frame-order", help="reorder each view's frames (Park et al. Table 1): sequential | "
                    "blockwise | pairwise | interleaved")
    _add_device(ev, workers=2)
    _add_speed(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--frames", type=int, help="frames per view (default: the run's eval.views)")
    ev.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    ev.add_argument("--grid", nargs="+", metavar="KEY=LIST", help="evaluate over frames x sizes (StretchySnake "
                    "Table 1), e.g. --grid frames=8,16,32,64 size=96,112,128,192,224")
    ev.add_argument("--grid-metric", default="top1", choices=("top1", "retrieval"))
    ev.add_argument("--patch-policy", default="native", help=_POLICY_HELP)
    ev.set_defaults(func=_eval_cmd)


def _add_predict(sub: Any) -> None:
    from pks4.engine.infer import DEFAULT_BATCH  # noqa: PLC0415

    pr = sub.add_parser("predict", help="top-k classes of video files (multi-view), or a timeline of long ones")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--checkpoint", required=True, help="run dir, checkpoint, or a folder from export-pretrained")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--views", help="FRAMESxCLIPSxCROPS (default: the run's eval.views; one clip per window)")
    pr.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                    help=f"videos (or windows) per forward (default {DEFAULT_BATCH})")
    _add_device(pr, workers=0)
    _add_speed(pr)
    pr.add_argument("--json", action="store_true", help="one JSON object per video")
    pr.add_argument("--frames", type=int, help="frames per view (default: the run's eval.views)")
    pr.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    pr.add_argument("--patch-policy", default="native", help=_POLICY_HELP)
    tl = pr.add_argument_group("timeline of a long video")
    tl.add_argument("--window", help="classify windows of this many frames (at --fps), or seconds: 8 | 2s")
    tl.add_argument("--stride", help="step between windows, frames or seconds (default: the window)")
    tl.add_argument("--fps", type=float, help="rate the window and stride frames are counted at "
                    "(default: the video's own)")
    tl.add_argument("--csv", action="store_true", help="print the windows as CSV")
    tl.add_argument("--out", help="write <video>.timeline.json, .csv and .png (the plot) into this folder")
    pr.set_defaults(func=_predict_cmd)


def _add_protocols(sub: Any) -> None:
    specs = (("retrieval", "video retrieval: training clips as gallery, validation clips as queries", _retrieval_cmd),
             ("linear-probe", "logistic regression on frozen clip features", _linear_probe_cmd),
             ("embed", "write clip embeddings and a 2-D map coloured by class", _embed_cmd))
    for name, help_text, func in specs:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="checkpoint file/dir or run dir (uses its best)")
        p.add_argument("--train-data", help="gallery / probe-training list (default: the run's training list)")
        p.add_argument("--data", help="query / evaluation list (default: the run's validation list)")
        p.add_argument("--data-root", help="root the lists' paths are relative to")
        p.add_argument("--frames", type=int, help="clip length (default: the run's)")
        p.add_argument("--size", type=int, help="frame size (default: the run's)")
        p.add_argument("--patch-policy", default="native", help=_POLICY_HELP)
        p.add_argument("--batch-size", type=int, default=8)
        _add_device(p, workers=0)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "linear-probe":
            p.add_argument("--steps", type=int, default=300)
            p.add_argument("--weight-decay", type=float, default=1e-4)
        if name == "embed":
            p.add_argument("--out", required=True, help="features file (.npz or .safetensors); PNGs go beside it")
            p.add_argument("--split", default="val", choices=("train", "val"))
        p.set_defaults(func=func)


def add_parsers(sub: Any) -> None:
    """``eval``, ``predict``, ``retrieval``, ``linear-probe`` and ``embed``."""
    _add_eval(sub)
    _add_predict(sub)
    _add_protocols(sub)
