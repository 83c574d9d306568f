"""Run directories that are never lost: a guard to call before a command writes into ``--out``.

:func:`prepare_run_dir` does, in this order, before any work starts:

1. checks the destination (:func:`check_destination`): ``--out`` is not a file, its folder can be created and
   written (a probe file is created and removed, which catches permissions and read-only file systems), and
   the disk has the free space the caller asks for (:func:`checkpoint_bytes` estimates a run's);
2. takes the run's lock (:class:`RunLock`, ``DIR/.pks4.lock``): an exclusive ``flock`` that the kernel releases
   when its process ends, whatever the way, plus the holder's pid, host, start time and command line written
   inside for the message a second process gets. A lock file left by a dead process is free to the kernel and
   is taken over with a message naming the old holder;
3. refuses a directory that already holds a run (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``) unless
   ``resume`` is given (continue it) or ``overwrite`` is (the old run is MOVED aside to ``DIR.old-<timestamp>``,
   never deleted), and says how to do either.

Under DDP only the main rank calls it (the others wait at a barrier); the lock is held until :meth:`RunLock.release`
or the end of the process. :func:`atomic_write_text` / :func:`atomic_write_bytes` write small run files (config,
reports) through :func:`pks4.engine.checkpoint.atomic_output`, the same atomic mechanism checkpoints use.

Locks rely on ``fcntl.flock`` (Linux, macOS); on network file systems without lock support the lock cannot be
taken and the guard says so instead of running unprotected.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pks4.engine.checkpoint import atomic_output
from pks4.errors import UserError, describe_os_error

__all__ = ["RunDirError", "RunLock", "LOCK_FILE", "RUN_MARKERS", "run_markers", "check_destination",
           "checkpoint_bytes", "move_aside", "prepare_run_dir", "atomic_write_text", "atomic_write_bytes"]

LOCK_FILE = ".pks4.lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")  # what `pks4 train` writes first
_MIN_FREE = 64 * 2**20  # below this even the config and the first log lines may not fit


class RunDirError(UserError):
    """A run directory that cannot or must not be written (the message names it and says what to do)."""


def run_markers(out: str | Path) -> list[str]:
    """The files of a training run found in ``out`` (empty when it holds none)."""
    p = Path(out)
    found = []
    for name in RUN_MARKERS:
        marker = p / name
        if marker.is_file() or (marker.is_dir() and any(marker.iterdir())):
            found.append(name + ("/" if marker.is_dir() else ""))
    return found


def checkpoint_bytes(num_params: int, *, keep_last: int = 2, ema: bool = False) -> int:
    """Disk a run's checkpoints need at most: ``keep_last`` step checkpoints, ``best/`` and the one being
    written, each float32 weights (4 B, +4 B with an EMA copy) and AdamW's two moments (8 B) per parameter."""
    per_checkpoint = num_params * (4 + (4 if ema else 0) + 8)
    return per_checkpoint * (keep_last + 2)


def check_destination(out: str | Path, need_bytes: int = 0) -> Path:
    """Create ``out`` if needed and make sure a run can be written there; RunDirError naming it if not."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{p}: is a file, not a folder; --out names the run directory to create or continue")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory: {describe_os_error(exc)}") from None
    try:  # a file really created: permissions, ACLs and read-only mounts all answer here
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"{p}: cannot write into the run directory: {describe_os_error(exc, path=False)}") from None
    free = shutil.disk_usage(p).free
    need = max(need_bytes, _MIN_FREE)
    if free < need:
        raise RunDirError(f"{p}: {free / 2**30:.2f} GiB free on its disk, a run there needs about "
                          f"{need / 2**30:.2f} GiB; free some space or choose another --out")
    return p


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def move_aside(out: str | Path) -> Path:
    """Rename the run in ``out`` to ``out.old-<timestamp>`` (a free name beside it); returns the new path."""
    p = Path(out)
    base = p.with_name(f"{p.name}.old-{_timestamp()}")
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        os.rename(p, target)
    except OSError as exc:
        raise RunDirError(f"cannot move the old run aside: {describe_os_error(exc)}") from None
    return target


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class RunLock:
    """The exclusive lock of one run directory, held by this process until :meth:`release` or its end.

    The lock is ``flock`` on ``DIR/.pks4.lock``; the file also names its holder (pid, host, start, command) for
    the message a second process gets. A clean release empties the file; one that still names a holder when the
    lock is free was left by a process that died, and is taken over with a message (``previous`` keeps it).
    """

    def __init__(self, out: str | Path, log: Callable[[str], None] = _stderr) -> None:
        self.dir = Path(out)
        self.path = self.dir / LOCK_FILE
        self.log = log
        self.previous: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot create the run's lock file: {describe_os_error(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"{self.dir} is in use by another pks4 process ({_describe(holder)}); wait for it "
                              "to end or choose another --out (two runs in one folder would overwrite each other)"
                              ) from None
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"{self.path}: cannot lock the run directory ({describe_os_error(exc)}); its file "
                              "system does not support locks: choose an --out on a local disk") from None
        self.previous = _read_holder(fd) or None
        if self.previous is not None:
            self.log(f"{self.dir}: taking over the lock left by {_describe(self.previous)}: that process ended "
                     "without releasing it (killed or crashed)")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now().isoformat(" ", "seconds"), "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and unlock it; the file stays, so no second file can race it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or vanished disk: the next holder then reports this one as gone, which is true
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "unreadable lock file"}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _holds_run(out: Path, found: list[str]) -> str:
    return (f"{out} already holds a run ({', '.join(found)}); it was left as it is. To continue that run, add "
            f"--resume auto. To start a new one, choose another --out, or add --overwrite to move this one aside to "
            f"{out.name}.old-<date>-<time> (nothing is deleted)")


def prepare_run_dir(out: str | Path, *, resume: str | None = None, overwrite: bool = False, need_bytes: int = 0,
                    log: Callable[[str], None] = _stderr) -> RunLock:
    """Check ``out``, lock it and make sure no earlier run in it is overwritten (module docstring); returns the
    held lock. ``resume`` ("auto" or a path, as ``--resume``) allows continuing a run found there; ``overwrite``
    moves it aside first."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --out and --overwrite moves it aside: give only one")
    path = check_destination(out, need_bytes)
    lock = RunLock(path, log).acquire()
    try:
        found = run_markers(path)
        if found and not resume:
            if not overwrite:
                raise RunDirError(_holds_run(path, found))
            old = move_aside(path)  # our lock file moves with it; the new folder gets its own
            log(f"{path}: the earlier run was moved aside to {old} (nothing was deleted)")
            fresh = RunLock(check_destination(path, need_bytes), log).acquire()
            lock.release()
            (old / LOCK_FILE).unlink(missing_ok=True)
            lock = fresh
    except BaseException:
        lock.release()
        raise
    return lock


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` all or nothing; a failing write (disk full) is a RunDirError naming the file,
    its temporary copy removed and the old ``path`` untouched."""
    with atomic_output(path, error=RunDirError) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))
