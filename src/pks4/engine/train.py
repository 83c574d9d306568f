"""The training loop: one process or many (``torchrun`` + DDP), CPU or GPU.

Recipe of PKS4 section 3.5.2 / 4.2: AdamW with layer-wise LR decay (new modules exempt), cosine schedule with
linear warm-up stepped per optimizer step, LR scaled by the global batch, label smoothing, mixup/cutmix, AMP
(bf16/fp16 on GPU), gradient accumulation and clipping, activation checkpointing, a frozen-backbone option.

A run directory holds ``config.yaml``, ``metrics.jsonl``, TensorBoard events (``tb/``), ``curves.png``,
``confusion_matrix.{csv,png}`` of the latest evaluation, ``skipped_videos.txt`` and ``checkpoints/``.

Faults the loop survives:

* SIGINT/SIGTERM (Ctrl-C, cluster preemption, also under ``torchrun``) finish the current optimizer step, write a
  resumable checkpoint and return exit code 128 + signal number.
* SIGKILL or a crash: ``train.save_every_steps`` adds mid-epoch checkpoints, and ``--resume auto`` continues
  from the newest one that verifies. Data order, per-item augmentation seeds, dropout/mixup RNG, optimizer,
  schedule and scaler are all restored, so with ``train.deterministic`` on the CPU the final weights are
  bitwise those of an uninterrupted run.
* A non-finite loss or gradient stops the run with a message naming the step (``train.nan_policy=stop``), or
  that update is dropped and logged (``skip``).
* With ``data.skip_bad_videos`` a video that fails to read or transform, or a DataLoader worker that dies, costs
  that video (or batch) only; the skipped files are listed at the end and in ``skipped_videos.txt``.

StretchySnake (``flex.mode``, :mod:`pks4.flex`): each batch has its own sampled (T, H, patch) and a batch size
scaled to keep tokens per batch bounded, so epochs differ in length. The batch plan is a pure function of (seed,
epoch): every epoch is planned at start-up, the LR schedule spans the sum of the planned steps (warm-up: warm-up
epochs x the mean planned epoch length), and a resume replays the same batches from the saved batch position.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pks4.data.video import DataError
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import RunConfig, config_to_dict, format_config
from pks4.engine.ema import WeightEMA
from pks4.engine.infer import compute_metrics, confusion_matrix, evaluate, save_confusion_matrix
from pks4.engine.optim import LRSchedule, build_optimizer, scaled_lr
from pks4.flex import FlexBatchSampler, FlexDataset, flex_collate, flex_patch, resolve_flex_config

__all__ = ["TrainingError", "DistInfo", "TrainResult", "setup_distributed", "seed_everything", "amp_dtype_for",
           "build_model", "Trainer", "train", "plot_curves", "item_seed", "raise_load_errors"]

Log = Callable[[str], None]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, empty data); the message names the step or the file."""


# ------------------------------------------------------------------------------------------ process set-up


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"train.device={pref!r} but no CUDA device is available")
    return torch.device(pref)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` job described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def amp_dtype_for(amp: str, device: torch.device, cpu_amp: bool = False) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on GPU; on CPU only with ``cpu_amp`` (and only bf16), else full precision."""
    if amp == "none" or (device.type == "cpu" and not cpu_amp):
        return None
    if device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checks it between optimizer steps and saves before leaving."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step ...",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ model and data


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


class ResumableSampler(Sampler[int]):
    """Distributed shard of a dataset, reshuffled per epoch, that can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, dist_info: DistInfo, shuffle: bool, seed: int) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                        shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.start:])

    def __len__(self) -> int:
        return len(self.inner) - self.start


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


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one training item: a function of (run seed, epoch, dataset index) only."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class ReportBad(Dataset):
    """Wraps a VideoDataset so a skipped (unreadable) video travels to the loop as ``{"skipped": "path: why"}``,
    also from worker processes, where the dataset's own record of bad videos stays behind.

    Each item's random frame offsets and augmentation draw from :func:`item_seed` inside a forked RNG, never
    from the process RNG: the same clip comes out in the main process or in any worker, before or after a
    resume, and loading does not shift the RNG that dropout and mixup use. With ``skip`` any exception while
    reading or transforming a video (not only a DataError) becomes a reported skip, so one odd file cannot end
    a run mid-epoch. Without it an unreadable video travels as ``{"error": "path: why"}``: an exception raised
    in a worker would reach the loop re-typed and wrapped in a worker traceback, not as one clear line.
    """

    def __init__(self, inner: Dataset, seed: int = 0, epoch: int = 0, skip: bool = False) -> None:
        self.inner, self.seed, self.epoch, self.skip = inner, seed, epoch, skip

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int | Any) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            # a FlexKey (flexible training) names its item by .index: the same seed at every sampled shape.
            # Only the CPU generator: torch.manual_seed would also (re)seed every accelerator, outside what
            # fork_rng restores, and costs more than a millisecond per item.
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, int(getattr(i, "index", i))))
            try:
                item = self.inner[i]
            except DataError as exc:
                return {"skipped" if self.skip else "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - reported, not swallowed (skip mode only)
                if not self.skip:
                    raise
                return {"skipped": f"{_sample_path(self.inner, i)}: {type(exc).__name__}: {exc}"}
        if item is not None:
            return item
        bad = getattr(self.inner, "bad", None)
        return {"skipped": ": ".join(bad[-1]) if bad else _sample_path(self.inner, i)}


def _sample_path(dataset: Dataset, i: int | Any) -> str:
    i = int(getattr(i, "index", i))  # a FlexKey or a plain index
    samples = getattr(dataset, "samples", None)
    return str(samples[i].path) if samples is not None else f"item {i}"


def raise_load_errors(batches: Iterable[dict[str, Any] | None]) -> Iterator[dict[str, Any] | None]:
    """Pass batches through; an ``{"error": [...]}`` batch (unreadable video, no skipping) raises DataError."""
    for batch in batches:
        if batch is not None and "error" in batch:
            more = f" (and {len(batch['error']) - 1} more in this batch)" if len(batch["error"]) > 1 else ""
            raise DataError(f"{batch['error'][0]}{more}; fix or remove it, or set --skip-bad-videos "
                            "(data.skip_bad_videos=true) to skip unreadable videos")
        yield batch


class _DeferSigchld:
    """Keep a dying DataLoader worker from interrupting an optimizer step half-way.

    torch reports a killed worker from its SIGCHLD handler, i.e. at whatever line the main thread is running,
    possibly inside ``optimizer.step()``. While the loop computes, the signal is only noted; torch's handler
    gets it when the next batch is fetched, where the error is caught and the batch retried.
    """

    def __init__(self, workers: bool) -> None:
        self.saved: Any = None
        self.pending: tuple[int, Any] | None = None
        self.active = workers and threading.current_thread() is threading.main_thread()

    def computing(self) -> None:
        if self.active:
            self.saved = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def fetching(self, replay: bool = True) -> None:
        if not self.active or self.saved is None:
            return
        handler, self.saved = self.saved, None
        signal.signal(signal.SIGCHLD, handler)
        pending, self.pending = self.pending, None
        if replay and pending is not None and callable(handler):
            handler(*pending)


def _shut_down(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers now and reap them, dead ones included.

    Left to the garbage collector, a loader whose worker was killed keeps that worker registered with torch's
    SIGCHLD check; the next child to exit anywhere in the process (a later loader's worker) then makes torch
    raise "DataLoader worker ... killed" at whatever line is running, outside any handler. torch has no public
    call for this; ``_shutdown_workers`` is what its iterator runs when exhausted or deleted.
    """
    stop = getattr(batches, "_shutdown_workers", None)  # absent with num_workers=0: nothing to stop
    if stop is not None:
        stop()


def _worker_died(exc: BaseException) -> bool:
    # torch reports a killed or crashed worker as a RuntimeError naming "DataLoader worker (pid ...)"
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def collate_report_bad(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``collate_skip_bad`` plus the list of skipped videos under ``"skipped"``."""
    from pks4.data.datasets import collate_skip_bad

    errors = [it["error"] for it in items if it is not None and "error" in it]
    if errors:
        return {"error": errors}
    skipped = [it["skipped"] for it in items if it is not None and "skipped" in it]
    batch = collate_skip_bad([it for it in items if it is not None and "skipped" not in it])
    if batch is None:
        return {"skipped": skipped} if skipped else None
    batch["skipped"] = skipped
    return batch


def collate_flex_report_bad(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """:func:`pks4.flex.flex_collate` (one shape per batch, ``"shape"`` kept) with the ``"error"`` reporting of
    :func:`collate_report_bad`."""
    errors = [it["error"] for it in items if it is not None and "error" in it]
    return {"error": errors} if errors else flex_collate(items)


# ------------------------------------------------------------------------------------------------ logging


class MetricsLog:
    """JSON lines (``metrics.jsonl``) plus optional TensorBoard scalars; writes on the main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training loss and LR per step, validation accuracy per epoch, from ``metrics.jsonl``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train_rows], [r["lr"] for r in train_rows])
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("top1", "top5", "mean_class"):
        axes[2].plot([r["epoch"] for r in val_rows], [r[key] for r in val_rows], marker="o", label=key)
    axes[2].set(title="validation accuracy (%)", xlabel="epoch")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    status: str  # "finished" | "interrupted" | "stopped"
    epoch: int
    global_step: int
    best_top1: float | None
    last_metrics: dict[str, float] | None
    checkpoint: Path | None
    skipped: list[str]
    exit_code: int = 0
    nan_skipped_steps: list[int] = field(default_factory=list)  # updates dropped by train.nan_policy=skip
    init_report: str | None = None  # what model.init_from loaded (and re-initialised, for a partial load)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against (possibly mixed) soft targets with label smoothing folded in."""
    k = logits.shape[-1]
    targets = targets * (1.0 - smoothing) + smoothing / k
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Trainer:
    """Owns model, optimizer, schedule, data and run directory for one ``pks4 train`` run."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, log: Log = print) -> None:
        self.cfg, self.run_dir = cfg, Path(cfg.out)
        self.dist = setup_distributed(cfg.train.device)
        self.log: Log = log if self.dist.is_main else (lambda msg: None)
        seed_everything(cfg.train.seed + self.dist.rank, cfg.train.deterministic)
        self.train_set, self.val_set = build_datasets(cfg)
        self.classes = resolve_classes(cfg, [str(c) for c in self.train_set.classes])
        self.raw_model = build_model(cfg, len(self.classes))
        self.init_report = self._init_from(resume) if cfg.model.init_from else None
        self.raw_model.to(self.dist.device)
        self.model: nn.Module = self.raw_model
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        self._setup_data()
        self._setup_optim()
        t = cfg.train
        self.ema = WeightEMA(self.raw_model, t.ema_decay, t.ema_warmup) if t.ema_decay is not None else None
        self.amp_dtype = amp_dtype_for(cfg.train.amp, self.dist.device, cfg.train.cpu_amp)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.best_top1: float | None = None
        self.skipped: list[str] = [": ".join(b) for b in getattr(self.train_set, "bad", [])]
        self.nan_skipped: list[int] = []
        self._nan_streak = 0
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main, cfg.train.tensorboard)
        if resume:
            self._resume(resume)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _init_from(self, resume: str | None) -> str | None:
        """Start from ``model.init_from`` (strict unless ``model.partial_load``), unless resuming a run."""
        if resume and (resume != "auto" or ckpt.find_latest(self.run_dir, log=lambda m: None) is not None):
            return None  # the run's own checkpoint provides the weights
        tensors, source = ckpt.read_any_weights(self.cfg.model.init_from)
        report = ckpt.load_weights_into(self.raw_model, tensors, source, partial=self.cfg.model.partial_load)
        text = ckpt.describe_partial_load(report) if not report.complete else f"initialised from {source}"
        self.log(text)
        return text

    def _setup_data(self) -> None:
        bs, t = self.cfg.train.batch_size, self.cfg.train
        self.flex_cfg = None
        if self.cfg.flex.mode != "none":
            self._setup_flex()
        else:
            self.train_sampler = ResumableSampler(self.train_set, self.dist, shuffle=True, seed=t.seed)
            shard = len(self.train_sampler.inner)
            self.drop_last = shard >= 2 * bs  # constant batch shapes, unless the data is tiny
            self.micro_per_epoch = shard // bs if self.drop_last else math.ceil(shard / bs)
            self.planned_micro = [self.micro_per_epoch] * t.epochs
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.accum_steps)
        self.val_loader = None
        if self.val_set is not None:
            sampler = ResumableSampler(self.val_set, self.dist, shuffle=False, seed=0)
            self.val_loader = self._loader(self.val_set, sampler, self.cfg.eval.batch_size, False, 0)

    def _setup_flex(self) -> None:
        """StretchySnake batches: :class:`FlexBatchSampler` over the training set, every epoch planned now."""
        t = self.cfg.train
        try:
            self.flex_cfg = resolve_flex_config(self.cfg.flex, self.raw_model, base_frames=self.cfg.data.num_frames)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"flex.mode={self.cfg.flex.mode} with model '{self.cfg.model.name}': {exc}") from None
        self.train_sampler = FlexBatchSampler(len(self.train_set), t.batch_size, self.flex_cfg, seed=t.seed,
                                              rank=self.dist.rank, world_size=self.dist.world_size)
        self.drop_last = False  # the last batch wraps round to the start of the epoch's order instead
        self.planned_micro = [self._flex_epoch_length(e) for e in range(t.epochs)]
        self.micro_per_epoch = self.planned_micro[0] if self.planned_micro else self._flex_epoch_length(0)

    def _flex_epoch_length(self, epoch: int) -> int:
        """Micro-batches of epoch ``epoch`` (the same on every rank); leaves the sampler at that epoch's start."""
        self.train_sampler.set_epoch(epoch, 0)
        return len(self.train_sampler)

    def _loader(self, dataset: Dataset, sampler: Sampler, bs: int, drop_last: bool, epoch: int) -> DataLoader:
        # A private generator: building a loader must not draw from the global RNG, or resuming mid-epoch
        # would shift every random number after it.
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch * 1_009 + self.dist.rank)
        pin, workers = self.dist.device.type == "cuda", self.cfg.train.num_workers
        if isinstance(sampler, FlexBatchSampler):  # batches of FlexKey (index, shape): one (T, H) per batch
            wrapped = ReportBad(FlexDataset(dataset), self.cfg.train.seed, epoch, self.cfg.data.skip_bad_videos)
            return DataLoader(wrapped, batch_sampler=sampler, num_workers=workers, collate_fn=collate_flex_report_bad,
                              pin_memory=pin, generator=gen)
        wrapped = ReportBad(dataset, self.cfg.train.seed, epoch, self.cfg.data.skip_bad_videos)
        return DataLoader(wrapped, batch_size=bs, sampler=sampler, num_workers=workers,
                          collate_fn=collate_report_bad, pin_memory=pin, drop_last=drop_last, generator=gen)

    def _setup_optim(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        self.global_batch = t.batch_size * t.accum_steps * self.dist.world_size
        self.peak_lr = scaled_lr(o.lr, self.global_batch) if o.scale_lr else o.lr
        self.optimizer = build_optimizer(self.raw_model, o, self.peak_lr)
        # Every epoch's optimizer steps are known in advance (flexible epochs differ in length but are planned).
        steps = [math.ceil(m / t.accum_steps) for m in self.planned_micro]
        per_epoch = sum(steps) / len(steps) if steps else self.steps_per_epoch
        self.scheduler = LRSchedule(self.optimizer, sum(steps), round(o.warmup_epochs * per_epoch),
                                    self.peak_lr, o.min_lr, o.schedule, o.decay_fraction)
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        flex = f" (flex.mode={self.cfg.flex.mode}: mean of the planned epochs)" if self.flex_cfg else ""
        self.log(f"model {self.cfg.model.name}: {trainable / 1e6:.2f}M trainable parameters; global batch "
                 f"{self.global_batch}, peak lr {self.peak_lr:.3g}, {per_epoch:.4g} steps/epoch{flex}")

    # ---- one optimizer step ---------------------------------------------------------------------------
    def _forward_backward(self, batch: dict[str, Any], sync: bool, scale: float) -> torch.Tensor:
        t, k = self.cfg.train, len(self.classes)
        video, labels = batch["video"], torch.as_tensor(batch["label"]).long()
        smoothing = t.label_smoothing
        if t.mixup > 0 or t.cutmix > 0:
            from pks4.data.transforms import mixup_cutmix

            # on the CPU tensors: the soft targets come back with label smoothing already folded in
            video, targets = mixup_cutmix(video, labels, k, mixup_alpha=t.mixup, cutmix_alpha=t.cutmix,
                                          prob=t.mix_prob, label_smoothing=smoothing)
            smoothing = 0.0
        else:
            targets = F.one_hot(labels, k).float()
        video = video.to(self.dist.device, non_blocking=True)
        targets = targets.to(self.dist.device, non_blocking=True)
        no_sync = self.dist.distributed and not sync
        # The batch's patch size and token grid (flex training; no-op without "shape") stay set through the
        # backward too: activation checkpointing re-runs blocks there, and they must see the same grid.
        with self.model.no_sync() if no_sync else _null(), \
                flex_patch(self.raw_model, batch.get("shape"), self.cfg.flex.kernel_resize):
            with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(video)
            loss = _soft_ce(logits, targets, smoothing)
            self.scaler.scale(loss * scale).backward()
        return loss.detach()


    # ---- epochs -----------------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> Iterator[dict[str, Any] | None]:
        """Batches of the rest of epoch ``epoch``, from ``self.batch_in_epoch`` on.

        A DataLoader worker that dies (killed by the OOM killer, or a decoder crash) does not end the run: the
        batch it was making is retried alone in one fresh worker; if that worker dies too, the batch's files
        are reported as skipped (``data.skip_bad_videos``) or named in a TrainingError. Either way the loader
        restarts after it, with the same data order.
        """
        t, guard, end = self.cfg.train, _DeferSigchld(self.cfg.train.num_workers > 0), object()
        while True:
            # The flexible sampler skips whole (variable-size) batches; the plain one skips items.
            start = self.batch_in_epoch if self.flex_cfg is not None else self.batch_in_epoch * t.batch_size
            self.train_sampler.set_epoch(epoch, start)
            loader_iter = iter(self._loader(self.train_set, self.train_sampler, t.batch_size, self.drop_last, epoch))
            try:
                batches = raise_load_errors(loader_iter)
                while True:
                    guard.fetching()
                    batch = next(batches, end)
                    if batch is end:
                        return
                    guard.computing()
                    yield batch
            except RuntimeError as exc:
                if not _worker_died(exc):
                    raise
                died = str(exc)
            finally:
                guard.fetching(replay=False)
                _shut_down(loader_iter)
            pos = self.batch_in_epoch
            self.log(f"epoch {epoch + 1}, batch {pos + 1}: {died}; retrying that batch in a fresh worker")
            retried = self._retry_batch(epoch, pos)
            guard.computing()
            try:
                yield retried
            finally:  # also when the loop stops on this batch: torch's handler must come back
                guard.fetching(replay=False)

    def _retry_batch(self, epoch: int, pos: int) -> dict[str, Any]:
        t = self.cfg.train
        self.train_sampler.set_epoch(epoch, 0)
        flex = self.flex_cfg is not None
        if flex:  # batch pos of the plan: FlexKeys at that batch's shape
            indices: list[Any] = list(self.train_sampler)[pos]
        else:
            indices = list(self.train_sampler.inner)[pos * t.batch_size:(pos + 1) * t.batch_size]
        wrapped = ReportBad(FlexDataset(self.train_set) if flex else self.train_set, t.seed, epoch,
                            self.cfg.data.skip_bad_videos)
        loader = DataLoader(wrapped, batch_size=len(indices), sampler=indices, num_workers=1,
                            collate_fn=collate_flex_report_bad if flex else collate_report_bad)
        loader_iter = iter(loader)
        try:
            return next(raise_load_errors(loader_iter)) or {"skipped": []}
        except RuntimeError as exc:
            if not _worker_died(exc):
                raise
        finally:
            _shut_down(loader_iter)
        files = [_sample_path(self.train_set, i) for i in indices]
        if not self.cfg.data.skip_bad_videos:
            raise TrainingError(f"a DataLoader worker died twice loading batch {pos + 1} of epoch {epoch + 1}, "
                                f"files: {', '.join(files)}; remove them or set --skip-bad-videos "
                                "(data.skip_bad_videos=true) to skip them")
        return {"skipped": [f"{f}: a DataLoader worker died loading its batch" for f in files]}

    def _train_epoch(self, stop: StopFlag) -> str | None:
        """Run the rest of epoch ``self.epoch``; return a stop status, or None when the epoch completed."""
        from tqdm import tqdm

        t, epoch, accum = self.cfg.train, self.epoch, self.cfg.train.accum_steps
        if self.flex_cfg is not None:  # flexible epochs differ in length (all planned at start-up)
            self.micro_per_epoch = self._flex_epoch_length(epoch)
            self.steps_per_epoch = math.ceil(self.micro_per_epoch / accum)
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch // accum, unit="step", leave=False,
                   desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (t.progress and self.dist.is_main))
        self.model.train()
        tic, clips, bad, losses = time.perf_counter(), 0, False, []
        for batch in self._batches(epoch):
            i = self.batch_in_epoch
            self.batch_in_epoch += 1
            group_end = (i + 1) % accum == 0 or i + 1 == self.micro_per_epoch
            group = accum if i // accum < self.micro_per_epoch // accum else self.micro_per_epoch % accum
            if batch is not None:
                self._note_skipped(batch)
            if batch is not None and "video" in batch:
                loss = self._forward_backward(batch, sync=group_end, scale=1.0 / group)
                bad |= not bool(torch.isfinite(loss))
                losses.append(float(loss))
                clips += len(batch["label"]) * self.dist.world_size
            if not group_end:
                continue
            bad_grad = not bad and not self.scaler.is_enabled() and not self._grads_finite()
            bad, bad_grad, want_stop = agree(self.dist, bad, bad_grad, stop.signum is not None)
            lr = self.scheduler.get_lr()
            if bad or bad_grad:
                self._non_finite(epoch, i, "loss" if bad else "gradients", losses)
                norm = None
            else:
                self._nan_streak = 0
                norm = optimizer_step(self, self.raw_model.parameters())
                if self.ema is not None:
                    self.ema.update(self.raw_model)
            rate = clips / max(1e-9, time.perf_counter() - tic)
            mean_loss = sum(losses) / max(1, len(losses))
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
            bar.update(1)
            if self.global_step % t.log_every == 0 or group_end and i + 1 == self.micro_per_epoch:
                self.metrics.write("train", self.global_step, epoch=epoch + (i + 1) / self.micro_per_epoch,
                                   loss=mean_loss, lr=lr, clips_per_s=rate,
                                   **({"grad_norm": norm} if norm is not None else {}))
            losses, bad = [], False
            if want_stop:
                bar.close()
                return "interrupted"
            if t.stop_after_steps is not None and self.global_step >= t.stop_after_steps:
                bar.close()
                return "stopped"
            if t.save_every_steps and self.global_step % t.save_every_steps == 0:
                self._save()
        bar.close()
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        return None

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _non_finite(self, epoch: int, i: int, what: str, losses: list[float]) -> None:
        """Stop (train.nan_policy=stop) or drop this update and go on (skip), naming the step either way."""
        step = self.global_step + 1
        where = f"at epoch {epoch + 1}, step {step} (batch {i + 1} of the epoch)"
        value = f"loss is {losses[-1] if losses else float('nan')}"
        detail = f"{value} (not finite)" if what == "loss" else f"{value} but the gradients are not finite"
        self._nan_streak += 1
        if self.cfg.train.nan_policy == "stop" or self._nan_streak > self.cfg.train.max_nan_skips:
            why = "" if self.cfg.train.nan_policy == "stop" else \
                f" ({self._nan_streak} non-finite steps in a row, more than train.max_nan_skips)"
            raise TrainingError(f"{detail} {where}{why}; lower optim.lr, enable optim.clip_grad or use "
                                "train.amp=bf16/none, then resume from the latest checkpoint "
                                "(or set train.nan_policy=skip to drop such steps)")
        # Skip: the update is dropped, the step still counts so the schedule and epoch length stay as planned.
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.nan_skipped.append(step)
        self.log(f"{detail} {where}: update skipped (train.nan_policy=skip)")
        self.metrics.write("nan_skip", step, epoch=epoch + 1, what=what)

    def _note_skipped(self, batch: dict[str, Any]) -> None:
        for path in batch.get("skipped", ()) or ():
            self.skipped.append(str(path))
            self.log(f"skipped unreadable video: {path}")

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved as the run's weights: the weight average when train.ema_decay is set.

        The unwrapped model: evaluation needs no gradient sync, and ranks may see different batch counts."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _evaluate(self) -> dict[str, float]:
        out = evaluate(self.eval_model, raise_load_errors(self.val_loader), amp_dtype=self.amp_dtype)
        metrics = compute_metrics(out.probs, out.labels, len(self.classes))
        if self.dist.is_main:
            cm = confusion_matrix(out.probs.argmax(1), out.labels, len(self.classes))
            save_confusion_matrix(cm, self.classes, self.run_dir / "confusion_matrix.csv",
                                  self.run_dir / "confusion_matrix.png")
        self.metrics.write("val", self.global_step, epoch=self.epoch, samples=len(out.labels), **metrics)
        self.log(f"epoch {self.epoch}: val top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
                 f"mean-class {metrics['mean_class']:.2f}  ({len(out.labels)} clips"
                 f"{', EMA weights' if self.ema is not None else ''})")
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        model_cfg = asdict(self.raw_model.config)
        if "pretrained" in model_cfg:
            model_cfg["pretrained"] = ""  # the weights are in the checkpoint; do not re-read the CLIP file
        return {"model_name": self.raw_model.model_name, "model_config": model_cfg, "classes": self.classes,
                "config": config_to_dict(self.cfg)}

    def _save(self, best: bool = False) -> Path:
        extra: dict[str, Any] = {}
        if self.ema is not None:
            # The weights file holds the average (what eval, predict and init_from read); the state file keeps
            # the trained weights, which --resume continues from.
            extra = {"train_weights": ckpt.plain_state_dict(self.raw_model), "ema_updates": self.ema.updates}
        return save_loop_checkpoint(self, self.eval_model, self._metadata(), best=best, best_top1=self.best_top1,
                                    nan_skipped=list(self.nan_skipped), **extra)

    def _resume(self, resume: str) -> None:
        path = resume_dir(self, resume)
        if path is None:
            return
        state = ckpt.verify_checkpoint(path)
        tensors, _ = ckpt.read_weights(path / ckpt.WEIGHTS_FILE)
        trained = state.get("train_weights")  # present when the run kept a weight average
        if trained is not None:
            ckpt.load_weights_into(self.raw_model, trained, str(path / ckpt.STATE_FILE))
        else:
            ckpt.load_weights_into(self.raw_model, tensors, str(path / ckpt.WEIGHTS_FILE))
        if self.ema is not None:
            if trained is not None:
                self.ema.load_state_dict(tensors, state.get("ema_updates", 0))
            else:  # the checkpoint had no average: start one from its weights
                self.ema.load_state_dict(self.raw_model.state_dict(), 0)
                self.log(f"{path} holds no weight average; train.ema_decay starts one from its weights")
        self.best_top1 = state["best_top1"]
        self.nan_skipped = [int(s) for s in state.get("nan_skipped", [])]
        restore_loop_state(self, state, path)

    # ---- the run ------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until ``train.epochs`` (or a stop); evaluate, save, log, plot on the way."""
        t = self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(format_config(self.cfg))
        status, last, path = "finished", None, None
        with StopFlag() as stop:
            while self.epoch < t.epochs:
                status = self._train_epoch(stop) or "finished"
                if status != "finished":
                    path = self._save()
                    self.log(f"{status} at step {self.global_step}: checkpoint {path} (resume with --resume auto)")
                    break
                done = self.epoch
                improved = False
                if self.val_loader is not None and (done % t.eval_every == 0 or done == t.epochs):
                    last = self._evaluate()
                    improved = self.best_top1 is None or last["top1"] > self.best_top1
                    self.best_top1 = max(last["top1"], self.best_top1 or last["top1"])
                if done % t.save_every == 0 or done == t.epochs or improved:
                    path = self._save(best=improved)
        self._finish()
        code = {"interrupted": 128 + (stop.signum or signal.SIGINT)}.get(status, 0)
        return TrainResult(self.run_dir, status, self.epoch, self.global_step, self.best_top1, last, path,
                           list(self.skipped), code, list(self.nan_skipped), self.init_report)

    def _finish(self) -> None:
        self.metrics.close()
        if self.dist.distributed:  # every rank skipped its own shard's files; the report lists them all
            lists: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(lists, self.skipped)
            self.skipped = _merge(*lists)
        if not self.dist.is_main:
            return
        if self.metrics.path.is_file():
            plot_curves(self.metrics.path, self.run_dir / "curves.png")
        if self.nan_skipped:
            self.log(f"{len(self.nan_skipped)} update(s) with non-finite loss or gradients skipped, at steps "
                     f"{self.nan_skipped}")
        if self.skipped:
            (self.run_dir / "skipped_videos.txt").write_text("\n".join(self.skipped) + "\n")
            shown = "\n  ".join(self.skipped[:50])
            more = f"\n  ... and {len(self.skipped) - 50} more" if len(self.skipped) > 50 else ""
            self.log(f"{len(self.skipped)} unreadable video(s) skipped (also in "
                     f"{self.run_dir / 'skipped_videos.txt'}):\n  {shown}{more}")


def _merge(*lists: list[str]) -> list[str]:
    """Concatenate, dropping repeats but keeping the first-seen order."""
    return list(dict.fromkeys(x for lst in lists for x in lst))


# ---- what the training and pretraining loops share ------------------------------------------------------------
# A "loop" is a Trainer or a Pretrainer: it has cfg, dist, log, run_dir, optimizer, scheduler, scaler, epoch,
# batch_in_epoch, global_step and skipped.
def agree(d: DistInfo, *flags: bool) -> list[bool]:
    """Every rank gets the same stop / error decisions (one rank raising a flag is enough)."""
    if not d.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def optimizer_step(loop: Any, parameters: Iterable[nn.Parameter]) -> float | None:
    """Unscale and clip (``optim.clip_grad``), step, advance the schedule; the gradient norm when clipped."""
    clip, norm = loop.cfg.optim.clip_grad, None
    if clip:
        loop.scaler.unscale_(loop.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip))
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.global_step += 1
    return norm


def save_loop_checkpoint(loop: Any, model: nn.Module, metadata: dict[str, Any], best: bool = False,
                         **extra_state: Any) -> Path:
    """Write ``step-N`` (weights of ``model`` + the loop's state + ``extra_state``) on the main rank, every
    rank's RNG gathered into it; mark it best, prune old ones; all ranks return once it is on disk."""
    rngs = [ckpt.rng_state()]
    if loop.dist.distributed:
        rngs = [None] * loop.dist.world_size
        dist.all_gather_object(rngs, ckpt.rng_state())
    path = loop.run_dir / "checkpoints" / f"step-{loop.global_step:08d}"
    if loop.dist.is_main:
        state = {"epoch": loop.epoch, "batch_in_epoch": loop.batch_in_epoch, "global_step": loop.global_step,
                 "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                 "scaler": loop.scaler.state_dict(), "rng": rngs, "world_size": loop.dist.world_size,
                 "skipped": list(loop.skipped), **extra_state}
        ckpt.save_checkpoint(path, model, state, metadata)
        if best:
            ckpt.save_best(loop.run_dir, path)
        ckpt.prune_checkpoints(loop.run_dir, loop.cfg.train.keep_last)
    if loop.dist.distributed:
        dist.barrier()
    return path


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory (or a file inside one), or a run directory (-> its latest valid one)."""
    if path.is_file() and path.name in (ckpt.STATE_FILE, ckpt.WEIGHTS_FILE):
        return path.parent
    if (path / ckpt.STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = ckpt.find_latest(path)
        if latest is None:
            raise ckpt.CheckpointError(f"{path}: run directory has no valid checkpoint to resume from")
        return latest
    what = "no such file or directory" if not path.exists() else "not a checkpoint directory"
    raise ckpt.CheckpointError(f"{path}: {what}; --resume takes 'auto', a checkpoint directory (holding "
                               f"{ckpt.WEIGHTS_FILE} and {ckpt.STATE_FILE}) or a run directory; to start "
                               "from a weights file set model.init_from instead")


def resume_dir(loop: Any, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names; for "auto" the latest valid one of the run (None: start afresh)."""
    if resume != "auto":
        return checkpoint_dir(Path(resume))
    if loop.dist.is_main:  # half-written folders of a killed save
        ckpt.sweep_leftovers(loop.run_dir)
    if loop.dist.distributed:
        dist.barrier()
    path = ckpt.find_latest(loop.run_dir, log=loop.log)
    if path is None:
        loop.log(f"--resume auto: no checkpoint in {loop.run_dir}, starting from scratch")
    return path


def restore_loop_state(loop: Any, state: dict[str, Any], path: Path) -> None:
    """Put a resumed loop (``Trainer`` or the pretraining loop) back where its checkpoint ``state`` left it:
    optimizer, schedule, loss scaler, epoch / batch / step, the skipped-file list and this rank's RNG."""
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.epoch, loop.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
    loop.global_step = int(state["global_step"])
    loop.skipped = _merge(list(state.get("skipped", [])), loop.skipped)
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[loop.dist.rank] if loop.dist.rank < len(rngs) else rngs[0])
    loop.log(f"resumed from {path} (epoch {loop.epoch + 1}, batch {loop.batch_in_epoch}, "
             f"step {loop.global_step})")


def train(cfg: RunConfig, resume: str | None = None, log: Log = print) -> TrainResult:
    """Print the resolved config and run :class:`Trainer`; the process group is torn down afterwards."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(format_config(cfg).rstrip())
    try:
        return Trainer(cfg, resume=resume, log=log).fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _null():
    from contextlib import nullcontext

    return nullcontext()
