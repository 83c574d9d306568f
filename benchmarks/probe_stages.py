"""Where does a trained PKS4 keep the evidence that separates some classes? Linear probes at every stage.

For each stage of a trained PKS4 model the script fits a linear probe (:func:`pks4.engine.protocols.linear_probe`)
on the training clips of the chosen classes and reports its validation accuracy, twice:

* position-blind: the stage's patch tokens averaged over time and over patches, which is all a readout that
  treats every patch alike can use;
* position-aware: averaged over time only, one block of features per patch, so the probe may weigh each patch
  differently (a clockwise turn moves the top of a dial right and its bottom left).

Stages: ``pre`` (patch tokens entering the module), ``kpe`` (the KPE's residual phi(O_var(O_corr(F))), Eq. 14),
``ks4`` (the scanner's update, Eq. 4), ``post`` (the module's patch tokens, Eq. 5), ``final`` (patch tokens
after the last block) and ``clip`` (the pooled clip feature the linear head reads, Eq. 8).

    .venv/bin/python benchmarks/probe_stages.py --checkpoint RUN_DIR \
        --classes rotating_clockwise,rotating_counterclockwise [--json]

A time-reversed pair separates only where a stage carries the order of the frames: ``pre`` sees the frames one
at a time, so both its probes sit near chance for such a pair; a model that classifies the pair well has it in
``clip``. Probes fitted on a few hundred clips overfit a position-aware feature of N x C dimensions, so read its
training accuracy beside the validation one.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from pks4.data.datasets import build_dataset
from pks4.data.items import collate
from pks4.engine.checkpoint import load_model_from_checkpoint
from pks4.engine.protocols import linear_probe

STAGES = ("pre", "kpe", "ks4", "post", "final", "clip")


def _capture(model: torch.nn.Module, store: dict[str, Tensor]) -> list:
    """Forward hooks that write the module's stages and the last block's patch tokens to ``store``."""
    module, blocks = model.module, model.backbone.transformer.resblocks

    def on_module(_m, args, out):
        store["pre"], store["post"] = args[0][:, :, 1:], out[:, :, 1:]

    def on_kpe(_m, args, out):
        store["kpe"] = out - args[0]  # Eq. 14: Z_hat - Z is phi(F^var)

    def on_ks4(_m, _args, out):  # (B*N, T, C), one row per patch trajectory; reshaped by the caller
        store["ks4_raw"] = out

    def on_last(_m, _args, out):
        store["final_raw"] = out[:, 1:]

    return [module.register_forward_hook(on_module), module.kpe.register_forward_hook(on_kpe),
            module.ks4.register_forward_hook(on_ks4), blocks[-1].register_forward_hook(on_last)]


@torch.no_grad()
def stage_features(model: torch.nn.Module, dataset, batch_size: int = 16, skip_bad: bool = False
                   ) -> tuple[dict[str, Tensor], Tensor]:
    """{stage: (blind (M, C), aware (M, N*C))} pairs flattened into one dict, and labels (M,); an unreadable
    video is left out with ``skip_bad``, else it stops the script, named."""
    store: dict[str, Tensor] = {}
    hooks = _capture(model, store)
    out: dict[str, list[Tensor]] = {}
    labels = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            batch = batch if skip_bad else batch.raise_skipped()
            if batch.video is None:  # every clip of the batch unreadable
                continue
            video = batch.video
            views = video if video.ndim == 6 else video.unsqueeze(1)  # (B, V, T, 3, H, W)
            b, v, t = views.shape[:3]
            store.clear()
            clip = model.forward_features(views.flatten(0, 1)).float()  # (B*V, D)
            n, c = store["pre"].shape[2:]
            tokens = {
                "pre": store["pre"], "kpe": store["kpe"], "post": store["post"],
                "ks4": store["ks4_raw"].view(b * v, n, t, c).transpose(1, 2),
                "final": store["final_raw"].reshape(b * v, t, n, c),
            }
            for name, x in tokens.items():
                x = x.float().mean(1).view(b, v, n, c).mean(1)  # over time, then over views: (B, N, C)
                out.setdefault(f"{name}/blind", []).append(x.mean(1))
                out.setdefault(f"{name}/aware", []).append(x.flatten(1))
            out.setdefault("clip/blind", []).append(clip.view(b, v, -1).mean(1))
            labels.append(batch.label)
    finally:
        for h in hooks:
            h.remove()
    if not labels:
        raise ValueError("no readable clips of the chosen classes")
    return {k: torch.cat(x) for k, x in out.items()}, torch.cat(labels)


def _only(dataset, keep: list[int]) -> Subset:
    wanted = set(keep)
    picked = [i for i, s in enumerate(dataset.samples) if s.label in wanted]
    if not picked:
        raise ValueError(f"no clips of classes {keep} in {len(dataset)} items")
    return Subset(dataset, picked)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a PKS4 checkpoint or run directory")
    p.add_argument("--classes", required=True, help="comma-separated class names (or indices), two or more")
    p.add_argument("--val-list", help="probe-validation list (default: the run's validation list), e.g. a larger "
                                      "one from `pks4 data synth DIR --train-per-class 0 --val-per-class 100`")
    p.add_argument("--val-root", help="root of --val-list's paths (default: the list's folder)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="probe-validate on this fraction of the training clips instead of the validation list "
                        "(0: use the list); these are clips the model trained on, so prefer --val-list")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="the probes' L2 penalty")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    model, cfg, classes = load_model_from_checkpoint(args.checkpoint)
    module = getattr(model, "module", None)
    if module is None or getattr(module, "kpe", None) is None or getattr(module, "ks4", None) is None:
        raise SystemExit(f"{args.checkpoint}: not a PKS4 model with a KPE and KS4 ({type(model).__name__})")
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    keep = [int(c) if c.isdigit() else classes.index(c) if c in classes else -1 for c in names]
    if len(keep) < 2 or len(set(keep)) < len(keep) or not all(0 <= k < len(classes) for k in keep):
        raise SystemExit(f"--classes {args.classes!r}: need two or more different ones of {classes}")
    if not 0.0 <= args.holdout < 1.0:
        raise SystemExit(f"--holdout {args.holdout}: expected a fraction in [0, 1)")
    if args.holdout and args.val_list:
        raise SystemExit("--holdout and --val-list both choose the probe-validation clips: give one")
    feats, labels = {}, {}
    data_cfg = replace(cfg.data, val=args.val_list, root=args.val_root or "") if args.val_list else cfg.data
    splits = ("train",) if args.holdout else ("train", "val")
    for split in splits:
        split_cfg = cfg.data if split == "train" else data_cfg
        ds = _only(build_dataset(split_cfg, split, train=False), keep)
        feats[split], y = stage_features(model, ds, skip_bad=split_cfg.skip_bad_videos)
        labels[split] = torch.tensor([keep.index(int(v)) for v in y])
    if args.holdout:  # a fixed, seeded split of the training clips
        order = torch.randperm(len(labels["train"]), generator=torch.Generator().manual_seed(0))
        cut = int(round(len(order) * (1 - args.holdout)))
        fit, held = order[:cut], order[cut:]
        feats["val"] = {k: x[held] for k, x in feats["train"].items()}
        feats["train"] = {k: x[fit] for k, x in feats["train"].items()}
        labels["val"], labels["train"] = labels["train"][held], labels["train"][fit]
    rows = {}
    for key in feats["train"]:
        res = linear_probe(feats["train"][key], labels["train"], feats["val"][key], labels["val"],
                           num_classes=len(keep), weight_decay=args.weight_decay)
        rows[key] = {"val": round(res.top1, 1), "train": round(res.train_top1, 1)}
    report = {"checkpoint": str(args.checkpoint), "classes": names, "probes": rows,
              "clips": {s: int(len(labels[s])) for s in labels}}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{', '.join(names)}: {report['clips']['train']} training / {report['clips']['val']} validation clips")
        print("| stage | position-blind val (train) | position-aware val (train) |\n|---|---|---|")
        for s in STAGES:
            cell = [f"{rows[k]['val']:.1f} ({rows[k]['train']:.1f})" if k in rows else "-"
                    for k in (f"{s}/blind", f"{s}/aware")]
            print(f"| {s} | {cell[0]} | {cell[1]} |")
    return report


if __name__ == "__main__":
    main()
