"""The ``triton`` backend of the selective scan: launches the kernels of :mod:`pks4.ssm.triton_kernels`.

CUDA tensors run compiled kernels. When ``TRITON_INTERPRET=1`` was set before Triton was imported, every launch
runs under Triton's interpreter instead, which also takes CPU tensors (slow: about 0.5 ms per element of each
associative scan; it is how the kernels are tested without a GPU).

What the forward keeps for the backward is the inputs themselves (read in place, whatever their strides) and
the float32 state at the start of every ``_CKPT_STEPS`` steps: batch x d_inner x d_state x 4 bytes per 256
steps, a quarter of a byte per (token, channel) at d_state 16.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["forward", "backward", "state_update", "checkpoint_shape", "is_installed", "interpreting"]

# Register budget of a program: elements of one (channels, d_state, chunk) tile. 4096 float32 over 8 warps is
# 16 registers per thread per live tile; benchmarks/gpu.py sweeps this and the warp count on a real GPU.
_TILE_ELEMS = 4096
_MAX_CHUNK = 32      # steps solved at once by the associative scan inside a program
_CKPT_STEPS = 256    # the forward keeps the state every this many steps (the native CPU kernel's segment)
_NUM_WARPS = 8


def is_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when this process runs Triton's interpreter (kernels on CPU tensors, slowly).

    Triton fixes the mode of its own library functions when it is imported, from TRITON_INTERPRET, and torch
    imports it on first use of many features; so the variable counts only if it was set before that import.
    """
    if "triton" not in sys.modules:
        return _env_interpret()
    from triton.runtime.jit import JITFunction
    import triton.language as tl

    return not isinstance(tl.standard.zeros, JITFunction)


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType:
    """The kernels module, decorated in the mode Triton itself was imported in (see :func:`interpreting`)."""
    interpret = interpreting()  # imports nothing of triton if it is not imported yet
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"  # read by @triton.jit at decoration
    try:
        from . import triton_kernels
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return triton_kernels


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _launch_config(dim: int, N: int, L: int) -> tuple[int, int, int, int]:
    """(channels per program, steps per chunk, chunks per checkpoint, padded d_state)."""
    n_pad = _pow2(N)
    chunk = min(_MAX_CHUNK, _pow2(L))
    block_d = max(1, min(_pow2(dim), _TILE_ELEMS // (n_pad * chunk)))
    return block_d, chunk, max(1, _CKPT_STEPS // chunk), n_pad


def checkpoint_shape(batch: int, dim: int, L: int, N: int) -> tuple[int, int, int, int]:
    """Shape of the states the forward keeps: one per checkpoint interval after the first."""
    _, chunk, group, _ = _launch_config(dim, N, L)
    groups = -(-L // (chunk * group))
    return (batch, groups - 1, dim, N)


def _strides3(t: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def _input_strides(u, delta, A, B, C, z) -> tuple[int, ...]:
    return (*u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides3(z))


def _vector(t: Tensor | None) -> Tensor | None:
    """Per-channel vectors (D, delta_bias) are read with unit stride: copy a strided one (d_inner values)."""
    return None if t is None else t.contiguous()


def _flags(D, z, delta_bias, delta_softplus) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(delta_softplus)}


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, keep_checkpoints: bool
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(out in u's dtype, last state float32 or None, checkpoints float32 or None)."""
    D, delta_bias = _vector(D), _vector(delta_bias)
    batch, dim, L = u.shape
    N = A.shape[1]
    block_d, chunk, group, n_pad = _launch_config(dim, N, L)
    out = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype)
    last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32) if return_last_state else None
    ckpt = torch.empty(checkpoint_shape(batch, dim, L, N), device=u.device, dtype=torch.float32) \
        if keep_checkpoints else None
    dummy = out  # stands in for absent optional tensors; never read (the flags say so)
    grid = (batch, -(-dim // block_d))
    _kernels().selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, out, last if last is not None else dummy,
        ckpt if ckpt is not None and ckpt.numel() else dummy,
        L, dim, N, *_input_strides(u, delta, A, B, C, z),
        **_flags(D, z, delta_bias, delta_softplus), HAS_LAST=last is not None,
        HAS_CKPT=ckpt is not None and ckpt.numel() > 0,
        BLOCK_D=block_d, N_PAD=n_pad, CHUNK=chunk, GROUP=group, num_warps=_NUM_WARPS)
    return out, last, ckpt


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, delta_softplus: bool, ckpt: Tensor | None, dout: Tensor,
             dlast: Tensor | None) -> tuple[Tensor | None, ...]:
    """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias), each in its input's dtype (None for absent inputs)."""
    D, delta_bias = _vector(D), _vector(delta_bias)
    batch, dim, L = u.shape
    N = A.shape[1]
    block_d, chunk, group, n_pad = _launch_config(dim, N, L)
    blocks = -(-dim // block_d)
    if ckpt is None and -(-L // (chunk * group)) > 1:
        raise RuntimeError("selective_scan (triton): the forward pass kept no checkpoints (it ran without "
                           "gradients), so this backward pass cannot run")
    dev, f32 = u.device, torch.float32
    like = lambda t: torch.empty(batch, dim, L, device=dev, dtype=t.dtype)  # noqa: E731
    du, ddelta = like(u), like(delta)
    dz = like(z) if z is not None else None
    dA_part = torch.empty(batch, dim, N, device=dev, dtype=f32)
    dB_part = torch.empty(batch, blocks, N, L, device=dev, dtype=f32)
    dC_part = torch.empty(batch, blocks, N, L, device=dev, dtype=f32)
    dD_part = torch.empty(batch, dim, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty(batch, dim, device=dev, dtype=f32) if delta_bias is not None else None
    slots = min(group, -(-L // chunk)) - 1  # chunk-start states a group replay recovers, per program
    scratch = torch.empty(max(1, batch * blocks * slots * block_d * n_pad), device=dev, dtype=f32)
    if dlast is not None:
        dlast = dlast.to(f32).contiguous()
    dummy = dA_part
    _kernels().selective_scan_bwd_kernel[(batch, blocks)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, ckpt if ckpt is not None and ckpt.numel() else dummy,
        dout, dlast if dlast is not None else dummy, scratch,
        du, ddelta, dz if dz is not None else dummy, dA_part, dB_part, dC_part,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        L, dim, N, slots, *_input_strides(u, delta, A, B, C, z), *dout.stride(),
        **_flags(D, z, delta_bias, delta_softplus), HAS_DLAST=dlast is not None,
        BLOCK_D=block_d, N_PAD=n_pad, CHUNK=chunk, GROUP=group, num_warps=_NUM_WARPS)
    # fixed-order reductions of the partial sums: the same result on every run
    dA = dA_part.sum(0).to(A.dtype)
    dB, dC = dB_part.sum(1).to(B.dtype), dC_part.sum(1).to(C.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    """One recurrent step; ``state`` is updated in place, y (batch, d_inner) is returned in x's dtype."""
    D, dt_bias = _vector(D), _vector(dt_bias)
    batch, dim, N = state.shape
    n_pad = _pow2(N)
    block_d = max(1, min(_pow2(dim), 2048 // n_pad))
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    dummy = out
    z_strides = tuple(z.stride()) if z is not None else (0, 0)
    _kernels().selective_state_update_kernel[(batch, -(-dim // block_d))](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, out, dim, N,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z_strides,
        *out.stride(), **_flags(D, z, dt_bias, dt_softplus), BLOCK_D=block_d, N_PAD=n_pad, num_warps=4)
    return out
