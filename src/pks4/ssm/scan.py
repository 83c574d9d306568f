"""The selective scan of Mamba-1 (Gu & Dao 2023, Algorithm 2; eq. 2a-2b after zero-order-hold discretisation):

    h_t = exp(delta_t * A) h_{t-1} + delta_t * B_t * u_t            (2a, with B-bar ~ delta * B)
    y_t = C_t . h_t + D * u_t,        out_t = y_t * silu(z_t)       (2b, then the gate of the Mamba block)

Shapes follow Mamba-1: ``u, delta, z: (batch, d_inner, L)``, ``A: (d_inner, d_state)`` (real, negative),
``B, C: (batch, d_state, L)``, ``D, delta_bias: (d_inner,)``. The state and all sums are float32 (float64 for
float64 inputs); the output has ``u``'s dtype.

Paths (``backend=``, or the ``PKS4_SCAN_BACKEND`` environment variable when ``backend="auto"``):

- ``ref``: :func:`selective_scan_ref`, a plain loop over time; the numerical oracle of every other path.
- ``loop``: a lean per-step PyTorch loop (autograd backward); runs on any device.
- ``native``: a fused C++ kernel, compiled on first use, vectorised across 8 channels at a time, with its own
  backward: the forward pass keeps the state at every ``_SEGMENT``-th step and the backward pass recomputes one
  segment at a time from there (nothing of size batch x d_inner x L x d_state is stored). Its results are the
  same to the last bit for any thread count. ``auto`` picks it for CPU tensors and falls back to ``loop``
  (saying so once) when no C++ compiler is available.
- ``compile``: ``loop`` under ``torch.compile``, in chunks of steps so compile time does not grow with L.

``auto`` picks ``loop`` for CUDA tensors.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "available_backends"]

BACKENDS = ("ref", "loop", "native", "compile")
_ALIASES = {"reference": "ref", "torch": "loop", "cpp": "native", "cpu": "native"}
_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cpp"
# -ffast-math lets gcc vectorise expf through glibc's libmvec; it is given at compile time only, because
# linking a shared library with it would set flush-to-zero for the whole process.
_CXXFLAGS = ("-O3", "-ffast-math", "-march=native", "-fPIC", "-std=c++17")
# Steps per segment of the native kernel: its backward keeps a segment's states and decays (2 x 256 steps x
# d_state x 8 channels x 4 bytes = 256 KiB) in L2, and the forward stores one state per segment for it.
# Measured at L = 1569: 64 -> 128 -> 256 steps cut the backward by 6% and 5%; 512 and 1024 were slower again.
_SEGMENT = 256


# --------------------------------------------------------------------------------------------------------------
# Argument checks shared by every path
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


def _delta_eff(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """The step size actually used: softplus(delta + delta_bias) (Mamba's dt projection, §3.6)."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


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
    dtype, f = u.dtype, _compute_dtype(u)
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    delta = _delta_eff(delta, delta_bias, delta_softplus)
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
# Lean PyTorch loop (any device) and its torch.compile'd variant
# --------------------------------------------------------------------------------------------------------------
def _loop_steps(h: Tensor, A: Tensor, dt: Tensor, dtu: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Advance the state over the steps of ``dt`` (batch, d_inner, K); return (state, y (batch, d_inner, K))."""
    ys = []
    for dt_t, dtu_t, B_t, C_t in zip(dt.unbind(-1), dtu.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.addcmul(torch.exp(dt_t.unsqueeze(-1) * A) * h, dtu_t.unsqueeze(-1), B_t.unsqueeze(1))
        ys.append(torch.bmm(h, C_t.unsqueeze(-1)))                    # (batch, d_inner, 1)
    return h, torch.cat(ys, dim=-1)


_COMPILE_CHUNK = 16  # steps per compiled call: bounds compile time, whatever L is


@functools.lru_cache(maxsize=None)
def _compiled_steps():
    return torch.compile(_loop_steps, dynamic=False)


def _scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
               delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool,
               compiled: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    dtype, f = u.dtype, _compute_dtype(u)
    u, delta, A, B, C = (t.to(f) for t in (u, delta, A, B, C))
    dt = _delta_eff(delta, delta_bias, delta_softplus)
    dtu = dt * u
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    if compiled:
        step, ys = _compiled_steps(), []
        for s in range(0, u.shape[-1], _COMPILE_CHUNK):
            sl = slice(s, s + _COMPILE_CHUNK)
            h, y_chunk = step(h, A, dt[..., sl], dtu[..., sl], B[..., sl], C[..., sl])
            ys.append(y_chunk)
        y = torch.cat(ys, dim=-1)
    else:
        h, y = _loop_steps(h, A, dt, dtu, B, C)
    if D is not None:
        y = torch.addcmul(y, D.to(f)[:, None], u)
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(dtype)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------------------------
# Native fused kernel: built on first use, loaded with ctypes
# --------------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("PKS4_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pks4")
    return Path(root) / "scan"


def _cpu_signature() -> str:
    """-march=native code must not be reused on another CPU that shares the cache directory."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((ln for ln in lines if ln.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _build(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / out.name
        subprocess.run([cxx, *_CXXFLAGS, "-c", str(_SOURCE), "-o", str(obj)], check=True, capture_output=True,
                       text=True)
        subprocess.run([cxx, "-shared", str(obj), "-o", str(lib), "-lm", "-pthread"], check=True,
                       capture_output=True, text=True)
        os.replace(lib, out)  # atomic: concurrent processes never load a half-written library


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd, bwd = getattr(lib, f"pks4_scan_fwd_{suffix}"), getattr(lib, f"pks4_scan_bwd_{suffix}")
        fwd.argtypes = [p] * 8 + [i32] + [i64] * 5 + [p] * 3 + [i32]
        bwd.argtypes = [p] * 8 + [i32] + [i64] * 5 + [p] * 11 + [i32]
        fwd.restype = bwd.restype = i32
    return lib


@functools.lru_cache(maxsize=None)
def _native_lib() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when it cannot be built or loaded here."""
    try:
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        key = hashlib.sha256("\0".join([_SOURCE.read_text(), cxx, *_CXXFLAGS, _cpu_signature()]).encode())
        path = _cache_dir() / f"selective_scan_{key.hexdigest()[:16]}.so"
        if not path.exists():
            try:
                _build(cxx, path)
            except PermissionError:  # read-only home: build next to other temporary files instead
                path = Path(tempfile.gettempdir()) / "pks4-scan" / path.name
                if not path.exists():
                    _build(cxx, path)
        return _declare(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.CalledProcessError, AttributeError) as err:
        detail = getattr(err, "stderr", "") or ""
        warnings.warn(f"pks4.ssm.scan: the native CPU selective scan is unavailable ({err}) {detail[-500:]}; "
                      "falling back to the slower PyTorch loop", RuntimeWarning, stacklevel=3)
        return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _NativeScan(torch.autograd.Function):
    """Fused CPU scan; the backward recomputes states segment by segment from the forward's checkpoints,
    which are kept only when ``keep_checkpoints`` (grad mode on and some input requiring grad)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, keep_checkpoints):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus = bool(delta_softplus)
        args, (batch, dim, L, N), suffix = _native_args(u, delta, A, B, C, D, z, delta_bias)
        f = args[0].dtype
        out = torch.empty(batch, dim, L, dtype=f)
        last = torch.empty(batch, dim, N, dtype=f) if return_last_state else None
        ctx.segment = _SEGMENT
        segments = -(-L // ctx.segment)
        # The state at each segment start but the first: 1/_SEGMENT of all states, what the backward needs.
        ctx.ckpt = torch.empty(batch, dim, segments - 1, N, dtype=f) if keep_checkpoints and segments > 1 else None
        _call(f"pks4_scan_fwd_{suffix}", *map(_ptr, args), ctx.softplus, batch, dim, L, N, ctx.segment, _ptr(out),
              _ptr(last), _ptr(ctx.ckpt), torch.get_num_threads())
        out = out.to(u.dtype)
        return out if last is None else (out, last)

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        args, (batch, dim, L, N), suffix = _native_args(u, delta, A, B, C, D, z, delta_bias)
        f = args[0].dtype
        dout = dout.to(f).contiguous()
        dlast = None if dlast is None else dlast.to(f).contiguous()
        du, ddelta = torch.empty(batch, dim, L, dtype=f), torch.empty(batch, dim, L, dtype=f)
        dz = torch.empty(batch, dim, L, dtype=f) if z is not None else None
        dA, dD, dbias = torch.empty(dim, N, dtype=f), torch.empty(dim, dtype=f), torch.empty(dim, dtype=f)
        dB, dC = torch.empty(batch, N, L, dtype=f), torch.empty(batch, N, L, dtype=f)
        grads = (dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias)
        _call(f"pks4_scan_bwd_{suffix}", *map(_ptr, args), ctx.softplus, batch, dim, L, N, ctx.segment,
              _ptr(ctx.ckpt), *map(_ptr, grads), torch.get_num_threads())
        like = lambda g, t: None if t is None else g.to(t.dtype)  # noqa: E731
        return (like(du, u), like(ddelta, delta), like(dA, A), like(dB, B), like(dC, C), like(dD, D), like(dz, z),
                like(dbias, delta_bias), None, None, None)


def _call(name: str, *args) -> None:
    if getattr(_native_lib(), name)(*args) != 0:
        raise RuntimeError(f"pks4.ssm.scan: {name} refused its arguments; checkpoints missing for a backward "
                           "pass over more than one segment (was the forward run without grad)?")


def _native_args(u, delta, A, B, C, D, z, delta_bias):
    """Contiguous compute-dtype tensors in the kernel's argument order."""
    f = _compute_dtype(u)
    cast = lambda t: None if t is None else t.detach().to(f).contiguous()  # noqa: E731
    args = (cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z), cast(delta_bias))
    return args, (*u.shape, A.shape[1]), "f64" if f == torch.float64 else "f32"


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def available_backends() -> list[str]:
    """Backends usable in this process (building the native kernel if it is not built yet)."""
    names = ["ref", "loop"]
    if _native_lib() is not None:
        names.append("native")
    if hasattr(torch, "compile"):
        names.append("compile")
    return names


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        backend = os.environ.get("PKS4_SCAN_BACKEND", "auto").strip().lower() or "auto"
    backend = _ALIASES.get(backend, backend)
    if backend == "auto":
        return "native" if device.type == "cpu" and _native_lib() is not None else "loop"
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"selective_scan: backend 'native' runs on CPU tensors, got device {device}")
        if _native_lib() is None:
            return "loop"  # already warned once by _native_lib
    return backend


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = True,
                   return_last_state: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (eq. 2a-2b, gated by silu(z)), on the fastest path available for the inputs' device.

    Returns ``out`` (batch, d_inner, L) in ``u``'s dtype, and with ``return_last_state`` also the final state
    (batch, d_inner, d_state) in float32 (float64 for float64 inputs). ``backend``: "auto" (default; the
    ``PKS4_SCAN_BACKEND`` environment variable overrides it), "ref", "loop", "native" or "compile".
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = _resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "native":
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (u, delta, A, B, C, D, z, delta_bias))
        return _NativeScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, keep)
    return _scan_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                      compiled=name == "compile")


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = True) -> Tensor:
    """One recurrent step of the scan (eq. 2a-2b at a single t), for streaming inference.

    ``state`` (batch, d_inner, d_state) is updated in place; ``x, dt, z``: (batch, d_inner); ``B, C``:
    (batch, d_state). Returns y (batch, d_inner) in ``x``'s dtype; the arithmetic is done in ``state``'s dtype
    (keep the state float32).
    """
    batch, dim, N = state.shape
    for name, t, shape in (("x", x, (batch, dim)), ("dt", dt, (batch, dim)), ("A", A, (dim, N)),
                           ("B", B, (batch, N)), ("C", C, (batch, N)), ("z", z, (batch, dim))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update: {name} must have shape {shape} for a state of shape "
                             f"{tuple(state.shape)}, got {tuple(t.shape)}")
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
