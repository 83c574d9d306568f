"""``pks4 eval`` (also over the frames x size grid), ``pks4 predict`` (also as a timeline of a long video),
the StretchySnake protocols (``retrieval``, ``linear-probe``, ``embed``): a checkpoint scored through the one
inference path; and ``pks4 text-retrieval`` for video-text checkpoints.

``text-retrieval`` is its own command rather than a flag of ``retrieval``: the two take different checkpoints (a
video-text model, a classifier), different data (a caption file in one of the published layouts, two lists of
labelled videos) and report different things (both directions with median rank and optional re-ranking, top-k
by class), so no option of one would mean anything to the other."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import checks

__all__ = ["add_parsers"]


def _emit(args: argparse.Namespace, report: dict[str, Any], text: str) -> int:
    print(json.dumps(report) if args.json else text)
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _failed(failures: list[tuple[str, str]], total: int) -> int:
    """After the good results are printed: 0, or the videos that could not be read as an error (exit 2) -- one
    line for a single video; for several, one line per video and a count."""
    from pks4.data.video import DataError

    if not failures:
        return 0
    if total == 1:
        raise DataError(f"{failures[0][0]}: {failures[0][1]}")
    for path, reason in failures:
        _stderr(f"pks4: cannot read {path}: {reason}")
    raise DataError(f"{len(failures)} of {total} videos could not be read (listed above) and were left out; the "
                    f"results printed are those of the other {total - len(failures)}")


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
                                 amp=args.amp, progress=not args.quiet, data_format=args.data_format, log=_stderr)
    return _emit(args, report, f"top-1 {report['top1']:.2f}  top-5 {report['top5']:.2f}  mean-class "
                               f"{report['mean_class']:.2f}  views {report['views']}  frame order "
                               f"{report['frame_order']}  ({report['samples']} videos)  {report['size']} px, "
                               f"patch {report['patch_policy']}")


def _grid_cmd(args: argparse.Namespace) -> int:
    """``pks4 eval --checkpoint C --grid frames=... size=... [--out DIR]``: table, CSV and heat map."""
    from pks4.engine.protocols import eval_grid, load_checkpoint_data, parse_grid, patch_policy, write_grid
    from pks4.engine.rundir import check_destination

    frames, sizes = parse_grid(args.grid)
    if args.out:
        check_destination(args.out, option="--out", what="output folder", min_free=0)
    splits = ("train", "val") if args.grid_metric == "retrieval" else ("val",)
    loaded = load_checkpoint_data(args.checkpoint, splits, device=args.device, data=args.data,
                                  data_root=args.data_root, data_format=args.data_format, log=_stderr)
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
    """Top-k of every video; one that cannot be read is reported and skipped, and ends the run with exit 2
    after the others' predictions are printed."""
    if args.window is not None:
        return _timeline_cmd(args)
    for flag in ("stride", "fps", "csv", "out"):
        if getattr(args, flag) not in (None, False):
            raise ValueError(f"predict --{flag} applies to a timeline only; give --window too")
    from pks4.engine.infer import predict_checkpoint

    results = predict_checkpoint(args.checkpoint, args.videos, views=args.views, topk=args.topk,
                                 device=args.device, frames=args.frames, size=args.size,
                                 patch_policy=args.patch_policy, amp=args.amp, batch_size=args.batch_size,
                                 num_workers=args.workers, progress=not args.quiet, skip_bad=True)
    note_topk(args.topk, [len(r["topk"]) for r in results if "topk" in r])
    failures = []
    for res in results:
        if "error" in res:
            failures.append((res["path"], res["error"]))
        if args.json:
            print(json.dumps(res))
        elif "error" not in res:
            best = ", ".join(f"{t['label']} {t['score']:.3f}" for t in res["topk"])
            print(f"{res['path']}: {best}")
    return _failed(failures, len(results))


def note_topk(asked: int, shown: list[int]) -> None:
    if shown and max(shown) < asked:
        _stderr(f"note: --topk {asked} is more than the model's {max(shown)} classes: all {max(shown)} are shown")


def _timeline_cmd(args: argparse.Namespace) -> int:
    """``predict --window``: per-window top-k of long videos, printed as text, JSON or CSV; files with --out."""
    from pks4.data.items import Skipped
    from pks4.engine.rundir import check_destination
    from pks4.engine.timeline import timeline_checkpoint

    if args.json and args.csv:
        raise ValueError("predict: give --json or --csv, not both")
    if args.frames or args.size or args.patch_policy != "native":
        raise ValueError("predict --window runs the model at its own --frames/--size; drop them")
    if args.out:
        check_destination(args.out, option="--out", what="timeline folder", min_free=0)
    timelines = timeline_checkpoint(args.checkpoint, args.videos, args.window, args.stride, args.fps,
                                    views=args.views, device=args.device, amp=args.amp,
                                    batch_size=args.batch_size, progress=not args.quiet, skip_bad=True)
    note_topk(args.topk, [len(tl.classes) for tl in timelines if not isinstance(tl, Skipped)])
    failures, n = [], 0
    for tl in timelines:
        if isinstance(tl, Skipped):
            failures.append((tl.path, tl.reason))
            continue
        if args.out:
            _write_timeline(tl, Path(args.out), args.topk)
        if args.json:
            print(json.dumps(tl.to_dict(args.topk)))
        elif args.csv:
            print(tl.to_csv(args.topk, header=n == 0), end="")
        else:
            _print_timeline(tl, args.topk)
        n += 1
    return _failed(failures, len(timelines))


def _write_timeline(tl: Any, out: Path, topk: int) -> None:
    from pks4.engine.rundir import atomic_write_text

    stem = out / f"{Path(tl.path).stem}.timeline"
    atomic_write_text(Path(f"{stem}.json"), json.dumps(tl.to_dict(topk), indent=1) + "\n")
    atomic_write_text(Path(f"{stem}.csv"), tl.to_csv(topk))
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
    """The checkpoint and its datasets; a forward at another --frames / --size that would not fit is refused."""
    from pks4.engine.protocols import check_protocol_memory, load_checkpoint_data, patch_policy

    loaded = load_checkpoint_data(args.checkpoint, splits, device=args.device, data=args.data,
                                  train_data=args.train_data, data_root=args.data_root, frames=args.frames,
                                  size=args.size, skip_bad=True if args.skip_bad_videos else None,
                                  data_format=args.data_format, log=_stderr)
    if args.frames or args.size:
        check_protocol_memory(loaded, patch_policy(args.patch_policy), args.batch_size, args.command)
    return loaded


def _common(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    from pks4.engine.protocols import patch_policy

    return dict(policy=patch_policy(args.patch_policy), batch_size=args.batch_size, num_workers=args.workers,
                kernel_resize=loaded.run.flex.kernel_resize, skip_bad=loaded.data_cfg.skip_bad_videos,
                skipped=loaded.skipped)


def _done(args: argparse.Namespace, loaded: Any, report: dict[str, Any], text: str) -> int:
    """Print the result; the videos left out (--skip-bad-videos) are then listed and the exit code is 2."""
    _emit(args, {**report, "skipped": [str(s) for s in loaded.skipped]} if loaded.skipped else report, text)
    missing = sum(s.reason == "missing" for s in loaded.skipped)  # left out of the datasets when they were built
    total = sum(len(ds) for ds in loaded.datasets.values()) + missing
    return _failed([(s.path, s.reason) for s in loaded.skipped], total)


def _retrieval_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.protocols import retrieval

    loaded = _load(args, ("train", "val"))
    cfg = loaded.data_cfg
    res = retrieval(loaded.model, loaded.datasets["train"], loaded.datasets["val"], ks=(1, 5),
                    **_common(args, loaded))
    report = {**res, "frames": cfg.num_frames, "size": cfg.size, "policy": args.patch_policy}
    return _done(args, loaded, report, f"retrieval top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
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
    return _done(args, loaded, report, f"linear probe top-1 {res.top1:.2f} (train {res.train_top1:.2f})")


def _embed_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.protocols import embed
    from pks4.engine.rundir import check_output_file

    check_output_file(args.out, "--out", "features file")
    loaded = _load(args, (args.split,))
    paths = embed(loaded.model, loaded.datasets[args.split], args.out, classes=loaded.classes,
                  **_common(args, loaded))
    report = {k: str(v) for k, v in paths.items()}
    return _done(args, loaded, report, "\n".join(f"{k}: {v}" for k, v in report.items()))


def _text_retrieval_cmd(args: argparse.Namespace) -> int:
    import sys

    from pks4.engine.video_text_task import retrieval_from_checkpoint

    if args.format and not args.captions:
        raise checks.UsageError("text-retrieval --format names the layout of --captions FILE; give the file too")
    report = retrieval_from_checkpoint(args.checkpoint, args.captions, args.format, args.root, rerank_k=args.rerank,
                                       batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                                       log=lambda msg: print(msg, file=sys.stderr))
    lines = [f"{report['captions']} ({report['format']}): {int(report['texts'])} captions, {int(report['videos'])} "
             "videos"]
    for prefix, what in (("", "similarity"), ("rerank_", f"re-ranked top {report['rerank_k']}")):
        if f"{prefix}t2v_r1" not in report:
            continue
        for d, name in (("t2v", "text-to-video"), ("v2t", "video-to-text")):
            lines.append(f"  {name:13s} ({what}): R@1 {report[f'{prefix}{d}_r1']:.2f}  R@5 {report[f'{prefix}{d}_r5']:.2f}"
                         f"  R@10 {report[f'{prefix}{d}_r10']:.2f}  MdR {report[f'{prefix}{d}_mdr']:g}")
    return _emit(args, report, "\n".join(lines))


def _add_text_retrieval(sub: Any) -> None:
    p = sub.add_parser("text-retrieval", help="text-to-video and video-to-text retrieval with a video-text checkpoint "
                       "(R@1/5/10, median rank; zero-shot or after fine-tuning)")
    p.add_argument("--checkpoint", required=True, help="a `pks4 pretrain --task video-text` run dir or checkpoint")
    p.add_argument("--captions", help="caption file (default: the run's captions.val); file#part for a part of a "
                   "file holding several, e.g. MSRVTT_data.json#test")
    p.add_argument("--format", help="its layout: captions | msrvtt | didemo | activitynet | lsmdc | msvd | webvid | "
                   "cc3m (default: captions)")
    p.add_argument("--root", help="folder of the videos (default: the caption file's folder)")
    p.add_argument("--rerank", type=checks.integer(0), help="re-score each query's top K with the matching head (UMT: 128; "
                   "default: the run's retrieval.rerank_k; 0 = off)")
    p.add_argument("--batch-size", type=checks.integer(1),
                   help="clips per batch (default: the run's retrieval.batch_size)")
    _add_device(p, workers=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_text_retrieval_cmd)


# ---- parsers ------------------------------------------------------------------------------------------------------
_POLICY_HELP = "native (stored patch size) | static_tokens (patch scaled to keep the token grid) | N"


def _add_device(p: argparse.ArgumentParser, workers: int | None) -> None:
    p.add_argument("--device", default="auto", type=checks.device, help="auto | cpu | cuda | cuda:N")
    if workers is not None:
        p.add_argument("--workers", type=checks.integer(0), default=workers,
                       help=f"video-decoding processes (default {workers})")


def _add_speed(p: argparse.ArgumentParser) -> None:
    from pks4.engine.infer import AMP_CHOICES  # noqa: PLC0415

    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast dtype; auto = bf16 on a GPU, fp32 on the CPU (bf16 there: 1.26x for PKS4-B/16, "
                   "see benchmarks/predict_speed.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it only shows on a terminal anyway)")


def _add_shape(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--frames", type=checks.integer(1), help=f"frames per view (default: {what})")
    p.add_argument("--size", type=checks.integer(1), help="frame size in pixels (default: the run's data.size)")
    p.add_argument("--patch-policy", default="native", help=_POLICY_HELP)


def _add_format(p: argparse.ArgumentParser) -> None:
    from pks4.data.datasets import dataset_formats  # noqa: PLC0415

    p.add_argument("--data-format", choices=dataset_formats(), help="format of the list(s) given (default: the "
                   "run's data.format, usually auto: detected, and the choice is printed)")


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser("eval", help="multi-view evaluation of a checkpoint or run directory")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file/dir or run dir (uses its best)")
    ev.add_argument("--data", "--val-list", dest="data", help="list file to evaluate (default: the run's "
                    "validation list, stored as an absolute path)")
    ev.add_argument("--data-root", help="root the list's paths are relative to (default: the run's root, or the "
                    "folder of a list given with --data)")
    _add_format(ev)
    ev.add_argument("--views", type=checks.views, help="FRAMESxCLIPSxCROPS (default: the run's eval.views)")
    ev.add_argument("--batch-size", type=checks.integer(1), default=None)
    ev.add_argument("--out", help="write confusion_matrix.csv/.png here (with --grid: grid.csv/.md/.png)")
    ev.add_argument("--frame-order", help="reorder each view's frames (Park et al. Table 1): sequential | "
                    "blockwise | pairwise | interleaved")
    _add_device(ev, workers=2)
    _add_speed(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _add_shape(ev, "the run's eval.views")
    ev.add_argument("--grid", nargs="+", metavar="KEY=LIST", help="evaluate over frames x sizes (StretchySnake "
                    "Table 1), e.g. --grid frames=8,16,32,64 size=96,112,128,192,224")
    ev.add_argument("--grid-metric", default="top1", choices=("top1", "retrieval"))
    ev.set_defaults(func=_eval_cmd)


def _add_predict(sub: Any) -> None:
    from pks4.engine.infer import DEFAULT_BATCH  # noqa: PLC0415

    pr = sub.add_parser("predict", help="top-k classes of video files (multi-view), or a timeline of long ones; "
                        "a file that cannot be read is reported and skipped (exit code 2 after the others)")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--checkpoint", required=True, help="run dir, checkpoint, or a folder from export-pretrained")
    pr.add_argument("--topk", type=checks.integer(1), default=5, help="classes shown per video (default 5; more "
                    "than the model has shows them all)")
    pr.add_argument("--views", type=checks.views,
                    help="FRAMESxCLIPSxCROPS (default: the run's eval.views; one clip per window)")
    pr.add_argument("--batch-size", type=checks.integer(1), default=None,
                    help=f"videos (or windows) per forward (default {DEFAULT_BATCH})")
    _add_device(pr, workers=0)
    _add_speed(pr)
    pr.add_argument("--json", action="store_true", help="one JSON object per video")
    _add_shape(pr, "the run's eval.views")
    tl = pr.add_argument_group("timeline of a long video")
    tl.add_argument("--window", help="classify windows of this many frames (at --fps), or seconds: 8 | 2s")
    tl.add_argument("--stride", help="step between windows, frames or seconds (default: the window)")
    tl.add_argument("--fps", type=checks.number(0, above=True), help="rate the window and stride frames are "
                    "counted at (default: the video's own)")
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
        _add_format(p)
        _add_shape(p, "the run's")
        p.add_argument("--batch-size", type=checks.integer(1), default=8)
        p.add_argument("--skip-bad-videos", action="store_true", help="leave unreadable or missing videos out, "
                       "list them at the end (exit code 2); without it the first one ends the run")
        _add_device(p, workers=0)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "linear-probe":
            p.add_argument("--steps", type=checks.integer(1), default=300)
            p.add_argument("--weight-decay", type=checks.number(0), default=1e-4)
        if name == "embed":
            p.add_argument("--out", required=True, help="features file (.npz or .safetensors); PNGs go beside it")
            p.add_argument("--split", default="val", choices=("train", "val"))
        p.set_defaults(func=func)


def add_parsers(sub: Any) -> None:
    """``eval``, ``predict``, ``retrieval``, ``linear-probe``, ``embed`` and ``text-retrieval``."""
    _add_eval(sub)
    _add_predict(sub)
    _add_protocols(sub)
    _add_text_retrieval(sub)
