"""ViT block pieces shared by every transformer backbone in pks4 (no model logic here).

The pre-norm residual block implements Eqs. (10)-(11) of the PKS4 paper:

    Z^(i-1/2) = Z^(i-1)   + MSA(LN(Z^(i-1)))        (10)
    Z^(i)     = Z^(i-1/2) + MLP(LN(Z^(i-1/2)))      (11)

Parameter names follow OpenAI CLIP's ``ResidualAttentionBlock`` (``ln_1``, ``attn.in_proj_weight``, ...,
``mlp.c_fc``, ``mlp.c_proj``) so that released CLIP weights load one-to-one, while attention itself runs
through ``F.scaled_dot_product_attention`` (fused kernels, and FLOP counters recognise it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "QuickGELU", "Attention", "Mlp", "DropPath", "ResidualAttentionBlock", "make_act"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as CLIP does: bf16/fp16 statistics over 768+ channels
    lose enough precision to shift CLIP's features measurably."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with (its weights need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """Activation by name: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (exact erf GELU)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu' or 'gelu'")


class Attention(nn.Module):
    """Multi-head self-attention (the MSA of Eq. 10) with nn.MultiheadAttention's parameter layout.

    ``in_proj_weight`` (3D, D) stacks the q, k, v projections as row blocks, exactly as in
    ``nn.MultiheadAttention``, so a state dict saved from either module loads into the other.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scheme as nn.MultiheadAttention, so from-scratch training matches CLIP's code.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D). ``attn_mask`` is passed to SDPA (bool: True = attend; float: added)."""
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, heads, N, N) for the same input ``forward`` takes.

        The plain path, used where the map itself is needed (e.g. picking the tokens a CLS attends to).
        """
        q, k, _ = self._qkv(x)
        logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        return logits.softmax(dim=-1).to(x.dtype)


class Mlp(nn.Module):
    """Two-layer MLP of Eq. (11), named like CLIP's (``c_fc`` -> act -> ``c_proj``)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.c_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample and rescales the kept ones by 1/keep, so
    the expected output is unchanged and evaluation needs no correction."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block, Eqs. (10)-(11): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "quick_gelu",
        ln_eps: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), act=act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.attn(self.ln_1(x), attn_mask=attn_mask))  # Eq. (10)
        x = x + self.drop_path(self.mlp(self.ln_2(x)))  # Eq. (11)
        return x
