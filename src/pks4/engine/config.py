"""Typed run configuration: dataclasses loaded from YAML, overridden with ``--set a.b=value``.

A run is described by one :class:`RunConfig` made of small sections (model, data, optim, train, eval). The same
tree is printed at start, stored inside every checkpoint as plain values, and rebuilt from there with
:func:`config_from_dict`, so a checkpoint alone says how it was trained.

YAML is read by :func:`read_yaml` / :func:`parse_yaml`: PyYAML's safe loader (nothing is evaluated) that also
refuses duplicate keys (naming the file, the line and the key) and aliases that expand past ``MAX_YAML_NODES``
values (an "alias bomb" is refused after composing, which stays linear in the text, before anything walks it).
Every value is checked against its field's type, then against its range (:data:`FIELD_RULES`: batch sizes,
frames and views >= 1, lr > 0, label smoothing in [0, 1), crop scale ordered inside (0, 1], ...), with the
key in the message.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from pks4.data.datasets import DataConfig
from pks4.data.flex_sampler import FlexConfig
from pks4.data.sampling import parse_views
from pks4.errors import UserError, describe_os_error, require_regular_file

__all__ = [
    "ConfigError", "ModelConfig", "OptimConfig", "TrainConfig", "EvalConfig", "RunConfig", "DataConfig", "FlexConfig",
    "load_config", "apply_overrides", "config_to_dict", "config_from_dict", "format_config", "build_section",
    "read_yaml", "parse_yaml", "MAX_YAML_NODES", "FIELD_RULES", "check_fields",
]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(UserError, ValueError):
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

    def __post_init__(self) -> None:
        check_fields("model", self)


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

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives lists where tuples are declared
        check_fields("optim", self)


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
        check_fields("train", self)


@dataclass
class EvalConfig:
    """Evaluation views (#frames x #clips x #crops) and batch."""

    views: str = "8x2x3"  # final / standalone evaluation
    val_views: Optional[str] = None  # evaluation during training; None = one centre view
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_fields("eval", self)


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


# ---------------------------------------------------------------------------------------------- field ranges

# A rule is (predicate, what was expected). Predicates see values already checked against the field's type.
Rule = tuple[Callable[[Any], bool], str]


def _number(test: Callable[[float], bool], expected: str) -> Rule:
    return (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and test(v)), expected


def _each(rule: Rule, expected: str) -> Rule:
    return (lambda v: len(v) > 0 and all(rule[0](x) for x in v)), expected


def _views(v: str) -> bool:
    try:
        parse_views(v)  # checks the FRAMESxCLIPSxCROPS form and that each is >= 1
    except ValueError:
        return False
    return True


def _device(v: str) -> bool:
    import torch

    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


def _template(v: str) -> bool:
    try:
        return v.format(1) != v.format(2)  # one integer field, or every frame would be the same file
    except (IndexError, KeyError, ValueError):
        return False


AT_LEAST_ONE = _number(lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE = _number(lambda v: v >= 0, "a number >= 0")
POSITIVE = _number(lambda v: v > 0, "a number > 0")
IN_0_1 = _number(lambda v: 0 <= v <= 1, "a number in [0, 1]")
IN_0_1_OPEN = _number(lambda v: 0 <= v < 1, "a number in [0, 1)")
IN_OPEN_0_1 = _number(lambda v: 0 < v <= 1, "a number in (0, 1]")
SIZES = _each(AT_LEAST_ONE, "a non-empty list of integers >= 1")

# Ranges of every numeric field, by config class (the section's own __post_init__ adds cross-field checks).
# DataConfig and FlexConfig live beside the code that reads them; their ranges are checked here, where the
# config is parsed, before the class is built (FlexConfig divides by base_patch and tubelet when built).
FIELD_RULES: dict[str, dict[str, Rule]] = {
    "ModelConfig": {"num_classes": AT_LEAST_ONE},
    "OptimConfig": {
        "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "decay_fraction": IN_OPEN_0_1,
        "weight_decay": NON_NEGATIVE, "layer_decay": IN_OPEN_0_1, "eps": POSITIVE, "clip_grad": POSITIVE,
        "betas": _each(IN_0_1_OPEN, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    },
    "TrainConfig": {
        "label_smoothing": IN_0_1_OPEN, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "mix_prob": IN_0_1,
        "device": (_device, "auto, cpu, cuda or cuda:N"),
    },
    "EvalConfig": {
        "batch_size": AT_LEAST_ONE,
        "views": (_views, "FRAMESxCLIPSxCROPS with each >= 1, e.g. 8x2x3"),
        "val_views": (_views, "FRAMESxCLIPSxCROPS with each >= 1, e.g. 8x1x1, or null for one centre view"),
    },
    "DataConfig": {
        "num_frames": AT_LEAST_ONE, "size": AT_LEAST_ONE, "short_side": AT_LEAST_ONE, "dense_stride": AT_LEAST_ONE,
        "random_erasing": IN_0_1, "frame_start_index": _number(lambda v: v >= 0, "an integer >= 0"),
        "scale": ((lambda v: IN_OPEN_0_1[0](v[0]) and IN_OPEN_0_1[0](v[1]) and v[0] <= v[1]),
                  "[min, max] with 0 < min <= max <= 1 (fractions of the frame area)"),
        "std": _each(POSITIVE, "three numbers > 0"),
        "mean": _each(_number(lambda v: True, ""), "three finite numbers"),
        "frame_template": (_template, "a file name with one integer field, e.g. img_{:05d}.jpg"),
    },
    "FlexConfig": {
        "frames": SIZES, "sizes": SIZES, "flexivit_patches": SIZES, "flex_all_patches": SIZES,
        "flexivit_size": AT_LEAST_ONE, "base_frames": AT_LEAST_ONE, "base_size": AT_LEAST_ONE,
        "base_patch": AT_LEAST_ONE, "max_batch": AT_LEAST_ONE, "tubelet": AT_LEAST_ONE,
    },
}


def check_fields(section: str, config: Any, values: dict[str, Any] | None = None) -> None:
    """Raise ValueError naming ``section.field=value`` and the expected range for the first field of ``config``
    (an instance, or its class with ``values``) outside :data:`FIELD_RULES`; None values are "unset"."""
    cls = config if isinstance(config, type) else type(config)
    given = values if values is not None else {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    for name, (ok, expected) in FIELD_RULES.get(cls.__name__, {}).items():
        value = given.get(name)
        if value is not None and not ok(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{section}.{name}={shown!r}; expected {expected}")


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
        if cls in (DataConfig, FlexConfig):  # their files own them; their ranges are checked here (FIELD_RULES)
            check_fields(prefix or cls.__name__, cls, kwargs)
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as exc:  # the section's own validation (__post_init__)
        raise ConfigError(f"config section '{prefix or cls.__name__}': {exc}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ------------------------------------------------------------------------------------------------ YAML

MAX_YAML_NODES = 100_000  # values after expanding aliases; a large recipe has a few hundred


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML that a config may not hold (a repeated key, a value that contains itself)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *defaults" merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if seen is not None:
                    raise _Refused(None, None, f"duplicate key {key!r} (first at line {seen})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node) -> int:
    """Values ``node`` stands for once every alias is expanded, stopping past MAX_YAML_NODES.

    Aliases share their node, so sizes are memoised per node: the walk costs one visit per distinct node, even
    for a document that would expand to billions of values.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            raise _Refused(None, None, "an alias refers to the value that contains it", n.start_mark)
        active.add(id(n))
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else (
            n.value if isinstance(n, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total = min(total + size(child), MAX_YAML_NODES + 1)
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML ``text`` safely: no code, no duplicate keys, no alias bombs. Errors are ConfigError naming
    ``source``, the line and the problem."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise ConfigError(f"{source}: its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); "
                              "write the values out instead of nesting aliases")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(filter(None, [exc.context, exc.problem])) or str(exc)
        if isinstance(exc, _Refused):
            raise ConfigError(f"{source}{where}: {problem}") from None
        raise ConfigError(f"{source}{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in the file ``path`` (see :func:`parse_yaml`); a missing file, a folder, a FIFO or
    text that is not UTF-8 is a ConfigError naming the path."""
    p = Path(path)
    try:
        require_regular_file(p, what)  # a FIFO would block, a folder or device is a mistake
        text = p.read_text(encoding="utf-8")
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{what} {describe_os_error(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text {what} (not UTF-8 at byte {exc.start})") from None
    return parse_yaml(text, str(p))


# ---------------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """YAML scalar/flow parsing ("3" -> 3, "1e-3" -> 0.001, "[1, 2]" -> list, "none"/"null" -> None)."""
    if not text.strip():
        return ""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        value = parse_yaml(text, "--set value")
    except ConfigError:
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
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
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
