"""A bridge to the video-model contract (token geometry as a ``forward`` argument), for models that predate it.

The engine is written against the contract: a batch's token geometry is ``TokenGeometry(patch, grid,
kernel_resize)``, the model runs as ``model(video, geometry=geometry)``, and the flexible sampler reads
``model.native_geometry()``. A model whose ``forward`` does not take ``geometry`` yet is driven through
:mod:`pks4.flex`'s patch hook instead, held from the forward through the backward (activation checkpointing
recomputes blocks there, and they must see the same grid). Models that take the argument go straight through.
Once every model does, this module goes: ``forward`` becomes ``model(x, geometry=g)``, ``hold`` disappears and
``contract_view(model)`` becomes ``model``.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ContextManager, Iterator

from torch import Tensor, nn

try:
    from pks4.layers.geometry import TokenGeometry
except ImportError:  # the contract's module is not there yet: the same fields

    @dataclass(frozen=True)
    class TokenGeometry:  # type: ignore[no-redef]
        """How a batch of frames becomes tokens (see the contract)."""

        patch: int | None = None
        grid: int | None = None
        kernel_resize: str = "bicubic"

__all__ = ["TokenGeometry", "forward", "hold", "contract_view"]


def _takes_geometry(model: nn.Module) -> bool:
    return "geometry" in inspect.signature(model.forward).parameters


def forward(model: nn.Module, video: Tensor, geometry: TokenGeometry | None) -> Tensor:
    """``model(video, geometry=geometry)``."""
    if geometry is not None and _takes_geometry(model):
        return model(video, geometry=geometry)
    return model(video)  # no geometry, or one that ``hold`` installed


def hold(model: nn.Module, geometry: TokenGeometry | None) -> ContextManager[Any]:
    """For a model without the ``geometry`` argument: its patch hook set to ``geometry`` for the block."""
    if geometry is None or _takes_geometry(model):
        return nullcontext()
    return _patched(model, geometry)


@contextmanager
def _patched(model: nn.Module, geometry: TokenGeometry) -> Iterator[None]:
    from pks4.flex import set_patch_size

    undo = set_patch_size(model, geometry.patch, geometry.grid, geometry.kernel_resize)
    try:
        yield
    finally:
        undo()


class _NativeView:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def native_geometry(self) -> Any:
        from pks4.flex import native_geometry

        return SimpleNamespace(**native_geometry(self.model))


def contract_view(model: nn.Module) -> Any:
    """``model`` where it has ``native_geometry()``, else a view that provides it."""
    return model if callable(getattr(model, "native_geometry", None)) else _NativeView(model)
