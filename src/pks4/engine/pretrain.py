"""``pks4 pretrain``: masked-alignment pretraining of a VideoMamba against a frozen CLIP (Li et al. §3.4, after UMT).

The objective is :func:`pks4.models.videomamba_pretrain.masked_alignment_loss`: the frozen CLIP teacher's
CLS attention keeps 20% of each frame's patches visible (CLS always), the student runs only those tokens, and
its decoded tokens are pulled towards the teacher's L2-normalised tokens with ``2 - 2 cos``. Labels are never
read: any training list the classifier can read (the same datasets, the same augmentation) serves as unlabeled
clips. The loop is the classifier's (:mod:`pks4.engine.loop`; this module supplies the :class:`AlignTask`): the
same data loaders, per-item seeds and worker retry, AdamW with the linear-warm-up cosine schedule stepped per
optimizer step, AMP, the weight average (``train.ema_decay``), the NaN policy, DDP under ``torchrun``, atomic
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

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pks4.data.datasets import DataConfig
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import (ModelConfig, OptimConfig, RunConfig, TrainConfig,
                                config_to_dict, format_config, load_section)
from pks4.engine.loop import Loop, LoopSettings, RunResult, Task
from pks4.engine.runtime import TrainingError, process_group, start_process
from pks4.engine.train import build_model
from pks4.models.clip_vit import CLIP_VIT_B16, CLIP_VIT_L14, CLIP_VIT_TINY, CLIPVisionTransformer
from pks4.models.videomamba import FLIP_SCANS, VideoMamba
from pks4.models.videomamba_pretrain import MaskedAlignmentStudent, masked_alignment_loss

__all__ = ["TeacherConfig", "MaskConfig", "PretrainConfig", "load_pretrain_config", "build_teacher",
           "build_student", "AlignTask", "build_pretrainer", "pretrain"]

Log = Callable[[str], None]

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


class AlignTask(Task):
    """Masked alignment as a task of the training loop: the student (VideoMamba + alignment decoder) is trained,
    the CLIP teacher stays frozen and in eval mode; checkpoints hold the VideoMamba as their weights and the
    decoder in their state. No evaluation: the alignment loss is what the run reports."""

    def __init__(self, cfg: PretrainConfig, student: MaskedAlignmentStudent, teacher: CLIPVisionTransformer,
                 train_set: Dataset, classes: list[str], log: Log) -> None:
        super().__init__()
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.train_set, self.classes, self.log = train_set, classes, log

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        return self.student.model

    def describe(self) -> str:
        return f"student {self.cfg.model.name} (with its alignment decoder; mask ratio {self.cfg.mask.ratio})"

    def trainable(self) -> nn.Module:
        return self.student

    def train(self, mode: bool = True) -> "AlignTask":
        super().train(mode)
        self.teacher.eval()  # frozen: its dropout or norm statistics must not change with the student's mode
        return self

    def loss(self, inputs: dict[str, Tensor], geometry: Any = None) -> dict[str, Tensor]:
        return {"align": masked_alignment_loss(self.student, self.teacher, inputs["video"])}

    def metadata(self) -> dict[str, Any]:
        model = self.student.model
        model_cfg = asdict(model.config)
        model_cfg["pretrained"] = ""  # the weights are in the checkpoint; do not re-read the init file
        return {"model_name": model.model_name, "model_config": model_cfg, "classes": self.classes,
                "config": config_to_dict(_run_view(self.cfg)), "pretrain_config": config_to_dict(self.cfg),
                "objective": "masked_alignment"}

    def extra_state(self) -> dict[str, Any]:
        return {"decoder": ckpt.plain_state_dict(self.student.decoder)}

    def load_extra_state(self, state: dict[str, Any], source: Path) -> None:
        if "decoder" not in state:
            raise ckpt.CheckpointError(f"{source / ckpt.STATE_FILE}: no alignment decoder: not a `pks4 pretrain` "
                                       "checkpoint (fine-tune from it with `pks4 train` instead)")
        ckpt.load_weights_into(self.student.decoder, state["decoder"], f"{source / ckpt.STATE_FILE} [decoder]")

    def finished(self, loop: Loop, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            self.log(f"student checkpoint {checkpoint}; fine-tune it with `pks4 train RECIPE.yaml "
                     f"--set model.overrides.pretrained={checkpoint}`")


def build_pretrainer(cfg: PretrainConfig, resume: str | None = None, log: Log = print) -> Loop:
    """The training loop of one ``pks4 pretrain`` run, set up (and resumed, with ``resume``), not yet started."""
    from pks4.data.datasets import build_dataset

    dist_info = start_process(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    main_log: Log = log if dist_info.is_main else (lambda msg: None)
    train_set = build_dataset(cfg.data, "train", train=True)
    classes = [str(c) for c in train_set.classes]
    teacher = build_teacher(cfg.teacher, main_log).to(dist_info.device)
    student = build_student(cfg, _teacher_dim(teacher), cfg.model.num_classes or len(classes))
    task = AlignTask(cfg, student.to(dist_info.device), teacher, train_set, classes, main_log)
    settings = LoopSettings(cfg.train, cfg.optim, Path(cfg.out), cfg, cfg.data.skip_bad_videos)
    return Loop(task, settings, dist_info, resume=resume, log=log)


def pretrain(cfg: PretrainConfig, resume: str | None = None, log: Log = print) -> RunResult:
    """Print the resolved config and run the pretraining; the process group is torn down afterwards."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(format_config(cfg).rstrip())
    with process_group():
        return build_pretrainer(cfg, resume=resume, log=log).fit()
