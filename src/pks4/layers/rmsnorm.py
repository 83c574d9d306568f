"""RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x^2) + eps) * weight``, no mean and no bias.

The norm of Mamba and of both VideoMamba models (Li et al. "RMSNorm blocks"). Statistics are computed in
float32 whatever the input dtype: in bf16 the mean of squares over a few hundred channels loses enough
precision to change the residual stream noticeably, which is the instability the Mamba authors avoid by
keeping the residual in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension; parameter ``weight`` (dim,), as in the Mamba checkpoints."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
