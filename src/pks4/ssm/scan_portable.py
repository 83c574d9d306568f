"""The selective scan in a form exporters keep as ONE loop: the ``portable`` backend of :mod:`.scan`.

The custom op ``pks4::selective_scan`` is one node under ``torch.export``, but a file holding it loads only
where pks4 registers the op, and ONNX has no such operator. This path writes the recurrence (eq. 2a-2b) with
plain PyTorch operators inside a loop construct each format has:

- under ``torch.export`` (and in eager mode): torch's ``scan`` higher-order operator over time, which an
  ExportedProgram stores as one ``higher_order.scan`` node (its body a small graph) and the ONNX exporter
  turns into one ONNX ``Scan``;
- under ``torch.jit.trace``: a TorchScript function with a ``for`` loop, kept as a ``prim::Loop`` in the
  archive.

Unrolling the time loop instead would write L copies of the step: a VideoMamba-Ti or -S clip of 8 frames
(L = 1569) has 48 scans, i.e. 75,312 copies of a step of about ten operators. Both forms run the same step,
:func:`scan_step`; the working precision and the step sizes come from :mod:`.discretize`, as on every other
path. Meant for export: on CPU the native kernel is much faster in eager mode.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .discretize import compute_dtype, skip_and_gate, step_sizes

__all__ = ["portable_scan", "scan_step"]


def scan_step(h: Tensor, u_t: Tensor, delta_t: Tensor, B_t: Tensor, C_t: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """One time step: h (batch, d_inner, d_state), u_t, delta_t (batch, d_inner), B_t, C_t (batch, d_state)
    -> (h_t (eq. 2a), C_t . h_t (batch, d_inner), the first term of eq. 2b)."""
    h = torch.exp(delta_t.unsqueeze(-1) * A) * h + (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)
    return h, (h * C_t.unsqueeze(1)).sum(-1)


def _loop_over_time(h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence as a TorchScript loop: (last state, y (batch, d_inner, L))."""
    ys: list[Tensor] = []
    for t in range(u.shape[-1]):
        h, y = scan_step(h, u[:, :, t], delta[:, :, t], B[:, :, t], C[:, :, t], A)
        ys.append(y)
    return h, torch.stack(ys, dim=-1)


@functools.lru_cache(maxsize=None)
def _scripted_loop():
    """Compiled on first use, so importing pks4 never pays for TorchScript."""
    return torch.jit.script(_loop_over_time)


def _scan_over_time(h: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence through torch's scan higher-order operator: (last state, y (batch, d_inner, L))."""
    from torch._higher_order_ops.scan import scan_op

    def combine(h: Tensor, u_t: Tensor, delta_t: Tensor, B_t: Tensor, C_t: Tensor, A: Tensor) -> list[Tensor]:
        return list(scan_step(h, u_t, delta_t, B_t, C_t, A))

    time_first = [t.permute(2, 0, 1) for t in (u, delta, B, C)]  # 'b c l -> l b c': the operator scans dim 0
    last, ys = scan_op(combine, [h], time_first, additional_inputs=(A,))
    return last, ys.permute(1, 2, 0)


def portable_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = True,
                  return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`pks4.ssm.scan.selective_scan` (same arguments and results) as one exportable loop."""
    dtype, f = u.dtype, compute_dtype(u)
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    delta = step_sizes(delta, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, d_inner, d_state)
    loop = _scripted_loop() if torch.jit.is_tracing() else _scan_over_time
    last, y = loop(h, u, delta, A, B, C)
    out = skip_and_gate(y, u, D, z).to(dtype)
    return (out, last) if return_last_state else out
