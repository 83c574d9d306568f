"""`pks4 pretrain` (masked alignment, Li et al. §3.4) on a micro VideoMamba, a tiny CLIP teacher and tiny mp4s."""
import torch
from safetensors.torch import load_file

from pks4.cli import main
from pks4.data.datasets import DataConfig
from pks4.data.synth import generate_synth
from pks4.engine.checkpoint import read_state
from pks4.engine.config import ModelConfig, OptimConfig
from pks4.engine.optim import build_optimizer
from pks4.engine.pretrain import AlignTask, MaskConfig, PretrainConfig, TeacherConfig, build_student, build_teacher
from pks4.weights import create_model  # the builder reads `pretrained` first

RECIPE = """
model: {name: videomamba_li_micro}
data: {num_frames: 4, size: 32, short_side: 32, flip: "off", scale: [0.6, 1.0]}
optim: {lr: 1.0e-3, scale_lr: false, warmup_epochs: 0, min_lr: 1.0e-4}
train: {epochs: 1, batch_size: 4, num_workers: 0, progress: false, tensorboard: false, log_every: 1, amp: none}
teacher: {arch: tiny}
"""


def test_loss_decreases_on_a_fixed_batch_and_only_the_student_learns():
    cfg = PretrainConfig(model=ModelConfig(name="videomamba_li_micro"), data=DataConfig(num_frames=4, size=32),
                         mask=MaskConfig(ratio=0.8, sample=False))  # top-k mask: the same tokens every step
    teacher = build_teacher(TeacherConfig(arch="tiny"), log=lambda msg: None)
    student = build_student(cfg, 128, num_classes=10)
    task = AlignTask(cfg, student, teacher, train_set=None, classes=[], log=lambda msg: None)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    last_block = student.model.layers[-1].mixer.in_proj.weight.clone()
    opt = build_optimizer(student, OptimConfig(lr=3e-3, weight_decay=0.0), 3e-3)
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = task({"video": clip})["align"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert 0.0 < losses[0] <= 4.0  # 2 - 2 cos lies in [0, 4]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert torch.equal(student.model.layers[-1].mixer.in_proj.weight, last_block)  # unreachable: frozen
    assert student.decoder.proj.weight.grad is not None and student.model.patch_embed.proj.weight.grad is not None


def _run(data, tmp_path, out, *extra):
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(RECIPE)
    return main(["pretrain", str(recipe), "--out", str(out), "--set", f"data.root={data.root}",
                 "--set", f"data.train={data.train}", *extra])


def test_pretrain_cli_checkpoint_resume_and_finetune_init(tmp_path, capsys):
    data = generate_synth(tmp_path / "synth", seed=3, num_train_per_class=2, num_val_per_class=1, num_frames=8,
                          size=32)
    # A teacher file in OpenAI's layout holding the same weights as the seeded random tiny tower.
    teacher = build_teacher(TeacherConfig(arch="tiny"), log=lambda msg: None)
    clip_file = tmp_path / "clip_tiny.pt"
    torch.save({f"visual.{k}": v for k, v in teacher.state_dict().items()}, clip_file)

    assert _run(data, tmp_path, tmp_path / "a", "--teacher", str(clip_file)) == 0
    log = capsys.readouterr().out
    assert "teacher: CLIP vision tower from" in log and "RANDOMLY" not in log
    assert "finished: 5 steps" in log
    final_a = tmp_path / "a" / "checkpoints" / "step-00000005"
    assert (final_a / "model.safetensors").is_file()

    # Same run without the file (random tiny teacher, loudly), stopped after 2 steps and resumed.
    assert _run(data, tmp_path, tmp_path / "b", "--set", "train.stop_after_steps=2") == 0
    log = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in log and "stopped: 2 steps" in log
    assert _run(data, tmp_path, tmp_path / "b", "--resume", "auto") == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "finished: 5 steps" in log
    final_b = tmp_path / "b" / "checkpoints" / "step-00000005"
    weights_a, weights_b = load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "resume changed the result"
    dec_a, dec_b = read_state(final_a)["decoder"], read_state(final_b)["decoder"]
    assert all(torch.equal(dec_a[k], dec_b[k]) for k in dec_a)

    # The student initialises a fine-tuning model (`pks4 train --set model.overrides.pretrained=CKPT`),
    # here at another clip length (temporal position embedding resized) and class count (new head).
    model = create_model("videomamba_li_micro", image_size=32, num_frames=8, num_classes=7, pretrained=str(final_a))
    state = model.state_dict()
    assert torch.equal(state["layers.1.mixer.in_proj.weight"], weights_a["layers.1.mixer.in_proj.weight"])
    assert torch.equal(state["patch_embed.proj.weight"], weights_a["patch_embed.proj.weight"])
    assert state["temporal_pos_embedding"].shape[1] == 8 and state["head.weight"].shape[0] == 7


def test_bad_teacher_file_is_one_clear_line(tmp_path, capsys):
    data = generate_synth(tmp_path / "synth", seed=3, num_train_per_class=1, num_val_per_class=1, num_frames=4,
                          size=32)
    assert _run(data, tmp_path, tmp_path / "c", "--teacher", str(tmp_path / "missing.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.path" in err[0] and "missing.pt" in err[0]


def test_pretraining_has_the_loop_s_weight_average_and_nan_policy(tmp_path):
    from pks4.engine.pretrain import build_pretrainer, load_pretrain_config

    data = generate_synth(tmp_path / "synth", seed=3, num_train_per_class=1, num_val_per_class=0, num_frames=4,
                          size=32)
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(RECIPE)
    cfg = load_pretrain_config(recipe, [f"data.root={data.root}", f"data.train={data.train}", f"out={tmp_path / 'r'}",
                                        "train.ema_decay=0.5", "train.nan_policy=skip"])
    messages = []
    loop = build_pretrainer(cfg, log=messages.append)
    decoder = loop.task.student.decoder.proj.weight
    decoder.register_hook(lambda g: g * float("nan") if loop.global_step + 1 == 2 else g)
    result = loop.fit()
    assert result.status == "finished" and result.global_step == 2 and result.nan_skipped_steps == [2]
    assert any("step 2" in m and "update skipped" in m for m in messages) and loop.ema.updates == 2
    state = read_state(result.checkpoint)
    assert {"decoder", "train_weights", "ema_updates"} <= set(state) and state["nan_skipped"] == [2]
    weights = load_file(result.checkpoint / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in loop.ema.state_dict().items())  # the average is saved
