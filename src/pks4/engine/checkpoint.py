"""Checkpoints: atomic, safe to load, resumable.

A checkpoint is a directory ``<run>/checkpoints/step-00000120/`` holding

* ``model.safetensors``: the weights, with the registry name, model config, class names and run config in its
  metadata, so the file alone rebuilds the model;
* ``state.pt``: run config, optimizer / scheduler / grad-scaler state, epoch and step, RNG states of python,
  numpy and torch, best metric, and the SHA-256 of the weights file. It holds only tensors and plain values and
  is read with ``torch.load(weights_only=True)``: nothing arbitrary is unpickled.

Both files are written into a temporary directory, fsynced, and the directory is renamed into place, so a crash
leaves either the old checkpoint or the new one, never half of one. ``best/`` is a copy of the best checkpoint.
:func:`atomic_output` is that mechanism for any file or folder; a write that fails (a full disk, a file-size
limit, a read-only file system) removes its temporary copy and raises an error naming the destination and the
cause, leaving whatever was there before untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pks4.errors import UserError, describe_os_error
from pks4.weights import LoadReport

__all__ = [
    "CheckpointError", "WEIGHTS_FILE", "STATE_FILE", "save_checkpoint", "read_state", "read_weights",
    "verify_checkpoint", "list_checkpoints", "find_latest", "resolve_checkpoint", "checkpoint_dir",
    "prune_checkpoints",
    "save_best", "unwrap", "rng_state", "set_rng_state", "load_weights_into", "load_model_from_checkpoint",
    "describe_partial_load", "read_any_weights", "sweep_leftovers", "plain_state_dict", "atomic_output",
    "write_failure",
]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, unsafe or does not fit the model (the message names the file)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (PKS4 models have their own ``.module``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors and plain values only."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(np_keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ saving


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of ``model``'s tensors (unwrapped from DDP), safe to write and to keep beside training."""
    module = unwrap(model)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: raised directly, chained under torch's RuntimeError (torch.save to a
    Python file), or named in safetensors' message ("os error 28"); None if the failure is something else."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"os error (\d+)", str(exc))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


def _remove(path: Path) -> None:
    """Remove a temporary file or folder if it is there; cleaning up must not hide the error that led here."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink()
    except OSError:
        pass


@contextmanager
def atomic_output(final: str | Path, *, directory: bool = False, what: str = "file",
                  error: type[Exception] = CheckpointError) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write into (a folder when ``directory``); on success fsync it
    and rename it into place, on any failure remove it.

    A write that fails for a reason of the disk (full, quota, file-size limit, read-only, I/O error) becomes an
    ``error`` naming ``final`` and the reason; whatever ``final`` held before is untouched. The temporary name
    (``.tmp-<name>-<pid>``) is one :func:`sweep_leftovers` recognises after a crash.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if directory:
            tmp.mkdir()
        yield tmp
        if directory:
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            _replace_dir(tmp, final)
        else:
            _fsync_file(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    except BaseException as exc:
        _remove(tmp)
        cause = write_failure(exc) if isinstance(exc, Exception) else None
        if cause is None:  # not a failing write (a bug, Ctrl-C): as it was
            raise
        free = shutil.disk_usage(final.parent).free if final.parent.is_dir() else None
        room = f"; {free / 2**20:.0f} MiB free there" if free is not None else ""
        raise error(f"{final}: could not write the {what}: {describe_os_error(cause)}{room}. Its temporary copy "
                    "was removed; what was there before is untouched") from exc


def save_checkpoint(ckpt_dir: str | Path, model: nn.Module, state: dict[str, Any],
                    metadata: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``state.pt`` atomically into the directory ``ckpt_dir``.

    ``metadata`` (model_name, model_config, classes, config) goes into the safetensors header as JSON and into
    the state; ``state`` must hold only tensors and plain values (optimizer/scheduler state dicts, RNG, epoch).
    A write that fails (disk full) raises CheckpointError and leaves the earlier checkpoints as they were.
    """
    final = Path(ckpt_dir)
    with atomic_output(final, directory=True, what="checkpoint") as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(plain_state_dict(model), str(weights),
                  metadata={"format": "pks4", **{k: json.dumps(v) for k, v in metadata.items()}})
        full_state = {**state, **metadata, "format": 1, "weights_sha256": _sha256(weights),
                      "weights_bytes": weights.stat().st_size}
        with open(tmp / STATE_FILE, "wb") as fh:  # a Python file: a failing write keeps its errno (write_failure)
            torch.save(full_state, fh)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    # A non-empty directory cannot be renamed over: move the old one aside first, then drop it.
    old = dst.parent / f".old-{dst.name}-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_best(run_dir: str | Path, ckpt_dir: str | Path) -> Path:
    """Copy checkpoint ``ckpt_dir`` to ``<run>/checkpoints/best`` atomically."""
    best = Path(run_dir) / "checkpoints" / "best"
    with atomic_output(best, directory=True, what="best checkpoint") as tmp:
        tmp.rmdir()
        shutil.copytree(ckpt_dir, tmp)
    return best


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest ``step-*`` checkpoints (``best`` is never touched)."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    sweep_leftovers(run_dir)
    return doomed


def sweep_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove half-written ``.tmp-*`` folders left by a process killed while saving.

    A ``.old-*`` folder is a complete checkpoint that a killed process had moved aside to replace it; if its
    replacement never arrived it is moved back, else dropped.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    swept = []
    for p in root.iterdir():
        m = re.match(r"\.(tmp|old)-(.+)-(\d+)$", p.name)
        if not m or int(m.group(3)) == os.getpid():
            continue
        target = root / m.group(2)
        if m.group(1) == "old" and not target.exists():
            os.replace(p, target)
            continue
        shutil.rmtree(p, ignore_errors=True)
        swept.append(p)
    return swept


# ------------------------------------------------------------------------------------------------ loading


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Load ``state.pt`` with ``weights_only=True``; refuse anything else (pickled code, truncation)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing state file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain "
                              f"values ({str(exc).splitlines()[0]})") from None
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated ({exc})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded JSON metadata of a safetensors file written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from None
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    return tensors, meta


def verify_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Return the state of a complete checkpoint; raise CheckpointError if any part is missing or corrupt."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    if weights.stat().st_size != state.get("weights_bytes") or _sha256(weights) != state.get("weights_sha256"):
        raise CheckpointError(f"{weights}: size or checksum differs from {STATE_FILE} (truncated or replaced)")
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """``step-*`` checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path, log=lambda msg: print(msg, file=sys.stderr)) -> Path | None:
    """Newest checkpoint of a run that verifies; broken ones are skipped with a message."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log(f"skipping checkpoint {path}: {exc}")
    best = Path(run_dir) / "checkpoints" / "best"
    if best.is_dir():
        try:
            verify_checkpoint(best)
            return best
        except CheckpointError as exc:
            log(f"skipping checkpoint {best}: {exc}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file, a checkpoint directory, or a run directory (-> its best, else latest) -> weights file."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / WEIGHTS_FILE).is_file():
        return p / WEIGHTS_FILE
    if (p / "checkpoints").is_dir():
        best = p / "checkpoints" / "best"
        if (best / WEIGHTS_FILE).is_file():
            return best / WEIGHTS_FILE
        latest = find_latest(p)
        if latest is not None:
            return latest / WEIGHTS_FILE
        raise CheckpointError(f"{p}: run directory has no valid checkpoint under checkpoints/")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or run directory")
    raise CheckpointError(f"{p}: not a checkpoint (expected {WEIGHTS_FILE}, a checkpoint directory or a run "
                          "directory written by `pks4 train --out`)")


def checkpoint_dir(path: Path) -> Path:
    """What ``--resume PATH`` names: a checkpoint directory (or a file inside one), or a run directory (-> its
    latest valid checkpoint)."""
    if path.is_file() and path.name in (STATE_FILE, WEIGHTS_FILE):
        return path.parent
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: run directory has no valid checkpoint to resume from")
        return latest
    what = "no such file or directory" if not path.exists() else "not a checkpoint directory"
    raise CheckpointError(f"{path}: {what}; --resume takes 'auto', a checkpoint directory (holding "
                          f"{WEIGHTS_FILE} and {STATE_FILE}) or a run directory; to start "
                          "from a weights file set model.init_from instead")


def load_weights_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
                      partial: bool = False) -> "LoadReport":
    """Strict load that names missing, unexpected and mis-shaped keys (wrong architecture or class count).

    With ``partial`` those keys are tolerated (the model keeps its fresh initialisation for them, e.g. a head
    for another class count) and returned in the report; a checkpoint sharing no key at all still fails.
    """
    from pks4.weights import CheckpointError as WeightsError
    from pks4.weights import load_state_dict_strict

    try:
        report = load_state_dict_strict(unwrap(model), tensors, source, allow_partial=["*"] if partial else None)
    except WeightsError as exc:
        hint = " (wrong architecture or class count? set model.partial_load=true to re-initialise them)"
        raise CheckpointError(f"{exc}{hint}") from None
    if partial and not report.loaded:
        raise CheckpointError(f"{source}: no key of the checkpoint fits {type(unwrap(model)).__name__} "
                              f"(first checkpoint keys: {sorted(tensors)[:5]}): another architecture")
    return report


def describe_partial_load(report: "LoadReport") -> str:
    """One message naming every key a partial load left at its fresh initialisation."""
    parts = [f"{len(report.loaded)} tensors loaded from {report.source}"]
    if report.mismatched:
        parts.append("re-initialised (shape differs): "
                     + ", ".join(f"{k} {a}->{b}" for k, a, b in report.mismatched))
    if report.missing:
        parts.append("re-initialised (not in checkpoint): " + ", ".join(report.missing))
    if report.unexpected:
        parts.append("ignored (not in model): " + ", ".join(report.unexpected))
    return "partial load: " + "; ".join(parts)


def read_any_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a pks4 checkpoint (file, checkpoint dir or run dir) or any weights file read safely
    (safetensors, or ``torch.load(weights_only=True)``); returns ``(tensors, the file read)``."""
    from pks4.weights import CheckpointError as WeightsError
    from pks4.weights import read_checkpoint_file

    p = Path(path)
    target = resolve_checkpoint(p) if p.is_dir() or not p.exists() else p
    if target.suffix == ".safetensors":
        return read_weights(target)[0], str(target)
    try:
        return read_checkpoint_file(target), str(target)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None


def load_model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                               ) -> tuple[nn.Module, Any, list[str]]:
    """Rebuild the model saved at ``path`` (weights file, checkpoint dir, or run dir -> best checkpoint).

    Returns ``(model in eval mode, RunConfig, class names)``.
    """
    from pks4.engine.config import config_from_dict
    from pks4.models.registry import model_from_config

    weights = resolve_checkpoint(path)
    tensors, meta = read_weights(weights)
    for key in ("model_name", "model_config", "config"):
        if key not in meta:
            raise CheckpointError(f"{weights}: metadata lacks '{key}': not written by pks4 train")
    model = model_from_config(meta["model_name"], meta["model_config"])
    load_weights_into(model, tensors, str(weights))
    model.to(map_location).eval()
    classes = list(meta.get("classes") or [str(i) for i in range(getattr(model, "num_classes", 0))])
    return model, config_from_dict(meta["config"]), classes
