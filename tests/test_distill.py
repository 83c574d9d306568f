"""Self-distillation in `pks4 train` (Li et al. §3.3, Fig. 6): a frozen smaller VideoMamba's final tokens as a
term of the classification task, its early stop, the projector in the checkpoint state and a bitwise resume."""
import json

import pytest
import torch

from pks4.cli import main
from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import DistillConfig, load_config
from pks4.engine.distill import SelfDistillation, WithProjector
from pks4.engine.optim import param_groups
from pks4.engine.train import build_trainer
from pks4.models.registry import create_model
from pks4.models.videomamba_pretrain import cosine_alignment_loss


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=2, num_train_per_class=1, num_val_per_class=1,
                          num_frames=8, size=32)


def _sets(synth, out, width=32, **extra):
    sets = {"model.name": "videomamba_li_micro", "model.overrides": f"{{embed_dim: {width}, depth: 2}}",
            "data.train": synth.train, "data.val": synth.val, "data.root": synth.root, "data.labels": synth.labels,
            "data.num_frames": 4, "data.size": 32, "data.short_side": 32, "data.flip": "off", "train.epochs": 2,
            "train.batch_size": 5, "train.num_workers": 0, "train.progress": "false", "train.tensorboard": "false",
            "train.device": "cpu", "train.log_every": 1, "optim.scale_lr": "false", "optim.warmup_epochs": 0,
            "out": out, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def teacher(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    build_trainer(load_config(None, _sets(synth, run, width=16, **{"train.epochs": 1})), log=lambda m: None).fit()
    return run


def _rows(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_the_term_aligns_projected_student_tokens_to_the_frozen_teachers(synth, teacher, tmp_path):
    loop = build_trainer(load_config(None, _sets(synth, tmp_path / "run", **{"train.distill.teacher": teacher})),
                         log=lambda m: None)
    task = loop.task
    frozen = {k: v.clone() for k, v in task.distill.teacher.state_dict().items()}
    video = torch.randn(2, 4, 3, 32, 32)
    tokens = task.model.forward_tokens(video)
    want = cosine_alignment_loss(task.distill.projector(tokens), task.distill.teacher.forward_tokens(video))
    torch.testing.assert_close(task.distill(tokens, video), want)  # weight 1: the paper's loss as it is
    result = loop.fit()
    assert all({"ce", "distill"} <= set(r) for r in _rows(tmp_path / "run"))
    assert all(torch.equal(v, task.distill.teacher.state_dict()[k]) for k, v in frozen.items())
    weights, _ = ckpt.read_weights(result.checkpoint / ckpt.WEIGHTS_FILE)
    assert set(weights) == set(task.model.state_dict())  # the student alone
    state = ckpt.read_state(result.checkpoint)
    assert torch.equal(state["distill_projector"]["proj.weight"], task.distill.projector.proj.weight)


def test_early_stop_drops_the_term_from_its_epoch(synth, teacher, tmp_path):
    messages = []
    loop = build_trainer(load_config(None, _sets(synth, tmp_path / "run", **{
        "train.distill.teacher": teacher, "train.distill.stop_epoch": 2})), log=messages.append)
    assert loop.task.unused_parameters  # the projector gets no gradient after the stop: DDP must know
    loop.fit()
    rows = _rows(tmp_path / "run")
    assert [("distill" in r) for r in rows] == [True, True, False, False]  # 10 clips, batch 5: two steps an epoch
    assert "epoch 2: self-distillation stopped (train.distill.stop_epoch)" in messages


def test_resume_restores_the_projector_bitwise(synth, teacher, tmp_path):
    extra = {"train.distill.teacher": teacher, "train.save_every_steps": 1}
    straight = build_trainer(load_config(None, _sets(synth, tmp_path / "a", **extra)), log=lambda m: None)
    straight.fit()
    build_trainer(load_config(None, _sets(synth, tmp_path / "b", **extra, **{"train.stop_after_steps": 3})),
                  log=lambda m: None).fit()
    resumed = build_trainer(load_config(None, _sets(synth, tmp_path / "b", **extra)), resume="auto",
                            log=lambda m: None)
    resumed.fit()
    for a, b in ((straight.task.model, resumed.task.model), (straight.task.distill.projector,
                                                              resumed.task.distill.projector)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_the_projector_sits_at_the_top_of_the_layer_decay():
    student = create_model("videomamba_li_micro", embed_dim=32, depth=2, image_size=32, num_frames=4)
    teacher = create_model("videomamba_li_micro", embed_dim=16, depth=2, image_size=32, num_frames=4)
    both = WithProjector(student, SelfDistillation(teacher, 32, DistillConfig(teacher="t")).projector)
    assert both.layer_id("projector.proj.weight") == student.num_layers + 1
    assert both.layer_id("model.layers.0.mixer.in_proj.weight") == student.layer_id("layers.0.mixer.in_proj.weight")
    groups = param_groups(both, 0.05, layer_decay=0.5)
    projector = [g for g in groups if any(p is both.projector.proj.weight for p in g["params"])][0]
    assert projector["lr_scale"] == 1.0 and projector["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(both.parameters()))


def test_bad_teachers_are_named(synth, teacher, tmp_path, capsys):
    other = tmp_path / "other"  # another frame count: other tokens
    build_trainer(load_config(None, _sets(synth, other, width=16, **{"train.epochs": 1, "data.num_frames": 2})),
                  log=lambda m: None).fit()
    common = ["train", *[x for s in _sets(synth, tmp_path / "s") for x in ("--set", s)]]
    assert main([*common, "--set", f"train.distill.teacher={other}"]) == 2
    assert "its clips are (frames, size, patch, tubelet) = (2, 32, 8, 1), the student's (4, 32, 8, 1)" in capsys.readouterr().err
    assert main([*common, "--set", "train.distill.stop_epoch=0"]) == 2
    assert "train.distill.stop_epoch=0; expected an epoch >= 1" in capsys.readouterr().err
    assert main([*common, "--set", "model.name=pks4_vit_tiny", "--set", "model.overrides={}",
                 "--set", f"train.distill.teacher={teacher}"]) == 2
    assert "the student is a PKS4" in capsys.readouterr().err
