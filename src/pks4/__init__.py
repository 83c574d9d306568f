"""pks4: efficient video understanding with state space models.

Data flows through the sub-packages in this order:
``data`` (video -> frames -> clips) -> ``layers``/``ssm`` (building blocks) -> ``models`` (clip -> logits)
-> ``engine`` (train / evaluate / predict / profile) -> ``api`` (``VideoClassifier``) -> ``cli`` / ``web``.

The names below are the public entry points; they are imported lazily so that ``import pks4`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from pks4.version import __version__

_LAZY = {
    "create_model": "pks4.weights",  # the builder: registry models, pretrained weights read first
    "list_models": "pks4.models.registry",
    "selective_scan": "pks4.ssm.scan",
    "selective_scan_ref": "pks4.ssm.scan",
    "load_pretrained_backbone": "pks4.weights",
    "VideoClassifier": "pks4.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pks4' has no attribute {name!r}")
