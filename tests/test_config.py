"""Typed configs: YAML + --set parsing, error messages, round trip through a checkpoint's plain dict."""
from importlib import resources

import pytest

from pks4.engine.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict,
                                format_config, load_config)
from pks4.engine.demo import load_demo_config


def test_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), ["train.epochs=3", "optim.lr=1e-3", "optim.clip_grad=1", "train.amp=fp16",
                                        "train.deterministic=true", "data.scale=[0.5, 1.0]", "eval.views=16x1x3",
                                        "model.overrides.image_size=32", "model.overrides.cls_route=tsm",
                                        "optim.clip_grad=none", "model.num_classes=7"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.clip_grad is None
    assert cfg.train.amp == "fp16" and cfg.train.deterministic is True
    assert cfg.data.scale == (0.5, 1.0) and cfg.eval.views == "16x1x3"
    assert cfg.model.overrides == {"image_size": 32, "cls_route": "tsm"} and cfg.model.num_classes == 7


@pytest.mark.parametrize("item, words", [
    ("train.epoch=3", ["train.epoch", "valid keys", "epochs", "batch_size"]),
    ("trian.epochs=3", ["trian.epochs", "valid keys", "optim", "train"]),
    ("train.epochs=three", ["train.epochs", "expected int", "three"]),
    ("train.epochs=2.5", ["train.epochs", "expected int"]),
    ("train.amp=fp8", ["train.amp", "'bf16'"]),
    ("optim.lr=fast", ["optim.lr", "float"]),
    ("train.deterministic=maybe", ["train.deterministic", "bool"]),
    ("train.epochs", ["KEY=VALUE"]),
    ("train.epochs.x=1", ["train.epochs", "not a section"]),
    ("data.format=mp3", ["data", "format"]),
])
def test_override_errors_name_key_and_expectation(item, words):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [item])
    for word in words:
        assert word in str(err.value)


def test_round_trip_through_plain_dict_and_yaml(tmp_path):
    cfg = apply_overrides(RunConfig(), ["train.epochs=4", "model.overrides.image_size=32", "data.num_frames=16"])
    plain = config_to_dict(cfg)
    assert all(not isinstance(v, tuple) for v in plain["data"].values())  # YAML/JSON friendly
    assert config_from_dict(plain) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(format_config(cfg))
    assert load_config(path) == cfg
    assert load_config(path, ["train.epochs=9"]).train.epochs == 9


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  batch: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.batch.*valid keys"):
        load_config(bad)
    bad.write_text("optim: {lr: 7e-4}\ntrain: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train'"):
        load_config(bad)
    assert load_config(None).train.epochs == RunConfig().train.epochs
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name, frames, views, lr", [
    ("pks4_b16_ssv2_8f.yaml", 8, "8x2x3", 7e-4), ("pks4_b16_ssv2_32f.yaml", 32, "32x1x3", 7e-4),
    ("pks4_b16_k400_32f.yaml", 32, "32x1x3", 7e-4), ("pks4_l14_ssv2_16f.yaml", 16, "16x1x3", 1e-3)])
def test_shipped_recipes_load(name, frames, views, lr):
    path = resources.files("pks4") / "configs" / name
    cfg = load_config(str(path))
    assert (cfg.data.num_frames, cfg.eval.views, cfg.optim.lr) == (frames, views, pytest.approx(lr))
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 5
    assert cfg.data.flip == ("on" if "k400" in name else "off")


def test_demo_preset_loads_and_overrides():
    cfg = load_demo_config(None, ["run.train.epochs=1", "pks4_model.name=pks4_vit_tiny"])
    assert cfg.run.train.epochs == 1 and cfg.baseline_model.name == "vit_tiny_avgpool"
    with pytest.raises(ConfigError, match="valid keys"):
        load_demo_config(None, ["run.train.epoch=1"])
