"""The ``loop`` backend of the selective scan: a lean per-step PyTorch loop, for any device and dtype.

It is the fallback where no fused kernel runs (CUDA without Triton, other devices, float64 on CUDA). The forward
keeps the state at every ``_SEGMENT``-th step; the backward walks the segments in reverse, recomputes one
segment's states from its kept state and runs the adjoint recurrence through it by hand (no autograd graph), so
nothing of size batch x d_inner x L x d_state is ever held: at most one segment's states, transiently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .discretize import compute_dtype, step_sizes

__all__ = ["forward", "backward", "checkpoint_shape", "loop_steps"]

# Steps per backward segment: the backward holds one segment's states (64 x batch x d_inner x d_state floats)
# while the kept states cost 4 x d_state / 64 = 1 byte per (token, channel) at d_state 16.
_SEGMENT = 64


def loop_steps(h: Tensor, A: Tensor, dt: Tensor, dtu: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Advance the state over the steps of ``dt`` (batch, d_inner, K); return (state, y (batch, d_inner, K)).

    Steps come from ``unbind`` rather than ``x[..., t]``: indexing inside an autograd loop makes the backward
    pass O(L^2).
    """
    ys = []
    for dt_t, dtu_t, B_t, C_t in zip(dt.unbind(-1), dtu.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.addcmul(torch.exp(dt_t.unsqueeze(-1) * A) * h, dtu_t.unsqueeze(-1), B_t.unsqueeze(1))
        ys.append(torch.bmm(h, C_t.unsqueeze(-1)))                    # (batch, d_inner, 1)
    return h, torch.cat(ys, dim=-1)


def _segment(h: Tensor, A: Tensor, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
             z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """(y of the segment, gated, in h's dtype; state after it) from the state h before it."""
    f = h.dtype
    u, delta, B, C = (t.to(f) for t in (u, delta, B, C))
    dt = step_sizes(delta, delta_bias, delta_softplus)
    h, y = loop_steps(h, A.to(f), dt, dt * u, B, C)
    if D is not None:
        y = torch.addcmul(y, D.to(f)[:, None], u)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y, h


def checkpoint_shape(batch: int, dim: int, L: int, N: int) -> tuple[int, int, int, int]:
    return (-(-L // _SEGMENT) - 1, batch, dim, N)


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, keep_checkpoints: bool
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(out in u's dtype, last state, the state at each segment start but the first)."""
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1], dtype=compute_dtype(u))
    ys, kept = [], []
    with torch.no_grad():
        for s in range(0, L, _SEGMENT):
            if s and keep_checkpoints:
                kept.append(h)
            sl = slice(s, s + _SEGMENT)
            y, h = _segment(h, A, u[..., sl], delta[..., sl], B[..., sl], C[..., sl], D,
                            None if z is None else z[..., sl], delta_bias, delta_softplus)
            ys.append(y)
    ckpt = None
    if keep_checkpoints:
        ckpt = torch.stack(kept) if kept else h.new_empty(checkpoint_shape(batch, dim, L, A.shape[1]))
    return torch.cat(ys, dim=-1).to(u.dtype), h if return_last_state else None, ckpt


def _segment_states(h: Tensor, A: Tensor, u: Tensor, dt: Tensor, B: Tensor) -> Tensor:
    """States after each step of a segment, (batch, d_inner, d_state, K), from the state h before it."""
    states = []
    for dt_t, dtu_t, B_t in zip(dt.unbind(-1), (dt * u).unbind(-1), B.unbind(-1)):
        h = torch.addcmul(torch.exp(dt_t.unsqueeze(-1) * A) * h, dtu_t.unsqueeze(-1), B_t.unsqueeze(1))
        states.append(h)
    return torch.stack(states, dim=-1)


def _segment_adjoint(h0: Tensor, H: Tensor, A: Tensor, dt: Tensor, dtu: Tensor, B: Tensor, C: Tensor, dy: Tensor,
                     dh: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Walk a segment backwards: dh_t = exp(dt_{t+1} A) dh_{t+1} + C_t dy_t (eq. 2a transposed).

    ``H``: the segment's states (batch, d_inner, d_state, K); ``dh``: dL/dh at the first step after the segment
    (None = 0). Returns, per step, sum_n dh B (batch, d_inner, K), the part of dL/d(dt) through exp(dt A), dB from
    the recurrence, then dA (d_inner, d_state) and dL/dh0. About ten operations per step."""
    batch, dim, N, K = H.shape
    dh_B, ddt_decay, dB = (torch.empty(batch, n, K, dtype=H.dtype, device=H.device) for n in (dim, dim, N))
    dA_steps = torch.zeros_like(H[..., 0])                                    # summed over the batch at the end
    prev = [h0, *H.unbind(-1)[:-1]]
    for t in reversed(range(K)):
        dy_t, C_t = dy[..., t].unsqueeze(-1), C[..., t].unsqueeze(1)
        dh = dy_t * C_t if dh is None else torch.addcmul(dh, dy_t, C_t)        # dL/dh_t
        decay = torch.exp(dt[..., t].unsqueeze(-1) * A)
        g = dh * (decay * prev[t])                                             # dh_t * exp(dt_t A) h_{t-1}
        dA_steps.addcmul_(g, dt[..., t].unsqueeze(-1))
        ddt_decay[..., t] = (g * A).sum(-1)
        dh_B[..., t] = torch.bmm(dh, B[..., t].unsqueeze(-1)).squeeze(-1)
        dB[..., t] = torch.bmm(dh.transpose(1, 2), dtu[..., t].unsqueeze(-1)).squeeze(-1)
        dh = dh * decay                                                        # a_t dh_t, for step t - 1
    return dh_B, ddt_decay, dB, dA_steps.sum(0), dh


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, delta_softplus: bool, ckpt: Tensor | None, dout: Tensor,
             dlast: Tensor | None) -> tuple[Tensor | None, ...]:
    """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias), each in its input's dtype (None for absent inputs)."""
    batch, dim, L = u.shape
    f = compute_dtype(u)
    starts = list(range(0, L, _SEGMENT))
    if len(starts) > 1 and (ckpt is None or ckpt.shape[0] != len(starts) - 1):
        raise RuntimeError("selective_scan (loop): the forward pass kept no checkpoints (it ran without "
                           "gradients), so this backward pass cannot run")
    uf, Bf, Cf, Af, doutf = (t.to(f) for t in (u, B, C, A, dout))
    raw = delta.to(f) + (0 if delta_bias is None else delta_bias.to(f)[:, None])
    dt = F.softplus(raw) if delta_softplus else raw
    gate = None if z is None else F.silu(z.to(f))
    dy = doutf if gate is None else doutf * gate
    du, ddt, dB, dC, y = (torch.empty_like(x) for x in (uf, uf, Bf, Cf, uf))
    dA, dh = torch.zeros_like(Af), None if dlast is None else dlast.to(f)
    dtu = dt * uf
    for i in reversed(range(len(starts))):
        sl = slice(starts[i], starts[i] + _SEGMENT)
        h0 = ckpt[i - 1].to(f) if i else u.new_zeros(batch, dim, A.shape[1], dtype=f)
        H = _segment_states(h0, Af, uf[..., sl], dt[..., sl], Bf[..., sl])
        y[..., sl] = torch.einsum("bdnk,bnk->bdk", H, Cf[..., sl])
        dC[..., sl] = torch.einsum("bdnk,bdk->bnk", H, dy[..., sl])
        du[..., sl], ddt[..., sl], dB[..., sl], dA_seg, dh = _segment_adjoint(
            h0, H, Af, dt[..., sl], dtu[..., sl], Bf[..., sl], Cf[..., sl], dy[..., sl], dh)
        dA += dA_seg
    ddt = torch.addcmul(ddt, du, uf)                                           # + sum_n dh B u (through b_t)
    du = du * dt                                                               # sum_n dh dt B
    if D is not None:
        du = torch.addcmul(du, dy, D.to(f)[:, None])
        y = torch.addcmul(y, uf, D.to(f)[:, None])
    ddelta = ddt * torch.sigmoid(raw) if delta_softplus else ddt
    dz = None
    if z is not None:
        sig = torch.sigmoid(z.to(f))
        dz = (doutf * y * sig * (1 + z.to(f) * (1 - sig))).to(z.dtype)             # silu'(z) = s (1 + z (1 - s))
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else (dy * uf).sum((0, 2)).to(D.dtype), dz,
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype))
