"""Host round-trips of a training run: how often the main process reads a tensor back (``aten._local_scalar_dense``,
what ``.item()``, ``float()`` and ``bool()`` of a tensor run), for runs of different lengths that log only at the end.

A run on the built-in benchmark (tiny PKS4, batch 2, 2 micro-batches per step, gradient clipping, weight average),
its clips decoded in one DataLoader worker, so only the training loop is counted. A loop without per-step
round-trips gives the same count at every length; the difference per extra step is what a GPU would wait for.

    .venv/bin/python benchmarks/host_syncs.py
    # the loop before the loop core, for comparison (its API had a Trainer class):
    git archive fe215d4 src | tar -x -C /tmp/before && PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/host_syncs.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pks4.data.synth import generate_synth
from pks4.engine.config import load_config


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _trainer(cfg):
    try:
        from pks4.engine.train import build_trainer
    except ImportError:  # the loop before the loop core
        from pks4.engine.train import Trainer as build_trainer
    return build_trainer(cfg, log=lambda msg: None)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synth(Path(tmp) / "s", seed=1, num_train_per_class=2, num_val_per_class=0, num_frames=4,
                              size=32)
        counts = {}
        for steps in (2, 4):
            cfg = load_config(None, [
                f"data.root={data.root}", f"data.train={data.train}", f"data.labels={data.labels}",
                "data.num_frames=4", "data.size=32", "data.short_side=32", "model.name=pks4_vit_tiny",
                "train.epochs=1", "train.batch_size=2", "train.accum_steps=2", "train.num_workers=1",
                "train.progress=false", "train.tensorboard=false", "optim.clip_grad=1.0", "train.ema_decay=0.9",
                f"train.log_every={steps}", f"train.stop_after_steps={steps}", f"out={Path(tmp) / str(steps)}"])
            trainer = _trainer(cfg)
            with Count() as counter:
                trainer.fit()
            counts[steps] = counter.calls
            print(f"{steps} optimizer steps of 2 micro-batches, logging at the last: {counter.calls} host round-trips")
        print(f"per extra optimizer step: {(counts[4] - counts[2]) / 2:g}")


if __name__ == "__main__":
    main()
