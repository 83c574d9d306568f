"""The ``native`` backend of the selective scan: a fused C++ kernel for CPU tensors (``csrc/selective_scan.cpp``).

Compiled on first use (cached per source, compiler, flags and CPU), loaded with ctypes. It is vectorised across
8 channels at a time and has its own backward: the forward keeps the state at every ``_SEGMENT``-th step and the
backward recomputes one segment at a time from there (nothing of size batch x d_inner x L x d_state is stored).
Its results are the same to the last bit for any thread count.
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
from torch import Tensor

__all__ = ["forward", "backward", "checkpoint_shape", "native_lib"]

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cpp"
# -ffast-math lets gcc vectorise expf through glibc's libmvec; it is given at compile time only, because
# linking a shared library with it would set flush-to-zero for the whole process.
_CXXFLAGS = ("-O3", "-ffast-math", "-march=native", "-fPIC", "-std=c++17")
# Steps per segment of the native kernel: its backward keeps a segment's states and decays (2 x 256 steps x
# d_state x 8 channels x 4 bytes = 256 KiB) in L2, and the forward stores one state per segment for it.
# Measured at L = 1569: 64 -> 128 -> 256 steps cut the backward by 6% and 5%; 512 and 1024 were slower again.
_SEGMENT = 256


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
def native_lib() -> ctypes.CDLL | None:
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


def _call(name: str, *args) -> None:
    if getattr(native_lib(), name)(*args) != 0:
        raise RuntimeError(f"pks4.ssm.scan: {name} refused its arguments; checkpoints missing for a backward "
                           "pass over more than one segment (was the forward run without grad)?")


def _args(u, delta, A, B, C, D, z, delta_bias):
    """Contiguous compute-dtype tensors in the kernel's argument order (float64 stays float64)."""
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.detach().to(f).contiguous()  # noqa: E731
    args = (cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z), cast(delta_bias))
    return args, (*u.shape, A.shape[1]), "f64" if f == torch.float64 else "f32"


def checkpoint_shape(batch: int, dim: int, L: int, N: int) -> tuple[int, int, int, int]:
    return (batch, dim, -(-L // _SEGMENT) - 1, N)


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool, keep_checkpoints: bool
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(out in u's dtype, last state, checkpoints: the state at each segment start but the first)."""
    args, (batch, dim, L, N), suffix = _args(u, delta, A, B, C, D, z, delta_bias)
    f = args[0].dtype
    out = torch.empty(batch, dim, L, dtype=f)
    last = torch.empty(batch, dim, N, dtype=f) if return_last_state else None
    ckpt = torch.empty(checkpoint_shape(batch, dim, L, N), dtype=f) if keep_checkpoints else None
    _call(f"pks4_scan_fwd_{suffix}", *map(_ptr, args), bool(delta_softplus), batch, dim, L, N, _SEGMENT,
          _ptr(out), _ptr(last), _ptr(ckpt if ckpt is not None and ckpt.numel() else None),
          torch.get_num_threads())
    return out.to(u.dtype), last, ckpt


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
             delta_bias: Tensor | None, delta_softplus: bool, ckpt: Tensor | None, dout: Tensor,
             dlast: Tensor | None) -> tuple[Tensor | None, ...]:
    """(du, ddelta, dA, dB, dC, dD, dz, d delta_bias), each in its input's dtype (None for absent inputs)."""
    args, (batch, dim, L, N), suffix = _args(u, delta, A, B, C, D, z, delta_bias)
    f = args[0].dtype
    dout = dout.to(f).contiguous()
    dlast = None if dlast is None else dlast.to(f).contiguous()
    du, ddelta = torch.empty(batch, dim, L, dtype=f), torch.empty(batch, dim, L, dtype=f)
    dz = torch.empty(batch, dim, L, dtype=f) if z is not None else None
    dA, dD, dbias = torch.empty(dim, N, dtype=f), torch.empty(dim, dtype=f), torch.empty(dim, dtype=f)
    dB, dC = torch.empty(batch, N, L, dtype=f), torch.empty(batch, N, L, dtype=f)
    grads = (dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias)
    ckpt = ckpt.contiguous() if ckpt is not None and ckpt.numel() else None
    _call(f"pks4_scan_bwd_{suffix}", *map(_ptr, args), bool(delta_softplus), batch, dim, L, N, _SEGMENT,
          _ptr(ckpt), *map(_ptr, grads), torch.get_num_threads())
    like = lambda g, t: None if t is None else g.to(t.dtype)  # noqa: E731
    return (like(du, u), like(ddelta, delta), like(dA, A), like(dB, B), like(dC, C), like(dD, D), like(dz, z),
            like(dbias, delta_bias))
