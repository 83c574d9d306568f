"""AdamW parameter groups with layer-wise LR decay, and the LR schedules (linear warm-up, then cosine or WSD).

PKS4 section 3.5.2: AdamW, cosine schedule with warm-up, LR scaled by the global batch, layer-wise LR decay on
the pre-trained ViT backbone, and the newly inserted PKS4 modules exempt from that decay so they adapt quickly.
Section 4.2 gives the values (base LR 7e-4, 1e-3 for ViT-L; weight decay 0.05; 5 warm-up epochs).

The cosine schedule is the paper's and the default. ``"wsd"`` (warm-up, stable, decay) holds the peak LR and
spends only the last ``decay_fraction`` of the steps on the cosine decay. It is the option for runs that may be
extended, because a checkpoint from the stable phase can be continued at the same LR.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the optimizer needs only the values, not the config module
    from pks4.engine.config import OptimConfig

__all__ = ["NO_DECAY_KEYWORDS", "scaled_lr", "param_groups", "build_optimizer", "cosine_lr", "wsd_lr", "LRSchedule",
           "SCHEDULES"]

# Parameters whose magnitude is meaningful on its own: decaying them towards zero only hurts.
NO_DECAY_KEYWORDS = ("pos_embed", "positional_embedding", "class_embedding", "cls_token", "A_log", "A_b_log", ".D")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule used by the recipes the paper follows: ``base * global_batch / 256``."""
    return base_lr * global_batch / 256.0


def _no_decay(name: str, param: torch.Tensor, extra: set[str]) -> bool:
    if param.ndim <= 1 or name in extra:
        return True
    # The SSM skip "D" (and the backward copy "D_b") is matched as a whole name segment, not as a substring.
    if any(seg == "D" or seg.startswith("D_") for seg in name.split(".")):
        return True
    return any(k in name for k in NO_DECAY_KEYWORDS if k != ".D")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Split trainable parameters into AdamW groups keyed by (layer, decay / no decay).

    Each group carries ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``: the head and newly inserted
    modules (``layer_id == num_layers + 1``) get the full LR, block ``i`` gets ``layer_decay**(L+1-i)`` and the
    embeddings (``layer_id == 0``) the smallest. Frozen parameters are left out.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    use_layers = layer_decay != 1.0 and hasattr(model, "layer_id") and hasattr(model, "num_layers")
    top = model.num_layers + 1 if use_layers else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = int(model.layer_id(name)) if use_layers else top
        if not 0 <= layer <= top:
            raise ValueError(f"layer_id({name!r}) = {layer}, expected 0..{top}")
        decay = not _no_decay(name, param, extra)
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (top - layer) if use_layers else 1.0,
                "group_name": f"layer{layer}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: "OptimConfig", lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``lr`` is the already batch-scaled peak LR.

    The fused implementation (one kernel for all parameters, CPU and GPU): besides being the fast one, it takes
    a ``found_inf`` flag on the device and drops that step's update there, so the training loop can skip a
    non-finite step without reading anything back from the GPU.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if not groups:
        raise ValueError("no trainable parameters: is the whole model frozen?")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=True)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """LR for optimizer step ``step`` (0-based).

    Warm-up is linear and reaches ``peak_lr`` at the last warm-up step (the first step is not wasted at LR 0);
    then half a cosine from ``peak_lr`` down to ``min_lr`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
           decay_fraction: float) -> float:
    """Warm-up, stable, decay: the warm-up of :func:`cosine_lr`, ``peak_lr`` until the last
    ``round(decay_fraction * total_steps)`` steps, then :func:`cosine_lr`'s half cosine over those steps alone."""
    decay_start = max(warmup_steps, total_steps - max(1, round(decay_fraction * total_steps)))
    if warmup_steps <= step < decay_start:
        return peak_lr
    # before the warm-up ends: cosine_lr's warm-up; from decay_start on: its cosine, "warmed up" until decay_start
    return cosine_lr(step, total_steps, warmup_steps if step < warmup_steps else decay_start, peak_lr, min_lr)


SCHEDULES = ("cosine", "wsd")


class LRSchedule:
    """Per-step schedule that sets every group's LR to ``lr(step) * group['lr_scale']``.

    ``kind`` is ``"cosine"`` (:func:`cosine_lr`) or ``"wsd"`` (:func:`wsd_lr` with ``decay_fraction``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 peak_lr: float, min_lr: float, kind: str = "cosine", decay_fraction: float = 0.2) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {kind!r}; expected one of {SCHEDULES}")
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, total_steps, warmup_steps
        self.peak_lr, self.min_lr, self.kind, self.decay_fraction = peak_lr, min_lr, kind, decay_fraction
        self.step_count = 0
        self._apply()

    def _lr(self, step: int) -> float:
        if self.kind == "wsd":
            return wsd_lr(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr,
                          self.decay_fraction)
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def _apply(self) -> None:
        lr = self._lr(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def get_lr(self) -> float:
        """Current un-scaled LR (what the head and new modules use)."""
        return self._lr(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "peak_lr": self.peak_lr, "min_lr": self.min_lr, "kind": self.kind,
                "decay_fraction": self.decay_fraction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
