"""``pks4 pretrain``: masked-alignment pretraining of a VideoMamba against a frozen CLIP (Li et al. §3.4, after UMT).

The objective is :func:`pks4.models.videomamba_pretrain.masked_alignment_loss`: the frozen CLIP teacher's
CLS attention keeps 20% of each frame's patches visible (CLS always), the student runs only those tokens, and
its decoded tokens are pulled towards the teacher's L2-normalised tokens with ``2 - 2 cos``. Labels are never
read: any training list the classifier can read (the same datasets, the same augmentation) serves as unlabeled
clips. The loop is the classifier's (:mod:`pks4.engine.train`): the same data loaders and per-item seeds,
AdamW with the linear-warm-up cosine schedule stepped per optimizer step, AMP, DDP under ``torchrun``, atomic
checkpoints, SIGINT/SIGTERM saving, ``--resume auto``.

**The teacher.** ``teacher.path`` (``--teacher``) loads real CLIP vision weights through
:func:`pks4.weights.load_pretrained_backbone` (OpenAI, open_clip or Hugging Face files). Without it a
randomly initialised tower of ``teacher.arch`` is used -- seeded, so a resumed run sees the same one -- and the
log says loudly that the result is only good for testing the pipeline.

**What a checkpoint holds.** ``model.safetensors`` holds the VideoMamba alone, under its own key names (the
layout of the released VideoMamba checkpoints) with the registry name and model config in its metadata;
``state.pt`` holds the alignment decoder next to the optimizer state. The decoder is a pretraining-only
part, so a fine-tuning run starts from the student directly::

    pks4 train RECIPE.yaml --set model.overrides.pretrained=RUN/checkpoints/step-00001000

(:func:`pks4.weights.videomamba.load_videomamba_checkpoint`: a new head, position embeddings resized to the
fine-tuning frame count and size), or ``--set model.init_from=RUN --set model.partial_load=true`` for the same
sizes. The last block, ``norm_f`` and the head receive no gradient from the alignment (the student is read at
the residual stream entering its last block), so they are frozen here and start fine-tuning as initialised.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pks4.data.datasets import DataConfig
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import (ModelConfig, OptimConfig, RunConfig, TrainConfig,
                                config_to_dict, format_config, load_section)
from pks4.engine.optim import LRSchedule, build_optimizer, scaled_lr
from pks4.engine.train import (Log, MetricsLog, _null, ReportBad, ResumableSampler, StopFlag, TrainingError, agree,
                               amp_dtype_for, build_model, collate_report_bad, optimizer_step, plot_curves,
                               raise_load_errors, restore_loop_state, resume_dir, save_loop_checkpoint,
                               seed_everything, setup_distributed)
from pks4.models.clip_vit import CLIP_VIT_B16, CLIP_VIT_L14, CLIP_VIT_TINY, CLIPVisionTransformer
from pks4.models.videomamba import FLIP_SCANS, VideoMamba
from pks4.models.videomamba_pretrain import MaskedAlignmentStudent, masked_alignment_loss

__all__ = ["TeacherConfig", "MaskConfig", "PretrainConfig", "PretrainResult", "load_pretrain_config",
           "build_teacher", "build_student", "AlignmentObjective", "Pretrainer", "pretrain"]

TEACHER_ARCHS = {"b16": CLIP_VIT_B16, "l14": CLIP_VIT_L14, "tiny": CLIP_VIT_TINY}


@dataclass
class TeacherConfig:
    """The frozen CLIP vision tower the student is aligned to."""

    path: str = ""  # CLIP vision weights; "" = a random tower of `arch` (tests the pipeline, teaches nothing)
    arch: Literal["b16", "l14", "tiny"] = "b16"  # size of that random tower; ignored when `path` is set
    teacher_seed: int = 1234  # random tower only: the same tower on every rank and after a resume


@dataclass
class MaskConfig:
    """Attention-guided masking (§3.4, UMT): the teacher's CLS attention picks the visible patches."""

    ratio: float = 0.8  # Li et al. Table 5c: 80% of each frame's patches hidden
    sample: bool = True  # draw visible patches in proportion to the attention (UMT); false = top-k

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask.ratio={self.ratio}; expected a value in [0, 1)")


@dataclass
class PretrainConfig:
    """Everything one ``pks4 pretrain`` run needs; ``train`` fields about labels (label smoothing, mixup,
    evaluation) are not used."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="videomamba_middle"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    out: str = "runs/pretrain"


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """A YAML recipe (or the defaults when ``path`` is None) with ``key=value`` overrides, type-checked."""
    return load_section(PretrainConfig, path, overrides)


def _run_view(cfg: PretrainConfig) -> RunConfig:
    """The classifier's config with the same model, data and optimizer sections (stored in checkpoints)."""
    return RunConfig(model=cfg.model, data=cfg.data, optim=cfg.optim, train=cfg.train, out=cfg.out)


# ------------------------------------------------------------------------------------------------ parts


def build_teacher(cfg: TeacherConfig, log: Log = print) -> CLIPVisionTransformer:
    """The frozen teacher: real CLIP weights from ``cfg.path``, else a seeded random tower with a warning."""
    # In a forked RNG: building the teacher (random or loaded) never shifts the student's initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.teacher_seed)
        teacher = _load_teacher(cfg.path) if cfg.path else CLIPVisionTransformer(TEACHER_ARCHS[cfg.arch])
    if cfg.path:
        log(f"teacher: CLIP vision tower from {cfg.path} (width {teacher.cfg.width}, {teacher.num_blocks} blocks)")
    else:
        log(f"WARNING: no teacher weights given (--teacher / teacher.path): the CLIP teacher ({cfg.arch}) is "
            "RANDOMLY INITIALISED. The student will learn to match random features: use this only to test "
            "the pipeline. Pass --teacher /path/to/ViT-B-16.pt (OpenAI, open_clip or Hugging Face weights).")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _load_teacher(path: str) -> CLIPVisionTransformer:
    from pks4.weights import CheckpointError as WeightsError
    from pks4.weights import load_pretrained_backbone

    try:
        return load_pretrained_backbone(path)
    except WeightsError as exc:
        raise ckpt.CheckpointError(f"teacher.path: {exc}") from None


def _teacher_dim(teacher: CLIPVisionTransformer) -> int:
    return teacher.cfg.output_dim or teacher.cfg.width


def build_student(cfg: PretrainConfig, teacher_dim: int, num_classes: int) -> MaskedAlignmentStudent:
    """VideoMamba from the registry + alignment decoder; parts the objective never reaches are frozen."""
    model = build_model(_run_view(cfg), num_classes)
    if not isinstance(model, VideoMamba):
        raise TrainingError(f"model '{cfg.model.name}' is a {type(model).__name__}; masked-alignment "
                            "pretraining needs a VideoMamba (videomamba_tiny/small/middle, ...)")
    if model.config.scan not in FLIP_SCANS:
        raise TrainingError(f"model.overrides.scan={model.config.scan!r}: masked alignment runs visible tokens "
                            f"only and needs a scan whose backward order reverses the forward one: {FLIP_SCANS}")
    student = MaskedAlignmentStudent(model, teacher_dim, cfg.mask.ratio, cfg.mask.sample)
    last = f"model.layers.{model.num_layers - 1}."
    for name, p in student.named_parameters():
        if name.startswith((last, "model.norm_f.", "model.head.")):
            p.requires_grad_(False)  # no gradient reaches them; frozen, they also keep DDP and AdamW exact
    return student


class AlignmentObjective(nn.Module):
    """Student + frozen teacher -> loss, as one module so DistributedDataParallel sees the forward pass."""

    def __init__(self, student: MaskedAlignmentStudent, teacher: CLIPVisionTransformer) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return masked_alignment_loss(self.student, self.teacher, clip)


@dataclass
class PretrainResult:
    """What a finished (or stopped) pretraining run reports."""

    run_dir: Path
    status: str  # "finished" | "interrupted" | "stopped"
    epoch: int
    global_step: int
    last_loss: float | None
    checkpoint: Path | None
    skipped: list[str]
    exit_code: int = 0


# ------------------------------------------------------------------------------------------------ the loop


class Pretrainer:
    """Owns student, teacher, optimizer, schedule, data and run directory of one ``pks4 pretrain`` run."""

    def __init__(self, cfg: PretrainConfig, resume: str | None = None, log: Log = print) -> None:
        from pks4.data.datasets import build_dataset

        self.cfg, self.run_dir = cfg, Path(cfg.out)
        self.dist = setup_distributed(cfg.train.device)
        self.log: Log = log if self.dist.is_main else (lambda msg: None)
        seed_everything(cfg.train.seed + self.dist.rank, cfg.train.deterministic)
        self.train_set = build_dataset(cfg.data, "train", train=True)
        self.classes = [str(c) for c in self.train_set.classes]
        self.teacher = build_teacher(cfg.teacher, self.log).to(self.dist.device)
        self.student = build_student(cfg, _teacher_dim(self.teacher), cfg.model.num_classes or len(self.classes))
        self.student.to(self.dist.device)
        self.objective: nn.Module = AlignmentObjective(self.student, self.teacher)
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self._setup_data_and_optim()
        self.amp_dtype = amp_dtype_for(cfg.train.amp, self.dist.device, cfg.train.cpu_amp)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.skipped: list[str] = [": ".join(b) for b in getattr(self.train_set, "bad", [])]
        self.last_loss: float | None = None
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main, cfg.train.tensorboard)
        if resume:
            self._resume(resume)

    def _setup_data_and_optim(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        self.sampler = ResumableSampler(self.train_set, self.dist, shuffle=True, seed=t.seed)
        shard = len(self.sampler.inner)
        if shard == 0:
            raise TrainingError(f"{self.cfg.data.train}: no training clips")
        self.drop_last = shard >= 2 * t.batch_size  # constant batch shapes, unless the data is tiny
        self.micro_per_epoch = shard // t.batch_size if self.drop_last else math.ceil(shard / t.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.accum_steps)
        global_batch = t.batch_size * t.accum_steps * self.dist.world_size
        self.peak_lr = scaled_lr(o.lr, global_batch) if o.scale_lr else o.lr
        self.optimizer = build_optimizer(self.student, o, self.peak_lr)
        self.scheduler = LRSchedule(self.optimizer, t.epochs * self.steps_per_epoch,
                                    round(o.warmup_epochs * self.steps_per_epoch), self.peak_lr, o.min_lr,
                                    o.schedule, o.decay_fraction)
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        self.log(f"student {self.cfg.model.name}: {trainable / 1e6:.2f}M trainable parameters (decoder included); "
                 f"{shard} clips per rank, global batch {global_batch}, peak lr {self.peak_lr:.3g}, "
                 f"{self.steps_per_epoch} steps/epoch, mask ratio {self.cfg.mask.ratio}")

    def _loader(self, epoch: int) -> DataLoader:
        t = self.cfg.train
        gen = torch.Generator().manual_seed(t.seed * 100_003 + epoch * 1_009 + self.dist.rank)
        wrapped = ReportBad(self.train_set, t.seed, epoch, self.cfg.data.skip_bad_videos)
        return DataLoader(wrapped, batch_size=t.batch_size, sampler=self.sampler, num_workers=t.num_workers,
                          collate_fn=collate_report_bad, pin_memory=self.dist.device.type == "cuda",
                          drop_last=self.drop_last, generator=gen)

    # ---- one step -----------------------------------------------------------------------------------------
    def _forward_backward(self, video: torch.Tensor, sync: bool, scale: float) -> torch.Tensor:
        video = video.to(self.dist.device, non_blocking=True)
        no_sync = self.dist.distributed and not sync
        with self.objective.no_sync() if no_sync else _null():
            with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.objective(video)
            self.scaler.scale(loss * scale).backward()
        return loss.detach().float()

    def _train_epoch(self, stop: StopFlag) -> str | None:
        """Run the rest of epoch ``self.epoch``; return a stop status, or None when the epoch completed."""
        t, epoch, accum = self.cfg.train, self.epoch, self.cfg.train.accum_steps
        self.sampler.set_epoch(epoch, self.batch_in_epoch * t.batch_size)
        self.student.train()
        tic, clips, losses = time.perf_counter(), 0, []
        for batch in raise_load_errors(self._loader(epoch)):
            i = self.batch_in_epoch
            self.batch_in_epoch += 1
            group_end = (i + 1) % accum == 0 or i + 1 == self.micro_per_epoch
            group = accum if i // accum < self.micro_per_epoch // accum else self.micro_per_epoch % accum
            for path in (batch or {}).get("skipped", ()) or ():
                self.skipped.append(str(path))
                self.log(f"skipped unreadable video: {path}")
            if batch is not None and "video" in batch:
                losses.append(self._forward_backward(batch["video"], sync=group_end, scale=1.0 / group))
                clips += len(batch["video"]) * self.dist.world_size
            if not group_end:
                continue
            if agree(self.dist, any(not torch.isfinite(x) for x in losses))[0]:
                raise TrainingError(f"non-finite alignment loss at epoch {epoch + 1}, step {self.global_step + 1} "
                                    f"(batch {i + 1} of the epoch); lower optim.lr or enable optim.clip_grad, "
                                    "then resume from the latest checkpoint")
            lr = self.scheduler.get_lr()
            optimizer_step(self, self.student.parameters())
            if losses:
                self.last_loss = float(torch.stack(losses).mean())
            if self.global_step % t.log_every == 0 or i + 1 == self.micro_per_epoch:
                rate = clips / max(1e-9, time.perf_counter() - tic)
                self.metrics.write("train", self.global_step, epoch=epoch + (i + 1) / self.micro_per_epoch,
                                   loss=self.last_loss, lr=lr, clips_per_s=rate)
                self.log(f"epoch {epoch + 1} step {self.global_step}: alignment loss {self.last_loss:.4f}  "
                         f"lr {lr:.3g}  {rate:.1f} clips/s")
            losses = []
            status = self._stop_status(stop)
            if status is not None:
                return status
            if t.save_every_steps and self.global_step % t.save_every_steps == 0:
                self._save()
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        return None

    def _stop_status(self, stop: StopFlag) -> str | None:
        if agree(self.dist, stop.signum is not None)[0]:
            return "interrupted"
        limit = self.cfg.train.stop_after_steps
        return "stopped" if limit is not None and self.global_step >= limit else None

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        model = self.student.model
        model_cfg = asdict(model.config)
        model_cfg["pretrained"] = ""  # the weights are in the checkpoint; do not re-read the init file
        return {"model_name": model.model_name, "model_config": model_cfg, "classes": self.classes,
                "config": config_to_dict(_run_view(self.cfg)), "pretrain_config": config_to_dict(self.cfg),
                "objective": "masked_alignment"}

    def _save(self) -> Path:
        return save_loop_checkpoint(self, self.student.model, self._metadata(),
                                    decoder=ckpt.plain_state_dict(self.student.decoder),
                                    last_loss=self.last_loss, best_top1=None)

    def _resume(self, resume: str) -> None:
        path = resume_dir(self, resume)
        if path is None:
            return
        state = ckpt.verify_checkpoint(path)
        if "decoder" not in state:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_FILE}: no alignment decoder: not a `pks4 pretrain` "
                                       "checkpoint (fine-tune from it with `pks4 train` instead)")
        tensors, _ = ckpt.read_weights(path / ckpt.WEIGHTS_FILE)
        ckpt.load_weights_into(self.student.model, tensors, str(path / ckpt.WEIGHTS_FILE))
        ckpt.load_weights_into(self.student.decoder, state["decoder"], f"{path / ckpt.STATE_FILE} [decoder]")
        self.last_loss = state.get("last_loss")
        restore_loop_state(self, state, path)

    # ---- the run ------------------------------------------------------------------------------------------
    def fit(self) -> PretrainResult:
        """Pretrain until ``train.epochs`` (or a stop), saving every ``train.save_every`` epochs and at the end."""
        t = self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(format_config(self.cfg))
        status, path = "finished", None
        with StopFlag() as stop:
            while self.epoch < t.epochs:
                status = self._train_epoch(stop) or "finished"
                if status != "finished":
                    path = self._save()
                    self.log(f"{status} at step {self.global_step}: checkpoint {path} (resume with --resume auto)")
                    break
                if self.epoch % t.save_every == 0 or self.epoch == t.epochs:
                    path = self._save()
        self.metrics.close()
        if self.dist.is_main:
            if self.metrics.path.is_file():
                plot_curves(self.metrics.path, self.run_dir / "curves.png")
            if self.skipped:
                (self.run_dir / "skipped_videos.txt").write_text("\n".join(self.skipped) + "\n")
                self.log(f"{len(self.skipped)} unreadable video(s) skipped, listed in skipped_videos.txt")
            if path is not None:
                self.log(f"student checkpoint {path}; fine-tune it with `pks4 train RECIPE.yaml "
                         f"--set model.overrides.pretrained={path}`")
        code = {"interrupted": 128 + (stop.signum or signal.SIGINT)}.get(status, 0)
        return PretrainResult(self.run_dir, status, self.epoch, self.global_step, self.last_loss, path,
                              list(self.skipped), code)


def pretrain(cfg: PretrainConfig, resume: str | None = None, log: Log = print) -> PretrainResult:
    """Print the resolved config and run :class:`Pretrainer`; the process group is torn down afterwards."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(format_config(cfg).rstrip())
    try:
        return Pretrainer(cfg, resume=resume, log=log).fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

