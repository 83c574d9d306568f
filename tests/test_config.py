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


# ------------------------------------------------------------------------------------------ safe YAML

import os  # noqa: E402

from pks4.engine.config import (MAX_YAML_NODES, EvalConfig, OptimConfig, TrainConfig, parse_yaml,  # noqa: E402
                                read_yaml)


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" document: each level lists the previous one ``width`` times (9^9 values)."""
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line, key", [
    ("train:\n  epochs: 2\n  batch_size: 4\n  epochs: 3\n", 4, "'epochs' (first at line 2)"),
    ("train: {epochs: 1}\noptim: {lr: 0.1}\ntrain: {epochs: 2}\n", 3, "'train' (first at line 1)"),
    ("model:\n  overrides: {depth: 2, depth: 3}\n", 2, "'depth' (first at line 2)"),
])
def test_duplicate_keys_name_file_line_and_key(tmp_path, text, line, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"dup.yaml, line {line}" in str(err.value) and f"duplicate key {key}" in str(err.value)


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("optim: &o {lr: 0.001, weight_decay: 0.01}\n"
                    "model:\n  overrides:\n    <<: {depth: 2, width: 64}\n    depth: 3\n"
                    "eval: {views: &v 4x1x1, val_views: *v}\n")
    cfg = load_config(path)
    assert cfg.model.overrides == {"depth": 3, "width": 64} and cfg.eval.val_views == "4x1x1"


def test_alias_bomb_is_refused_before_anything_expands_it(tmp_path):
    path = tmp_path / "bomb.yaml"
    # where the old loader accepted it: a free-form dict, which printing the config would expand 9^9 times
    path.write_text(_bomb() + "model:\n  overrides:\n    payload: *l8\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: its aliases expand to more than 100,000 values"):
        load_config(path)
    assert MAX_YAML_NODES == 100_000
    assert parse_yaml(_bomb(levels=3), "small") is not None  # 9^3 values: fine


def test_an_alias_inside_its_own_value_is_refused():
    with pytest.raises(ConfigError, match=r"cfg, line 1, column \d+: an alias refers to the value that contains it"):
        parse_yaml("a: &a [1, *a]\n", "cfg")


def test_deeply_nested_yaml_is_an_error_not_a_crash():
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_yaml("[" * 1000 + "]" * 1000, "deep.yaml")


def test_yaml_syntax_errors_name_line_and_column():
    with pytest.raises(ConfigError, match=r"x\.yaml, line 2, column 1: not valid YAML"):
        parse_yaml("a:\n\tb: 1\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: not valid YAML"):
        parse_yaml("a: \x1b\n", "x.yaml")  # a control character


def test_read_yaml_refuses_what_is_not_a_text_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    for path, words in ((tmp_path / "fifo.yaml", "is a FIFO"), (tmp_path, "is a directory"),
                        (tmp_path / "binary.yaml", "not UTF-8"), (tmp_path / "none.yaml", "not found")):
        with pytest.raises(ConfigError, match=words) as err:
            read_yaml(path)
        assert str(path) in str(err.value)


def test_demo_preset_with_a_duplicate_key(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"demo\.yaml, line 2.*duplicate key 'seed'"):
        load_demo_config(str(path))


# ---------------------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize("item, expected", [
    ("optim.lr=0", "optim.lr=0.0; expected a number > 0"),
    ("optim.lr=-0.001", "optim.lr=-0.001; expected a number > 0"),
    ("optim.lr=.nan", "optim.lr=nan; expected a number > 0"),
    ("optim.lr=.inf", "optim.lr=inf; expected a number > 0"),
    ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.weight_decay=-0.05", "optim.weight_decay"),
    ("optim.layer_decay=0", "optim.layer_decay=0.0; expected a number in (0, 1]"),
    ("optim.layer_decay=1.5", "optim.layer_decay"),
    ("optim.decay_fraction=0", "optim.decay_fraction"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]; expected two numbers in [0, 1)"),
    ("optim.eps=0", "optim.eps"),
    ("optim.clip_grad=0", "optim.clip_grad=0.0; expected a number > 0"),
    ("train.label_smoothing=1", "train.label_smoothing=1.0; expected a number in [0, 1)"),
    ("train.label_smoothing=-0.1", "train.label_smoothing"),
    ("train.mixup=-0.8", "train.mixup"),
    ("train.cutmix=-1", "train.cutmix"),
    ("train.mix_prob=1.5", "train.mix_prob=1.5; expected a number in [0, 1]"),
    ("train.batch_size=0", "train.batch_size=0; expected an integer >= 1"),
    ("train.accum_steps=0", "train.accum_steps"),
    ("train.device=gpu", "train.device='gpu'; expected auto, cpu, cuda or cuda:N"),
    ("eval.batch_size=0", "eval.batch_size=0; expected an integer >= 1"),
    ("eval.views=8x0x3", "eval.views='8x0x3'; expected FRAMESxCLIPSxCROPS"),
    ("eval.views=eight", "eval.views='eight'"),
    ("eval.val_views=0", "eval.val_views='0'"),
    ("model.num_classes=0", "model.num_classes=0; expected an integer >= 1"),
    ("data.num_frames=0", "data.num_frames=0; expected an integer >= 1"),
    ("data.size=0", "data.size=0"),
    ("data.short_side=-1", "data.short_side"),
    ("data.dense_stride=0", "data.dense_stride"),
    ("data.random_erasing=1.5", "data.random_erasing=1.5; expected a number in [0, 1]"),
    ("data.scale=[0.8, 0.2]", "data.scale=[0.8, 0.2]; expected [min, max] with 0 < min <= max <= 1"),
    ("data.scale=[0, 1]", "data.scale=[0.0, 1.0]"),
    ("data.scale=[0.5, 1.5]", "data.scale=[0.5, 1.5]"),
    ("data.std=[0.2, 0, 0.2]", "data.std=[0.2, 0.0, 0.2]; expected three numbers > 0"),
    ("data.frame_start_index=-1", "data.frame_start_index"),
    ("data.frame_template=frame.jpg", "data.frame_template='frame.jpg'; expected a file name with one integer"),
    ("flex.tubelet=0", "flex.tubelet=0; expected an integer >= 1"),
    ("flex.base_patch=0", "flex.base_patch=0"),
    ("flex.frames=[]", "flex.frames=[]; expected a non-empty list of integers >= 1"),
    ("flex.max_batch=0", "flex.max_batch"),
])
def test_out_of_range_values_name_the_key_and_the_range(item, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [item])
    assert expected in str(err.value)


@pytest.mark.parametrize("item", [
    "train.label_smoothing=0", "train.label_smoothing=0.99", "data.scale=[1, 1]", "data.scale=[0.08, 1]",
    "optim.layer_decay=1", "train.mix_prob=0", "train.mix_prob=1", "optim.betas=[0, 0.999]", "optim.min_lr=0",
    "optim.warmup_epochs=0", "train.device=cuda:1", "train.device=cpu", "eval.val_views=null", "eval.views=16",
    "data.random_erasing=0", "optim.lr=1e30", "optim.clip_grad=null", "model.num_classes=null",
])
def test_boundary_values_are_accepted(item):
    apply_overrides(RunConfig(), [item])


def test_sections_built_in_code_are_checked_too():
    # demo presets and tests build sections directly (dataclasses.replace): the same ranges hold there
    with pytest.raises(ValueError, match=r"optim\.lr=0; expected a number > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"train\.label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"eval\.views"):
        EvalConfig(views="8x2x0")
    assert OptimConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)


def test_a_checkpointed_config_with_a_bad_value_names_the_key():
    plain = config_to_dict(RunConfig())
    plain["data"]["scale"] = [0.9, 0.1]
    with pytest.raises(ConfigError, match=r"data\.scale"):
        config_from_dict(plain)
