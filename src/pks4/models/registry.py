"""Model registry: every variant is a name, a builder, a config class and a few lines of defaults.

``create_model(name, **overrides)`` builds a randomly initialised model; overrides may name fields of the model
config or of a nested config (``image_size=64`` reaches the backbone config of a PKS4 model).
``model_from_config`` rebuilds a model from the dictionary saved in a checkpoint. Model files declare their
variants in a ``MODELS`` dict of :class:`ModelSpec`; the registry merges those dicts (see ``_MODEL_FILES``).

Pretrained weights are read by the builder one layer up, ``pks4.weights.create_model(name, pretrained=...)``,
which reads the checkpoint first and builds from what it says (``ModelSpec.checkpoint`` names its reader);
the functions here refuse a config that names ``pretrained`` rather than build it with random weights.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

# Files whose MODELS dicts make up the registry, in the order `pks4 models` lists them.
_MODEL_FILES = (
    "pks4.models.pks4_variants",
    "pks4.models.videomamba",
    "pks4.models.baselines",
)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model."""

    builder: Callable[[Any, str], nn.Module]  # (config, registry name) -> model
    config_cls: type
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    checkpoint: str = ""  # which reader of pks4.weights loads a `pretrained` file: "clip_tower" | "videomamba"


def _registry() -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for module_name in _MODEL_FILES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # that family is not part of this build
                continue
            raise
        models.update(module.MODELS)
    return models


def list_models() -> list[str]:
    """Names of all registered models."""
    return list(_registry())


def get_spec(name: str) -> ModelSpec:
    models = _registry()
    if name not in models:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(models)}")
    return models[name]


def _apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass ``cfg`` with ``overrides`` applied, reaching into nested dataclass fields."""
    own = {f.name for f in dataclasses.fields(cfg)}
    nested = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if dataclasses.is_dataclass(getattr(cfg, f.name))}
    direct, per_nested = {}, {name: {} for name in nested}
    for key, value in overrides.items():
        if key in nested and isinstance(value, dict):
            per_nested[key].update(value)
        elif key in own:
            direct[key] = value
        else:
            owners = [n for n, sub in nested.items() if key in {f.name for f in dataclasses.fields(sub)}]
            if not owners:
                valid = sorted(own | {f"{n}.{f.name}" for n, sub in nested.items() for f in dataclasses.fields(sub)})
                raise ValueError(f"unknown option {key!r} for {type(cfg).__name__}; valid: {', '.join(valid)}")
            per_nested[owners[0]][key] = value
    for name, sub_overrides in per_nested.items():
        if sub_overrides and name not in direct:
            direct[name] = _apply_overrides(nested[name], sub_overrides)
    return dataclasses.replace(cfg, **direct)


def build_config(name: str, overrides: dict[str, Any]) -> Any:
    """The config of registered model ``name``: its defaults, then ``overrides`` (see the module docstring)."""
    spec = get_spec(name)
    return _apply_overrides(spec.config_cls(**spec.defaults), overrides)


def config_from_dict(name: str, config: dict[str, Any]) -> Any:
    """The config of ``name`` from ``dataclasses.asdict(model.config)`` as saved in a checkpoint."""
    try:
        return get_spec(name).config_cls(**config)
    except TypeError as err:
        raise ValueError(f"saved config does not fit model {name!r}: {err}") from err


def build(name: str, cfg: Any) -> nn.Module:
    """Registered model ``name`` built from its config, with random weights (whatever ``pretrained`` says)."""
    return get_spec(name).builder(cfg, name)


def _random_init(name: str, cfg: Any) -> nn.Module:
    if getattr(cfg, "pretrained", ""):
        raise ValueError(f"model {name!r} names pretrained={cfg.pretrained!r}: pretrained weights are read by "
                         "pks4.weights.create_model / model_from_config (pks4.create_model), which read the "
                         "checkpoint first")
    return build(name, cfg)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build registered model ``name`` with its defaults, then ``overrides`` (see the module docstring)."""
    return _random_init(name, build_config(name, overrides))


def model_from_config(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``dataclasses.asdict(model.config)`` as saved in a checkpoint."""
    return _random_init(name, config_from_dict(name, config))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
