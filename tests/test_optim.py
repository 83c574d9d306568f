"""AdamW groups (no decay on norms / biases / embeddings / A_log / D), layer-wise LR decay, cosine schedule."""
import math

import pytest
import torch
from torch import nn

from pks4.engine.optim import LRSchedule, build_optimizer, cosine_lr, param_groups, scaled_lr, wsd_lr
from pks4.models.registry import create_model


class _Toy(nn.Module):
    """Two 'blocks' plus embedding, SSM-style parameters and a head, with a known layer map."""

    num_layers = 2

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.mixer = nn.Module()
        self.mixer.A_log = nn.Parameter(torch.zeros(8, 4))
        self.mixer.D = nn.Parameter(torch.zeros(8, 2))  # 2-D on purpose: excluded by name, not by ndim
        self.mixer.Dense = nn.Parameter(torch.zeros(8, 2))  # not the SSM "D": decays
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def layer_id(self, name: str) -> int:
        if name.startswith(("pos_embed", "embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1


def _by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in groups for p in g["params"]}


def test_no_weight_decay_rules():
    model = _Toy()
    groups = _by_name(model, param_groups(model, weight_decay=0.05, layer_decay=1.0))
    no_decay = {n for n, g in groups.items() if g["weight_decay"] == 0.0}
    assert no_decay == {"pos_embed", "embed.bias", "blocks.0.bias", "blocks.1.bias", "mixer.A_log", "mixer.D",
                        "norm.weight", "norm.bias", "head.bias"}
    assert groups["mixer.Dense"]["weight_decay"] == 0.05
    assert groups["head.weight"]["weight_decay"] == 0.05


def test_layer_decay_values():
    model = _Toy()
    groups = _by_name(model, param_groups(model, weight_decay=0.05, layer_decay=0.5))
    # lr_scale = decay ** (num_layers + 1 - layer_id): head / new modules 1, block 1 0.5, block 0 0.25, embed 0.125
    assert groups["head.weight"]["lr_scale"] == 1.0
    assert groups["mixer.A_log"]["lr_scale"] == 1.0
    assert groups["blocks.1.weight"]["lr_scale"] == 0.5
    assert groups["blocks.0.bias"]["lr_scale"] == 0.25
    assert groups["pos_embed"]["lr_scale"] == 0.125


def test_pks4_model_groups_new_modules_full_lr_and_frozen_left_out():
    model = create_model("pks4_vit_tiny", num_classes=4, image_size=32)
    groups = _by_name(model, param_groups(model, 0.05, layer_decay=0.75))
    assert all(groups[n]["lr_scale"] == 1.0 for n in groups if model.is_new_parameter(n))
    top = model.num_layers + 1
    assert groups["backbone.conv1.weight"]["lr_scale"] == pytest.approx(0.75 ** top)
    assert groups["backbone.positional_embedding"]["weight_decay"] == 0.0
    for n, p in model.named_parameters():
        p.requires_grad_(model.is_new_parameter(n))
    groups = _by_name(model, param_groups(model, 0.05, 0.75))
    assert groups and all(model.is_new_parameter(n) for n in groups)


def test_build_optimizer_sets_scaled_group_lrs():
    from pks4.engine.optim import build_optimizer

    class Cfg:
        weight_decay, layer_decay, betas, eps = 0.05, 0.5, (0.9, 0.999), 1e-8

    model = _Toy()
    opt = build_optimizer(model, Cfg(), lr=0.1)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.0125, 0.025, 0.05, 0.1])
    sched = LRSchedule(opt, total_steps=10, warmup_steps=2, peak_lr=0.1, min_lr=0.0)
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.05)  # step 0 of 2 warm-up steps
    sched.step()
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.1)


def test_scaled_lr():
    assert scaled_lr(7e-4, 256) == pytest.approx(7e-4)
    assert scaled_lr(7e-4, 64) == pytest.approx(1.75e-4)


def test_cosine_golden_values():
    vals = [cosine_lr(s, total_steps=10, warmup_steps=2, peak_lr=1.0, min_lr=0.1) for s in range(11)]
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]
    assert vals == pytest.approx(expected)
    assert vals[2] == pytest.approx(1.0) and vals[6] == pytest.approx(0.55) and vals[10] == pytest.approx(0.1)
    assert cosine_lr(50, 10, 2, 1.0, 0.1) == pytest.approx(0.1)  # clamped past the end
    assert cosine_lr(0, 10, 0, 1.0, 0.0) == pytest.approx(1.0)  # no warm-up


def test_scheduler_state_round_trip():
    model = _Toy()
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1.0)
    a = LRSchedule(opt, 20, 3, 1.0, 0.0)
    for _ in range(7):
        a.step()
    b = LRSchedule(opt, 20, 3, 1.0, 0.0)
    b.load_state_dict(a.state_dict())
    assert b.get_lr() == a.get_lr() == pytest.approx(cosine_lr(7, 20, 3, 1.0, 0.0))


def test_wsd_golden_values():
    # 20 steps, 2 warm-up, the last 5 (decay_fraction 0.25) on the cosine: steps 15..20 go from peak to min.
    vals = [wsd_lr(s, 20, 2, 1.0, 0.1, 0.25) for s in range(21)]
    expected = [0.5, 1.0] + [1.0] * 13 + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(6)]
    assert vals == pytest.approx(expected)
    assert wsd_lr(99, 20, 2, 1.0, 0.1, 0.25) == pytest.approx(0.1)  # clamped past the end
    # decay_fraction 1 with no warm-up is the cosine schedule itself
    assert [wsd_lr(s, 10, 0, 1.0, 0.0, 1.0) for s in range(11)] == pytest.approx(
        [cosine_lr(s, 10, 0, 1.0, 0.0) for s in range(11)])
    # a decay longer than what the warm-up leaves starts right after the warm-up
    assert [wsd_lr(s, 10, 4, 1.0, 0.0, 0.9) for s in range(4, 11)] == pytest.approx(
        [cosine_lr(s, 10, 4, 1.0, 0.0) for s in range(4, 11)])


def test_lr_schedule_kinds_and_bad_values():
    model = _Toy()
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1.0)
    sched = LRSchedule(opt, 20, 2, 1.0, 0.1, kind="wsd", decay_fraction=0.25)
    for _ in range(10):
        sched.step()
    assert sched.get_lr() == pytest.approx(1.0) and opt.param_groups[0]["lr"] == pytest.approx(1.0)
    resumed = LRSchedule(opt, 20, 2, 1.0, 0.1, kind="wsd", decay_fraction=0.25)
    resumed.load_state_dict(sched.state_dict())
    for _ in range(7):
        sched.step()
        resumed.step()
    assert resumed.get_lr() == sched.get_lr() == pytest.approx(wsd_lr(17, 20, 2, 1.0, 0.1, 0.25))
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'"):
        LRSchedule(opt, 20, 2, 1.0, 0.1, kind="linear")
    with pytest.raises(ValueError, match="decay_fraction"):
        LRSchedule(opt, 20, 2, 1.0, 0.1, kind="wsd", decay_fraction=0.0)
