"""The run-directory guard: an earlier run is never overwritten (refused, or moved aside with --overwrite), one
process per run directory (a lock naming its holder; a dead holder's lock is taken over), the destination is
checked before any work, and a write that fails (a file-size limit the kernel enforces) leaves no temporary
file and keeps the last good checkpoint."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pks4.engine import checkpoint as ckpt
from pks4.engine.rundir import (LOCK_FILE, RunDirError, RunLock, atomic_write_text, check_destination,
                                checkpoint_bytes, prepare_run_dir, run_markers)
from pks4.errors import user_message

ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _a_run(path: Path) -> Path:
    """What `pks4 train --out path` leaves: its config, its metrics and a checkpoint folder."""
    (path / "checkpoints" / "step-00000010").mkdir(parents=True)
    (path / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"weights")
    (path / "config.yaml").write_text("train: {epochs: 3}\n")
    (path / "metrics.jsonl").write_text('{"step": 10}\n')
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


# ------------------------------------------------------------------------------------- an earlier run


def test_a_folder_holding_a_run_is_refused_and_left_as_it_is(tmp_path):
    run = _a_run(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(run)
    text = str(err.value)
    for words in ("already holds a run", "checkpoints/", "metrics.jsonl", "config.yaml", "--resume auto",
                  "another --out", "--overwrite", "run.old-", "nothing is deleted"):
        assert words in text, text
    assert _snapshot(run) == before
    assert RunLock(run).acquire().release() is None  # the refusal released its lock


def test_resume_continues_the_run_in_place(tmp_path):
    run = _a_run(tmp_path / "run")
    before = _snapshot(run)
    lock = prepare_run_dir(run, resume="auto")
    assert lock.held and _snapshot(run) == before
    lock.release()


def test_overwrite_moves_the_old_run_aside_never_deletes_it(tmp_path):
    run = _a_run(tmp_path / "run")
    before = _snapshot(run)
    messages = []
    lock = prepare_run_dir(run, overwrite=True, log=messages.append)
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and _snapshot(old[0]) == before  # every file of the old run, byte for byte
    assert not (old[0] / LOCK_FILE).exists()
    assert run_markers(run) == [] and [p.name for p in run.iterdir()] == [LOCK_FILE] and lock.held
    assert any("moved aside to" in m and str(old[0]) in m for m in messages)
    lock.release()
    # a second overwrite (possibly within the same second) finds a free name of its own
    _a_run(run)
    prepare_run_dir(run, overwrite=True, log=messages.append).release()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 2


@pytest.mark.parametrize("content", ["nothing", "unrelated files", "an empty checkpoints folder"])
def test_a_folder_without_a_run_is_used(tmp_path, content):
    out = tmp_path / "out"
    if content != "nothing":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        if content == "an empty checkpoints folder":
            (out / "checkpoints").mkdir()
    prepare_run_dir(out).release()
    assert out.is_dir()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunDirError, match="give only one"):
        prepare_run_dir(tmp_path / "run", resume="auto", overwrite=True)


# ---------------------------------------------------------------------------------------- the destination


def test_out_naming_a_file_or_a_path_through_a_file(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n")
    with pytest.raises(RunDirError, match=r"results\.csv: is a file, not a folder"):
        check_destination(tmp_path / "results.csv")
    with pytest.raises(RunDirError, match=r"results\.csv/run: a part of the path is not a directory"):
        check_destination(tmp_path / "results.csv" / "run")


def test_not_enough_free_space_is_refused_before_any_work(tmp_path):
    with pytest.raises(RunDirError, match=r"GiB free on its disk, a run there needs about .* GiB"):
        check_destination(tmp_path / "run", need_bytes=2**62)
    assert checkpoint_bytes(1_000_000, keep_last=2) == 48_000_000  # 12 B per parameter x (2 kept + best + new)


@contextlib.contextmanager
def _as_nobody():
    """Root writes anywhere; run the block as an unprivileged user when this test runs as root."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_folder_without_write_permission():
    base = Path(tempfile.mkdtemp(prefix="pks4-perm-"))  # outside pytest's private (0700) folders
    locked, run = base / "locked", base / "locked" / "run"
    try:
        base.chmod(0o755)
        run.mkdir(parents=True)
        run.chmod(0o555)
        locked.chmod(0o555)
        with _as_nobody(), pytest.raises(RunDirError, match=r"locked/new: permission denied") as err:
            check_destination(locked / "new")
        assert user_message(err.value).startswith("cannot create the run directory")
        with _as_nobody(), pytest.raises(RunDirError, match=r"locked/run: cannot write into the run directory: "
                                                            "permission denied"):
            check_destination(run)
    finally:
        locked.chmod(0o755)
        run.chmod(0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------------------------------------- the lock


_HOLDER = textwrap.dedent("""
    import sys, time
    from pks4.engine.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def _holder(out: Path):
    """Another process holding the lock of ``out`` until the block ends (then SIGKILLed, as a crash)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with _holder(out) as proc:
        with pytest.raises(RunDirError) as err:
            prepare_run_dir(out)
        text = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in text and "in use by another pks4 process" in text
        assert "another --out" in text
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid and holder["command"].endswith(str(out))


def test_the_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with _holder(out) as proc:
        dead = proc.pid
    assert proc.returncode == -signal.SIGKILL
    messages = []
    lock = prepare_run_dir(out, log=messages.append)
    assert lock.previous["pid"] == dead
    assert any(f"taking over the lock left by pid {dead}" in m and "killed or crashed" in m for m in messages)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / LOCK_FILE).read_text() == ""  # a clean release: the next holder has nothing to report
    messages.clear()
    prepare_run_dir(out, log=messages.append).release()
    assert messages == []


def test_one_process_cannot_hold_a_run_twice(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path) as again:
        assert again.held
    assert not again.held


# ------------------------------------------------------------------------------------- failing writes

# The child process runs with RLIMIT_FSIZE: the kernel refuses to grow any file past the limit (EFBIG), a real
# failing write at the point where a full disk fails (ENOSPC), through Python's, torch's and safetensors' own
# write paths. SIGXFSZ is ignored, so the write returns the error instead of killing the process.
_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    from pks4.errors import user_message
    try:
        {action}
    except Exception as exc:
        print("ERROR", type(exc).__name__, user_message(exc))
        sys.exit(2)
    print("OK")
""")


def _run_limited(action: str, *args: str) -> str:
    code = _LIMITED.replace("{action}", textwrap.indent(textwrap.dedent(action), "    ").strip())
    proc = subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_a_failing_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "report.md", "the old report\n")
    out = _run_limited("""
        from pks4.engine.rundir import atomic_write_text
        atomic_write_text(sys.argv[1], "x" * 1_000_000)
    """, str(target))
    assert "ERROR RunDirError" in out and "report.md: could not write the file" in out, out
    assert "file too large" in out and "temporary copy was removed" in out
    assert target.read_text() == "the old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def _save(run: Path, step: int, width: int, state_floats: int = 0) -> Path:
    model = nn.Linear(width, 10)
    state = {"global_step": step, "extra": torch.zeros(state_floats)}
    meta = {"model_name": "linear", "model_config": {}, "classes": [], "config": {}}
    return ckpt.save_checkpoint(run / "checkpoints" / f"step-{step:08d}", model, state, meta)


@pytest.mark.parametrize("width, state_floats", [(20_000, 0), (10, 200_000)], ids=["weights", "state"])
def test_a_failing_checkpoint_write_keeps_the_last_good_checkpoint(tmp_path, width, state_floats):
    run = tmp_path / "run"
    good = _save(run, 1, 10)
    out = _run_limited(f"""
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_rundir import _save
        _save(Path(sys.argv[1]), 2, {width}, {state_floats})
    """, str(run))
    assert "ERROR CheckpointError" in out and "step-00000002: could not write the checkpoint" in out, out
    assert "file too large" in out, out  # the reason, found under safetensors' or torch's own error
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]  # no .tmp-* left
    assert ckpt.verify_checkpoint(good)["global_step"] == 1
    assert ckpt.find_latest(run) == good
