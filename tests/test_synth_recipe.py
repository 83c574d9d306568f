"""The from-scratch recipe: it loads as a run config, and it is chosen exactly when a run names no recipe and
has no starting weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from pks4.cli.training import recipe_path
from pks4.engine.config import load_config
from pks4.recipes import FROM_SCRATCH_MODELS, FROM_SCRATCH_RECIPE, choose_recipe


def test_recipe_loads_and_builds_both_tiny_models():
    from pks4.engine.train import build_model

    cfg = load_config(recipe_path(FROM_SCRATCH_RECIPE))
    assert cfg.model.name == FROM_SCRATCH_MODELS[0] and cfg.train.epochs <= 15
    assert not cfg.optim.scale_lr and "pretrained" not in cfg.model.overrides
    for name in FROM_SCRATCH_MODELS:
        model = build_model(load_config(recipe_path(FROM_SCRATCH_RECIPE), [f"model.name={name}"]), 8)
        assert model.num_classes == 8 and model.config.backbone.image_size == cfg.data.size


@pytest.mark.parametrize("overrides", [
    [], ["data.train=t.txt", "model.num_classes=8"], ["model.name=pks4_vit_tiny"], ["model.name=vit_tiny_avgpool"],
    ["model.overrides.pretrained=", "model.init_from=null"],  # emptied again: still from scratch
    ["model.name=videomamba_li_tiny", "model.name=pks4_vit_tiny"],  # the last assignment wins
])
def test_from_scratch_recipe_when_nothing_says_otherwise(overrides):
    recipe, message = choose_recipe(None, overrides)
    assert recipe == FROM_SCRATCH_RECIPE and recipe_path(recipe).is_file()
    assert "no recipe named and no pretrained backbone" in message and recipe in message


@pytest.mark.parametrize("overrides, why", [
    (["model.overrides.pretrained=ViT-B-16.pt"], "starting weights"),
    (["model.pretrained=tower.pt"], "starting weights"),
    (["model.init_from=runs/old"], "starting weights"),
    (["model.name=videomamba_li_tiny"], "not one the from-scratch recipe was tuned for"),
    (["model.name=pks4_vit_b16"], "not one the from-scratch recipe was tuned for"),
])
def test_built_in_defaults_when_weights_are_given_or_the_model_is_another(overrides, why):
    recipe, message = choose_recipe(None, overrides)
    assert recipe is None and why in message


def test_a_named_recipe_is_always_kept():
    assert choose_recipe("mine.yaml", ["model.overrides.pretrained=x.pt"]) == ("mine.yaml", "recipe mine.yaml")
    assert choose_recipe("mine.yaml")[0] == "mine.yaml"


def test_train_from_flags_alone_runs_the_from_scratch_recipe_and_says_so(tmp_path, capsys):
    from pks4.cli import main
    from pks4.data.synth import generate_synth

    data = generate_synth(tmp_path / "data", kind="classic", num_train_per_class=1, num_val_per_class=1,
                          num_frames=8, size=32)
    out = tmp_path / "run"
    assert main(["train", "--train-list", str(data.train), "--val-list", str(data.val), "--labels",
                 str(data.labels), "--epochs", "1", "--workers", "0", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("no recipe named and no pretrained backbone") and FROM_SCRATCH_RECIPE in first
    ran = load_config(out / "config.yaml")
    recipe = load_config(recipe_path(FROM_SCRATCH_RECIPE))
    assert ran.model == recipe.model and ran.optim == recipe.optim and ran.train.epochs == 1
