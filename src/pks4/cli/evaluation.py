"""``pks4 eval`` (also over the frames x size grid), ``pks4 predict`` and the StretchySnake protocols
(``retrieval``, ``linear-probe``, ``embed``): a checkpoint scored through the one inference path."""
from __future__ import annotations

import argparse
import json
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
                                 frames=args.frames, size=args.size, patch_policy=args.patch_policy)
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
        p.add_argument("--workers", type=int, default=workers, help="data-loading processes")


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
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--frames", type=int, help="frames per view (default: the run's eval.views)")
    ev.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    ev.add_argument("--grid", nargs="+", metavar="KEY=LIST", help="evaluate over frames x sizes (StretchySnake "
                    "Table 1), e.g. --grid frames=8,16,32,64 size=96,112,128,192,224")
    ev.add_argument("--grid-metric", default="top1", choices=("top1", "retrieval"))
    ev.add_argument("--patch-policy", default="native", help=_POLICY_HELP)
    ev.set_defaults(func=_eval_cmd)


def _add_predict(sub: Any) -> None:
    pr = sub.add_parser("predict", help="top-k classes of video files (multi-view)")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--views", help="FRAMESxCLIPSxCROPS (default: the run's eval.views)")
    _add_device(pr, workers=None)
    pr.add_argument("--json", action="store_true", help="one JSON object per video")
    pr.add_argument("--frames", type=int, help="frames per view (default: the run's eval.views)")
    pr.add_argument("--size", type=int, help="frame size in pixels (default: the run's data.size)")
    pr.add_argument("--patch-policy", default="native", help=_POLICY_HELP)
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
