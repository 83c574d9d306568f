"""Tiny trained-model stand-ins, videos and fixtures shared by the API, timeline and web-page tests.

A "run" here is a real run directory layout (``checkpoints/best`` written by ``save_checkpoint``, a
``metrics.jsonl``) around a tiny PKS4 with seeded random weights: loading, saving and the inference path are
what these tests check, not accuracy, so no training is needed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pks4.data.datasets import DataConfig
from pks4.data.synth import ENCODER_OPTIONS, generate_synth, write_video
from pks4.data.video import read_frames
from pks4.engine.checkpoint import save_checkpoint
from pks4.engine.config import EvalConfig, ModelConfig, RunConfig, config_to_dict
from pks4.models.registry import create_model

TINY = dict(image_size=32, patch_size=8, width=32, heads=2, layers=2, output_dim=32, insert_layer=1)
FPS = 8.0  # the built-in benchmark's frame rate
# val top-1 rows a run's metrics.jsonl holds; the model card must report the best one (epoch 2)
METRIC_ROWS = [{"kind": "val", "step": 10, "epoch": 1, "samples": 10, "top1": 40.0, "top5": 90.0},
               {"kind": "val", "step": 20, "epoch": 2, "samples": 10, "top1": 60.0, "top5": 100.0},
               {"kind": "val", "step": 30, "epoch": 3, "samples": 10, "top1": 50.0, "top5": 100.0}]


def synth(root: Path):
    """One 16-frame 32 px validation clip per class of the built-in benchmark."""
    return generate_synth(root, seed=3, num_train_per_class=0, num_val_per_class=1, num_frames=16, size=32)


def val_videos(splits) -> list[str]:
    return [str(splits.root / line.split()[0]) for line in splits.val.read_text().splitlines()]


def tiny_run(run: Path, splits, views: str = "8x2x1") -> Path:
    """A run directory holding a seeded tiny PKS4 for the benchmark's 10 classes, as ``pks4 train`` lays it out."""
    torch.manual_seed(0)
    model = create_model("pks4_vit_tiny", num_classes=splits.num_classes, **TINY).eval()
    data = DataConfig(format="list", root=str(splits.root), val=str(splits.val), labels=str(splits.labels),
                      num_frames=8, size=32, short_side=32, flip="off")
    cfg = RunConfig(model=ModelConfig(name="pks4_vit_tiny", overrides=dict(TINY)), data=data,
                    eval=EvalConfig(views=views), out=str(run))
    meta = {"model_name": model.model_name, "model_config": dataclasses.asdict(model.config),
            "classes": splits.labels.read_text().split(), "config": config_to_dict(cfg)}
    save_checkpoint(run / "checkpoints" / "best", model, {"global_step": 30}, meta)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRIC_ROWS))
    return run


def concat_videos(videos: list[str], out: Path, frames_each: int = 16) -> Path:
    """The first ``frames_each`` frames of each video, one after the other, as one mp4 at the benchmark's rate."""
    frames = np.concatenate([read_frames(v, range(frames_each)).numpy() for v in videos])
    return write_video(out, frames, FPS, crf=None, options=ENCODER_OPTIONS)


# ---- module-scoped fixtures; a test module imports the ones it uses --------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"), data)


@pytest.fixture(scope="module")
def clf(run):
    import pks4

    return pks4.VideoClassifier.from_pretrained(run, device="cpu")


@pytest.fixture(scope="module")
def long_video(data, tmp_path_factory):
    """Six clips of six classes, 16 frames each: 96 frames, 12 s at 8 fps."""
    return concat_videos(val_videos(data)[:6], tmp_path_factory.mktemp("long") / "six.mp4")
