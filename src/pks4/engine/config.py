"""Typed run configuration: dataclasses loaded from YAML, overridden with ``--set a.b=value``.

A run is described by one :class:`RunConfig` made of small sections (model, data, optim, train, eval). The same
tree is printed at start, stored inside every checkpoint as plain values, and rebuilt from there with
:func:`config_from_dict`, so a checkpoint alone says how it was trained. Values are parsed with
``yaml.safe_load`` and checked against the dataclass field types: nothing is evaluated.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pks4.data.datasets import DataConfig
from pks4.data.flex_sampler import FlexConfig

__all__ = [
    "ConfigError", "ModelConfig", "OptimConfig", "TrainConfig", "EvalConfig", "RunConfig", "DataConfig", "FlexConfig",
    "load_config", "apply_overrides", "config_to_dict", "config_from_dict", "format_config", "build_section",
]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the typed config (the message names the key)."""


@dataclass
class ModelConfig:
    """Which registered model to build and how (``pks4 models`` lists the names)."""

    name: str = "pks4_vit_tiny"
    # Keyword overrides for the registry builder (e.g. image_size, insert_layer, pretrained=<CLIP weights>);
    # num_frames and image_size default to the data section's num_frames and size.
    overrides: dict[str, Any] = field(default_factory=dict)
    # Expected class count; None = as many as the data has. Larger than the data's count is allowed (classes
    # absent from the training list); smaller is an error.
    num_classes: Optional[int] = None
    # A pks4 checkpoint (file, checkpoint dir or run dir) or a weights file to start from (fine-tuning).
    init_from: str = ""
    # Let init_from miss keys or differ in shape (e.g. another class count: the head is re-initialised);
    # every re-initialised key is reported. Off by default so a wrong checkpoint fails loudly.
    partial_load: bool = False


@dataclass
class OptimConfig:
    """AdamW with layer-wise decay and a warm-up + cosine schedule (PKS4 section 3.5.2 and 4.2)."""

    lr: float = 7e-4  # base LR for a global batch of 256; the paper's B/16 value (L/14: 1e-3)
    scale_lr: bool = True  # lr = base * global_batch / 256, as in the recipes the paper follows
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: hold the peak LR, decay in the last decay_fraction
    decay_fraction: float = 0.2  # only for schedule "wsd"
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # 1.0 disables layer-wise decay; new PKS4 modules and the head always get full LR
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # max global grad norm; None = no clipping


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, regularisation, logging and saving."""

    epochs: int = 20
    batch_size: int = 8  # per process; the global batch is batch_size * accum_steps * world_size
    accum_steps: int = 1
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) for mixup; 0 disables
    cutmix: float = 0.0  # Beta(alpha, alpha) for cutmix; 0 disables
    mix_prob: float = 1.0
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # ignored on CPU unless cpu_amp is set
    cpu_amp: bool = False
    grad_checkpointing: bool = False
    freeze_backbone: bool = False  # train only newly inserted modules and the head
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2
    # Seconds a DataLoader worker may take for one batch before it counts as hung and the batch is retried in a
    # fresh worker (0 = wait forever). A batch of decoded clips takes seconds; ten minutes allows slow disks.
    loader_timeout: float = 600.0
    eval_every: int = 1  # epochs
    save_every: int = 1  # epochs
    keep_last: int = 2
    log_every: int = 10  # optimizer steps between metric lines
    stop_after_steps: Optional[int] = None  # save and stop early (the schedule still spans all epochs)
    # Checkpoint every N optimizer steps as well (mid-epoch); a crash then loses at most N steps.
    save_every_steps: Optional[int] = None
    # Non-finite loss or gradients: "stop" names the step and ends the run; "skip" drops that update
    # (weights and optimizer state untouched), logs it, and stops after max_nan_skips skips in a row.
    nan_policy: Literal["stop", "skip"] = "stop"
    max_nan_skips: int = 20
    progress: bool = True
    tensorboard: bool = True
    # Exponential moving average of the weights (pks4.engine.ema), e.g. 0.999: evaluation, the best checkpoint
    # and the saved weights use the average; None = off. ema_warmup shortens the window early in a run.
    ema_decay: Optional[float] = None
    ema_warmup: bool = True

    def __post_init__(self) -> None:
        # Caught here, a zero batch or a negative epoch count is one clear line instead of a crash mid-run.
        for name, low in (("epochs", 0), ("batch_size", 1), ("accum_steps", 1), ("num_workers", 0),
                          ("eval_every", 1), ("save_every", 1), ("keep_last", 0), ("log_every", 1),
                          ("max_nan_skips", 1), ("save_every_steps", 1), ("stop_after_steps", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"train.{name}={value}; expected an integer >= {low}")
        if self.loader_timeout < 0:
            raise ValueError(f"train.loader_timeout={self.loader_timeout}; expected seconds >= 0 (0 = no limit)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay={self.ema_decay}; expected a number strictly between 0 and 1 "
                             "(e.g. 0.999), or null to turn the average off")


@dataclass
class EvalConfig:
    """Evaluation views (#frames x #clips x #crops) and batch."""

    views: str = "8x2x3"  # final / standalone evaluation
    val_views: Optional[str] = None  # evaluation during training; None = one centre view
    batch_size: int = 4


@dataclass
class RunConfig:
    """Everything one ``pks4 train`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # StretchySnake flexible training (pks4.data.flex_sampler): off unless flex.mode is set, e.g.
    # flex.mode=static_tokens. base_frames / base_size / base_patch / tubelet come from data.num_frames and the model.
    flex: FlexConfig = field(default_factory=FlexConfig)
    out: str = "runs/default"


# ---------------------------------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int -> float widening allowed), or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_section(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads "7e-4" (no dot) as a string
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # "8x2x3"-like strings stay strings; numbers given for a str key are accepted
        if isinstance(value, bool):
            raise ConfigError(f"{bad} (quote it: YAML reads on/off/yes/no as booleans)")
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(repr(_join(prefix, u)) for u in unknown)} "
                          f"in {where}; valid keys: {', '.join(sorted(types_))}")
    kwargs = {k: _coerce(v, types_[k], _join(prefix, k)) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the section's own validation (__post_init__)
        raise ConfigError(f"config section '{prefix or cls.__name__}': {exc}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ---------------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """YAML scalar/flow parsing ("3" -> 3, "1e-3" -> 0.001, "[1, 2]" -> list, "none"/"null" -> None)."""
    if not text.strip():
        return ""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) or value is None:
        return text if value is None and text.strip() else value
    return value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of config ``cfg`` with ``key.sub=value`` assignments applied (typed; unknown keys
    rejected with the list of valid ones)."""
    tree = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        key, text = item.split("=", 1)
        _assign(tree, type(cfg), key.strip(), _parse_value(text), text)
    return build_section(type(cfg), tree)


def _assign(tree: dict, cls: type, key: str, value: Any, raw: str) -> None:
    parts, node, node_cls = key.split("."), tree, cls
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if node_cls is None:  # inside a free-form dict (e.g. model.overrides)
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        types_ = _field_types(node_cls)
        if part not in types_:
            raise ConfigError(f"unknown config key '{key}'" + (f" in '{where}'" if where else "")
                              + f"; valid keys: {', '.join(sorted(types_))}")
        tp = types_[part]
        if depth == len(parts) - 1:
            try:
                node[part] = _to_plain(_coerce(value, tp, key))
            except ConfigError:
                # YAML turns off/yes/1e-3-like text into bools and numbers; a str-typed key wants the text
                node[part] = _to_plain(_coerce(raw, tp, key))
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls = tp if dataclasses.is_dataclass(tp) else None
        if node_cls is None and typing.get_origin(tp) is not dict:
            raise ConfigError(f"config key '{'.'.join(parts[:depth + 1])}' is a {_type_name(tp)}, not a section")


# ------------------------------------------------------------------------------------------- conversions


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (safe for YAML, JSON and ``torch.load(weights_only=True)``)."""
    return _to_plain(cfg)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :func:`config_to_dict` output (missing keys take their defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping, got {type(values).__name__}")
    return build_section(RunConfig, values)


def load_section(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Config dataclass ``cls`` from a YAML file (or its defaults when ``path`` is None), then ``--set``
    overrides; every error names the file and the key."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    try:
        cfg = build_section(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return apply_overrides(cfg, list(overrides or []))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    return load_section(RunConfig, path, overrides)


def format_config(cfg: Any) -> str:
    """The resolved config as YAML text (printed at the start of a run)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
