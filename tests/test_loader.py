"""Batches from plans through real DataLoader workers (pks4.engine.loader): a worker lost while its batch is
received, a hanging worker, the retry shared by training, evaluation and the protocols."""
from __future__ import annotations

import multiprocessing
import os
from multiprocessing.resource_sharer import DupFd
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from pks4.data.datasets import Sample
from pks4.data.items import Item
from pks4.engine.loader import BatchStream, LoaderOptions, ShardPlan, _worker_lost, sequential_stream
from pks4.engine.runtime import DistInfo, TrainingError


class Slow(Dataset):
    """Clip i is all i; in a worker, item ``victim`` takes ``delay`` seconds (once, if ``marker`` is given)."""

    def __init__(self, n: int = 8, victim: int = -1, delay: float = 0.0, marker: Path | None = None) -> None:
        self.n, self.victim, self.delay, self.marker = n, victim, delay, marker
        self.samples = [Sample(f"clip{i}.mp4", 0) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        if i == self.victim and torch.utils.data.get_worker_info() is not None:
            if self.marker is None or not self.marker.exists():
                if self.marker is not None:
                    self.marker.touch()
                time.sleep(self.delay)
        return Item(torch.full((2, 3, 8, 8), float(i)), i % 2, i)


class KillsItsWorker(Slow):
    """Loading ``victim`` in a worker kills that worker (every time, or once with a ``marker``)."""

    def __getitem__(self, i: int) -> Item:
        in_worker = torch.utils.data.get_worker_info() is not None
        if i == self.victim and in_worker and (self.marker is None or not self.marker.exists()):
            if self.marker is not None:
                self.marker.touch()
            os.kill(os.getpid(), 9)
        return super().__getitem__(i)


def _indices(stream) -> list[int]:
    return [i for batch in stream for i in (batch.index.tolist() if batch.index is not None else [])]


@pytest.mark.parametrize("exc, lost", [
    (RuntimeError("DataLoader worker (pid(s) 12) exited unexpectedly"), "DataLoader worker (pid(s) 12)"),
    (RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. "), "killed by signal"),
    (ConnectionResetError(104, "Connection reset by peer"), "lost while its batch was received (ConnectionReset"),
    (EOFError(), "lost while its batch was received (EOFError"),
    (BrokenPipeError(32, "Broken pipe"), "(BrokenPipeError"),
    (RuntimeError("DataLoader timed out after 5 seconds"), "a DataLoader worker hung (DataLoader timed out"),
    (EOFError("Caught EOFError in DataLoader worker process 0.\nOriginal Traceback"), None),
    (RuntimeError("shapes do not match"), None),
    (ValueError("DataLoader worker"), None),
])
def test_which_errors_mean_a_lost_worker(exc, lost):
    got = _worker_lost(exc)
    assert got is None if lost is None else lost in got


def test_a_worker_lost_while_its_batch_is_received_is_retried(monkeypatch):
    """The race behind a failed CI run: the worker dies while the main process receives a batch's shared memory,
    before torch has seen the worker exit, so the connection error reaches the loop as it is."""
    calls, detach = [], DupFd.detach

    def lost_once(self):  # where the main process fetches a batch tensor's file descriptor from its worker
        calls.append(1)
        if len(calls) == 7:  # inside the third batch received
            raise ConnectionResetError(104, "Connection reset by peer")
        return detach(self)

    monkeypatch.setattr(DupFd, "detach", lost_once)
    messages = []
    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]
    stream = BatchStream(Slow(), batches, LoaderOptions(workers=1), skip_bad=False, where="epoch 1",
                         log=messages.append)
    assert _indices(stream) == list(range(8))
    assert len(messages) == 1 and "epoch 1, batch 3: a DataLoader worker was lost while its batch was received " \
        "(ConnectionResetError" in messages[0] and "retrying that batch in a fresh worker" in messages[0]
    assert multiprocessing.active_children() == []


# A worker "hangs" when it sends nothing for HANG_TIMEOUT seconds; a hanging item sleeps HANG_DELAY. The timeout
# leaves a fresh worker seconds to start on a loaded machine; the sleep ends soon after, so stopping it is quick.
HANG_TIMEOUT, HANG_DELAY = 3.0, 5.0


def test_a_hanging_worker_is_detected_and_its_batch_retried(tmp_path):
    messages = []
    stream = BatchStream(Slow(victim=3, delay=HANG_DELAY, marker=tmp_path / "once"), [[0, 1], [2, 3], [4, 5]],
                         LoaderOptions(workers=1, timeout=HANG_TIMEOUT), skip_bad=False, where="the evaluation",
                         log=messages.append)
    assert _indices(stream) == list(range(6)) and (tmp_path / "once").exists()
    assert len(messages) == 1 and "the evaluation, batch 2: a DataLoader worker hung" in messages[0]
    assert multiprocessing.active_children() == []


def test_a_batch_that_hangs_twice_is_named(tmp_path):
    """(Skipping instead, with data.skip_bad_videos, is the path of a batch whose worker dies twice:
    test_reliability.py.)"""
    strict = BatchStream(Slow(victim=1, delay=HANG_DELAY), [[0, 1], [2, 3]],
                         LoaderOptions(workers=1, timeout=HANG_TIMEOUT), skip_bad=False, where="epoch 2",
                         log=lambda m: None, start=5)
    with pytest.raises(TrainingError, match=r"worker hung twice loading batch 6 of epoch 2, files: clip0.mp4, "
                                            r"clip1.mp4; remove them or set --skip-bad-videos"):
        list(strict)
    assert multiprocessing.active_children() == []


def test_a_lost_batch_in_skip_mode_lists_its_files(tmp_path):
    stream = BatchStream(KillsItsWorker(4, victim=1, marker=None), [[0, 1], [2, 3]], LoaderOptions(workers=1),
                         skip_bad=True, where="epoch 1", log=lambda m: None)
    batches = list(stream)
    assert [str(s) for s in batches[0].skipped] == ["clip0.mp4: a DataLoader worker died loading its batch",
                                                    "clip1.mp4: a DataLoader worker died loading its batch"]
    assert batches[0].video is None and batches[1].index.tolist() == [2, 3]




def test_evaluation_batches_survive_a_killed_worker(tmp_path):
    """Evaluation and the protocols read through the same stream as training."""
    from pks4.engine.infer import evaluate
    from pks4.models.registry import create_model

    model = create_model("pks4_vit_tiny", width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3,
                         image_size=8, patch_size=4, num_frames=2, num_classes=2).eval()
    messages = []
    stream = sequential_stream(KillsItsWorker(6, victim=2, marker=tmp_path / "once"), 2, LoaderOptions(workers=1),
                               skip_bad=False, log=messages.append)
    out = evaluate(model, stream)
    assert out.indices.tolist() == list(range(6)) and len(messages) == 1
    # which batch is lost depends on how far the worker got: the one it was making, or one still in its send queue
    assert messages[0].startswith("evaluation, batch ") and "DataLoader worker" in messages[0]


def test_shard_plan_splits_ranks_and_keeps_epochs_apart():
    ranks = [ShardPlan(10, DistInfo(rank=r, world_size=2), 2, shuffle=True, seed=3) for r in range(2)]
    assert [p.length(0) for p in ranks] == [2, 2]  # 5 clips per rank: two full batches, the last one dropped
    a, b = ranks[0].batches(0), ranks[1].batches(0)
    assert len(a) == 2 and not set(sum(a, [])) & set(sum(b, []))
    assert ranks[0].batches(1) != a and ranks[0].batches(0) == a
    tiny = ShardPlan(3, DistInfo(), 2, shuffle=False)
    assert tiny.batches(0) == [[0, 1], [2]]  # fewer than two batches: nothing dropped


def test_loader_timeout_is_checked_where_it_is_parsed():
    from pks4.engine.config import ConfigError, load_config

    assert load_config(None, []).train.loader_timeout == LoaderOptions().timeout == 600.0
    with pytest.raises(ConfigError, match=r"train.loader_timeout=-1.0; expected seconds >= 0"):
        load_config(None, ["train.loader_timeout=-1"])
