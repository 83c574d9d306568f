"""Training that survives faults: SIGKILL + ``--resume auto`` (bitwise), SIGTERM (also under torchrun), NaN/inf,
bad videos and dying DataLoader workers, partial loads. Every run is a real one on tiny real mp4 files."""
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from pks4.cli import main
from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import load_config
from pks4.engine.loader import BatchStream
from pks4.engine.loop import Loop
from pks4.engine.runtime import TrainingError
from pks4.engine.train import build_trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 10 classes x 1 clip: 5 optimizer steps per epoch at batch 2
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=3, num_train_per_class=1, num_val_per_class=1,
                          num_frames=6, size=32)


def _argv(data, out, *extra, epochs=2, workers=0):
    """`pks4 train` flags of a run that exercises every RNG: random frame offsets, RandAugment, random erasing,
    mixup/cutmix, dropout, warm-up + cosine schedule, AdamW state."""
    sets = ["data.short_side=32", "train.deterministic=true", "train.mixup=0.8", "train.cutmix=1.0",
            "model.overrides.head_dropout=0.5", "train.save_every_steps=1", "train.keep_last=2",
            "train.log_every=1", "train.progress=false", "train.tensorboard=false", "eval.views=4x1x1",
            "optim.warmup_epochs=0.5", "optim.lr=0.05", "data.rand_augment=m5-n2", "data.random_erasing=0.25"]
    return ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--val-list", str(data.val),
            "--data-root", str(data.root), "--labels", str(data.labels), "--frames", "4", "--size", "32",
            "--epochs", str(epochs), "--batch-size", "2", "--workers", str(workers), "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def _cfg(data, out, *extra):
    return load_config(None, [
        f"data.root={data.root}", f"data.train={data.train}", f"data.labels={data.labels}", "data.val=",
        "data.num_frames=4", "data.size=32", "data.short_side=32", "model.name=pks4_vit_tiny", "train.epochs=1",
        "train.batch_size=2", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
        "train.deterministic=true", "optim.lr=0.01", "optim.warmup_epochs=0", f"out={out}", *extra])


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return ckpt.read_weights(run / "checkpoints" / f"step-{step:08d}" / ckpt.WEIGHTS_FILE)[0]


def _wait_for_step(proc, metrics: Path, step: int, timeout: float = 150.0) -> int:
    """Poll ``metrics.jsonl`` until a training row with ``step`` or later appears; return the step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()
                     if x.strip().endswith("}") and '"train"' in x]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.01)
    raise AssertionError(f"run ended or timed out before step {step}: {proc.poll()}")


def _bitwise_equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------------- SIGKILL, resume


def test_sigkill_at_random_step_then_resume_auto_is_bitwise_equal(data, tmp_path, capsys):
    # The reference: one uninterrupted run (in-process CLI).
    assert main(_argv(data, tmp_path / "ref")) == 0
    reference = _weights(tmp_path / "ref", 10)
    # The victim runs in its own process, loading with a worker, and is SIGKILLed at a random step (possibly
    # while it writes a checkpoint); it is resumed with `--resume auto` in the main process without workers.
    kill_at = random.Random(time.time_ns()).randint(1, 8)
    run = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "pks4.cli", *_argv(data, run, workers=1)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = _wait_for_step(proc, run / "metrics.jsonl", kill_at)
        proc.send_signal(signal.SIGKILL)
    finally:
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"kill_at={kill_at}: {out}"
    # A kill that lands while the first checkpoint is written leaves nothing valid: then the run starts over.
    resumable = ckpt.find_latest(run, log=lambda msg: None) is not None
    capsys.readouterr()
    assert main(_argv(data, run, "--resume", "auto")) == 0
    printed = capsys.readouterr()
    assert ("resumed from" in printed.out) == resumable, printed
    diff = _bitwise_equal(reference, _weights(run, 10))
    assert not diff, f"killed at step >= {kill_at} (seen {seen}): {len(diff)} tensors differ, e.g. {diff[:3]}"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000009", "step-00000010"]  # keep_last=2
    assert ckpt.verify_checkpoint(run / "checkpoints" / "best")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers swept


def test_resume_skips_a_truncated_newest_checkpoint_with_a_message(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert build_trainer(_cfg(data, run, "train.save_every_steps=1", "train.keep_last=3",
                        "train.stop_after_steps=3"), log=lambda m: None).fit().global_step == 3
    newest = run / "checkpoints" / "step-00000003" / ckpt.WEIGHTS_FILE
    newest.write_bytes(newest.read_bytes()[:1000])  # what a crash mid-write of a non-atomic save would leave
    (run / "checkpoints" / ".tmp-step-00000004-999999").mkdir()  # a save killed before its rename
    messages = []
    resumed = build_trainer(_cfg(data, run), resume="auto", log=messages.append)
    assert resumed.global_step == 2
    text = "\n".join(messages)
    assert "skipping checkpoint" in text and "step-00000003" in text and "truncated" in text
    assert not (run / "checkpoints" / ".tmp-step-00000004-999999").exists()


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_a_checkpoint_and_resume_continues(data, tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pks4.cli", *_argv(data, run, epochs=50)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(proc, run / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM" in out and "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    state = ckpt.verify_checkpoint(run / "checkpoints" / f"step-{step:08d}")
    assert state["global_step"] == step
    capsys.readouterr()
    assert main(_argv(data, run, "--resume", "auto", "--set", f"train.stop_after_steps={step + 1}", epochs=50)) == 0
    assert f"step {step})" in capsys.readouterr().out
    assert ckpt.verify_checkpoint(run / "checkpoints" / f"step-{step + 1:08d}")["global_step"] == step + 1


def test_sigterm_under_torchrun_two_processes_saves_a_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pks4.cli",
           *_argv(data, run, "--set", "train.save_every_steps=1000", epochs=50)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(proc, run / "metrics.jsonl", 1)
        proc.send_signal(signal.SIGTERM)  # to torchrun only: it forwards the signal to both workers
    finally:
        out, _ = proc.communicate(timeout=120)
    assert "interrupted at step" in out, out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    state = ckpt.verify_checkpoint(run / "checkpoints" / f"step-{step:08d}")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_step"] == step


# ------------------------------------------------------------------------------------------------ NaN


def _poison_grad_at(trainer: Loop, steps: set[int]) -> None:
    """Make the head's gradient NaN during the backward pass of the given optimizer steps (1-based)."""
    head = trainer.task.model.head.weight
    head.register_hook(lambda g: g * float("nan") if trainer.global_step + 1 in steps else g)


def test_non_finite_gradient_with_finite_loss_stops_naming_the_step(data, tmp_path):
    trainer = build_trainer(_cfg(data, tmp_path / "run"), log=lambda m: None)
    _poison_grad_at(trainer, {3})
    with pytest.raises(TrainingError, match=r"gradients are not finite at epoch 1, step 3 \(batch 3"):
        trainer.fit()


def test_nan_policy_skip_drops_the_update_and_goes_on(data, tmp_path):
    one = build_trainer(_cfg(data, tmp_path / "one", "train.stop_after_steps=1"), log=lambda m: None)
    one.fit()
    messages = []
    skipping = build_trainer(_cfg(data, tmp_path / "skip", "train.nan_policy=skip", "train.stop_after_steps=2"),
                       log=messages.append)
    _poison_grad_at(skipping, {2})
    result = skipping.fit()
    assert result.status == "stopped" and result.global_step == 2 and result.nan_skipped_steps == [2]
    a, b = one.task.model.state_dict(), skipping.task.model.state_dict()
    assert not _bitwise_equal(a, b)  # step 2 changed nothing
    assert any("step 2" in m and "update skipped" in m for m in messages)
    assert ckpt.read_state(result.checkpoint)["nan_skipped"] == [2]


def test_nan_policy_skip_still_stops_when_every_step_is_non_finite(data, tmp_path):
    trainer = build_trainer(_cfg(data, tmp_path / "run", "train.nan_policy=skip", "train.max_nan_skips=2",
                           "optim.lr=1e30"), log=lambda m: None)
    with pytest.raises(TrainingError, match=r"step 4 .*3 non-finite steps in a row"):
        trainer.fit()


# ---------------------------------------------------------------------------------------- bad videos


def test_skip_bad_videos_video_failing_mid_epoch_is_listed_at_the_end(data, tmp_path, capsys):
    good = (data.root / "train" / "moving_left" / "moving_left_000.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 3])  # exists, so it fails only when decoded
    train_list = tmp_path / "train.txt"
    train_list.write_text(data.train.read_text() + f"{tmp_path / 'cut.mp4'} 4\n")
    argv = _argv(data, tmp_path / "run", "--set", f"data.train={train_list}", epochs=1)
    capsys.readouterr()
    assert main(argv) == 2  # without the flag: one clear line naming the file
    assert "cut.mp4" in capsys.readouterr().err
    assert main(argv + ["--skip-bad-videos", "--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable video(s) skipped" in out and "cut.mp4" in out.split("skipped (also in")[1]
    assert "cut.mp4" in (tmp_path / "run2" / "skipped_videos.txt").read_text()


class _KillsItsWorker(Dataset):
    """The real training set, except that loading ``victim`` in a DataLoader worker SIGKILLs that worker (a
    decoder crash or the OOM killer); with ``once`` only the first time (a marker file remembers)."""

    def __init__(self, inner, victim: str, marker: Path | None) -> None:
        self.inner, self.victim, self.marker = inner, victim, marker

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        in_worker = torch.utils.data.get_worker_info() is not None
        if self.inner.samples[i].path == self.victim and in_worker:
            if self.marker is None or not self.marker.exists():
                if self.marker is not None:
                    self.marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[i]


def _with_killer(trainer: Loop, marker: Path | None) -> str:
    victim = trainer.task.train_set.samples[3].path
    trainer.task.train_set = _KillsItsWorker(trainer.task.train_set, victim, marker)
    return victim


def test_a_worker_killed_once_is_retried_and_nothing_is_lost(data, tmp_path, monkeypatch):
    extra = ("train.num_workers=2", "data.skip_bad_videos=true")
    plain = build_trainer(_cfg(data, tmp_path / "plain", *extra), log=lambda m: None)
    plain.fit()
    messages, left_running = [], []
    retry = BatchStream._retry

    def watched_retry(self, pos):
        # The failed loader is stopped before the retry: a sibling worker or an unreaped dead one left
        # behind would make torch's SIGCHLD check raise later, at a random line outside the training loop.
        left_running.extend(multiprocessing.active_children())
        return retry(self, pos)

    monkeypatch.setattr(BatchStream, "_retry", watched_retry)
    hit = build_trainer(_cfg(data, tmp_path / "hit", *extra), log=messages.append)
    _with_killer(hit, tmp_path / "marker")
    result = hit.fit()
    assert (tmp_path / "marker").exists() and any("DataLoader worker" in m for m in messages)
    assert result.status == "finished" and result.skipped == []
    assert left_running == [] and multiprocessing.active_children() == []
    torch._C._error_if_any_worker_fails()  # no dead worker is still registered with torch
    assert not _bitwise_equal(plain.task.model.state_dict(), hit.task.model.state_dict())


def test_a_run_stopped_on_the_retried_batch_gives_sigchld_back(data, tmp_path):
    # The retried batch is batch 1 here; stopping right after it closes the batch generator at that batch.
    hit = build_trainer(_cfg(data, tmp_path / "hit", "train.num_workers=2", "train.stop_after_steps=1"),
                  log=lambda m: None)
    _with_killer(hit, tmp_path / "marker")
    result = hit.fit()
    assert (tmp_path / "marker").exists() and result.status == "stopped" and result.global_step == 1
    # the step's deferral (which only notes the signal) must not outlive the run: torch's handler is back
    assert getattr(signal.getsignal(signal.SIGCHLD), "__name__", "") != "_note"


def test_a_batch_that_always_kills_its_worker_is_skipped_and_listed(data, tmp_path):
    trainer = build_trainer(_cfg(data, tmp_path / "run", "train.num_workers=1", "data.skip_bad_videos=true"),
                      log=lambda m: None)
    victim = _with_killer(trainer, None)
    result = trainer.fit()
    assert result.status == "finished" and result.global_step == 5
    assert any(victim in s and "worker died" in s for s in result.skipped) and len(result.skipped) == 2
    strict = build_trainer(_cfg(data, tmp_path / "strict", "train.num_workers=1"), log=lambda m: None)
    _with_killer(strict, None)
    with pytest.raises(TrainingError, match=r"worker died twice.*" + victim.replace(".", r"\.")):
        strict.fit()


# ------------------------------------------------------------------------------------ partial loading


def test_init_from_other_class_count_needs_partial_load_which_is_reported(data, tmp_path):
    from pks4.models.registry import create_model

    donor = create_model("pks4_vit_tiny", num_classes=3, image_size=32, num_frames=4)
    meta = {"model_name": donor.model_name, "model_config": {}, "classes": ["a", "b", "c"], "config": {}}
    path = ckpt.save_checkpoint(tmp_path / "donor", donor, {}, meta)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)head\.weight.*\(3, 128\).*\(10, 128\).*partial_load"):
        build_trainer(_cfg(data, tmp_path / "a", f"model.init_from={path}"), log=lambda m: None)
    messages = []
    trainer = build_trainer(_cfg(data, tmp_path / "b", f"model.init_from={path}", "model.partial_load=true"),
                      log=messages.append)
    assert "re-initialised (shape differs): head.bias (3,)->(10,), head.weight (3, 128)->(10, 128)" \
        in trainer.task.init_report
    assert any("partial load" in m for m in messages)
    mine, theirs = trainer.task.model.state_dict(), donor.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if not k.startswith("head."))
    other = create_model("vit_tiny_avgpool", num_classes=10, image_size=32, num_frames=4)
    path2 = ckpt.save_checkpoint(tmp_path / "other", other, {}, meta)
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys.*module\."):
        build_trainer(_cfg(data, tmp_path / "c", f"model.init_from={path2}"), log=lambda m: None)
