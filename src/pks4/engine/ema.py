"""Exponential moving average of the weights, for evaluation and deployment (``train.ema_decay``).

After every optimizer step the average moves towards the trained weights::

    d_t  = min(decay, (1 + t) / (10 + t))          # t = optimizer steps so far; warm-up, see below
    ema <- d_t * ema + (1 - d_t) * weights          # floating-point parameters and buffers
    ema <- weights                                  # integer buffers (counters) are copied

Why: late in a cosine schedule the weights still move from batch to batch, and on a small validation set the
accuracy of the last (or the best-evaluated) epoch swings by several points; the average of the last
~1 / (1 - decay) steps is steadier and usually at least as good. The warm-up term (as in Polyak averaging with a
growing window, and in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) keeps the random initial weights from
dominating a short run: at step t the average effectively spans about t / 10 + 1 steps until that reaches the
nominal window. ``warmup=False`` uses the plain constant decay.

The averaged copy lives beside the model (same device and dtype), is never trained, and is always in eval mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """An averaged copy of ``model`` (see the module docstring for the update rule)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay}: expected a number strictly between 0 and 1 (e.g. 0.999)")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """One step towards ``model``'s current weights (call after each optimizer step).

        ``skip``: a 0-d device tensor, 1.0 when the optimizer dropped this step's update; the average then stays
        where it is, decided on the device without reading the flag back (the step still advances the warm-up).
        """
        d = self.current_decay()
        weight: float | torch.Tensor = 1.0 - d if skip is None else (1.0 - skip) * (1.0 - d)
        # state_dict order is deterministic for a given architecture: zip pairs the same tensors.
        for avg, new in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(new.detach().to(avg.dtype), weight)
            else:
                avg.copy_(new)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(tensors)
        self.updates = int(updates)
