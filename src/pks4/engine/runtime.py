"""Where a training process runs: device, process group (``torchrun`` + DDP), seeds, precision and signals.

Everything here is decided once, before the first batch, and is the same for every kind of training
(:mod:`pks4.engine.loop`).
"""
from __future__ import annotations

import os
import random
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pks4.errors import UserError

__all__ = ["TrainingError", "DistInfo", "setup_distributed", "start_process", "process_group", "seed_everything",
           "amp_dtype_for", "StopFlag", "agree"]


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, empty data, a batch that kills its workers); the message names
    the step or the file."""


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"train.device={pref!r} but no CUDA device is available")
    return torch.device(pref)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` job described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def start_process(device: str, seed: int, deterministic: bool = False) -> DistInfo:
    """Join the job and seed this rank (``seed + rank``), before anything random (model initialisation) runs."""
    info = setup_distributed(device)
    seed_everything(seed + info.rank, deterministic)
    return info


@contextmanager
def process_group() -> Iterator[None]:
    """Tear the process group down when the run ends, however it ends."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def amp_dtype_for(amp: str, device: torch.device, cpu_amp: bool = False) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on GPU; on CPU only with ``cpu_amp`` (and only bf16), else full precision."""
    if amp == "none" or (device.type == "cpu" and not cpu_amp):
        return None
    if device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checks it between optimizer steps and saves before leaving."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step ...",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def agree(d: DistInfo, *flags: bool) -> list[bool]:
    """Every rank gets the same stop / error decisions (one rank raising a flag is enough). A collective and a
    host round-trip: the loop calls it only where it reads device values anyway (logging steps, saves)."""
    if not d.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
