"""StretchySnake, the data half (pks4.data.flex_sampler): modes, the batch sampler, datasets at a sampled shape."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pks4.data.flex_sampler import (FLEX_MODES, FlexBatchSampler, FlexConfig, FlexDataset, FlexKey, FlexShape,
                                    batch_size_for, data_config_at, sample_shape, static_token_patch,
                                    tokens_per_clip)
from pks4.data.items import Item, collate


# ---- modes -------------------------------------------------------------------------------------------------------
def _draw(cfg: FlexConfig, n: int = 300) -> list[FlexShape]:
    rng = np.random.default_rng(0)
    return [sample_shape(cfg, rng) for _ in range(n)]


def test_paper_defaults():
    cfg = FlexConfig()
    assert cfg.frames == (8, 16, 32, 64) and cfg.sizes == (96, 128, 224, 384)
    assert cfg.flexivit_patches == (8, 10, 12, 15, 16, 20, 24, 30, 40, 48) and cfg.flexivit_size == 240
    assert cfg.native_grid == 14


@pytest.mark.parametrize("mode", FLEX_MODES)
def test_every_mode_samples_from_its_declared_ranges(mode):
    cfg = FlexConfig(mode=mode)
    shapes = _draw(cfg)
    t_seen = {s.frames for s in shapes}
    h_seen = {s.size for s in shapes}
    if mode == "none":
        assert shapes[0] == FlexShape(16, 224, 16, 14) and len(set(shapes)) == 1
        return
    assert t_seen == set(cfg.frames)  # all four lengths show up in 300 draws
    for s in shapes:
        assert s.grid == s.size // s.patch or mode == "static_tokens"
    if mode == "temporal":
        assert h_seen == {224} and {s.patch for s in shapes} == {16}
    elif mode == "static_patch":
        assert h_seen == set(cfg.sizes) and {s.patch for s in shapes} == {16}
        assert {s.grid for s in shapes} == {6, 8, 14, 24}
    elif mode == "static_tokens":
        assert h_seen == set(cfg.sizes) and {s.grid for s in shapes} == {14}
        assert {(s.size, s.patch) for s in shapes} == {(96, 7), (128, 9), (224, 16), (384, 27)}
    elif mode == "flexivit":
        assert h_seen == {240} and {s.patch for s in shapes} == set(cfg.flexivit_patches)
    elif mode == "flex_all":
        assert h_seen == set(cfg.sizes)
        for s in shapes:  # §4.2 example 5: p divides H, 12 <= p <= 48
            assert 12 <= s.patch <= 48 and s.size % s.patch == 0


def test_sample_shape_draws_what_uniform_choice_draws():
    # Reference: numpy's own uniform choice over R^t then R^s, from the same seed (the plans of benchmarks/flex.py)
    cfg = FlexConfig(mode="static_tokens")
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(50):
        t, h = int(ref.choice(cfg.frames)), int(ref.choice(cfg.sizes))
        assert sample_shape(cfg, rng) == FlexShape(t, h, round(h / 14), 14)


def test_static_token_patch_matches_paper_example():
    # §4.2 example 3: 128 px with a 14 x 14 grid -> p = 9
    assert static_token_patch(128, 14) == FlexShape(0, 128, 9, 14)
    assert static_token_patch(224, 14).patch == 16


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        FlexConfig(mode="stretchy")
    with pytest.raises(ValueError, match="tubelet"):
        FlexConfig(frames=(3, 8), tubelet=2)
    with pytest.raises(ValueError, match="kernel_resize"):
        FlexConfig(kernel_resize="nearest")


# ---- batch sampler -----------------------------------------------------------------------------------------------
def test_batch_size_scales_inversely_with_tokens():
    cfg = FlexConfig(mode="static_patch")
    ref = FlexShape(16, 224, 16, 14)
    assert batch_size_for(ref, 8, cfg) == 8
    assert batch_size_for(FlexShape(32, 224, 16, 14), 8, cfg) == 4
    assert batch_size_for(FlexShape(64, 384, 16, 24), 8, cfg) == 1  # 8 * 3136 / 36864 -> at least 1
    assert batch_size_for(FlexShape(8, 96, 16, 6), 8, cfg) == 64  # capped at 8 x base
    assert batch_size_for(FlexShape(8, 96, 16, 6), 8, dataclasses.replace(cfg, max_batch=20)) == 20
    assert batch_size_for(FlexShape(64, 384, 16, 24), 8, dataclasses.replace(cfg, scale_batch=False)) == 8


def test_sampler_is_deterministic_covers_the_data_and_bounds_tokens():
    cfg = FlexConfig(mode="static_tokens", frames=(8, 16, 32, 64))
    s = FlexBatchSampler(100, 8, cfg, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2)
    assert list(s) == a
    s.set_epoch(3)
    assert list(s) != a
    idx = [k.index for batch in a for k in batch]
    assert sorted(idx) == list(range(100))  # one epoch = every item once
    ref = 8 * 16 * 14**2
    for batch in a:
        assert len({k.shape for k in batch}) == 1  # one shape per batch
        assert len(batch) * tokens_per_clip(batch[0].shape) <= ref
    assert len(s) == len(list(s))


def test_sampler_shards_ranks_with_equal_steps_and_shapes():
    cfg = FlexConfig(mode="static_patch")
    plans = []
    for rank in range(3):
        s = FlexBatchSampler(50, 4, cfg, seed=1, rank=rank, world_size=3)
        plans.append(s.plan())
    assert len({len(p) for p in plans}) == 1
    for steps in zip(*plans):
        assert len({shape for shape, _ in steps}) == 1
        assert len({len(ix) for _, ix in steps}) == 1
    all_idx = {i for p in plans for _, ix in p for i in ix}
    assert all_idx == set(range(50))
    resumed = FlexBatchSampler(50, 4, cfg, seed=1, rank=0, world_size=3)
    resumed.set_epoch(0, start=2)
    assert [[k.index for k in b] for b in resumed] == [ix for _, ix in plans[0][2:]]


# ---- datasets --------------------------------------------------------------------------------------------------
class _Clips(Dataset):
    def __init__(self, n: int, frames: int = 4, size: int = 16) -> None:
        self.n, self.frames, self.size = n, frames, size

    def with_shape(self, frames: int, size: int) -> "_Clips":
        return _Clips(self.n, frames, size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        return Item(torch.full((self.frames, 3, self.size, self.size), float(i)), i % 3, i)


def test_loader_yields_batches_at_the_sampled_shape():
    cfg = FlexConfig(mode="static_tokens", frames=(2, 4), sizes=(16, 24, 32), base_frames=4, base_size=16,
                     base_patch=4)
    loader = DataLoader(FlexDataset(_Clips(20)), batch_sampler=FlexBatchSampler(20, 3, cfg, seed=0),
                        collate_fn=collate)
    n = 0
    for batch in loader:
        shape = batch.shape
        assert batch.video.shape[1:] == (shape.frames, 3, shape.size, shape.size)
        assert shape.grid == 4 and shape.patch == shape.size // 4
        assert torch.equal(batch.video[:, 0, 0, 0, 0], batch.index.float())
        n += len(batch.index)
    assert n == 20
    with pytest.raises(ValueError, match="mixes shapes"):
        collate([FlexDataset(_Clips(2))[FlexKey(0, FlexShape(2, 16, 4, 4))],
                 FlexDataset(_Clips(2))[FlexKey(1, FlexShape(4, 16, 4, 4))]])


def test_data_config_at_keeps_the_field_of_view():
    from pks4.data.datasets import DataConfig

    cfg = DataConfig(num_frames=8, size=224, short_side=256)
    half = data_config_at(cfg, 16, 112)
    assert (half.num_frames, half.size, half.short_side) == (16, 112, 128)
    assert data_config_at(cfg, None, None) == cfg
    assert data_config_at(DataConfig(size=32, short_side=32), 4, 48).short_side == 48


def test_unreadable_video_is_reported_with_its_reason(tmp_path):
    from pks4.data.datasets import DataConfig, build_dataset
    from pks4.data.synth import generate_synth

    splits = generate_synth(tmp_path / "synth", num_train_per_class=1, num_val_per_class=0, num_frames=4, size=32)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    listing = tmp_path / "train.txt"
    listing.write_text(splits.train.read_text() + f"{tmp_path / 'bad.mp4'} 1\n")
    cfg = DataConfig(root=str(splits.root), train=str(listing), num_frames=2, size=32, skip_bad_videos=True)
    ds = FlexDataset(build_dataset(cfg, "train", train=True))
    with pytest.warns(UserWarning, match="bad.mp4"):
        item = ds[FlexKey(len(ds) - 1, FlexShape(2, 48, 12, 4))]
    assert str(item).startswith(str(tmp_path / "bad.mp4")) and "not a readable video" in str(item)
    batch = collate([item, ds[FlexKey(0, FlexShape(2, 48, 12, 4))]])
    assert batch.skipped == [item] and batch.video.shape == (1, 2, 3, 48, 48)


def test_video_dataset_variant_loads_other_sizes(tmp_path):
    from pks4.data.datasets import DataConfig, build_dataset
    from pks4.data.synth import generate_synth

    splits = generate_synth(tmp_path / "synth", num_train_per_class=1, num_val_per_class=1, num_frames=8, size=32)
    cfg = DataConfig(root=str(splits.root), train=str(splits.train), val=str(splits.val), num_frames=4, size=32,
                     short_side=32, flip="off")
    ds = FlexDataset(build_dataset(cfg, "train", train=True))
    item = ds[FlexKey(0, FlexShape(6, 24, 6, 4))]
    assert item.video.shape == (6, 3, 24, 24) and item.shape.size == 24
    val = FlexDataset(build_dataset(cfg, "val", train=False))
    assert val[FlexKey(1, FlexShape(2, 48, 12, 4))].video.shape == (2, 3, 48, 48)


def test_one_default_mode_and_the_cells_it_trains():
    from pks4.engine.config import RunConfig

    assert FlexConfig().mode == "none" and not FlexConfig().enabled and RunConfig().flex == FlexConfig()
    assert FlexConfig().trained_cells(8, 224) == [(8, 224)]
    cfg = FlexConfig(mode="static_tokens", frames=(8, 16), sizes=(96, 224))
    assert cfg.enabled and cfg.trained_cells(8, 224) == [(8, 96), (8, 224), (16, 96), (16, 224)]
    assert FlexConfig(mode="temporal", frames=(8, 16)).trained_cells(8, 112) == [(8, 112), (16, 112)]
    assert FlexConfig(mode="flexivit", frames=(8,)).trained_cells(8, 112) == [(8, 240)]


def test_batches_is_the_whole_plan_of_an_epoch_whatever_the_start():
    cfg = FlexConfig(mode="static_patch")
    sampler = FlexBatchSampler(30, 4, cfg, seed=1)
    sampler.set_epoch(3, start=2)
    whole = sampler.batches(3)
    sampler.set_epoch(3)
    assert whole == list(sampler) and len({k.shape for k in whole[0]}) == 1
    assert whole != sampler.batches(4)
