"""The one error boundary of the ``pks4`` command line: a user's mistake is one line, a bug is a traceback.

An error that comes from what the user gave -- a file that is missing, unreadable, a directory, a FIFO, a
symbolic-link loop, a name too long, a device that is not there, a full or read-only disk; a YAML, JSON or CSV
file that does not parse or holds a field of the wrong type; the project's own errors (``UserError`` and its
subclasses: DataError, ConfigError, CheckpointError, RunDirError) -- ends as one line::

    pks4: error: <file or option>: <problem>

with exit code 2. Anything else is an internal error: its traceback is printed, then a line asking for a report,
exit code 1. ``--debug`` (or ``PKS4_DEBUG=1``; ``PKS4_TRACEBACK=1`` is kept as an alias) re-raises every error
so the whole traceback shows.

This module imports no other part of pks4 at import time, so every layer may raise :class:`UserError`.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import stat
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Callable, Sequence, TextIO

__all__ = ["UserError", "EXIT_USER", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "describe_os_error", "user_message",
           "debug_requested", "split_debug_flag", "run_guarded", "require_regular_file", "file_kind"]

EXIT_USER = 2  # what argparse uses for a bad command line, so every user mistake exits alike
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

_PACKAGE_DIR = Path(__file__).resolve().parent
_DEBUG_ENV = ("PKS4_DEBUG", "PKS4_TRACEBACK")


class UserError(Exception):
    """An error caused by what the user gave (a file, an option, a config key); the message names it and says
    what was expected. The boundary prints it as one line, without a traceback."""


# errno -> what to tell the user. Everything here is about the path or the machine the user pointed pks4 at,
# never a bug; other errnos (ECONNRESET from a dying worker, ENOMEM, ...) stay internal.
_ERRNO_PROBLEMS: dict[int, str] = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied (check the owner and mode of the file and of its folders)",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory, where a file was expected",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENXIO: "no such device or address (a FIFO with no process at its other end, or a device that is gone)",
    errno.ENODEV: "no such device",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for this file system or process limit",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
    errno.ETXTBSY: "file is busy",
    errno.EXDEV: "cannot move across file systems",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.EMFILE: "too many open files (raise the limit with `ulimit -n`)",
    errno.ESTALE: "stale file handle (a network file system changed under pks4)",
}


def describe_os_error(exc: OSError, *, path: bool = True) -> str:
    """``<file>: <problem>`` for an OSError (``<file> -> <file2>`` for a failed rename or link); only the
    problem with ``path`` False or when the error names no file."""
    problem = _ERRNO_PROBLEMS.get(exc.errno or -1) or (exc.strerror or str(exc))
    if exc.errno == errno.ENAMETOOLONG and exc.filename is not None:
        longest = max((len(part) for part in Path(os.fsdecode(exc.filename)).parts), default=0)
        problem += f" (its longest part has {longest} characters; most file systems allow 255 bytes)"
    if exc.filename is None or not path:
        return problem
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {problem}"


def file_kind(mode: int) -> str | None:
    """What a ``st_mode`` that is not a regular file is ("a directory", "a FIFO (named pipe)", ...); None for
    a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def require_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file (or a link to one); else a UserError saying what it is.

    Reading a FIFO would block for ever and a device may never end, so readers of user files call this first.
    """
    p = Path(path)
    try:
        kind = file_kind(p.stat().st_mode)
    except FileNotFoundError:
        raise UserError(f"{p}: {what} not found") from None
    except OSError as exc:
        raise UserError(f"{what} {describe_os_error(exc)}") from None
    if kind is not None:
        raise UserError(f"{p}: is {kind}, not a {what}")
    return p


# -------------------------------------------------------------------------------------------- classifying


def _raised_in_pks4(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` is pks4 code: a ValueError pks4 raises on purpose checks an input;
    one from inside torch or numpy is a case pks4 failed to check, i.e. a bug."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def _parse_error_message(exc: BaseException) -> str | None:
    """One line for a file that does not parse (YAML, JSON, CSV, text that is not UTF-8)."""
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(exc).split())}"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc}"
    if isinstance(exc, csv.Error):
        return f"not valid CSV: {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return (f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                "save the file as UTF-8, or check that it is the text file you meant")
    return None


def _worker_user_error(exc: BaseException) -> str | None:
    """The message of a user error re-raised by a DataLoader from a worker process.

    torch re-raises a worker's exception as ``type(message)`` or, when that constructor does not fit, as a
    RuntimeError, with the worker's traceback inside the text; the last line names the original type.
    """
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return None
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    qualname, sep, message = last.partition(": ")
    if not sep:
        return None
    module, _, name = qualname.rpartition(".")
    cls = getattr(sys.modules.get(module or "builtins"), name, None)
    if isinstance(cls, type) and issubclass(cls, UserError):
        return message
    return None


def user_message(exc: BaseException) -> str | None:
    """The one line to show for ``exc`` if it comes from what the user gave; None for an internal error."""
    if isinstance(exc, UserError):
        return exc.args[0] if len(exc.args) == 1 else str(exc)
    if isinstance(exc, OSError) and exc.errno in _ERRNO_PROBLEMS:
        return describe_os_error(exc)
    parsed = _parse_error_message(exc)
    if parsed is not None:
        return parsed
    if isinstance(exc, (ValueError, KeyError)) and _raised_in_pks4(exc.__traceback__):
        # pks4's own checks of options and arguments (e.g. "--views 8x0x3"); KeyError's str() adds quotes
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (f"out of memory ({' '.join(str(exc).split())[:200]}); lower the batch size, the frames or the "
                "frame size")
    return _worker_user_error(exc)


# ------------------------------------------------------------------------------------------- the boundary


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or PKS4_DEBUG / PKS4_TRACEBACK set to anything but empty or 0."""
    return flag or any(os.environ.get(name, "") not in ("", "0") for name in _DEBUG_ENV)


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from anywhere before ``--`` in ``argv``; returns (the rest, whether it was there)."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    found = "--debug" in args[:end]
    return [a for i, a in enumerate(args) if i >= end or a != "--debug"], found


def run_guarded(func: Callable[[], int | None], *, debug: bool = False, stream: TextIO | None = None,
                prog: str = "pks4") -> int:
    """Run ``func`` and turn whatever it raises into an exit code, printing what the user needs to see.

    User errors: one ``<prog>: error: ...`` line, exit 2. Internal errors: the traceback and a request for a
    report, exit 1. Ctrl-C: exit 130. With ``debug`` (or its environment variables) every error is re-raised.
    """
    out = stream if stream is not None else sys.stderr
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        if debug_requested(debug):
            raise
        print(f"{prog}: interrupted", file=out)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted into user and internal errors just below
        if debug_requested(debug):
            raise
        message = user_message(exc)
        if message is not None:
            print(f"{prog}: error: {message}", file=out)
            return EXIT_USER
        traceback.print_exception(exc, file=out)
        print(f"{prog}: internal error ({type(exc).__name__}): this is a bug in {prog}, not in your input; please "
              "report it with the command line and the traceback above", file=out)
        return EXIT_INTERNAL
