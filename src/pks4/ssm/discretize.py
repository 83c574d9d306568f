"""What every scan path computes the same way before its recurrence: the step size and the working precision.

Kept apart from :mod:`pks4.ssm.scan` (the dispatch) so the backends it dispatches to can use them without
importing it back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["step_sizes", "compute_dtype"]


def step_sizes(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """The step size actually used: softplus(delta + delta_bias) (Mamba's dt projection, §3.6)."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32
