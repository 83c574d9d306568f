"""The training loop on a tiny real-video dataset: outputs, frozen backbone, bad videos, non-finite loss."""
import json

import pytest
import torch

from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import load_config
from pks4.engine.optim import wsd_lr
from pks4.engine.runtime import TrainingError, amp_dtype_for
from pks4.engine.train import build_trainer, resolve_classes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=1, num_train_per_class=2, num_val_per_class=1,
                          num_frames=4, size=32)


def _cfg(data, out, *extra):
    return load_config(None, [
        f"data.root={data.root}", f"data.train={data.train}", f"data.val={data.val}", f"data.labels={data.labels}",
        "data.num_frames=4", "data.size=32", "data.short_side=32", "model.name=pks4_vit_tiny", "train.epochs=1",
        "train.batch_size=4", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
        "optim.lr=0.01", "optim.scale_lr=false", "train.log_every=1", "eval.batch_size=10", f"out={out}", *extra])


def test_amp_dtype_rules():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype_for("bf16", cpu) is None and amp_dtype_for("bf16", cpu, cpu_amp=True) is torch.bfloat16
    assert amp_dtype_for("fp16", gpu) is torch.float16 and amp_dtype_for("bf16", gpu) is torch.bfloat16
    assert amp_dtype_for("none", gpu) is None


def test_resolve_classes():
    cfg = load_config(None, ["model.num_classes=4"])
    assert resolve_classes(cfg, ["a", "b"]) == ["a", "b", "2", "3"]
    with pytest.raises(TrainingError, match="num_classes=4 but the training data has 5"):
        resolve_classes(cfg, list("abcde"))


def test_one_epoch_frozen_backbone_skips_bad_video(data, tmp_path):
    bad = data.root / "train" / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    lines = data.train.read_text()
    train_list = tmp_path / "train.txt"
    train_list.write_text(lines + "train/broken.mp4 3\n")
    trainer = build_trainer(_cfg(data, tmp_path / "run", f"data.train={train_list}", "data.skip_bad_videos=true",
                           "train.freeze_backbone=true", "train.accum_steps=2", "optim.clip_grad=1.0",
                           "train.label_smoothing=0.1"), log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    result = trainer.fit()
    assert result.status == "finished" and result.global_step == 3  # 21 clips / 4 = 6 batches / accum 2
    assert len(result.skipped) == 1 and "broken.mp4" in result.skipped[0]
    assert "broken.mp4" in (tmp_path / "run" / "skipped_videos.txt").read_text()
    after = trainer.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("train") == 3 and rows[-1]["kind"] == "val"
    assert 0.0 <= rows[-1]["top1"] <= 100.0 and rows[-1]["samples"] == 10
    assert all("grad_norm" in r for r in rows if r["kind"] == "train")
    for name in ("curves.png", "confusion_matrix.png", "confusion_matrix.csv", "config.yaml"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()


def test_non_finite_loss_stops_naming_the_step(data, tmp_path):
    trainer = build_trainer(_cfg(data, tmp_path / "run", "optim.lr=1e30", "optim.warmup_epochs=0", "data.val="),
                      log=lambda m: None)
    with pytest.raises(TrainingError, match=r"not finite\) at epoch 1, step 2"):
        trainer.fit()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EMA = ("train.ema_decay=0.8", "train.epochs=2", "optim.warmup_epochs=0")


def test_training_with_ema_saves_the_average_and_resume_continues_both(data, tmp_path):
    full = build_trainer(_cfg(data, tmp_path / "full", *EMA), log=lambda m: None)
    result = full.fit()
    assert result.global_step == 10 and full.ema.updates == 10  # 2 epochs of 20 clips / 4
    assert full.eval_model is full.ema.module
    # the weights file (what eval / predict / init_from read) holds the average; the state keeps the trained ones
    tensors, _ = ckpt.read_weights(result.checkpoint / ckpt.WEIGHTS_FILE)
    assert _equal(tensors, full.ema.state_dict())
    assert _equal(ckpt.read_state(result.checkpoint)["train_weights"], full.task.model.state_dict())
    assert not _equal(tensors, full.task.model.state_dict())
    model, _, _ = ckpt.load_model_from_checkpoint(result.checkpoint)
    assert _equal(model.state_dict(), tensors)

    # stopped after 3 steps, then resumed: the trained weights and the average both match the straight run
    build_trainer(_cfg(data, tmp_path / "cut", *EMA, "train.stop_after_steps=3"), log=lambda m: None).fit()
    messages = []
    resumed = build_trainer(_cfg(data, tmp_path / "cut", *EMA), resume="auto", log=messages.append)
    assert resumed.ema.updates == 3
    resumed.fit()
    assert _equal(resumed.task.model.state_dict(), full.task.model.state_dict())
    assert _equal(resumed.ema.state_dict(), full.ema.state_dict())


def test_resuming_a_run_without_an_average_starts_one(data, tmp_path):
    build_trainer(_cfg(data, tmp_path / "run", "train.stop_after_steps=2"),
            log=lambda m: None).fit()
    messages = []
    resumed = build_trainer(_cfg(data, tmp_path / "run", *EMA), resume="auto", log=messages.append)
    assert any("holds no weight average" in m for m in messages)
    assert resumed.ema.updates == 0 and _equal(resumed.ema.state_dict(), resumed.task.model.state_dict())


def test_wsd_schedule_reaches_the_optimizer(data, tmp_path):
    """optim.schedule=wsd: the LR of every logged step is the warm-up/stable/decay value, not the cosine one."""
    trainer = build_trainer(_cfg(data, tmp_path / "wsd", "train.epochs=2", "optim.warmup_epochs=0", "optim.min_lr=0.0",
                           "optim.schedule=wsd", "optim.decay_fraction=0.4"), log=lambda m: None)
    assert trainer.scheduler.kind == "wsd" and trainer.scheduler.total_steps == 10
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "wsd" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows if r["kind"] == "train"]
    assert logged == pytest.approx([wsd_lr(s, 10, 0, 0.01, 0.0, 0.4) for s in range(10)])
    assert logged[:6] == pytest.approx([0.01] * 6)  # stable phase: the cosine would be at 0.0065 by step 5
    assert logged[-1] < 0.002
