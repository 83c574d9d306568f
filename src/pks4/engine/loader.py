"""Batches for every loop of the engine (training, pretraining, evaluation, the protocols), from a plan that is a
pure function of (seed, epoch), surviving DataLoader workers that die or hang.

An epoch is planned up front as a list of batches of dataset keys (:class:`ShardPlan` for plain batches,
:class:`FlexPlan` for StretchySnake's sampled shapes), so a resume can start at any batch and a lost batch can be
loaded again on its own. :class:`BatchStream` iterates such a list through a DataLoader:

* a worker killed while it makes a batch (the OOM killer, a decoder crash), also while the main process is
  receiving that batch (``ConnectionResetError``, ``EOFError``, ``BrokenPipeError``), or a worker that sends
  nothing for ``timeout`` seconds, costs one retry: the failed loader is stopped, its batch is loaded again
  alone in one fresh worker, and a new loader goes on from the next batch, in the same order;
* if the retry fails too, the batch's files are reported as skipped (``skip_bad``) or named in a
  :class:`~pks4.engine.runtime.TrainingError`;
* a :class:`~pks4.data.items.Skipped` item ends the pass with a DataError naming the file, unless ``skip_bad``.
"""
from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pks4.data.flex_sampler import FlexBatchSampler, FlexDataset
from pks4.data.items import Batch, Skipped, collate
from pks4.engine.runtime import DistInfo, TrainingError

__all__ = ["item_seed", "SeededItems", "ShardPlan", "FlexPlan", "LoaderOptions", "BatchStream", "sequential_stream"]

Log = Callable[[str], None]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one training item: a function of (run seed, epoch, dataset index) only."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


def _key_index(key: Any) -> int:
    return int(getattr(key, "index", key))  # a FlexKey (index at a shape) or a plain index


class SeededItems(Dataset):
    """Each item's random frame offsets and augmentation draw from :func:`item_seed` inside a forked RNG, never
    from the process RNG: the same clip comes out in the main process or in any worker, before or after a
    resume, and loading does not shift the RNG that dropout and mixup use."""

    def __init__(self, inner: Dataset, seed: int, epoch: int) -> None:
        self.inner, self.seed, self.epoch = inner, seed, epoch

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def samples(self) -> Any:
        return getattr(self.inner, "samples", None)

    def __getitem__(self, key: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also (re)seed every accelerator, outside what
            # fork_rng restores, and costs more than a millisecond per item. A FlexKey keeps one seed per item
            # at every sampled shape.
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, _key_index(key)))
            return self.inner[key]


# ---- plans: the batches of an epoch -------------------------------------------------------------------------------
class ShardPlan:
    """Batches of ``batch_size`` over this rank's shard (DistributedSampler order, reshuffled per epoch with
    ``shuffle``). ``drop_last`` None: drop the last, smaller batch unless the shard is tiny (< 2 batches)."""

    def __init__(self, n: int, dist_info: DistInfo, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool | None = None) -> None:
        self.sampler = DistributedSampler(range(n), num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        shard = len(self.sampler)
        self.drop_last = shard >= 2 * batch_size if drop_last is None else drop_last
        self.shard = shard

    def length(self, epoch: int) -> int:
        """Batches per epoch (the same in every epoch)."""
        return self.shard // self.batch_size if self.drop_last else math.ceil(self.shard / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order, bs = list(self.sampler), self.batch_size
        return [order[i:i + bs] for i in range(0, self.length(epoch) * bs, bs)]

    def wrap(self, dataset: Dataset) -> Dataset:
        return dataset


class FlexPlan:
    """StretchySnake batches (:class:`~pks4.data.flex_sampler.FlexBatchSampler`): one sampled shape per batch,
    so epochs differ in length; every epoch is a pure function of (seed, epoch)."""

    def __init__(self, sampler: FlexBatchSampler) -> None:
        self.sampler = sampler

    def length(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch))

    def batches(self, epoch: int) -> list[list[Any]]:
        return self.sampler.batches(epoch)

    def wrap(self, dataset: Dataset) -> Dataset:
        return FlexDataset(dataset)


# ---- streaming them -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoaderOptions:
    """How batches are loaded: worker processes, the seconds one batch may take in a worker before the worker
    counts as hung (0 = wait forever; the default is ``train.loader_timeout``'s), page-locked memory for a fast
    copy to the GPU."""

    workers: int = 0
    timeout: float = 600.0
    pin_memory: bool = False


class _DeferSigchld:
    """Keep a dying DataLoader worker from interrupting an optimizer step half-way.

    torch reports a killed worker from its SIGCHLD handler, i.e. at whatever line the main thread is running,
    possibly inside ``optimizer.step()``. While the loop computes, the signal is only noted; torch's handler
    gets it when the next batch is fetched, where the error is caught and the batch retried.
    """

    def __init__(self, workers: bool) -> None:
        self.saved: Any = None
        self.pending: tuple[int, Any] | None = None
        self.active = workers and threading.current_thread() is threading.main_thread()

    def computing(self) -> None:
        if self.active:
            self.saved = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def fetching(self, replay: bool = True) -> None:
        if not self.active or self.saved is None:
            return
        handler, self.saved = self.saved, None
        signal.signal(signal.SIGCHLD, handler)
        pending, self.pending = self.pending, None
        if replay and pending is not None and callable(handler):
            handler(*pending)


def _shut_down(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers now and reap them, dead ones included.

    Left to the garbage collector, a loader whose worker was killed keeps that worker registered with torch's
    SIGCHLD check; the next child to exit anywhere in the process (a later loader's worker) then makes torch
    raise "DataLoader worker ... killed" at whatever line is running, outside any handler. torch has no public
    call for this; ``_shutdown_workers`` is what its iterator runs when exhausted or deleted.
    """
    stop = getattr(batches, "_shutdown_workers", None)  # absent with num_workers=0: nothing to stop
    if stop is not None:
        stop()


# A worker killed while the main process unpickles its batch breaks the connection that hands over the batch's
# shared memory; torch re-raises that error as it is when it has not yet seen the worker die.
_CONNECTION_LOST = (ConnectionError, EOFError)


def _worker_lost(exc: BaseException) -> str | None:
    """What happened to the worker, or None when ``exc`` is not about a lost worker."""
    text = str(exc)
    if "in DataLoader worker process" in text:  # the dataset's own exception, re-raised from a worker
        return None
    if isinstance(exc, RuntimeError) and "DataLoader timed out" in text:
        return f"a DataLoader worker hung ({text})"
    if isinstance(exc, RuntimeError) and "DataLoader worker" in text:
        return text
    if isinstance(exc, _CONNECTION_LOST):
        return f"a DataLoader worker was lost while its batch was received ({type(exc).__name__}: {text})"
    return None


def _sample_path(dataset: Dataset, key: Any) -> str:
    samples = getattr(dataset, "samples", None)
    return str(samples[_key_index(key)].path) if samples is not None else f"item {_key_index(key)}"


class BatchStream:
    """The batches ``batches`` (lists of keys of ``dataset``) as :class:`~pks4.data.items.Batch` objects, in
    order, surviving dead and hanging workers (see the module docstring). ``start`` numbers the first batch in
    messages (a resumed epoch); ``where`` names the pass ("epoch 3", "evaluation")."""

    def __init__(self, dataset: Dataset, batches: Sequence[list[Any]], options: LoaderOptions, *,
                 skip_bad: bool, where: str, log: Log = print, start: int = 0, seed: int = 0) -> None:
        self.dataset, self.batches, self.options = dataset, list(batches), options
        self.skip_bad, self.where, self.log, self.start, self.seed = skip_bad, where, log, start, seed

    def __len__(self) -> int:
        return len(self.batches)

    def _loader(self, batches: Sequence[list[Any]], workers: int) -> DataLoader:
        # A private generator: creating a loader must not draw from the global RNG, or resuming mid-epoch would
        # shift every random number after it.
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                          pin_memory=self.options.pin_memory, timeout=self.options.timeout if workers else 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def _checked(self, batch: Batch) -> Batch:
        return batch if self.skip_bad else batch.raise_skipped()

    def __iter__(self) -> Iterator[Batch]:
        guard, pos, end = _DeferSigchld(self.options.workers > 0), 0, object()
        while pos < len(self.batches):
            loader_iter = iter(self._loader(self.batches[pos:], self.options.workers))
            try:
                while True:
                    guard.fetching()
                    batch = next(loader_iter, end)
                    if batch is end:
                        return
                    guard.computing()
                    yield self._checked(batch)
                    pos += 1
            except Exception as exc:  # noqa: BLE001 - a lost worker is retried, anything else re-raised
                lost = _worker_lost(exc) if self.options.workers else None
                if lost is None:
                    raise
            finally:
                guard.fetching(replay=False)
                _shut_down(loader_iter)
            self.log(f"{self.where}, batch {self.start + pos + 1}: {lost}; retrying that batch in a fresh worker")
            retried = self._retry(pos)
            guard.computing()
            try:
                yield self._checked(retried)
            finally:  # also when the consumer stops on this batch: torch's handler must come back
                guard.fetching(replay=False)
            pos += 1

    def _retry(self, pos: int) -> Batch:
        """Batch ``pos`` alone in one fresh worker; its files reported (or named in an error) if that fails too."""
        loader_iter = iter(self._loader([self.batches[pos]], 1))
        try:
            return next(loader_iter)
        except Exception as exc:  # noqa: BLE001 - as in __iter__
            lost = _worker_lost(exc)
            if lost is None:
                raise
        finally:
            _shut_down(loader_iter)
        what = "hung" if lost.startswith("a DataLoader worker hung") else "died"
        files = [_sample_path(self.dataset, key) for key in self.batches[pos]]
        if not self.skip_bad:
            raise TrainingError(f"a DataLoader worker {what} twice loading batch {self.start + pos + 1} of "
                                f"{self.where}, files: {', '.join(files)}; remove them or set --skip-bad-videos "
                                "(data.skip_bad_videos=true) to skip them")
        reason = f"a DataLoader worker {what} loading its batch"
        return Batch(None, None, None, [Skipped(f, reason) for f in files])


def sequential_stream(dataset: Dataset, batch_size: int, options: LoaderOptions, *, skip_bad: bool,
                      where: str = "evaluation", log: Log = print) -> BatchStream:
    """Every item of ``dataset`` once, in order, ``batch_size`` at a time (evaluation and feature extraction)."""
    keys = list(range(len(dataset)))
    return BatchStream(dataset, [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)], options,
                       skip_bad=skip_bad, where=where, log=log)
