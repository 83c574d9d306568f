"""Every registered model, at tiny size, through the interface the engine relies on."""
import dataclasses

import pytest
import torch

from pks4.models.registry import create_model, list_models, model_from_config

TINY = [n for n in list_models() if ("tiny" in n or "micro" in n) and n != "videomamba_tiny"]


def _clip(model, batch=2):
    cfg = model.config
    size = getattr(cfg, "image_size", None) or cfg.backbone.image_size
    frames = getattr(cfg, "num_frames", 4)
    return torch.randn(batch, frames, 3, size, size)


def test_tiny_models_are_registered():
    assert {"pks4_vit_tiny", "vit_tiny_avgpool", "videomamba_li_micro", "videomamba_park_micro"} <= set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_interface(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = _clip(model)
    logits = model(x)
    assert logits.shape == (2, 5)
    feat = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feat), logits)
    # the pooled feature must depend on the input (a constant feature means a dead path, e.g. a gated CLS)
    assert (feat[0] - feat[1]).abs().max() > 1e-4
    assert model.num_classes == 5 and model.num_layers >= 1
    assert all(0 <= model.layer_id(n) <= model.num_layers + 1 for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", TINY)
def test_training_step_moves_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    x, y = _clip(model, batch=4), torch.tensor([0, 1, 2, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(4):  # one fixed batch: the loss must go down
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert model.head.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", TINY)
def test_rebuild_from_saved_config(name):
    model = create_model(name, num_classes=4).eval()
    rebuilt = model_from_config(name, dataclasses.asdict(model.config)).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = _clip(model, batch=1)
    torch.testing.assert_close(rebuilt(x), model(x))
