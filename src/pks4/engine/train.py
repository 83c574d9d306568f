"""``pks4 train``: supervised classification, one task of the training loop (:mod:`pks4.engine.loop`).

Recipe of PKS4 section 3.5.2 / 4.2: AdamW with layer-wise LR decay (new modules exempt), cosine schedule with
linear warm-up stepped per optimizer step, LR scaled by the global batch, label smoothing, mixup/cutmix, AMP
(bf16/fp16 on GPU), gradient accumulation and clipping, activation checkpointing, a frozen-backbone option. All
of that but the model, the loss and the evaluation is the loop's; this module supplies those three:

* the model: a registry model with the data's class count and clip shape, optionally started from
  ``model.init_from`` (another run, or any weights file; ``model.partial_load`` for another class count);
* the loss: cross-entropy against soft targets (label smoothing folded in, mixup/cutmix drawn on the CPU);
  with ``flex.mode`` the batch's sampled shape reaches the model as its token geometry;
* the evaluation: the validation set through the one inference path (:func:`pks4.engine.infer.evaluate`):
  top-1, top-5, mean-class accuracy, and ``confusion_matrix.{csv,png}`` of the latest evaluation.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pks4.data.flex_sampler import FlexConfig, resolve_flex_config
from pks4.data.items import Batch
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import RunConfig, config_to_dict, format_config
from pks4.engine.infer import compute_metrics, confusion_matrix, evaluate, save_confusion_matrix
from pks4.engine.loop import Loop, LoopSettings, RunResult, Task
from pks4.engine.runtime import TrainingError, process_group, start_process
from pks4.layers.geometry import TokenGeometry

__all__ = ["build_model", "build_datasets", "resolve_classes", "soft_targets", "soft_cross_entropy", "ClassifyTask",
           "build_trainer", "train"]

Log = Callable[[str], None]


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """Registry model with the data's class count and clip length, plus freezing / checkpointing options."""
    from pks4.weights import create_model  # the builder: a `pretrained` override is read before building

    overrides = {"num_frames": cfg.data.num_frames, "image_size": cfg.data.size, **cfg.model.overrides,
                 "num_classes": num_classes}
    try:
        model = create_model(cfg.model.name, **overrides)
    except (KeyError, ValueError) as exc:
        raise TrainingError(f"model '{cfg.model.name}': {exc}") from None
    if cfg.train.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(bool(model.is_new_parameter(name)))
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_datasets(cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
    """Training set (augmented) and validation set (``eval.val_views``, default one centre view)."""
    from pks4.data.datasets import build_dataset
    from pks4.data.sampling import parse_views

    for key in ("num_frames", "size"):  # fail before any video is opened, naming the key
        if getattr(cfg.data, key) < 1:
            raise TrainingError(f"data.{key}={getattr(cfg.data, key)}: expected an integer >= 1")
    train_set = build_dataset(cfg.data, "train", train=True)
    val_set = None
    if cfg.data.val:
        views = parse_views(cfg.eval.val_views) if cfg.eval.val_views else None
        val_set = build_dataset(cfg.data, "val", train=False, views=views)
    return train_set, val_set


def resolve_classes(cfg: RunConfig, data_classes: list[str]) -> list[str]:
    """The data's class names, padded to ``model.num_classes`` when that asks for more."""
    want = cfg.model.num_classes
    if want is None or want == len(data_classes):
        return list(data_classes)
    if want < len(data_classes):
        raise TrainingError(f"model.num_classes={want} but the training data has {len(data_classes)} classes "
                            f"({cfg.data.train or cfg.data.root})")
    return list(data_classes) + [str(i) for i in range(len(data_classes), want)]


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) class indices -> (B, K) label-smoothed targets: 1 - s + s/K on the class, s/K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k, in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ClassifyTask(Task):
    """Clips -> logits -> soft cross-entropy; evaluated on the validation set (see the module docstring)."""

    score_key = "top1"

    def __init__(self, cfg: RunConfig, model: nn.Module, train_set: Dataset, val_set: Dataset | None,
                 classes: list[str], log: Log) -> None:
        super().__init__()
        self.cfg, self.model, self.train_set, self.val_set = cfg, model, train_set, val_set
        self.classes, self.log = classes, log

    def describe(self) -> str:
        return f"model {self.cfg.model.name}"

    def inputs(self, batch: Batch) -> dict[str, Any]:
        t, k = self.cfg.train, len(self.classes)
        if t.mixup > 0 or t.cutmix > 0:
            from pks4.data.transforms import mixup_cutmix

            # on the CPU: the soft targets come back with label smoothing already folded in
            video, target = mixup_cutmix(batch.video, batch.label, k, mixup_alpha=t.mixup, cutmix_alpha=t.cutmix,
                                         prob=t.mix_prob, label_smoothing=t.label_smoothing)
            return {"video": video, "target": target}
        return {"video": batch.video, "target": soft_targets(batch.label, k, t.label_smoothing)}

    def loss(self, inputs: dict[str, Tensor], geometry: TokenGeometry | None = None) -> dict[str, Tensor]:
        logits = self.model(inputs["video"], geometry=geometry)
        return {"ce": soft_cross_entropy(logits, inputs["target"])}

    def evaluate(self, model: nn.Module, loop: Loop) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        out = evaluate(model, loop.eval_stream(self.val_set, self.cfg.eval.batch_size), amp_dtype=loop.amp_dtype)
        metrics = compute_metrics(out.probs, out.labels, len(self.classes))
        if loop.dist.is_main:
            cm = confusion_matrix(out.probs.argmax(1), out.labels, len(self.classes))
            save_confusion_matrix(cm, self.classes, loop.run_dir / "confusion_matrix.csv",
                                  loop.run_dir / "confusion_matrix.png")
        self.log(f"epoch {loop.epoch}: val top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
                 f"mean-class {metrics['mean_class']:.2f}  ({len(out.labels)} clips"
                 f"{', EMA weights' if loop.ema is not None else ''})")
        return {"samples": len(out.labels), **metrics}

    def metadata(self) -> dict[str, Any]:
        model_cfg = asdict(self.model.config)
        if "pretrained" in model_cfg:
            model_cfg["pretrained"] = ""  # the weights are in the checkpoint; do not re-read the CLIP file
        return {"model_name": self.model.model_name, "model_config": model_cfg, "classes": self.classes,
                "config": config_to_dict(self.cfg)}


def _init_from(cfg: RunConfig, model: nn.Module, resume: str | None, log: Log) -> str | None:
    """Start from ``model.init_from`` (strict unless ``model.partial_load``), unless resuming a run."""
    if not cfg.model.init_from:
        return None
    if resume and (resume != "auto" or ckpt.find_latest(Path(cfg.out), log=lambda m: None) is not None):
        return None  # the run's own checkpoint provides the weights
    tensors, source = ckpt.read_any_weights(cfg.model.init_from)
    report = ckpt.load_weights_into(model, tensors, source, partial=cfg.model.partial_load)
    text = ckpt.describe_partial_load(report) if not report.complete else f"initialised from {source}"
    log(text)
    return text


def _flex_for(cfg: RunConfig, model: nn.Module) -> FlexConfig | None:
    """``cfg.flex`` resolved against the model's stored geometry; None without flexible training."""
    if not cfg.flex.enabled:
        return None
    try:
        return resolve_flex_config(cfg.flex, model, base_frames=cfg.data.num_frames)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"flex.mode={cfg.flex.mode} with model '{cfg.model.name}': {exc}") from None


def build_trainer(cfg: RunConfig, resume: str | None = None, log: Log = print) -> Loop:
    """The training loop of one ``pks4 train`` run, set up (and resumed, with ``resume``), not yet started."""
    dist_info = start_process(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    main_log: Log = log if dist_info.is_main else (lambda msg: None)
    train_set, val_set = build_datasets(cfg)
    classes = resolve_classes(cfg, [str(c) for c in train_set.classes])
    model = build_model(cfg, len(classes))
    init_report = _init_from(cfg, model, resume, main_log)
    model.to(dist_info.device)
    task = ClassifyTask(cfg, model, train_set, val_set, classes, main_log)
    task.init_report = init_report
    settings = LoopSettings(cfg.train, cfg.optim, Path(cfg.out), cfg, cfg.data.skip_bad_videos, _flex_for(cfg, model))
    return Loop(task, settings, dist_info, resume=resume, log=log)


def train(cfg: RunConfig, resume: str | None = None, log: Log = print) -> RunResult:
    """Print the resolved config and run the training; the process group is torn down afterwards."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(format_config(cfg).rstrip())
    with process_group():
        return build_trainer(cfg, resume=resume, log=log).fit()
