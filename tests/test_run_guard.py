"""Runs are never lost, through the real command line: a second training into a run directory is refused (or
moves the old run aside with --overwrite), two processes on one directory (the second refuses, naming the first),
a killed training's lock taken over by the next, `pks4 demo` stopped by a real signal (no report from partial runs,
a resume hint, then --resume finishes it), and a run trained with relative paths evaluated from another folder."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pks4.cli import main
from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.rundir import LOCK_FILE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=5, num_train_per_class=1, num_val_per_class=1,
                          num_frames=6, size=32)


def _train(data, out, *extra, epochs=1):
    return ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--val-list", str(data.val),
            "--data-root", str(data.root), "--labels", str(data.labels), "--frames", "4", "--size", "32",
            "--epochs", str(epochs), "--batch-size", "2", "--workers", "0", "--out", str(out),
            "--set", "data.short_side=32", "--set", "train.progress=false", "--set", "train.tensorboard=false",
            "--set", "train.log_every=1", "--set", "eval.views=4x1x1", *extra]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pks4.cli", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(proc: subprocess.Popen, metrics: list[Path], timeout: float = 240.0) -> None:
    """Until every file of ``metrics`` holds a training row (the run is past its set-up and lock)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if all(m.is_file() and '"train"' in m.read_text() for m in metrics):
            return
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    raise AssertionError(f"no training row in {metrics} (exit {proc.poll()}): {out}")


# ---------------------------------------------------------------------------------------- an earlier run


def test_a_second_training_is_refused_and_overwrite_moves_the_first_aside(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train(data, run)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_train(data, run)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert _snapshot(run) == before  # best/, every checkpoint and the metrics untouched
    assert main(_train(data, run, "--overwrite")) == 0
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and _snapshot(old[0]) == before
    assert "moved aside to" in capsys.readouterr().out
    assert ckpt.verify_checkpoint(run / "checkpoints" / "best")  # the new run is complete too
    assert main(_train(data, run, "--resume", "auto", "--epochs", "2")) == 0  # and --resume auto continues it


# ---------------------------------------------------------------------------------------- two processes


def test_two_trainings_on_one_folder_the_second_refuses_naming_the_first(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = _start(_train(data, run, epochs=500))
    try:
        _wait_for_rows(first, [run / "metrics.jsonl"])
        second = subprocess.run([sys.executable, "-m", "pks4.cli", *_train(data, run, "--resume", "auto")],
                                env=ENV, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by another pks4 process (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 128 + signal.SIGTERM, out  # the first run went on, then saved as asked
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert ckpt.verify_checkpoint(run / "checkpoints" / f"step-{step:08d}")["global_step"] == step


def test_the_lock_of_a_killed_training_is_taken_over_by_the_next(data, tmp_path, capsys):
    run = tmp_path / "run"
    victim = _start(_train(data, run, "--set", "train.save_every_steps=1", epochs=500))
    try:
        _wait_for_rows(victim, [run / "metrics.jsonl"])
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.communicate(timeout=60)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == victim.pid  # the dead holder is still named
    capsys.readouterr()
    assert main(_train(data, run, "--resume", "auto", "--set", "train.save_every_steps=1", epochs=1)) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock left by pid {victim.pid}" in out and "killed or crashed" in out
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly at the end


# ------------------------------------------------------------------------------------------ the demo


def _demo(out: Path, *extra: str) -> list[str]:
    sets = ["synth.num_train_per_class=2", "synth.num_val_per_class=1", "synth.num_frames=8", "synth.size=32",
            "run.train.epochs=400", "run.train.progress=false", "run.train.log_every=1", "run.eval.views=4x1x1",
            "run.data.num_frames=4", "run.train.batch_size=4", *extra]
    return ["demo", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow
@pytest.mark.parametrize("sig, parallel", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_interrupting_the_demo_stops_it_all_after_saving_then_resume_finishes(tmp_path, capsys, sig, parallel):
    out = tmp_path / "demo"
    keys = ("pks4", "baseline") if parallel else ("pks4",)
    proc = _start(_demo(out, f"parallel={str(parallel).lower()}"))
    try:
        _wait_for_rows(proc, [out / k / "metrics.jsonl" for k in keys])
        proc.send_signal(sig)  # to the demo's own process only, as `kill` or a cluster would
        text = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, text
    assert f"continue it with `pks4 demo --out {out} --resume`" in text.lower() and "Traceback" not in text
    assert json.loads(text.strip().splitlines()[-1])["status"] == "interrupted"
    assert not (out / "report.json").exists() and not (out / "report.md").exists()  # no report from partial runs
    for key in keys:
        assert ckpt.find_latest(out / key, log=lambda m: None) is not None, key  # each training saved first
    if not parallel:
        assert not (out / "baseline").exists()  # the next model never started
    capsys.readouterr()
    steps = {k: ckpt.read_state(ckpt.find_latest(out / k, log=lambda m: None))["global_step"] for k in keys}
    assert main(_demo(out, f"run.train.stop_after_steps={max(steps.values()) + 1}")) == 2  # no silent restart
    assert "--resume" in capsys.readouterr().err
    assert main([*_demo(out, f"run.train.stop_after_steps={max(steps.values()) + 1}"), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pks4"]["samples"] == 10 and report["baseline"]["samples"] == 10


# ---------------------------------------------------------------------------------------- relative paths


def test_a_run_trained_with_relative_paths_evaluates_from_another_folder(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(data.root)  # every path relative, as a user in the dataset's folder types them
    run = tmp_path / "run"
    argv = _train(data, run)
    for flag, value in (("--train-list", "train.txt"), ("--val-list", "val.txt"), ("--data-root", "."),
                        ("--labels", "classes.txt")):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 0
    stored = ckpt.read_weights(run / "checkpoints" / "best" / ckpt.WEIGHTS_FILE)[1]["config"]["data"]
    assert all(Path(stored[k]).is_absolute() for k in ("root", "train", "val", "labels")), stored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--json", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 10
    # --val-list and --data-root given now win: the same clips under another root, listed relative to it
    moved = tmp_path / "moved"
    shutil.copytree(data.root / "val", moved / "clips" / "val")
    (moved / "list.txt").write_text(data.val.read_text())
    assert main(["eval", "--checkpoint", str(run), "--json", "--workers", "0", "--val-list",
                 str(moved / "list.txt"), "--data-root", str(moved / "clips")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 10
    assert main(["eval", "--checkpoint", str(run), "--workers", "0", "--data-root", str(elsewhere)]) == 2
    assert "10 of 10 listed videos are missing" in capsys.readouterr().err  # the root given was the one used
