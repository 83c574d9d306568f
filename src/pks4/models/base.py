"""The contract every video model in pks4 meets, and what the engine derives from it.

A video model takes clips ``x: (B, T, 3, H, W)`` and returns logits. How the frames become tokens (patch size,
token grid: StretchySnake's flexible embedding) is an argument of ``forward``, a
:class:`pks4.layers.geometry.TokenGeometry`, passed down to the embedding: never state set on a module, so it
also holds when activation checkpointing recomputes a block in the backward pass. The engine and the
flexible-training code use only the names of :class:`VideoModel` (no ``hasattr``, no ``isinstance`` on model
classes, no patched methods).

:func:`geometry_for` is the geometry to evaluate a model at any (T, H) under a patch policy;
:func:`at_geometry` hands a model with a fixed geometry to code that calls ``model(x)``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from pks4.layers.geometry import NativeGeometry, TokenGeometry

__all__ = ["VideoModel", "PATCH_POLICIES", "geometry_for", "at_geometry", "AtGeometry", "check_ranges"]

PATCH_POLICIES = ("native", "static_tokens")


@runtime_checkable
class VideoModel(Protocol):
    """What every registered video model (PKS4, VideoMamba of Li and of Park, frame-average ViT, joint ViT,
    ST-Adapter) implements."""

    model_name: str
    config: Any  # its dataclass config: everything needed to rebuild it (saved inside checkpoints)

    @property
    def num_classes(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    def forward(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Clips (B, T, 3, H, W) -> logits (B, num_classes)."""

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Clips -> the pooled clip feature (B, D) (retrieval, linear probing, embeddings)."""

    def forward_head(self, features: Tensor) -> Tensor:
        """Pooled clip feature (B, D) -> logits."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names that weight decay skips."""

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: 0 (embeddings) .. num_layers + 1 (exempt)."""

    def is_new_parameter(self, name: str) -> bool:
        """True for parameters a pretrained checkpoint does not provide (heads, inserted modules)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in the backward pass instead of storing their activations."""

    def native_geometry(self) -> NativeGeometry:
        """The frames, frame size, patch size and tubelet the weights are stored for."""

    def resize(self, frames: int | None = None, size: int | None = None, patch: int | None = None) -> None:
        """Re-store position embeddings / patch kernel for a new native geometry, in place."""


def check_ranges(cfg: Any, *, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                 rates: tuple[str, ...] = ()) -> None:
    """Range checks of a model config, naming the field: ``at_least_one`` ints >= 1, ``positive`` numbers > 0,
    ``rates`` (dropout, stochastic depth) in [0, 1). Run first in ``__post_init__``, so a size of 0 is one clear
    error rather than a division by zero in a later check."""
    owner = type(cfg).__name__
    for names, ok, want in ((at_least_one, lambda v: v >= 1, "an int >= 1"), (positive, lambda v: v > 0, "> 0"),
                            (rates, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"{owner}.{name}={value!r}; expected {want}")


def _contract(model: nn.Module) -> VideoModel:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not isinstance(model, VideoModel):
        raise TypeError(f"{type(model).__name__} does not implement the video-model contract "
                        f"(pks4.models.base.VideoModel): it has no native geometry to flex")
    return model


def geometry_for(model: nn.Module, frames: int, size: int, policy: str | int = "native", *,
                 kernel_resize: str = "bicubic") -> TokenGeometry:
    """The token geometry to run ``model`` at on ``frames`` x ``size`` x ``size`` clips.

    ``policy``: "native" keeps the stored patch size (the grid follows the size; the paper's evaluation
    protocol), "static_tokens" flexes the patch to keep the native grid (how static-tokens training sees
    every size: p = round(H / L), the frame fitted to L * p), or an int patch size (digits accepted).
    """
    native = _contract(model).native_geometry()
    if frames < 1 or frames % native.tubelet:
        raise ValueError(f"frames={frames}: expected a positive multiple of the tubelet {native.tubelet}")
    if isinstance(policy, int) or (isinstance(policy, str) and policy.isdigit()):
        patch = int(policy)
    elif policy == "native":
        patch = native.patch
    elif policy == "static_tokens":
        patch = max(1, int(round(size / native.grid)))
        return TokenGeometry(patch=patch, grid=native.grid, kernel_resize=kernel_resize)
    else:
        raise ValueError(f"patch policy {policy!r}; expected one of {PATCH_POLICIES} or a patch size")
    if not 1 <= patch <= size:
        raise ValueError(f"patch size {patch} must be between 1 and the frame size {size}")
    return TokenGeometry(patch=patch, grid=size // patch, kernel_resize=kernel_resize)


class AtGeometry(nn.Module):
    """``model`` whose ``forward`` / ``forward_features`` always receive ``geometry``: for code that calls
    ``model(x)`` (the inference path's view loop) at a chosen (T, H, patch). The geometry is still an argument
    of every call; the wrapped model is a submodule, so ``eval()``, ``parameters()`` and devices pass through."""

    def __init__(self, model: nn.Module, geometry: TokenGeometry) -> None:
        super().__init__()
        self.model, self.geometry = model, geometry

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, geometry=self.geometry)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x, geometry=self.geometry)


def at_geometry(model: nn.Module, geometry: TokenGeometry | None) -> nn.Module:
    """``model`` itself when ``geometry`` is None, else an :class:`AtGeometry` view of it."""
    return model if geometry is None else AtGeometry(model, geometry)
