"""The selective scan of Mamba-1 (Gu & Dao 2023, Algorithm 2; eq. 2a-2b after zero-order-hold discretisation):

    h_t = exp(delta_t * A) h_{t-1} + delta_t * B_t * u_t            (2a, with B-bar ~ delta * B)
    y_t = C_t . h_t + D * u_t,        out_t = y_t * silu(z_t)       (2b, then the gate of the Mamba block)

Shapes follow Mamba-1: ``u, delta, z: (batch, d_inner, L)``, ``A: (d_inner, d_state)`` (real, negative),
``B, C: (batch, d_state, L)``, ``D, delta_bias: (d_inner,)``. The state and all sums are float32 (float64 for
float64 inputs on the paths that take them); the output has ``u``'s dtype. Inputs may be strided views.

This file holds the reference, the dispatch and the custom op; each fast path lives in its own file.
Paths (``backend=``, or the ``PKS4_SCAN_BACKEND`` environment variable when ``backend="auto"``):

- ``ref``: :func:`selective_scan_ref`, a plain loop over time under autograd; the numerical oracle.
- ``loop`` (:mod:`.scan_loop`): a lean per-step PyTorch loop on any device, whose backward replays 64-step
  segments from kept states.
- ``native`` (:mod:`.scan_native`): a fused C++ kernel for CPU tensors, compiled on first use.
- ``triton`` (:mod:`.scan_triton`): Triton kernels for CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).
- ``mamba_ssm``: the CUDA kernel of the ``mamba_ssm`` package, when the user has it installed.

``loop``, ``native`` and ``triton`` run as one custom op, ``torch.ops.pks4.selective_scan``, with its own
backward (``pks4::selective_scan_backward``) and a shape-only implementation, so ``torch.export`` and
``torch.compile`` see the scan as one node and the meta device can count its memory. None of them stores
per-step states for the backward: each keeps its inputs and one state per 64-256 steps.

``auto`` picks ``native`` for CPU tensors (``loop`` without a C++ compiler); for CUDA tensors ``mamba_ssm`` when
it is importable, else ``triton`` when Triton is installed (``pip install 'pks4[gpu]'``), else ``loop``, and says
once which and why. :func:`resolve_backend` tells which path a device and dtype get.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .discretize import compute_dtype, step_sizes

__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
           "available_backends", "resolve_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("ref", "loop", "native", "triton", "mamba_ssm")
_ALIASES = {"reference": "ref", "torch": "loop", "cpp": "native", "cpu": "native", "mamba": "mamba_ssm"}
_OP_BACKENDS = ("loop", "native", "triton")  # the paths behind torch.ops.pks4.selective_scan
_HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# Argument checks and helpers shared by every path
# --------------------------------------------------------------------------------------------------------------
def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (d_inner={dim}, d_state), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; expected a real (d_inner, d_state) A")
    N = A.shape[1]
    expected = {"delta": (delta, (batch, dim, L)), "B": (B, (batch, N, L)), "C": (C, (batch, N, L)),
                "D": (D, (dim,)), "z": (z, (batch, dim, L)), "delta_bias": (delta_bias, (dim,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape} (u is {tuple(u.shape)}, "
                             f"A is {tuple(A.shape)}), got {tuple(t.shape)}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}; expected one device")


# --------------------------------------------------------------------------------------------------------------
# Reference: the oracle
# --------------------------------------------------------------------------------------------------------------
def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = True,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan as a plain sequential loop (eq. 2a-2b); slow, readable, the oracle of the fast paths.

    Steps come from ``unbind`` rather than ``x[..., t]``: indexing inside an autograd loop makes the backward
    pass O(L^2).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype, f = u.dtype, compute_dtype(u)
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    delta = step_sizes(delta, delta_bias, delta_softplus)
    batch, dim, _ = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])                           # (batch, d_inner, d_state)
    ys = []
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(delta_t[:, :, None] * A)                    # exp(delta A): (batch, d_inner, d_state)
        inject = delta_t[:, :, None] * B_t[:, None, :] * u_t[:, :, None]  # delta B u
        h = decay * h + inject                                        # eq. 2a
        ys.append((h * C_t[:, None, :]).sum(-1))                      # C h: (batch, d_inner)
    y = torch.stack(ys, dim=-1)                                       # (batch, d_inner, L)
    if D is not None:
        y = y + D.to(f)[:, None] * u                                  # eq. 2b skip term
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(dtype)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------------------------
# Which path: availability, checks, the choice of "auto"
# --------------------------------------------------------------------------------------------------------------
def _native_available() -> bool:
    from .scan_native import native_lib

    return native_lib() is not None


def _triton_installed() -> bool:
    from .scan_triton import is_installed

    return is_installed()


@functools.lru_cache(maxsize=None)
def _mamba_ssm_scan_fn():
    """mamba_ssm's selective_scan_fn, or the reason it cannot be used (a string)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # a missing package, or a compiled extension that does not load with this torch
        return f"mamba_ssm is not importable ({type(err).__name__}: {err})"
    return selective_scan_fn


def _require(name: str, device: torch.device, dtype: torch.dtype | None) -> None:
    """Raise a clear error when the backend asked for by name cannot run these inputs."""
    if name == "native" and device.type != "cpu":
        raise ValueError(f"selective_scan: backend 'native' runs on CPU tensors, got device {device}; use "
                         "'auto', 'triton' or 'loop' for other devices")
    if name == "triton":
        if not _triton_installed():
            raise RuntimeError("selective_scan: backend 'triton' needs the triton package: pip install 'pks4[gpu]'")
        if device.type == "cpu":
            from .scan_triton import interpreting

            if not interpreting():
                raise RuntimeError("selective_scan: backend 'triton' got CPU tensors; its kernels run on CUDA "
                                   "tensors, or on CPU tensors under Triton's interpreter: set TRITON_INTERPRET=1 "
                                   "in the environment before starting Python (Triton reads it when it is "
                                   "imported; slow, meant for tests)")
        elif device.type != "cuda":
            raise ValueError(f"selective_scan: backend 'triton' runs on CUDA tensors, got device {device}")
    if name == "mamba_ssm":
        fn = _mamba_ssm_scan_fn()
        if isinstance(fn, str):
            raise RuntimeError(f"selective_scan: backend 'mamba_ssm' needs the mamba_ssm package: {fn}")
        if device.type != "cuda":
            raise ValueError(f"selective_scan: backend 'mamba_ssm' runs on CUDA tensors, got device {device}")
    if name in ("triton", "mamba_ssm") and dtype is not None and dtype not in _HALF_AND_SINGLE:
        raise ValueError(f"selective_scan: backend {name!r} takes float32, bfloat16 or float16 inputs, got {dtype}; "
                         "use 'loop' or 'ref' for other dtypes")


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(device: torch.device, name: str, why: str) -> None:
    """Say once per device type and path which path ``auto`` took and why (a warning when it is slow)."""
    key = (device.type, name)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    message = f"selective_scan on {device.type} tensors uses the {name!r} path: {why}"
    if name == "loop" and device.type == "cuda":
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    else:
        logger.info(message)


def _auto(device: torch.device, dtype: torch.dtype | None) -> str:
    if device.type == "cpu":
        return "native" if _native_available() else "loop"
    if device.type != "cuda":
        return "loop"
    if dtype is not None and dtype not in _HALF_AND_SINGLE:
        _announce(device, "loop", f"the fused kernels take float32, bfloat16 and float16 inputs, not {dtype}")
        return "loop"
    mamba = _mamba_ssm_scan_fn()
    if not isinstance(mamba, str):
        _announce(device, "mamba_ssm", "the mamba_ssm package is installed")
        return "mamba_ssm"
    if _triton_installed():
        _announce(device, "triton", f"Triton is installed and {mamba}")
        return "triton"
    _announce(device, "loop", f"neither Triton nor mamba_ssm is installed ({mamba}); the per-step loop launches "
              "about 40 kernels per token: pip install 'pks4[gpu]'")
    return "loop"


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> str:
    """The path :func:`selective_scan` takes for ``backend`` on tensors of ``device`` (and ``dtype``).

    ``"auto"`` (or the ``PKS4_SCAN_BACKEND`` environment variable) is resolved as the module docstring says;
    a backend asked for by name is checked against the device and dtype, with an error saying what it needs.
    ``native`` without a working C++ compiler resolves to ``loop`` (with one warning).
    """
    device = torch.device(device)
    name = backend.strip().lower()
    if name == "auto":
        name = os.environ.get("PKS4_SCAN_BACKEND", "auto").strip().lower() or "auto"
    name = _ALIASES.get(name, name)
    if name == "auto":
        return _auto(device, dtype)
    if name not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    _require(name, device, dtype)
    if name == "native" and not _native_available():
        return "loop"  # already warned once by native_lib
    return name


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that run on ``device`` in this process (building the native kernel if it is not built yet)."""
    device = torch.device(device)
    names = ["ref", "loop"]
    for name in ("native", "triton", "mamba_ssm"):
        try:
            if resolve_backend(name, device) == name:
                names.append(name)
        except (RuntimeError, ValueError):
            pass
    return names


# --------------------------------------------------------------------------------------------------------------
# The custom op: forward, backward, shapes, autograd
# --------------------------------------------------------------------------------------------------------------
def _backend_module(name: str):
    if name == "native":
        from . import scan_native as module
    elif name == "triton":
        from . import scan_triton as module
    elif name == "loop":
        from . import scan_loop as module
    else:
        raise ValueError(f"pks4::selective_scan: backend {name!r} is not one of {_OP_BACKENDS}")
    return module


def _state_dtype(u: Tensor, backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else compute_dtype(u)


@torch.library.custom_op("pks4::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool, keep_checkpoints: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, last state or an empty tensor, kept states or an empty tensor) of one path."""
    out, last, ckpt = _backend_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                       return_last_state, keep_checkpoints)
    empty = u.new_empty(0, dtype=_state_dtype(u, backend))
    return out, empty if last is None else last, empty.clone() if ckpt is None else ckpt


@_scan_op.register_fake
def _scan_op_shapes(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, keep_checkpoints,
                    backend):
    (batch, dim, L), N, f = u.shape, A.shape[1], _state_dtype(u, backend)
    last = u.new_empty((batch, dim, N) if return_last_state else (0,), dtype=f)
    ckpt = u.new_empty(_backend_module(backend).checkpoint_shape(batch, dim, L, N) if keep_checkpoints else (0,),
                       dtype=f)
    return u.new_empty(batch, dim, L), last, ckpt


@torch.library.custom_op("pks4::selective_scan_backward", mutates_args=())
def _scan_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, ckpt: Tensor,
                      dout: Tensor, dlast: Optional[Tensor], backend: str) -> list[Tensor]:
    """Gradients of u, delta, A, B, C, D, z, delta_bias (an empty tensor for an absent input)."""
    grads = _backend_module(backend).backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                              ckpt if ckpt.numel() else None, dout, dlast)
    return [u.new_empty(0) if g is None else g for g in grads]


@_scan_backward_op.register_fake
def _scan_backward_shapes(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ckpt, dout, dlast, backend):
    return [u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, _, _, backend = inputs
    ckpt = output[2]
    ctx.mark_non_differentiable(ckpt)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
    ctx.softplus, ctx.backend = delta_softplus, backend


def _scan_autograd_backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(u.shape, dtype=u.dtype, device=u.device)
    dlast = dlast if dlast is not None and dlast.numel() else None
    grads = _scan_backward_op(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ckpt, dout, dlast, ctx.backend)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return (*(None if t is None else g for g, t in zip(grads, inputs)), None, None, None, None)


_scan_op.register_autograd(_scan_autograd_backward, setup_context=_scan_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    f32 = lambda t: None if t is None else t.float()  # noqa: E731  (its kernel takes float32 A, D, bias)
    return _mamba_ssm_scan_fn()(u, delta, A.float(), B, C, f32(D), z, f32(delta_bias),
                                delta_softplus=delta_softplus, return_last_state=return_last_state)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = True,
                   return_last_state: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (eq. 2a-2b, gated by silu(z)), on the fastest path available for the inputs' device.

    Returns ``out`` (batch, d_inner, L) in ``u``'s dtype, and with ``return_last_state`` also the final state
    (batch, d_inner, d_state) in float32 (float64 for float64 inputs). ``backend``: "auto" (default; the
    ``PKS4_SCAN_BACKEND`` environment variable overrides it) or one of :data:`BACKENDS`.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device, u.dtype)
    args = (u, delta, A, B, C, D, z, delta_bias)
    if name == "ref":
        return selective_scan_ref(*args, delta_softplus, return_last_state)
    if name == "mamba_ssm":
        return _mamba_ssm_scan(*args, delta_softplus, return_last_state)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    out, last, _ = _scan_op(*args, bool(delta_softplus), bool(return_last_state), keep, name)
    return (out, last) if return_last_state else out


def _check_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        z: Tensor | None) -> None:
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state must be (batch, d_inner, d_state), got {tuple(state.shape)}")
    batch, dim, N = state.shape
    for name, t, shape in (("x", x, (batch, dim)), ("dt", dt, (batch, dim)), ("A", A, (dim, N)),
                           ("B", B, (batch, N)), ("C", C, (batch, N)), ("z", z, (batch, dim))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update: {name} must have shape {shape} for a state of shape "
                             f"{tuple(state.shape)}, got {tuple(t.shape)}")


def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                               dt_softplus: bool = True) -> Tensor:
    """One step of eq. 2a-2b in plain PyTorch, in ``state``'s dtype; the oracle of the Triton step."""
    f = state.dtype
    xf, dtf = x.to(f), dt.to(f)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(f)
    if dt_softplus:
        dtf = F.softplus(dtf)
    decay = torch.exp(dtf.unsqueeze(-1) * A.to(f))
    state.mul_(decay).add_((dtf * xf).unsqueeze(-1) * B.to(f).unsqueeze(1))
    y = (state * C.to(f).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + D.to(f) * xf
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = True, backend: str = "auto") -> Tensor:
    """One recurrent step of the scan (eq. 2a-2b at a single t), for streaming inference.

    ``state`` (batch, d_inner, d_state) is updated in place; ``x, dt, z``: (batch, d_inner); ``B, C``:
    (batch, d_state). Returns y (batch, d_inner) in ``x``'s dtype; keep the state float32. Runs the Triton
    kernel where the scan would run a fused GPU path (``backend`` resolved as in :func:`resolve_backend`),
    else :func:`selective_state_update_ref`.
    """
    _check_state_update(state, x, dt, A, B, C, z)
    name = resolve_backend(backend, state.device, x.dtype)
    if name in ("triton", "mamba_ssm") and state.dtype in _HALF_AND_SINGLE and _triton_installed():
        from .scan_triton import state_update

        return state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
