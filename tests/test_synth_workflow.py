"""benchmarks/pretrained_workflow.py: the tower's frames and labels, its OpenAI-layout file, and a fine-tuning start
that equals the tower."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from pks4.cli.training import recipe_path
from pks4.data.synth import KINDS
from pks4.engine.config import load_config
from pks4.engine.train import build_model

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))  # the script imports its sibling synth_family.py
_spec = importlib.util.spec_from_file_location("pretrained_workflow", _DIR / "pretrained_workflow.py")
workflow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(workflow)


def test_scene_frames_label_every_frame_of_every_pair():
    images, labels, names = workflow.scene_frames(2, seed=0, frames=8, size=64)
    scenes = sum(len(k.pairs) for k in KINDS.values())
    assert len(names) == scenes and names[0] == "classic/translate_x" and names[-1].startswith("dynamics/")
    assert images.shape == (scenes * 2 * 8, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels, torch.arange(scenes).repeat_interleave(16))


def test_shape_images_are_deterministic_and_label_what_one_image_shows():
    images, labels, names = workflow.shape_images(64, seed=0, size=64)
    again, same, _ = workflow.shape_images(64, seed=0, size=64)
    assert torch.equal(images, again) and torch.equal(labels, same)
    assert names == list(workflow.SHAPE_ATTRIBUTES)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (64, len(names))
    for k, count in enumerate(workflow.SHAPE_ATTRIBUTES.values()):
        assert 0 <= labels[:, k].min() and labels[:, k].max() < count
    assert len(labels[:, 0].unique()) > 3 and not torch.equal(images[0], images[1])


def test_a_tower_learns_several_attribute_columns_at_once():
    images, labels, _ = workflow.shape_images(256, seed=1, size=64)
    classes = list(workflow.SHAPE_ATTRIBUTES.values())
    tower, curve = workflow.train_tower((images, labels), (images, labels), classes, epochs=2, seed=0, augment=False)
    chance = 100.0 * sum(1 / c for c in classes) / len(classes)
    assert len(curve) == 2 and curve[-1] > chance


def test_tower_trains_and_its_file_starts_pks4_as_the_tower(tmp_path):
    images, labels, names = workflow.scene_frames(1, seed=1, frames=8, size=64)
    data = (images[:256], labels[:256])
    tower, curve = workflow.train_tower(data, data, [len(names)], epochs=1, seed=0)
    assert len(curve) == 1 and 0.0 <= curve[0] <= 100.0
    path = workflow.save_openai_layout(tower, tmp_path / "tower.pt")
    saved = torch.load(path, weights_only=True)
    assert "visual.conv1.weight" in saved and "visual.transformer.resblocks.2.mlp.c_proj.weight" in saved
    # zero-initialised residual projections: at step 0 the patch tokens leave the module as they entered, so
    # with the CLS route off (TokenT1D starts as a channel shift between frames) the model is the tower per frame
    sets = [f"model.overrides.pretrained={path}", "model.overrides.cls_route='none'"]
    model = build_model(load_config(recipe_path("tiny_finetune"), sets), num_classes=8).eval()
    clips = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        per_frame = tower.eval()(clips.flatten(0, 1)).view(2, 8, -1)
        torch.testing.assert_close(model.frame_features(clips), per_frame, rtol=1e-5, atol=1e-5)
    baseline = build_model(load_config(recipe_path("tiny_finetune"), [f"model.overrides.pretrained={path}",
                                                                          "model.name=vit_tiny_avgpool"]), 8).eval()
    with torch.no_grad():
        torch.testing.assert_close(baseline.forward_features(clips), per_frame.mean(1), rtol=1e-5, atol=1e-5)


def test_the_test_table_reads_a_runs_final_checkpoint_not_its_best(tmp_path):
    run = tmp_path / "run"
    for name in ("best", "step-00000500", "step-00001500", "step-00000625"):
        (run / "checkpoints" / name).mkdir(parents=True)
    assert workflow.final_checkpoint(run).name == "step-00001500"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no step checkpoint"):
        workflow.final_checkpoint(tmp_path / "empty")
