"""The data contract: datasets yield Item | Skipped, one collate makes a Batch, formats are registry entries."""
from __future__ import annotations

import pytest
import torch

from pks4.data import datasets
from pks4.data.datasets import DataConfig, Parsed, Sample, build_dataset, dataset_formats, register_format
from pks4.data.flex_sampler import FlexShape
from pks4.data.items import Batch, Item, Skipped, collate
from pks4.data.synth import write_video
from pks4.data.video import DataError


def _item(i: int, shape: FlexShape | None = None, **extra) -> Item:
    return Item(torch.full((2, 3, 4, 4), float(i)), label=i % 3, index=i, shape=shape, extra=extra)


def test_collate_stacks_items_and_lists_the_skipped():
    batch = collate([_item(0), Skipped("bad.mp4", "truncated"), _item(4)])
    assert batch.video.shape == (2, 2, 3, 4, 4) and batch.video[:, 0, 0, 0, 0].tolist() == [0.0, 4.0]
    assert batch.label.tolist() == [0, 1] and batch.label.dtype == torch.long and batch.index.tolist() == [0, 4]
    assert batch.skipped == [Skipped("bad.mp4", "truncated")] and len(batch) == 2 and batch.shape is None
    with pytest.raises(DataError, match=r"^bad\.mp4: truncated; fix or remove it, or set --skip-bad-videos"):
        batch.raise_skipped()
    assert collate([_item(1)]).raise_skipped().index.tolist() == [1]


def test_collate_names_the_count_of_further_skipped_files():
    with pytest.raises(DataError, match=r"a\.mp4: gone \(and 2 more in this batch\)"):
        collate([Skipped("a.mp4", "gone"), Skipped("b.mp4", "gone"), Skipped("c.mp4", "gone")]).raise_skipped()


def test_collate_keeps_one_flexible_shape_and_refuses_two():
    shape = FlexShape(2, 4, 2, 2)
    assert collate([_item(0, shape), _item(1, shape)]).shape == shape
    with pytest.raises(ValueError, match="mixes shapes"):
        collate([_item(0, shape), _item(1, FlexShape(2, 4, 1, 4))])


def test_collate_extras_key_by_key_and_refuses_other_items():
    batch = collate([_item(0, caption="a dial turns left"), _item(1, caption="a dial turns right")])
    assert batch.extra == {"caption": ["a dial turns left", "a dial turns right"]}
    with pytest.raises(TypeError, match="datasets yield pks4.data.items.Item or Skipped"):
        collate([{"video": torch.zeros(1), "label": 0, "index": 0}])


def test_pin_memory_pins_every_tensor_and_keeps_the_rest(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory  # what DataLoader(pin_memory=True) calls

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or t.clone())
    batch = collate([_item(0), Skipped("x.mp4", "why")])
    out = pin_memory(batch)
    assert isinstance(out, Batch) and len(pinned) == 3 and out.skipped == batch.skipped
    assert torch.equal(out.video, batch.video) and out.video is not batch.video
    assert pin_memory(collate([Skipped("x.mp4", "why")])).video is None  # nothing to pin


# ---- the dataset side ----------------------------------------------------------------------------------------------
def _list_of(tmp_path, *entries):
    import numpy as np

    write_video(tmp_path / "good.mp4", np.zeros((6, 16, 16, 3), np.uint8), fps=6)
    (tmp_path / "list.txt").write_text("".join(f"{e} 0\n" for e in entries))
    return DataConfig(root=str(tmp_path), train="list.txt", num_frames=2, size=16, short_side=16)


def test_a_failing_transform_is_skipped_only_when_asked(tmp_path, monkeypatch):
    cfg = _list_of(tmp_path, "good.mp4")

    def broken(frames, label):
        raise ZeroDivisionError("a bug in an augmentation")

    strict = build_dataset(cfg, "train", train=True)
    monkeypatch.setattr(strict, "_train_tf", broken)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        strict[0]
    lenient = build_dataset(DataConfig(**{**cfg.__dict__, "skip_bad_videos": True}), "train", train=True)
    monkeypatch.setattr(lenient, "_train_tf", broken)
    with pytest.warns(UserWarning, match="good.mp4"):
        got = lenient[0]
    assert got == Skipped(str(tmp_path / "good.mp4"), "ZeroDivisionError: a bug in an augmentation")


def test_with_shape_loads_the_same_samples_at_another_size(tmp_path):
    ds = build_dataset(_list_of(tmp_path, "good.mp4"), "train", train=True)
    other = ds.with_shape(4, 24)
    item = other[0]
    assert isinstance(item, Item) and item.video.shape == (4, 3, 24, 24) and other.samples == ds.samples
    assert (other.cfg.num_frames, other.cfg.size, ds.cfg.size) == (4, 24, 16)


# ---- the format registry -------------------------------------------------------------------------------------------
def test_a_new_format_is_a_parser_and_one_line(tmp_path):
    def parse_pairs(source, root, cfg, classes) -> Parsed:  # "label|path" lines
        out = Parsed(source, "pairs", classes=["a", "b"])
        for n, line in enumerate(source.read_text().splitlines(), 1):
            label, path = line.split("|")
            out.samples.append(Sample(str(root / path), int(label)))
            out.lines.append(f"line {n}")
        return out

    import numpy as np

    write_video(tmp_path / "v.mp4", np.zeros((6, 16, 16, 3), np.uint8), fps=6)
    (tmp_path / "x.pairs").write_text("1|v.mp4\n")
    register_format("pairs", parse_pairs, detect=lambda path, head, root: path.suffix == ".pairs")
    try:
        assert "pairs" in dataset_formats()
        for fmt in ("pairs", "auto"):  # named, or detected
            cfg = DataConfig(format=fmt, root=str(tmp_path), train="x.pairs", num_frames=2, size=16, short_side=16)
            ds = build_dataset(cfg, "train", train=True)
            assert ds.classes == ["a", "b"] and ds.samples == [Sample(str(tmp_path / "v.mp4"), 1)]
        with pytest.raises(ValueError, match="already registered"):
            register_format("pairs", parse_pairs)
    finally:
        del datasets._FORMATS["pairs"]
    with pytest.raises(ValueError, match=r"DataConfig.format='pairs'; expected one of \('auto', 'folder'"):
        DataConfig(format="pairs")
