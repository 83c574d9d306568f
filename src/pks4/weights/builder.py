"""The builder: registry models with pretrained weights, the checkpoint read first.

``create_model(name, pretrained=PATH, **overrides)`` (and ``model_from_config`` for a saved config that names
``pretrained``) reads the checkpoint before building anything:

* models on a CLIP tower (PKS4, the frame-average, joint-attention and ST-Adapter baselines) get the tower the
  checkpoint describes (:func:`pks4.weights.clip.read_clip_tower`: shape from the tensors; QuickGELU for OpenAI
  weights, GELU for a Hugging Face ``hidden_act: gelu`` or a LAION open_clip tower; eps and heads as stated),
  at the requested image size; then the video parts (inserted module, adapters, head) are attached with their
  own initialisation and the tower's tensors loaded 1:1. A requested tower option that contradicts the
  checkpoint is an error (:func:`pks4.weights.clip.clip_tower_config`) unless ``force_activation`` is set;
* VideoMamba is built from its config and the official or pks4 checkpoint converted into it
  (:mod:`pks4.weights.videomamba`), with a new head.

Which reader a model uses is registry data (``ModelSpec.checkpoint``); models never read files themselves, so
:mod:`pks4.models` does not import this package. Without ``pretrained`` both functions are the registry's.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from pks4.models.registry import ModelSpec, build, build_config, config_from_dict, get_spec
from pks4.weights.clip import clip_tower_config, read_clip_tower, resize_tower_checkpoint
from pks4.weights.files import CheckpointError, load_state_dict_strict, read_checkpoint_file
from pks4.weights.videomamba import load_videomamba_state_dict

__all__ = ["create_model", "model_from_config", "requested_tower_fields"]

logger = logging.getLogger("pks4.weights")


def requested_tower_fields(config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """The tower (``backbone``) fields that ``overrides`` of a video config name: inside a ``backbone`` dict or
    config, or as bare tower field names (which the registry routes to the tower)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "backbone" not in fields:
        return {}
    backbone = overrides.get("backbone")
    requested = dataclasses.asdict(backbone) if dataclasses.is_dataclass(backbone) else dict(backbone or {})
    default = fields["backbone"].default_factory()  # every CLIP-tower config has a factory default
    tower = {f.name for f in dataclasses.fields(default)}
    return requested | {k: v for k, v in overrides.items() if k not in fields and k in tower}


def _clip_tower_model(spec: ModelSpec, name: str, cfg: Any, path: str, requested: dict[str, Any]) -> nn.Module:
    tower = read_clip_tower(path, heads=requested.get("heads"))
    tower = resize_tower_checkpoint(tower, int(requested.get("image_size", tower.config.image_size)))
    cfg = dataclasses.replace(cfg, backbone=clip_tower_config(tower, requested, cfg.backbone))
    model = spec.builder(cfg, name)
    load_state_dict_strict(model.backbone, tower.state_dict, path)
    logger.info("%s: CLIP tower (%s layout) from %s: %s", name, tower.layout, path, cfg.backbone)
    return model


def _videomamba_model(spec: ModelSpec, name: str, cfg: Any, path: str, requested: dict[str, Any]) -> nn.Module:
    raw = read_checkpoint_file(path)
    model = spec.builder(cfg, name)
    load_videomamba_state_dict(model, raw, path, reinit_head=True)
    return model


_READERS: dict[str, Callable[[ModelSpec, str, Any, str, dict[str, Any]], nn.Module]] = {
    "clip_tower": _clip_tower_model,
    "videomamba": _videomamba_model,
}


def _build_pretrained(name: str, cfg: Any, requested: dict[str, Any]) -> nn.Module:
    path = getattr(cfg, "pretrained", "")
    if not path:
        return build(name, cfg)
    spec = get_spec(name)
    reader = _READERS.get(spec.checkpoint)
    if reader is None:
        raise CheckpointError(path, f"model {name!r} has no checkpoint reader (ModelSpec.checkpoint="
                                    f"{spec.checkpoint!r}; known: {', '.join(_READERS)})")
    return reader(spec, name, cfg, str(Path(path)), requested)


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Registered model ``name`` with its defaults and ``overrides``, its weights read from ``pretrained``
    (also accepted as an override) when one is named: the checkpoint is read first (module docstring)."""
    if pretrained is not None:
        overrides["pretrained"] = str(pretrained)
    cfg = build_config(name, overrides)
    return _build_pretrained(name, cfg, requested_tower_fields(type(cfg), overrides))


def model_from_config(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a saved config dict; a config naming ``pretrained`` reads that checkpoint first,
    its ``backbone`` section then counting as requested."""
    cfg = config_from_dict(name, config)
    backbone = config.get("backbone")
    return _build_pretrained(name, cfg, dict(backbone) if isinstance(backbone, dict) else {})
