"""Self-distillation in training (Li et al. §3.3, Fig. 6): a term the classification task adds in the one loop.

A frozen, smaller, already trained VideoMamba (``train.distill.teacher``: a run directory or checkpoint of
``pks4 train``) runs on the same clips; the student's final tokens, through a projector (RMSNorm + Linear to the
teacher's width, :class:`~pks4.models.videomamba_pretrain.DistillProjector`), are pulled towards the teacher's
L2-normalised tokens with ``2 - 2 cos`` (:func:`~pks4.models.videomamba_pretrain.cosine_alignment_loss`),
weighted by ``train.distill.weight`` and added to the cross-entropy. ``train.distill.stop_epoch`` drops the term
from that epoch on: the early stopping of the distillation Li et al. tried against the teacher's over-direction
(Fig. 6b).

The teacher must see the clip as the student does (the same frames, size, patch and tubelet, so the same tokens);
its checkpoint is read again on resume and never saved. The projector is trained with the student (its own
parameter group, at the top of a layer-wise LR decay) and kept in the checkpoint's state, beside the optimizer.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from pks4.engine import checkpoint as ckpt
from pks4.engine.config import DistillConfig
from pks4.engine.runtime import TrainingError
from pks4.models.videomamba import VideoMamba
from pks4.models.videomamba_pretrain import DistillProjector, cosine_alignment_loss

__all__ = ["SelfDistillation", "WithProjector", "load_distill_teacher"]


def _token_layout(model: VideoMamba) -> tuple[int, ...]:
    c = model.config
    return c.num_frames, c.image_size, c.patch_size, c.tubelet


def load_distill_teacher(path: str, student: nn.Module, log: Callable[[str], None]) -> VideoMamba:
    """The frozen teacher of ``train.distill.teacher``, checked against the student (both VideoMambas, one token
    layout), in eval mode without gradients."""
    if not isinstance(student, VideoMamba):
        raise TrainingError(f"train.distill.teacher is set, but the student is a {type(student).__name__}: "
                            "self-distillation aligns the final tokens of two VideoMambas")
    teacher, _, _ = ckpt.load_model_from_checkpoint(path)
    if not isinstance(teacher, VideoMamba):
        raise TrainingError(f"train.distill.teacher={path}: a {type(teacher).__name__}, expected a VideoMamba")
    if _token_layout(teacher) != _token_layout(student):
        raise TrainingError(f"train.distill.teacher={path}: its clips are (frames, size, patch, tubelet) = "
                            f"{_token_layout(teacher)}, the student's {_token_layout(student)}; the two must see the "
                            "same tokens")
    if teacher.config.embed_dim > student.config.embed_dim:
        log(f"note: the distillation teacher is wider ({teacher.config.embed_dim}) than the student "
            f"({student.config.embed_dim}); Li et al. distil from a smaller model")
    teacher.requires_grad_(False)
    return teacher.eval()


class SelfDistillation(nn.Module):
    """The distillation term: frozen ``teacher``, trained ``projector``; :meth:`set_epoch` applies the stop."""

    def __init__(self, teacher: VideoMamba, student_dim: int, cfg: DistillConfig) -> None:
        super().__init__()
        self.teacher, self.cfg = teacher, cfg
        self.projector = DistillProjector(student_dim, teacher.config.embed_dim)
        self.active = True

    def train(self, mode: bool = True) -> "SelfDistillation":
        super().train(mode)
        self.teacher.eval()  # frozen: its dropout and drop path stay off whatever the student's mode
        return self

    def set_epoch(self, epoch: int) -> bool:
        """Whether the term is on in epoch ``epoch`` (0-based); returns True when this call switched it off."""
        was, self.active = self.active, self.cfg.stop_epoch is None or epoch + 1 < self.cfg.stop_epoch
        return was and not self.active

    def forward(self, tokens: Tensor, video: Tensor, geometry: object = None) -> Tensor:
        """``weight * (2 - 2 cos)`` between the projected student tokens (B, L, D_s) and the teacher's on ``video``."""
        with torch.no_grad():
            target = self.teacher.forward_tokens(video, geometry=geometry)
        return self.cfg.weight * cosine_alignment_loss(self.projector(tokens), target)


class WithProjector(nn.Module):
    """What the optimizer sees with distillation on: the student and the projector, the projector at the top of
    the student's layer-wise LR decay (a new module, like the head) and its weight decay rules."""

    def __init__(self, model: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.model, self.projector = model, projector
        if hasattr(model, "num_layers"):
            self.num_layers = model.num_layers

    def layer_id(self, name: str) -> int:
        if name.startswith("projector."):
            return self.model.num_layers + 1
        return self.model.layer_id(name[len("model."):])

    def no_weight_decay(self) -> set[str]:
        own = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in own}
