"""What a dataset yields and what a batch holds: ``Item | Skipped`` in, one :class:`Batch` out.

Every dataset of pks4 returns, for one index, either an :class:`Item` (a clip ready for the model) or a
:class:`Skipped` (the file that could not be read and why). Nothing else travels between a dataset and the
training or evaluation code: no ``None``, no marker dictionaries. :func:`collate` is the one collation: it stacks
the items, lists the skipped files, and keeps the shape of a flexible (StretchySnake) batch. Whether a skipped
file is an error or a note is decided once, by whoever reads the batches (:meth:`Batch.raise_skipped`).

A ``Skipped`` is a value, not an exception, so it crosses DataLoader worker processes as one clear line
instead of an exception re-raised inside a worker traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import default_collate

from .video import DataError

if TYPE_CHECKING:  # the sampler module imports this one
    from .flex_sampler import FlexShape

__all__ = ["Item", "Skipped", "Batch", "collate", "SKIP_HINT"]

# What every "unreadable video" error ends with: the two ways out.
SKIP_HINT = "fix or remove it, or set --skip-bad-videos (data.skip_bad_videos=true) to skip unreadable videos"


@dataclass
class Item:
    """One clip: ``video`` (T, 3, H, W), or (V, T, 3, H, W) test views; its class and dataset index.

    ``shape`` is the (T, H, patch, grid) a flexible batch was sampled at (None outside flexible training);
    ``extra`` carries what other tasks read beside the clip (e.g. a caption), collated key by key.
    """

    video: Tensor
    label: int
    index: int
    shape: "FlexShape | None" = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A video that yielded no clip: its ``path`` and the ``reason`` (decoder message, worker death, ...)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Batch:
    """Stacked items plus the files skipped while making them.

    ``video`` / ``label`` / ``index`` are None when every item of the batch was skipped; ``shape`` is the one
    flexible shape of the batch (None outside flexible training).
    """

    video: Tensor | None
    label: Tensor | None
    index: Tensor | None
    skipped: list[Skipped] = field(default_factory=list)
    shape: "FlexShape | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if self.label is None else len(self.label)

    def raise_skipped(self) -> "Batch":
        """Raise a DataError naming the first skipped file (and how many more); the batch itself otherwise."""
        if self.skipped:
            more = f" (and {len(self.skipped) - 1} more in this batch)" if len(self.skipped) > 1 else ""
            raise DataError(f"{self.skipped[0]}{more}; {SKIP_HINT}")
        return self

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors (what ``DataLoader(pin_memory=True)`` calls)."""
        pinned = {k: v.pin_memory() for k, v in (("video", self.video), ("label", self.label),
                                                 ("index", self.index)) if v is not None}
        return replace(self, **pinned)


def collate(items: Sequence[Item | Skipped]) -> Batch:
    """The one collation: stack the items, list the skipped, keep the flexible batch's one shape."""
    kept = [it for it in items if isinstance(it, Item)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if len(kept) + len(skipped) != len(items):
        odd = next(it for it in items if not isinstance(it, (Item, Skipped)))
        raise TypeError(f"a dataset item is a {type(odd).__name__}; datasets yield pks4.data.items.Item "
                        "or Skipped")
    if not kept:
        return Batch(None, None, None, skipped)
    shapes = {it.shape for it in kept}
    if len(shapes) != 1:
        raise ValueError(f"collate: one batch mixes shapes {sorted(shapes, key=str)}; use FlexBatchSampler")
    extra = default_collate([it.extra for it in kept]) if kept[0].extra else {}
    return Batch(video=torch.stack([it.video for it in kept]),
                 label=torch.tensor([it.label for it in kept], dtype=torch.long),
                 index=torch.tensor([it.index for it in kept], dtype=torch.long),
                 skipped=skipped, shape=shapes.pop(), extra=extra)
