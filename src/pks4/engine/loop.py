"""THE training loop: one core for every kind of training; a :class:`Task` supplies the model, the loss and the
evaluation (classification: :mod:`pks4.engine.train`; masked pretraining: :mod:`pks4.engine.pretrain`).

What the loop owns, the same for every task: the process (``torchrun`` + DDP, CPU or GPU), the data plan and its
loaders (:mod:`pks4.engine.loader`: per-item seeds, dead or hung workers retried, unreadable videos skipped or
named), AdamW with the warm-up schedule stepped per optimizer step, AMP, gradient accumulation and clipping, the
weight average (``train.ema_decay``), the NaN policy, checkpoints (:meth:`Loop.state_dict` /
:meth:`Loop.load_state_dict`, atomic, ``--resume auto``), signals, metrics and progress.

A run directory holds ``config.yaml``, ``metrics.jsonl``, TensorBoard events (``tb/``), ``curves.png``,
``skipped_videos.txt``, ``checkpoints/`` and whatever the task's evaluation writes.

Faults the loop survives:

* SIGINT/SIGTERM (Ctrl-C, cluster preemption, also under ``torchrun``) finish the current optimizer step, write a
  resumable checkpoint and return exit code 128 + signal number. Under ``torchrun`` the ranks agree on the stop
  at the next logging step.
* SIGKILL or a crash: ``train.save_every_steps`` adds mid-epoch checkpoints, and ``--resume auto`` continues
  from the newest one that verifies. Data order, per-item augmentation seeds, dropout/mixup RNG, optimizer,
  schedule, scaler and weight average are all restored, so with ``train.deterministic`` on the CPU the final
  weights are bitwise those of an uninterrupted run.
* A non-finite loss or gradient never reaches the weights: the fused AdamW step is told on the device to drop
  that update. At the next logging step (and before every save) the run stops with a message naming the step
  (``train.nan_policy=stop``) or logs the dropped update and goes on (``skip``).
* With ``data.skip_bad_videos`` a video that fails to read or transform, or a batch whose DataLoader worker
  dies twice, costs that video (or batch) only; the skipped files are listed at the end and in
  ``skipped_videos.txt``.

No host round-trip on the hot path: between logging steps a step reads nothing back from the device (losses,
finiteness flags and the gradient norm stay there), so a GPU is never left waiting for the host.

StretchySnake (``flex.mode``): each batch has its own sampled (T, H, patch), turned into the model's token geometry
here, and a batch size scaled to keep tokens per batch bounded, so epochs differ in length. Every epoch is planned
at start-up; the LR schedule spans the sum of the planned steps (warm-up: warm-up epochs x the mean planned epoch).

**The task seam.** A task is an ``nn.Module`` (so DistributedDataParallel wraps it and sees its forward) with:

* ``model``: the network whose weights a checkpoint's ``model.safetensors`` holds, the weight average averages
  and evaluation runs; ``train_set``: a dataset of :class:`~pks4.data.items.Item` / ``Skipped``;
* ``inputs(batch) -> dict``: CPU-side preparation of a :class:`~pks4.data.items.Batch` (mixup, targets); the
  loop moves the tensors to the device;
* ``loss(inputs, geometry) -> dict[str, Tensor]``: the named loss terms (the loop sums them, logs each; the
  loop calls it through ``forward``, which DDP wraps); a frozen teacher adding a term (self-distillation) or
  four objectives (video-text) are just more terms;
* ``trainable()``: the module the optimizer sees (its ``layer_id`` drives layer-wise LR decay);
* ``evaluate(model, loop)``: metrics (``score_key`` among them marks the best checkpoint) or None;
* ``metadata()``, ``extra_state()`` / ``load_extra_state(state, source)``: what checkpoints carry besides the
  weights (model name and config, classes, run config; a pretraining decoder ...);
* optional: ``start_epoch(epoch)``, called before the first batch of every epoch (also a resumed one): a task
  whose objective follows a schedule over epochs (video-text's masked then unmasked phase, distillation that
  stops early) switches there; ``batch_plan(dist_info, batch_size, seed)``: the task's own plan of the epochs'
  batches (e.g. never mixing images and videos in a batch), None for the loop's; ``unused_parameters``: True
  when some steps leave trainable parameters without a gradient (DDP then looks for them each step).
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from pks4.data.flex_sampler import FlexBatchSampler, FlexConfig, FlexShape
from pks4.data.items import Batch
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import OptimConfig, TrainConfig, format_config
from pks4.engine.ema import WeightEMA
from pks4.engine.loader import BatchStream, FlexPlan, LoaderOptions, SeededItems, ShardPlan
from pks4.engine.optim import LRSchedule, build_optimizer, scaled_lr
from pks4.engine.rundir import atomic_write_text, check_destination, checkpoint_bytes, guarded_run_dir
from pks4.engine.runlog import MetricsLog, plot_curves
from pks4.engine.runtime import DistInfo, StopFlag, TrainingError, agree, amp_dtype_for, process_group
from pks4.layers.geometry import TokenGeometry

__all__ = ["Task", "LoopSettings", "RunResult", "Loop", "run_printed"]

Log = Callable[[str], None]


class Task(nn.Module):
    """What one kind of training supplies to :class:`Loop` (see the module docstring for the seam)."""

    model: nn.Module
    train_set: Dataset
    score_key: str | None = None  # the metric of evaluate() whose best value marks the best checkpoint
    init_report: str | None = None  # what the model was initialised from, for the run's result
    unused_parameters: bool = False  # some steps leave trainable parameters without a gradient (a phase, a term)

    def inputs(self, batch: Batch) -> dict[str, Any]:
        return {"video": batch.video}

    def loss(self, inputs: dict[str, Any], geometry: Any = None) -> dict[str, Tensor]:
        """The named loss terms of one micro-batch (``inputs`` on the device, under autocast)."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], geometry: Any = None) -> dict[str, Tensor]:
        return self.loss(inputs, geometry)  # the call DistributedDataParallel wraps

    def trainable(self) -> nn.Module:
        return self.model

    def evaluate(self, model: nn.Module, loop: "Loop") -> dict[str, float] | None:
        return None

    def metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any], source: Path) -> None:
        pass

    def start_epoch(self, epoch: int) -> None:
        """Called before the first batch of epoch ``epoch`` (0-based), also when a run resumes inside it."""

    def batch_plan(self, dist_info: DistInfo, batch_size: int, seed: int) -> Any:
        """The plan of every epoch's batches (``length(epoch)``, ``batches(epoch)``, ``wrap(dataset)``, as
        :class:`~pks4.engine.loader.ShardPlan`); None: the loop's plan."""
        return None

    def describe(self) -> str:
        """How the run's first log line names what is trained."""
        return f"model {self.model.model_name}"

    def finished(self, loop: "Loop", checkpoint: Path | None) -> None:
        """Called on the main rank after the run (a hint on how to use the result)."""


@dataclass
class LoopSettings:
    """What the loop reads besides the task: the ``train`` and ``optim`` sections, the run directory, the
    whole config (written to ``config.yaml``), the bad-video policy and, for flexible training, the flex config
    resolved against the model (:func:`pks4.data.flex_sampler.resolve_flex_config`)."""

    train: TrainConfig
    optim: OptimConfig
    run_dir: Path
    config: Any
    skip_bad_videos: bool = False
    flex: FlexConfig | None = None


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    status: str  # "finished" | "interrupted" | "stopped"
    epoch: int
    global_step: int
    best_score: float | None  # best value of the task's score_key (None: never evaluated)
    last_metrics: dict[str, float] | None
    checkpoint: Path | None
    skipped: list[str]
    exit_code: int = 0
    nan_skipped_steps: list[int] = field(default_factory=list)  # updates dropped by train.nan_policy=skip
    last_loss: float | None = None  # mean loss of the last logged step
    init_report: str | None = None  # what the model was initialised from (and re-initialised, for a partial load)


@dataclass
class _Step:
    """One optimizer step's numbers, kept on the device until a logging step reads them."""

    number: int
    epoch: int
    batch: int
    lr: float
    flags: Tensor  # [dropped (all ranks agree), loss not finite on this rank, mean loss]
    terms: dict[str, Tensor]
    norm: Tensor | None


def _merge(*lists: list[str]) -> list[str]:
    """Concatenate, dropping repeats but keeping the first-seen order."""
    return list(dict.fromkeys(x for lst in lists for x in lst))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _non_finite(grads: list[Tensor], found: Tensor) -> Tensor:
    """Set ``found`` to 1 if any gradient holds an inf or NaN: one fused pass per device and dtype, no sync."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        flag = torch.zeros((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones((), device=device))
        found = torch.maximum(found, flag.to(found.device, non_blocking=True))
    return found


class Loop:
    """Trains ``task`` as ``settings`` say; ``fit()`` runs it (see the module docstring)."""

    def __init__(self, task: Task, settings: LoopSettings, dist_info: DistInfo, *, resume: str | None = None,
                 log: Log = print) -> None:
        self.task, self.s, self.dist = task, settings, dist_info
        self.run_dir = Path(settings.run_dir)
        self.log: Log = log if dist_info.is_main else (lambda msg: None)
        t = settings.train
        self.objective: nn.Module = task
        if dist_info.distributed:
            ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(task, device_ids=ids,
                                                                 find_unused_parameters=task.unused_parameters)
        self.plan = self._make_plan()
        self.planned_micro = [self.plan.length(e) for e in range(t.epochs)]
        self.micro_per_epoch = self.planned_micro[0] if self.planned_micro else self.plan.length(0)
        self._make_optimizer()
        self.ema = WeightEMA(task.model, t.ema_decay, t.ema_warmup) if t.ema_decay is not None else None
        self.amp_dtype = amp_dtype_for(t.amp, dist_info.device, t.cpu_amp)
        self.scaler = torch.amp.GradScaler(dist_info.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.best_score: float | None = None
        self.last_loss: float | None = None
        self.skipped: list[str] = [": ".join(b) for b in getattr(task.train_set, "bad", [])]
        self.nan_skipped: list[int] = []
        self._nan_streak, self._pending = 0, []
        self.metrics = MetricsLog(self.run_dir, dist_info.is_main, t.tensorboard)
        if resume:
            self._resume(resume)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _make_plan(self) -> ShardPlan | FlexPlan:
        t, n = self.s.train, len(self.task.train_set)
        own = self.task.batch_plan(self.dist, t.batch_size, t.seed)
        if own is not None:
            return own
        if self.s.flex is not None:
            return FlexPlan(FlexBatchSampler(n, t.batch_size, self.s.flex, seed=t.seed, rank=self.dist.rank,
                                             world_size=self.dist.world_size))
        plan = ShardPlan(n, self.dist, t.batch_size, shuffle=True, seed=t.seed)
        if plan.shard == 0:
            raise TrainingError("no training clips")
        if t.batch_size > plan.shard:  # allowed (a tiny set), but the scaled learning rate would surprise
            self.log(f"note: train.batch_size={t.batch_size} is more than the {plan.shard} training clips of a "
                     "process: each step takes them all, while optim.scale_lr scales the learning rate for the "
                     "batch size asked for")
        return plan

    def _make_optimizer(self) -> None:
        o, t = self.s.optim, self.s.train
        self.global_batch = t.batch_size * t.accum_steps * self.dist.world_size
        self.peak_lr = scaled_lr(o.lr, self.global_batch) if o.scale_lr else o.lr
        trainable = self.task.trainable()
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, o, self.peak_lr)
        # Every epoch's optimizer steps are known in advance (flexible epochs differ in length but are planned).
        steps = [math.ceil(m / t.accum_steps) for m in self.planned_micro]
        per_epoch = sum(steps) / len(steps) if steps else math.ceil(self.micro_per_epoch / t.accum_steps)
        self.scheduler = LRSchedule(self.optimizer, sum(steps), round(o.warmup_epochs * per_epoch),
                                    self.peak_lr, o.min_lr, o.schedule, o.decay_fraction)
        flex = f" (flex.mode={self.s.flex.mode}: mean of the planned epochs)" if self.s.flex else ""
        self.log(f"{self.task.describe()}: {sum(p.numel() for p in self.params) / 1e6:.2f}M trainable parameters; "
                 f"global batch {self.global_batch}, peak lr {self.peak_lr:.3g}, {per_epoch:.4g} steps/epoch{flex}")

    @property
    def loader_options(self) -> LoaderOptions:
        t = self.s.train
        return LoaderOptions(t.num_workers, t.loader_timeout, self.dist.device.type == "cuda")

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved as the run's weights: the weight average when train.ema_decay is set.
        The model itself, not the DDP wrapper: evaluation needs no gradient sync, and ranks may see different
        batch counts."""
        return self.ema.module if self.ema is not None else self.task.model

    def eval_stream(self, dataset: Dataset, batch_size: int) -> BatchStream:
        """This rank's shard of ``dataset`` in order (every rank's results are gathered by the evaluation)."""
        plan = ShardPlan(len(dataset), self.dist, batch_size, shuffle=False, drop_last=False)
        return BatchStream(dataset, plan.batches(0), self.loader_options, skip_bad=self.s.skip_bad_videos,
                           where="the evaluation", log=self.log, seed=self.s.train.seed)

    # ---- one optimizer step ---------------------------------------------------------------------------------
    def _geometry(self, shape: FlexShape | None) -> Any:
        if shape is None or self.s.flex is None:
            return None
        return TokenGeometry(patch=shape.patch, grid=shape.grid, kernel_resize=self.s.flex.kernel_resize)

    def _forward_backward(self, batch: Batch, sync: bool, scale: float) -> dict[str, Tensor]:
        """Loss terms of one micro-batch (detached), its gradients added (synced across ranks when ``sync``)."""
        device = self.dist.device
        inputs = _to_device(self.task.inputs(batch), device)
        geometry = self._geometry(batch.shape)
        no_sync = self.dist.distributed and not sync
        # The geometry holds through the backward too: activation checkpointing re-runs blocks there.
        with self.objective.no_sync() if no_sync else nullcontext():
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                terms = self.objective(inputs, geometry)
            loss = sum(terms.values())
            self.scaler.scale(loss * scale).backward()
        named = {k: v.detach() for k, v in terms.items()} if len(terms) > 1 else {}
        return {"loss": loss.detach(), **named}

    def _optimizer_step(self, micro: list[dict[str, Tensor]], epoch: int, i: int) -> _Step:
        """Clip, step (an update with a non-finite loss or gradient is dropped on the device), schedule, EMA."""
        device, clip = self.dist.device, self.s.optim.clip_grad
        lr = self.scheduler.get_lr()
        zero = torch.zeros((), device=device)
        terms = {k: torch.stack([m[k] for m in micro]).mean() for k in micro[0]} if micro else {"loss": zero}
        loss_bad = (~torch.isfinite(torch.stack([m["loss"] for m in micro])).all()).float() if micro else zero
        norm = None
        if self.scaler.is_enabled():  # fp16: the scaler skips inf/NaN gradients itself (and lowers its scale)
            if clip:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            dropped = loss_bad
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            dropped = _non_finite(grads, loss_bad)
            if clip:
                norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], clip)
            if self.dist.distributed:
                dist.all_reduce(dropped, op=dist.ReduceOp.MAX)
            self.optimizer.found_inf = dropped  # the fused AdamW skips the update (and its step count) on 1.0
            self.optimizer.step()
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a dropped update still counts: the schedule and epoch length stay as planned
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.task.model, skip=dropped)
        flags = torch.stack([dropped, loss_bad, terms["loss"].float()])
        return _Step(self.global_step, epoch, i, lr, flags, terms, norm)

    # ---- reading the device back (logging steps and saves only) ------------------------------------------------
    def _check_health(self) -> None:
        """Act on the non-finite steps since the last check: stop naming the first (train.nan_policy=stop), or log
        each dropped update (skip) and stop after train.max_nan_skips in a row."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        for step, (dropped, loss_bad, loss) in zip(pending, torch.stack([p.flags for p in pending]).tolist()):
            if not dropped:
                self._nan_streak = 0
                continue
            self._nan_streak += 1
            where = f"at epoch {step.epoch + 1}, step {step.number} (batch {step.batch + 1} of the epoch)"
            detail = f"loss is {loss} (not finite)" if loss_bad else f"loss is {loss} but the gradients are not finite"
            t = self.s.train
            if t.nan_policy == "stop" or self._nan_streak > t.max_nan_skips:
                why = "" if t.nan_policy == "stop" else \
                    f" ({self._nan_streak} non-finite steps in a row, more than train.max_nan_skips)"
                raise TrainingError(f"{detail} {where}{why}; lower optim.lr, enable optim.clip_grad or use "
                                    "train.amp=bf16/none, then resume from the latest checkpoint "
                                    "(or set train.nan_policy=skip to drop such steps)")
            self.nan_skipped.append(step.number)
            self.log(f"{detail} {where}: update skipped (train.nan_policy=skip)")
            self.metrics.write("nan_skip", step.number, epoch=step.epoch + 1,
                               what="loss" if loss_bad else "gradients")

    def _log_step(self, step: _Step, clips: int, tic: float, bar: Any) -> None:
        values = {k: float(v) for k, v in step.terms.items()}
        self.last_loss = values["loss"]
        rate = clips / max(1e-9, time.perf_counter() - tic)
        norm = {"grad_norm": float(step.norm)} if step.norm is not None else {}
        bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{step.lr:.2e}", clips_s=f"{rate:.1f}")
        self.metrics.write("train", step.number, epoch=step.epoch + (step.batch + 1) / self.micro_per_epoch,
                           lr=step.lr, clips_per_s=rate, **values, **norm)
        if bar.disable:
            terms = "".join(f"  {k} {v:.4f}" for k, v in values.items() if k != "loss")
            self.log(f"epoch {step.epoch + 1} step {step.number}: loss {self.last_loss:.4f}{terms}  "
                     f"lr {step.lr:.3g}  {rate:.1f} clips/s")

    def _after_step(self, step: _Step, stop: StopFlag, clips: int, tic: float, bar: Any) -> str | None:
        """Log, stop or save after an optimizer step; the device is read back only when one of them is due."""
        t = self.s.train
        logging = step.number % t.log_every == 0 or step.batch + 1 == self.micro_per_epoch
        limit = t.stop_after_steps is not None and step.number >= t.stop_after_steps
        save = bool(t.save_every_steps) and step.number % t.save_every_steps == 0
        signalled = stop.signum is not None and not self.dist.distributed  # ranks agree on logging steps
        if not (logging or limit or save or signalled):
            return None
        self._check_health()
        interrupted = agree(self.dist, stop.signum is not None)[0]
        if logging:
            self._log_step(step, clips, tic, bar)
        if interrupted:
            return "interrupted"
        if limit:
            return "stopped"
        if save:
            self._save()
        return None

    # ---- epochs -----------------------------------------------------------------------------------------------
    def _stream(self, epoch: int, batches: list[list[Any]]) -> BatchStream:
        """The rest of epoch ``epoch``, from ``self.batch_in_epoch`` on."""
        t, start = self.s.train, self.batch_in_epoch
        dataset = SeededItems(self.plan.wrap(self.task.train_set), t.seed, epoch)
        return BatchStream(dataset, batches[start:], self.loader_options, skip_bad=self.s.skip_bad_videos,
                           where=f"epoch {epoch + 1}", log=self.log, start=start,
                           seed=t.seed * 100_003 + epoch * 1_009 + self.dist.rank)

    def _group(self, i: int) -> int:
        """Micro-batches in the accumulation group of micro-batch ``i`` (the last group may be shorter)."""
        accum, micro = self.s.train.accum_steps, self.micro_per_epoch
        return accum if i // accum < micro // accum else micro % accum

    def _train_epoch(self, stop: StopFlag) -> str | None:
        """Run the rest of epoch ``self.epoch``; return a stop status, or None when the epoch completed."""
        from tqdm import tqdm

        t, epoch = self.s.train, self.epoch
        batches = self.plan.batches(epoch)
        self.micro_per_epoch = len(batches)
        bar = tqdm(total=math.ceil(self.micro_per_epoch / t.accum_steps), initial=self.batch_in_epoch // t.accum_steps,
                   unit="step", leave=False, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not (t.progress and self.dist.is_main))
        self.task.start_epoch(epoch)
        self.task.train()
        tic, clips, micro = time.perf_counter(), 0, []
        try:
            for batch in self._stream(epoch, batches):
                i = self.batch_in_epoch
                self.batch_in_epoch += 1
                group_end = (i + 1) % t.accum_steps == 0 or i + 1 == self.micro_per_epoch
                self._note_skipped(batch)
                if batch.video is not None:
                    micro.append(self._forward_backward(batch, sync=group_end, scale=1.0 / self._group(i)))
                    clips += len(batch) * self.dist.world_size
                if not group_end:
                    continue
                step = self._optimizer_step(micro, epoch, i)
                self._pending.append(step)
                micro = []
                bar.update(1)
                status = self._after_step(step, stop, clips, tic, bar)
                if status is not None:
                    return status
        finally:
            bar.close()
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        return None

    def _note_skipped(self, batch: Batch) -> None:
        for item in batch.skipped:
            self.skipped.append(str(item))
            self.log(f"skipped unreadable video: {item}")

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resume needs, every rank's RNG gathered in (a collective)."""
        rngs = [ckpt.rng_state()]
        if self.dist.distributed:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, ckpt.rng_state())
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rngs, "world_size": self.dist.world_size,
                 "skipped": list(self.skipped), "nan_skipped": list(self.nan_skipped), "best_score": self.best_score,
                 "last_loss": self.last_loss, **self.task.extra_state()}
        if self.ema is not None:
            # The weights file holds the average (what eval, predict and init_from read); the state keeps the
            # trained weights, which --resume continues from.
            state.update(train_weights=ckpt.plain_state_dict(self.task.model), ema_updates=self.ema.updates)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the loop back where ``state`` left it: optimizer, schedule, scaler, counters, lists, this rank's RNG."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.global_step = int(state["global_step"])
        self.skipped = _merge(list(state.get("skipped", [])), self.skipped)
        self.nan_skipped = [int(s) for s in state.get("nan_skipped", [])]
        self.best_score = state.get("best_score", state.get("best_top1"))  # older classification checkpoints
        self.last_loss = state.get("last_loss")
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    def _save(self, best: bool = False) -> Path:
        """Write ``step-N`` (weights + :meth:`state_dict`) on the main rank; mark it best, prune old ones; every
        rank returns once it is on disk. Non-finite steps are acted on first: no checkpoint follows one unseen."""
        self._check_health()
        state = self.state_dict()
        path = self.run_dir / "checkpoints" / f"step-{self.global_step:08d}"
        if self.dist.is_main:
            ckpt.save_checkpoint(path, self.eval_model, state, self.task.metadata())
            if best:
                ckpt.save_best(self.run_dir, path)
            ckpt.prune_checkpoints(self.run_dir, self.s.train.keep_last)
        if self.dist.distributed:
            dist.barrier()
        return path

    def _resume_dir(self, resume: str) -> Path | None:
        """The checkpoint ``--resume`` names; for "auto" the latest valid one of the run (None: start afresh)."""
        if resume != "auto":
            return ckpt.checkpoint_dir(Path(resume))
        if self.dist.is_main:  # half-written folders of a killed save
            ckpt.sweep_leftovers(self.run_dir)
        if self.dist.distributed:
            dist.barrier()
        path = ckpt.find_latest(self.run_dir, log=self.log)
        if path is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")
        return path

    def _resume(self, resume: str) -> None:
        path = self._resume_dir(resume)
        if path is None:
            return
        state = ckpt.verify_checkpoint(path)
        self.task.load_extra_state(state, path)
        tensors, _ = ckpt.read_weights(path / ckpt.WEIGHTS_FILE)
        trained = state.get("train_weights")  # present when the run kept a weight average
        if trained is not None:
            ckpt.load_weights_into(self.task.model, trained, str(path / ckpt.STATE_FILE))
        else:
            ckpt.load_weights_into(self.task.model, tensors, str(path / ckpt.WEIGHTS_FILE))
        if self.ema is not None:
            if trained is not None:
                self.ema.load_state_dict(tensors, state.get("ema_updates", 0))
            else:  # the checkpoint had no average: start one from its weights
                self.ema.load_state_dict(self.task.model.state_dict(), 0)
                self.log(f"{path} holds no weight average; train.ema_decay starts one from its weights")
        self.load_state_dict(state)
        self.log(f"resumed from {path} (epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                 f"step {self.global_step})")

    # ---- the run ----------------------------------------------------------------------------------------------
    def _evaluate_epoch(self) -> tuple[dict[str, float] | None, bool]:
        """The task's evaluation when it is due; (metrics, whether the score improved)."""
        t, done = self.s.train, self.epoch
        if not (done % t.eval_every == 0 or done == t.epochs):
            return None, False
        metrics = self.task.evaluate(self.eval_model, self)
        if metrics is None:
            return None, False
        self.metrics.write("val", self.global_step, epoch=self.epoch, **metrics)
        key = self.task.score_key
        if key is None:
            return metrics, False
        improved = self.best_score is None or metrics[key] > self.best_score
        self.best_score = max(metrics[key], self.best_score or metrics[key])
        return metrics, improved

    def fit(self) -> RunResult:
        """Train until ``train.epochs`` (or a stop); evaluate, save, log, plot on the way."""
        t = self.s.train
        if self.dist.is_main:  # before the first step: room for the checkpoints, the config written atomically
            need = checkpoint_bytes(sum(p.numel() for p in self.task.model.parameters()),
                                    keep_last=t.keep_last, ema=self.ema is not None)
            check_destination(self.run_dir, need)
            atomic_write_text(self.run_dir / "config.yaml", format_config(self.s.config))
        status, last, path = "finished", None, None
        with StopFlag() as stop:
            while self.epoch < t.epochs:
                status = self._train_epoch(stop) or "finished"
                if status != "finished":
                    path = self._save()
                    self.log(f"{status} at step {self.global_step}: checkpoint {path} (resume with --resume auto)")
                    break
                self._check_health()
                metrics, improved = self._evaluate_epoch()
                last = metrics or last
                if self.epoch % t.save_every == 0 or self.epoch == t.epochs or improved:
                    path = self._save(best=improved)
        self._finish(path)
        code = {"interrupted": 128 + (stop.signum or signal.SIGINT)}.get(status, 0)
        return RunResult(self.run_dir, status, self.epoch, self.global_step, self.best_score, last, path,
                         list(self.skipped), code, list(self.nan_skipped), self.last_loss, self.task.init_report)

    def _finish(self, checkpoint: Path | None) -> None:
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
        self.task.finished(self, checkpoint)



def run_printed(cfg: Any, build: Callable[..., Loop], resume: str | None = None, log: Log = print,
                overwrite: bool = False) -> RunResult:
    """What every training command does: print the resolved config (on the main rank), then build the loop with
    ``build(cfg, resume=resume, log=log)`` and run it in ``cfg.out``, locked and never over an earlier run
    (:func:`pks4.engine.rundir.guarded_run_dir`; ``overwrite`` moves one aside); the process group is torn down
    afterwards."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(format_config(cfg).rstrip())
    with guarded_run_dir(cfg.out, resume=resume, overwrite=overwrite, log=log), process_group():
        return build(cfg, resume=resume, log=log).fit()
