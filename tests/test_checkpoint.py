"""Checkpoints: atomic writes, safe loading, truncation fallback, model rebuild, bitwise resume."""
import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import config_to_dict, load_config
from pks4.engine.train import build_trainer
from pks4.models.registry import create_model


def _model(num_classes=3):
    return create_model("pks4_vit_tiny", num_classes=num_classes, image_size=32)


def _meta(model, classes=("a", "b", "c")):
    return {"model_name": model.model_name, "model_config": dataclasses.asdict(model.config),
            "classes": list(classes), "config": config_to_dict(load_config(None, ["train.epochs=3"]))}


def _save(run, step, model, **state):
    return ckpt.save_checkpoint(run / "checkpoints" / f"step-{step:08d}", model, {"step": step, **state},
                                _meta(model))


def test_save_load_round_trip_rebuilds_model(tmp_path):
    model = _model().eval()
    path = _save(tmp_path, 3, model)
    assert sorted(p.name for p in path.iterdir()) == sorted([ckpt.STATE_FILE, ckpt.WEIGHTS_FILE])
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    for where in (path, path / ckpt.WEIGHTS_FILE, tmp_path):  # checkpoint dir, weights file, run dir
        loaded, cfg, classes = ckpt.load_model_from_checkpoint(where)
        assert classes == ["a", "b", "c"] and cfg.train.epochs == 3
        x = torch.randn(1, 4, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert ckpt.verify_checkpoint(path)["step"] == 3


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_wrong_architecture_or_class_count_is_named(tmp_path):
    path = _save(tmp_path, 1, _model(num_classes=3))
    tensors, _ = ckpt.read_weights(path / ckpt.WEIGHTS_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)ck.*shape mismatch.*head\.weight.*\(3, 128\).*\(5, 128\)"):
        ckpt.load_weights_into(_model(num_classes=5), tensors, "ck")
    other = create_model("pks4_vit_tiny", num_classes=3, image_size=32, use_module=False)
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys.*module\."):
        ckpt.load_weights_into(other, tensors, "ck")


def test_truncated_checkpoint_is_skipped_with_message(tmp_path):
    model = _model()
    _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    weights = newest / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    messages = []
    assert ckpt.find_latest(tmp_path, log=messages.append).name == "step-00000001"
    assert "step-00000002" in messages[0] and "truncated" in messages[0]
    state = newest / ckpt.STATE_FILE  # a truncated state file is caught too
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.read_state(newest)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    path = _save(tmp_path, 1, model, tag="old")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError):
        _save(tmp_path, 1, model, tag="new")
    assert ckpt.verify_checkpoint(path)["tag"] == "old"
    assert ckpt.list_checkpoints(tmp_path) == [path]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    path = _save(tmp_path, 1, _model())
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": _Evil(str(marker))}, path / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.read_state(path)
    assert not marker.exists()


def test_keep_last_and_best(tmp_path):
    model = _model()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model)
    ckpt.save_best(tmp_path, tmp_path / "checkpoints" / "step-00000002")
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "best")["step"] == 2
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best" / ckpt.WEIGHTS_FILE
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.resolve_checkpoint(tmp_path / "nope")


def _tiny_cfg(data, out, *extra):
    return load_config(None, [
        f"data.root={data.root}", f"data.train={data.train}", f"data.labels={data.labels}", "data.val=",
        "data.num_frames=4", "data.size=32", "data.short_side=32", "data.flip=off", "model.name=pks4_vit_tiny",
        "train.epochs=1", "train.batch_size=4", "train.num_workers=0", "train.progress=false",
        "train.tensorboard=false", "train.deterministic=true", "train.mixup=0.8", "train.cutmix=1.0",
        "model.overrides.head_dropout=0.5", "optim.warmup_epochs=0.5", "optim.lr=0.05", f"out={out}", *extra])


def test_resume_mid_epoch_is_bitwise_equal(tmp_path):
    data = generate_synth(tmp_path / "data", seed=0, num_train_per_class=2, num_val_per_class=1, num_frames=4,
                          size=32)
    straight = build_trainer(_tiny_cfg(data, tmp_path / "a", "train.stop_after_steps=4"), log=lambda m: None)
    assert straight.fit().status == "stopped"
    first = build_trainer(_tiny_cfg(data, tmp_path / "b", "train.stop_after_steps=2"), log=lambda m: None)
    assert first.fit().global_step == 2
    torch.manual_seed(123)  # a different RNG state before resuming must not matter
    resumed = build_trainer(_tiny_cfg(data, tmp_path / "b", "train.stop_after_steps=4"), resume="auto",
                      log=lambda m: None)
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.global_step) == (0, 2, 2)
    assert resumed.fit().global_step == 4
    a, b = straight.task.model.state_dict(), resumed.task.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], first.task.model.state_dict()["head.weight"])
