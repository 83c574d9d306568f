"""StretchySnake, the data half: which (T, H, patch) each batch is drawn at, and batches loaded at that shape
(its section 4.2).

One set of weights is trained on clips whose frame count T, frame size H and patch size p change from batch to
batch. The five modes of §4.2 differ only in how (T, H, p) are drawn (:func:`sample_shape`); "static_tokens"
(the paper's best, StretchySnake proper) flexes p with H so that every frame keeps the native token grid. The
model receives each batch's shape as its token geometry (the patch kernel resized by Eq. 4, the position
embeddings by Eq. 5-6, inside the forward, so the stored weights train through the resize).

Pieces, in the order the data flows:

* :class:`FlexConfig` and :func:`sample_shape`: what a batch looks like (:class:`FlexShape`);
* :class:`FlexBatchSampler`: one shape per batch, batch size scaled so tokens per batch stay bounded, every
  epoch a pure function of (seed, epoch);
* :class:`FlexDataset`: items loaded at the batch's (T, H), each carrying its shape
  (:func:`pks4.data.items.collate` keeps it as ``Batch.shape``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import numpy as np
from torch.utils.data import Dataset, Sampler

from .items import Item, Skipped

__all__ = [
    "FLEX_MODES", "FlexConfig", "FlexShape", "FlexKey", "resolve_flex_config", "static_token_patch",
    "sample_shape", "tokens_per_clip", "batch_size_for", "FlexBatchSampler", "FlexDataset", "data_config_at",
    "resized_video_dataset",
]

FLEX_MODES = ("none", "temporal", "static_patch", "static_tokens", "flexivit", "flex_all")


# ---- configuration and shape sampling (§4.2) -----------------------------------------------------------------
@dataclass
class FlexConfig:
    """How batches are flexed. Ranges are the paper's (§4.2 and §5.1) for a 16-frame, 224 px, p = 16 model;
    flexible training is off until ``mode`` names one of the five modes."""

    mode: str = "none"  # one of FLEX_MODES; "none" = every batch at (base_frames, base_size)
    frames: tuple[int, ...] = (8, 16, 32, 64)  # R^t
    sizes: tuple[int, ...] = (96, 128, 224, 384)  # R^s
    flexivit_size: int = 240  # FlexiViT keeps H = W = 240 ...
    flexivit_patches: tuple[int, ...] = (8, 10, 12, 15, 16, 20, 24, 30, 40, 48)  # ... and samples p from these
    flex_all_patches: tuple[int, int] = (12, 48)  # flex-all: p in this range, preferring divisors of H
    base_frames: int = 16  # T0: the reference clip length (the static model's), for batch scaling
    base_size: int = 224  # H0: the size the model's position embedding is stored for
    base_patch: int = 16  # p0: the model's stored patch size; base_size // base_patch is the native grid
    kernel_resize: str = "bicubic"  # "bicubic" (the paper) | "pi" (FlexiViT's pseudo-inverse resize)
    scale_batch: bool = True  # batch ~ base_batch * tokens(T0, H0, p0) / tokens(T, H, p)
    max_batch: int | None = None  # upper bound on a scaled batch (None = base_batch * 8)
    tubelet: int = 1  # frames per token (Park's VideoMamba: 2); T is kept a multiple of it

    def __post_init__(self) -> None:
        self.frames, self.sizes = tuple(int(t) for t in self.frames), tuple(int(s) for s in self.sizes)
        self.flexivit_patches = tuple(int(p) for p in self.flexivit_patches)
        self.flex_all_patches = tuple(int(p) for p in self.flex_all_patches)
        if self.mode not in FLEX_MODES:
            raise ValueError(f"FlexConfig.mode={self.mode!r}; expected one of {FLEX_MODES}")
        if self.kernel_resize not in ("bicubic", "pi"):
            raise ValueError(f"FlexConfig.kernel_resize={self.kernel_resize!r}; expected 'bicubic' or 'pi'")
        if not self.frames or not self.sizes or min(self.frames + self.sizes) < 1:
            raise ValueError(f"FlexConfig needs non-empty positive frames/sizes, got {self.frames}, {self.sizes}")
        bad_t = [t for t in self.frames if t % self.tubelet]
        if bad_t:
            raise ValueError(f"FlexConfig.frames {bad_t} are not multiples of the tubelet {self.tubelet}")
        if self.base_size % self.base_patch:
            raise ValueError(f"FlexConfig.base_size {self.base_size} is not a multiple of base_patch {self.base_patch}")
        lo, hi = self.flex_all_patches
        if not 1 <= lo <= hi:
            raise ValueError(f"FlexConfig.flex_all_patches must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")

    @property
    def native_grid(self) -> int:
        return self.base_size // self.base_patch

    @property
    def enabled(self) -> bool:
        """Whether batches are flexed at all (``mode`` other than "none")."""
        return self.mode != "none"

    def trained_cells(self, frames: int, size: int) -> list[tuple[int, int]]:
        """(T, H) cells a run with this config trains at (the grey cells of StretchySnake's Table 1);
        ``frames`` x ``size`` is the run's own clip shape, the one cell without flexing."""
        if not self.enabled:
            return [(frames, size)]
        sizes = {"temporal": [size], "flexivit": [self.flexivit_size]}.get(self.mode, list(self.sizes))
        return [(int(t), int(s)) for t in self.frames for s in sizes]


class FlexShape(NamedTuple):
    """What every clip of one batch looks like: T frames of size x size pixels, cut into a grid x grid token
    grid of patch x patch pixels (the frame is centre-cropped or edge-padded to grid * patch, see
    :func:`fit_to_grid`)."""

    frames: int
    size: int
    patch: int
    grid: int


class FlexKey(NamedTuple):
    """One dataset item at one shape: what :class:`FlexBatchSampler` yields and :class:`FlexDataset` reads."""

    index: int
    shape: FlexShape


def static_token_patch(size: int, native_grid: int) -> FlexShape:
    """Patch size keeping the native token grid at ``size`` px (static tokens, §4.2 example 3).

    The paper takes p = floor(H / L) and lets the convolution drop the remainder, which changes the grid when
    H / L is far from an integer (96 / 14 -> p = 6, 16 tokens); rounding p and fitting the frame to L * p
    (at most p / 2 pixels cropped or padded per side) keeps exactly L tokens.
    """
    patch = max(1, int(round(size / native_grid)))
    return FlexShape(0, size, patch, native_grid)


def _patch_shape(size: int, patch: int) -> tuple[int, int]:
    if patch > size:
        raise ValueError(f"patch size {patch} is larger than the frame size {size}")
    return patch, size // patch


def _pick(rng: np.random.Generator, values: tuple[int, ...] | list[int]) -> int:
    # The same draw as rng.choice(values) (one integers() call), without its per-call array conversion:
    # a whole epoch is planned at start-up, so this runs once per batch of every epoch.
    return int(values[int(rng.integers(len(values)))])


def sample_shape(cfg: FlexConfig, rng: np.random.Generator) -> FlexShape:
    """Draw one batch shape for ``cfg.mode`` (§4.2): uniform over R^t, R^s and the mode's patch set."""
    t = _pick(rng, cfg.frames) if cfg.mode != "none" else cfg.base_frames
    if cfg.mode in ("none", "temporal"):
        return FlexShape(t, cfg.base_size, cfg.base_patch, cfg.native_grid)
    if cfg.mode == "flexivit":
        p, g = _patch_shape(cfg.flexivit_size, _pick(rng, cfg.flexivit_patches))
        return FlexShape(t, cfg.flexivit_size, p, g)
    size = _pick(rng, cfg.sizes)
    if cfg.mode == "static_patch":
        return FlexShape(t, size, *_patch_shape(size, cfg.base_patch))
    if cfg.mode == "static_tokens":
        return FlexShape(t, size, static_token_patch(size, cfg.native_grid).patch, cfg.native_grid)
    lo, hi = cfg.flex_all_patches  # flex_all: p divides H where it can (§4.2 example 5)
    hi = min(hi, size)
    candidates = [p for p in range(min(lo, hi), hi + 1) if size % p == 0] or list(range(min(lo, hi), hi + 1))
    return FlexShape(t, size, *_patch_shape(size, _pick(rng, candidates)))


def tokens_per_clip(shape: FlexShape, tubelet: int = 1) -> int:
    """Video tokens one clip of ``shape`` becomes: (T / tubelet) * grid^2 (CLS tokens are negligible)."""
    return max(1, shape.frames // tubelet) * shape.grid**2


def batch_size_for(shape: FlexShape, base_batch: int, cfg: FlexConfig) -> int:
    """Clips per batch so tokens per batch stay near base_batch * tokens(T0, H0, p0), at least 1.

    Activation memory of the token mixers is linear in the token count (quadratic attention inside a frame is
    fixed by the grid), so bounding tokens bounds memory across shapes.
    """
    if not cfg.scale_batch:
        return base_batch
    ref = FlexShape(cfg.base_frames, cfg.base_size, cfg.base_patch, cfg.native_grid)
    scaled = base_batch * tokens_per_clip(ref, cfg.tubelet) // tokens_per_clip(shape, cfg.tubelet)
    cap = cfg.max_batch if cfg.max_batch is not None else 8 * base_batch
    return int(min(max(1, scaled), cap))


# ---- the model's native geometry ------------------------------------------------------------------------------
class _StoredGeometry(Protocol):
    frames: int
    size: int
    patch: int
    tubelet: int


class _HasNativeGeometry(Protocol):
    def native_geometry(self) -> _StoredGeometry: ...


def resolve_flex_config(cfg: FlexConfig, model: _HasNativeGeometry, base_frames: int | None = None) -> FlexConfig:
    """``cfg`` with base_patch / base_size / tubelet from ``model.native_geometry()`` (and base_frames, if given)."""
    geo = model.native_geometry()
    return dataclasses.replace(cfg, base_patch=geo.patch, base_size=geo.size, tubelet=geo.tubelet,
                               base_frames=base_frames if base_frames is not None else cfg.base_frames)


# ---- batch sampler ---------------------------------------------------------------------------------------------
class FlexBatchSampler(Sampler[list[FlexKey]]):
    """Batches of :class:`FlexKey` sharing one shape, drawn per batch; deterministic in (seed, epoch).

    Every rank of a DDP job builds the same plan (same permutation, same shapes) and takes its own slice of
    each batch, so all ranks run the same number of steps on the same shape. ``set_epoch(epoch, start)`` also
    skips the first ``start`` batches (resuming mid-epoch).
    """

    def __init__(self, dataset_len: int, base_batch: int, cfg: FlexConfig, seed: int = 0, *, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if dataset_len < 1 or base_batch < 1:
            raise ValueError(f"FlexBatchSampler needs dataset_len >= 1 and base_batch >= 1, "
                             f"got {dataset_len}, {base_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.n, self.base_batch, self.cfg, self.seed = dataset_len, base_batch, cfg, seed
        self.shuffle, self.rank, self.world_size, self.drop_last = shuffle, rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        self._cached: tuple[int, list[tuple[FlexShape, list[int]]]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``start`` batches (counted in batches, not items)."""
        self.epoch, self.start = int(epoch), int(start)

    def plan(self) -> list[tuple[FlexShape, list[int]]]:
        """This rank's batches of the current epoch: (shape, dataset indices)."""
        if self._cached is None or self._cached[0] != self.epoch:  # len() then iter() plan an epoch once
            self._cached = (self.epoch, self._plan(self.epoch))
        return self._cached[1]

    def _plan(self, epoch: int) -> list[tuple[FlexShape, list[int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        out, pos = [], 0
        while pos < self.n:
            shape = sample_shape(self.cfg, rng)
            per_rank = batch_size_for(shape, self.base_batch, self.cfg)
            chunk = order[pos:pos + per_rank * self.world_size].tolist()
            pos += per_rank * self.world_size
            if len(chunk) < per_rank * self.world_size:
                if self.drop_last:
                    break
                per_rank = math.ceil(len(chunk) / self.world_size)
                chunk += order[:per_rank * self.world_size - len(chunk)].tolist()  # wrap, as DistributedSampler
            out.append((shape, chunk[self.rank * per_rank:(self.rank + 1) * per_rank]))
        return out

    def __iter__(self) -> Iterator[list[FlexKey]]:
        for shape, indices in self.plan()[self.start:]:
            yield [FlexKey(i, shape) for i in indices]

    def __len__(self) -> int:
        return max(0, len(self.plan()) - self.start)

    def batches(self, epoch: int) -> list[list[FlexKey]]:
        """Every batch of this rank in epoch ``epoch`` (the whole plan, whatever ``start`` says)."""
        self.set_epoch(epoch, 0)
        return [[FlexKey(i, shape) for i in indices] for shape, indices in self.plan()]


# ---- datasets at a sampled (T, H) -------------------------------------------------------------------------------
def data_config_at(cfg: Any, frames: int | None, size: int | None) -> Any:
    """A :class:`pks4.data.datasets.DataConfig` for ``frames`` x ``size`` clips (None keeps the value).

    The test-time short side scales with ``size`` (the same field of view at every size, as resizing frames in
    the paper does), so a 3-crop or centre-crop view covers the same part of the frame at every size.
    """
    frames = cfg.num_frames if frames is None else int(frames)
    size = cfg.size if size is None else int(size)
    short = max(size, int(round(size * cfg.short_side / max(cfg.size, 1))))
    return dataclasses.replace(cfg, num_frames=frames, size=size, short_side=short)


def resized_video_dataset(dataset: Dataset, frames: int, size: int) -> Dataset:
    """``dataset`` loading ``frames`` x ``size`` clips: a :class:`pks4.data.datasets.VideoDataset` (or any
    dataset with a ``with_shape(frames, size)`` method) is asked for its copy at that shape."""
    with_shape = getattr(dataset, "with_shape", None)
    if with_shape is None:
        raise TypeError(f"cannot load {type(dataset).__name__} at other sizes: give it with_shape(frames, size)")
    return with_shape(frames, size)


class FlexDataset(Dataset):
    """Reads :class:`FlexKey` items (index at a shape) through per-shape copies of ``dataset``; every
    :class:`~pks4.data.items.Item` carries its shape, a :class:`~pks4.data.items.Skipped` passes as it is."""

    def __init__(self, dataset: Dataset, variant: Callable[[Dataset, int, int], Dataset] = resized_video_dataset
                 ) -> None:
        self.dataset, self.variant = dataset, variant
        self._variants: dict[tuple[int, int], Dataset] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def samples(self) -> Any:
        """The inner dataset's samples (None when it has none): names the file of a skipped item."""
        return getattr(self.dataset, "samples", None)

    def at(self, frames: int, size: int) -> Dataset:
        key = (int(frames), int(size))
        if key not in self._variants:
            self._variants[key] = self.variant(self.dataset, *key)
        return self._variants[key]

    def __getitem__(self, key: FlexKey | int) -> Item | Skipped:
        if not isinstance(key, FlexKey):
            return self.dataset[key]
        item = self.at(key.shape.frames, key.shape.size)[key.index]
        return dataclasses.replace(item, shape=key.shape) if isinstance(item, Item) else item
