"""The loop core (pks4.engine.loop), once, on in-memory clips: accumulation, the task seam (several losses, a frozen
teacher), the NaN policy decided on the device, checkpoint state, and no host round-trip between logging steps."""
from __future__ import annotations

import collections
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset

from pks4.data.items import Item
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import OptimConfig, RunConfig, TrainConfig, load_config
from pks4.engine.loop import Loop, LoopSettings, Task
from pks4.engine.optim import build_optimizer, param_groups
from pks4.engine.runtime import DistInfo, TrainingError

T, S, K = 2, 8, 3  # frames, size, classes of the in-memory clips


class Clips(Dataset):
    """``n`` fixed random clips with labels, already decoded: the loop alone is measured."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.video = torch.randn(n, T, 3, S, S, generator=g)
        self.label = torch.randint(0, K, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> Item:
        return Item(self.video[i], self.label[i], i)


class Net(nn.Module):
    model_name = "net"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(T * 3 * S * S, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


class Classify(Task):
    """The smallest task: cross-entropy of a linear net; ``loop`` (set by the test) lets it poison steps."""

    def __init__(self, data: Dataset, poison: set[int] = frozenset()) -> None:
        super().__init__()
        self.model, self.train_set, self.poison, self.loop = Net(), data, poison, None
        self.weights_at: dict[int, torch.Tensor] = {}  # optimizer step -> weights its first micro-batch saw

    def inputs(self, batch):
        return {"video": batch.video, "label": batch.label}

    def loss(self, inputs, geometry=None):
        step = self.loop.global_step + 1 if self.loop is not None else 0
        self.weights_at.setdefault(step, self.model.proj.weight.detach().clone())
        loss = F.cross_entropy(self.model(inputs["video"]), inputs["label"])
        return {"ce": loss * float("nan") if step in self.poison else loss}

    def metadata(self):
        return {"model_name": "net"}


def _settings(tmp_path, name: str = "run", **train) -> LoopSettings:
    t = TrainConfig(**{"epochs": 1, "batch_size": 2, "num_workers": 0, "progress": False, "tensorboard": False,
                       "log_every": 100, **train})
    o = OptimConfig(lr=0.1, scale_lr=False, warmup_epochs=0, weight_decay=0.0, min_lr=0.1)
    return LoopSettings(t, o, tmp_path / name, RunConfig())


def _loop(task: Task, settings: LoopSettings, **kw) -> Loop:
    loop = Loop(task, settings, DistInfo(), log=kw.pop("log", lambda m: None), **kw)
    task.loop = loop
    return loop


def _rows(loop: Loop, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (loop.run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_accumulated_micro_batches_make_the_step_of_one_large_batch(tmp_path):
    one = _loop(Classify(Clips()), _settings(tmp_path, "one", batch_size=4, stop_after_steps=1))
    two = _loop(Classify(Clips()), _settings(tmp_path, "two", batch_size=2, accum_steps=2, stop_after_steps=1))
    assert one.fit().global_step == two.fit().global_step == 1
    torch.testing.assert_close(one.task.model.proj.weight, two.task.model.proj.weight, rtol=1e-6, atol=1e-7)
    assert not torch.equal(one.task.model.proj.weight, Net().proj.weight)


def test_state_dict_round_trip_resumes_bitwise(tmp_path):
    kw = dict(ema_decay=0.5, save_every_steps=1, epochs=2)
    straight = _loop(Classify(Clips()), _settings(tmp_path, "a", **kw))
    straight.fit()
    _loop(Classify(Clips()), _settings(tmp_path, "b", stop_after_steps=3, **kw)).fit()
    torch.manual_seed(99)  # the RNG before resuming must not matter
    resumed = _loop(Classify(Clips()), _settings(tmp_path, "b", **kw), resume="auto")
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.global_step, resumed.ema.updates) == (0, 3, 3, 3)
    assert resumed.fit().global_step == straight.global_step == 8
    assert torch.equal(resumed.task.model.proj.weight, straight.task.model.proj.weight)
    assert torch.equal(resumed.ema.module.proj.weight, straight.ema.module.proj.weight)
    state = ckpt.read_state(resumed.run_dir / "checkpoints" / "step-00000008")
    assert {"optimizer", "scheduler", "scaler", "rng", "train_weights", "ema_updates", "last_loss"} <= set(state)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_non_finite_step_is_dropped_on_the_device_and_named_at_the_next_check(tmp_path, policy):
    messages = []
    task = Classify(Clips(), poison={2})
    loop = _loop(task, _settings(tmp_path, nan_policy=policy, log_every=4, save_every_steps=3), log=messages.append)
    if policy == "stop":  # the check before the save at step 3 stops the run: no checkpoint follows a NaN unseen
        with pytest.raises(TrainingError, match=r"loss is nan \(not finite\) at epoch 1, step 2 \(batch 2"):
            loop.fit()
        assert loop.global_step == 3 and not (loop.run_dir / "checkpoints").exists()
    else:
        assert loop.fit().nan_skipped_steps == [2]
        assert [m for m in messages if "update skipped" in m] == \
            ["loss is nan (not finite) at epoch 1, step 2 (batch 2 of the epoch): update skipped "
             "(train.nan_policy=skip)"]
        assert [r["step"] for r in map(json.loads, (loop.run_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "nan_skip"] == [2]
    assert torch.equal(task.weights_at[3], task.weights_at[2]) and not torch.equal(task.weights_at[2],
                                                                                  task.weights_at[1])
    # the dropped update is not counted by AdamW (its bias correction), the schedule still counts the step
    assert int(loop.optimizer.state[task.model.proj.weight]["step"]) == loop.global_step - 1
    assert loop.scheduler.step_count == loop.global_step


class Distill(Task):
    """A third task through the same loop: a student VideoMamba with cross-entropy plus Li et al.'s
    self-distillation term, a frozen teacher and a trained projector (RMSNorm + Linear)."""

    def __init__(self, data: Dataset) -> None:
        from pks4.models.registry import create_model
        from pks4.models.videomamba_pretrain import DistillProjector

        super().__init__()
        micro = dict(embed_dim=32, depth=2, image_size=S, patch_size=4, num_frames=T, num_classes=K)
        self.model, self.train_set = create_model("videomamba_li_micro", **micro), data
        self.teacher = create_model("videomamba_li_micro", **micro).requires_grad_(False)
        self.projector = DistillProjector(32, 32)

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.model, self.projector])

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()
        return self

    def inputs(self, batch):
        return {"video": batch.video, "label": batch.label}

    def loss(self, inputs, geometry=None):
        from pks4.models.videomamba_pretrain import cosine_alignment_loss

        tokens = self.model.forward_tokens(inputs["video"])
        with torch.no_grad():
            target = self.teacher.forward_tokens(inputs["video"])
        return {"ce": F.cross_entropy(self.model.forward_head(tokens[:, 0]), inputs["label"]),
                "distill": 0.5 * cosine_alignment_loss(self.projector(tokens), target)}

    def metadata(self):
        return {"model_name": self.model.model_name}


def test_a_task_with_two_losses_and_a_frozen_teacher_plugs_in(tmp_path):
    task = Distill(Clips())
    teacher = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    projector = task.projector.proj.weight.detach().clone()
    loop = _loop(task, _settings(tmp_path, log_every=1))
    result = loop.fit()
    rows = _rows(loop)
    assert len(rows) == result.global_step == 4
    for row in rows:  # every term logged, their sum is the loss the step minimised
        assert row["loss"] == pytest.approx(row["ce"] + row["distill"], rel=1e-5) and row["distill"] > 0
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in teacher.items()) and not task.teacher.training
    assert not torch.equal(projector, task.projector.proj.weight)
    weights, _ = ckpt.read_weights(result.checkpoint / ckpt.WEIGHTS_FILE)
    assert set(weights) == set(task.model.state_dict())  # the student alone: no teacher, no projector


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``, what ``.item()``, ``float()`` and ``bool()`` of a tensor run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls[str(args[0].device)] += 1
        return func(*args, **(kwargs or {}))


def _count_syncs(tmp_path, name: str, steps: int, log_every: int) -> int:
    from pks4.engine.train import ClassifyTask
    from pks4.models.registry import create_model

    cfg = load_config(None, ["train.accum_steps=2", "train.ema_decay=0.9", "optim.clip_grad=1.0"])
    model = create_model("pks4_vit_tiny", width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3,
                         image_size=S, patch_size=4, num_frames=T, num_classes=K)
    task = ClassifyTask(cfg, model, Clips(4 * steps), None, [str(k) for k in range(K)], log=lambda m: None)
    settings = _settings(tmp_path, name, accum_steps=2, ema_decay=0.9, log_every=log_every, save_every=10)
    settings.optim.clip_grad = 1.0
    loop = _loop(task, settings)
    with SyncCounter() as counter:
        assert loop.fit().global_step == steps
    return sum(counter.calls.values())


def test_no_host_round_trip_between_logging_steps(tmp_path):
    """Loss, NaN policy, gradient norm, clipping, accumulation and the weight average stay on the device:
    a run reads the device back a fixed number of times (loader start, the logging step, the save), not per step."""
    few, many = _count_syncs(tmp_path, "few", 3, log_every=3), _count_syncs(tmp_path, "many", 6, log_every=6)
    assert few == many, f"{many - few} host round-trips in 3 extra training steps"
    assert _count_syncs(tmp_path, "every", 6, log_every=1) > many  # the counter does see the logging steps


def test_fused_adamw_agrees_with_the_plain_one_and_drops_a_flagged_update():
    cfg = OptimConfig(weight_decay=0.05)
    fused_net, plain_net = Net(), Net()
    fused = build_optimizer(fused_net, cfg, 1e-2)
    groups = param_groups(plain_net, cfg.weight_decay)  # the same groups: no decay on the bias
    plain = torch.optim.AdamW([{**g, "lr": 1e-2} for g in groups], lr=1e-2, eps=cfg.eps, foreach=False)
    x = torch.randn(4, T, 3, S, S)
    for _ in range(3):
        for net, opt in ((fused_net, fused), (plain_net, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(fused_net.proj.weight, plain_net.proj.weight, rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in fused_net.state_dict().items()}
    fused_net(x).square().mean().backward()
    fused.found_inf = torch.ones(())
    fused.step()
    assert all(torch.equal(v, fused_net.state_dict()[k]) for k, v in before.items())
    assert int(fused.state[fused_net.proj.weight]["step"]) == 3
