"""Weight averaging (train.ema_decay): the update rule by hand (the training run that saves and resumes the average is
in test_train.py)."""
import pytest
import torch
from torch import nn

from pks4.engine.config import load_config
from pks4.engine.ema import WeightEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_update_rule_by_hand():
    net = _net()
    ema = WeightEMA(net, decay=0.9, warmup=False)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)
    got = ema.state_dict()
    torch.testing.assert_close(got["0.weight"], 0.9 * start["0.weight"] + 0.1 * net[0].weight)
    torch.testing.assert_close(got["1.running_mean"], 0.9 * start["1.running_mean"] + 0.1 * 2.0)
    assert int(got["1.num_batches_tracked"]) == 7  # integer buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert net[0].weight.requires_grad  # the trained model is untouched


def test_warmup_shortens_the_window_early():
    ema = WeightEMA(_net(), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(_net())
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    assert WeightEMA(_net(), decay=0.5, warmup=False).current_decay() == 0.5


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        WeightEMA(_net(), decay=decay)
    with pytest.raises(ValueError, match="train.ema_decay"):
        load_config(None, [f"train.ema_decay={decay}"])
