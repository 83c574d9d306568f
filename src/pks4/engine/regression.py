"""Regression on video (LVU's ``like_ratio`` and ``view_count``, Li et al. Table 7): a one-output head and MSE.

Any registered model becomes a regressor by swapping its linear classification head for a one-output one
(:func:`attach_regression_head`); it then predicts the target standardised by the training set's mean and
standard deviation (:class:`TargetScale`), which keeps the head's output near unit scale whatever the
target's units (log views are ~12). :func:`regression_loss` is the MSE in those units, and
:func:`mean_squared_error` the error in the target's own units, the number Table 7 reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TargetScale", "attach_regression_head", "regression_loss", "mean_squared_error"]


@dataclass(frozen=True)
class TargetScale:
    """Standardisation of a regression target: ``z = (y - mean) / std``."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"target std must be positive, got {self.std}")

    @classmethod
    def fit(cls, targets: Sequence[float]) -> "TargetScale":
        """Mean and (population) standard deviation of the training targets; std 1 if they are all equal."""
        t = torch.as_tensor(list(targets), dtype=torch.float64)
        if t.numel() == 0:
            raise ValueError("cannot fit a target scale to no targets")
        std = float(t.std(unbiased=False))
        return cls(float(t.mean()), std if std > 0 else 1.0)

    def normalise(self, y: Tensor) -> Tensor:
        return (y - self.mean) / self.std

    def denormalise(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean


def attach_regression_head(model: nn.Module) -> nn.Module:
    """Replace ``model.head`` (a Linear on the pooled feature) by a zero-initialised Linear(D, 1): the model then
    starts by predicting the training mean. Returns the model."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear `head` to turn into a regression head")
    new = nn.Linear(head.in_features, 1).to(head.weight.device, head.weight.dtype)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    model.head = new
    return model


def _as_vector(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.dim() == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"regression needs predictions (B,) or (B, 1) and targets (B,), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return pred.float(), target.float()


def regression_loss(pred: Tensor, target: Tensor, scale: TargetScale = TargetScale()) -> Tensor:
    """Mean squared error between the head's output (standardised units) and ``scale.normalise(target)``."""
    pred, target = _as_vector(pred, target)
    return F.mse_loss(pred, scale.normalise(target))


def mean_squared_error(pred: Tensor, target: Tensor, scale: TargetScale = TargetScale()) -> float:
    """MSE in the target's own units of the head's standardised outputs (Table 7's metric)."""
    pred, target = _as_vector(pred, target)
    return float(((scale.denormalise(pred) - target) ** 2).mean())
