"""Datasets in their published layouts, built from tiny real videos; annotation mistakes caught up front."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pks4.data.datasets import (
    DataConfig,
    DatasetError,
    build_dataset,
    check_dataset,
    load_video_views,
    read_class_names,
)
from pks4.data.items import Skipped, collate
from pks4.data.sampling import parse_views
from pks4.data.synth import write_video

T, S = 8, 32


def flat_clip(level: int, t: int = T, h: int = 24, w: int = 40) -> np.ndarray:
    """Frame i is a flat image of value level + 10 i: spatially uniform, different over time."""
    return np.stack([np.full((h, w, 3), level + 10 * i, np.uint8) for i in range(t)])


@pytest.fixture
def videos(tmp_path):
    """Three real mp4 files, one with unicode and spaces in its name."""
    names = ["a.mp4", "sub/b.mp4", "vidéo c ☃.mp4"]
    for k, name in enumerate(names):
        write_video(tmp_path / name, flat_clip(20 + 30 * k), fps=10)
    return tmp_path, names


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), num_frames=4, size=S, short_side=S, **kw)


def test_list_file_space_and_comma(videos):
    root, names = videos
    (root / "train.txt").write_text("".join(f"{n} {k}\n" for k, n in enumerate(names)))
    (root / "val.csv").write_text("path,label\n" + "".join(f"{n},{k}\n" for k, n in enumerate(names)))
    cfg = cfg_for(root, train="train.txt", val="val.csv")
    ds = build_dataset(cfg, "train", train=True)
    assert [s.label for s in ds.samples] == [0, 1, 2] and ds.classes == ["0", "1", "2"]
    item = ds[2]
    assert item.video.shape == (4, 3, S, S) and item.label == 2 and item.index == 2
    val = build_dataset(cfg, "val", train=False)
    assert len(val) == 3 and val[0].video.shape == (4, 3, S, S)


def test_eval_views_are_clip_major(videos):
    root, names = videos
    (root / "val.txt").write_text(f"{names[0]} 0\n")
    ds = build_dataset(cfg_for(root, val="val.txt"), "val", train=False, views=parse_views("4x2x3"))
    v = ds[0].video
    assert v.shape == (6, 4, 3, S, S)
    # frames are spatially flat: the 3 crops of a clip agree, and the two clips hold different frames
    for c in range(2):
        for k in range(1, 3):
            assert torch.allclose(v[3 * c + k], v[3 * c], atol=1e-5)
    assert not torch.allclose(v[0], v[3])


def test_load_video_views(videos):
    root, names = videos
    views = load_video_views(root / names[2], 4, S, parse_views("8x2x3"), cfg_for(root))
    assert views.shape == (6, 4, 3, S, S)


def test_class_names_file_and_out_of_range(videos):
    root, names = videos
    (root / "classes.txt").write_text("0 cat\n1 dog\n")
    assert read_class_names(root / "classes.txt") == ["cat", "dog"]
    (root / "train.txt").write_text(f"{names[0]} 0\n{names[1]} 2\n{names[2]} 7\n")
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg_for(root, train="train.txt", labels="classes.txt"), "train", train=True)
    msg = str(err.value)
    assert "train.txt" in msg and "line 2: label 2 out of range for 2 classes" in msg and "line 3" in msg


@pytest.mark.parametrize("content, expected", [
    ("a.mp4 -1\n", "line 1: negative label -1"),
    ("a.mp4 0\na.mp4 one\n", "line 2: label 'one' is not an integer"),
    ("a.mp4 1.5\n", "not an integer"),
    ("", "no samples found"),
    ("a.mp4;0\n", "wrong delimiter"),
])
def test_bad_list_lines(videos, content, expected):
    root, _ = videos
    (root / "train.txt").write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        build_dataset(cfg_for(root, train="train.txt"), "train", train=True)
    assert err.value.path.endswith("train.txt")


def test_missing_files_reported_all_at_once(videos):
    root, names = videos
    (root / "train.txt").write_text(f"{names[0]} 0\ngone1.mp4 1\ngone2.mp4 0\n")
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg_for(root, train="train.txt"), "train", train=True)
    assert "2 of 3" in str(err.value) and "gone1.mp4" in str(err.value) and "gone2.mp4" in str(err.value)
    with pytest.warns(UserWarning, match="missing"):
        ds = build_dataset(cfg_for(root, train="train.txt", skip_bad_videos=True), "train", train=True)
    assert len(ds) == 1 and len(ds.bad) == 2


def test_unreadable_video_yields_skipped_and_collate_lists_it(videos):
    root, names = videos
    (root / "broken.mp4").write_text("not a video")
    (root / "train.txt").write_text(f"{names[0]} 0\nbroken.mp4 1\n")
    strict = build_dataset(cfg_for(root, train="train.txt"), "train", train=True)
    with pytest.raises(Exception, match="broken.mp4"):
        collate([strict[1]]).raise_skipped()  # whoever reads the batches decides: here, strict
    assert not strict.bad  # nothing skipped: the reader raises instead
    ds = build_dataset(cfg_for(root, train="train.txt", skip_bad_videos=True), "train", train=True)
    with pytest.warns(UserWarning, match="broken.mp4"):
        batch = collate([ds[0], ds[1]])
    assert batch.video.shape == (1, 4, 3, S, S) and batch.label.tolist() == [0]
    assert [s.path for s in batch.skipped] == [str(root / "broken.mp4")]
    assert "not a readable video" in batch.skipped[0].reason and "broken.mp4" not in batch.skipped[0].reason
    assert ds.bad and ds.bad[0][0].endswith("broken.mp4")
    empty = collate([Skipped("a.mp4", "gone"), Skipped("b.mp4", "gone")])
    assert empty.video is None and len(empty) == 0 and [str(s) for s in empty.skipped] == ["a.mp4: gone",
                                                                                          "b.mp4: gone"]


def _write_frame_folder(d, n):
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(d / f"img_{i + 1:05d}.jpg")


def test_rawframes_list(tmp_path):
    _write_frame_folder(tmp_path / "frames" / "v1", 6)
    (tmp_path / "raw.txt").write_text("frames/v1 6 1\n")
    cfg = cfg_for(tmp_path, train="raw.txt", val="raw.txt")
    ds = build_dataset(cfg, "train", train=True)
    assert ds.samples[0].num_frames == 6 and ds[0].video.shape == (4, 3, S, S)
    assert build_dataset(cfg, "val", train=False)[0].video.shape == (4, 3, S, S)


def test_folder_per_class(tmp_path):
    for split in ("train", "val"):
        for k, cls in enumerate(["zebra", "ant"]):
            write_video(tmp_path / split / cls / f"{cls}{k}.mp4", flat_clip(40), fps=10)
    cfg = DataConfig(root=str(tmp_path), num_frames=4, size=S, short_side=S)
    ds = build_dataset(cfg, "train", train=True)
    assert ds.classes == ["ant", "zebra"] and sorted(s.label for s in ds.samples) == [0, 1]
    assert build_dataset(cfg, "val", train=False).classes == ["ant", "zebra"]


def test_ssv2_official_layout(tmp_path):
    labels = {"Pushing something from left to right": "0", "Pushing something from right to left": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [{"id": "101", "label": "pushing a cup from left to right",
                "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
               {"id": "102", "label": "pushing a pen from right to left",
                "template": "Pushing [something] from right to left", "placeholders": ["a pen"]}]
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps(entries))
    write_video(tmp_path / "101.webm", flat_clip(30, h=24, w=32), fps=12, codec="libvpx")
    write_video(tmp_path / "102.webm", flat_clip(60, h=24, w=32), fps=12, codec="libvpx")
    cfg = cfg_for(tmp_path, train="something-something-v2-train.json", labels="labels.json", flip="off")
    ds = build_dataset(cfg, "train", train=True)
    assert ds.classes == list(labels) and [s.label for s in ds.samples] == [0, 1]
    assert ds[1].video.shape == (4, 3, S, S)


def test_k400_csv_layouts_and_wrong_delimiter(tmp_path):
    header = "label,youtube_id,time_start,time_end,split\n"
    rows = "abseiling,aaa,0,10,train\nair drumming,bbb,5,15,train\n"
    (tmp_path / "train.csv").write_text(header + rows)
    write_video(tmp_path / "train" / "abseiling" / "aaa_000000_000010.mp4", flat_clip(10), fps=10)
    write_video(tmp_path / "train" / "bbb_000005_000015.mp4", flat_clip(50), fps=10)  # flat layout also found
    cfg = cfg_for(tmp_path, train="train.csv")
    ds = build_dataset(cfg, "train", train=True)
    assert ds.classes == ["abseiling", "air drumming"] and [s.label for s in ds.samples] == [0, 1]
    assert ds[0].video.shape == (4, 3, S, S)
    (tmp_path / "semi.csv").write_text(header.replace(",", ";") + rows.replace(",", ";"))
    with pytest.raises(DatasetError, match="comma-separated"):
        build_dataset(cfg_for(tmp_path, train="semi.csv", format="k400"), "train", train=True)


def test_flip_swap_needs_pairs(videos):
    root, names = videos
    (root / "train.txt").write_text(f"{names[0]} 0\n{names[1]} 1\n")
    with pytest.raises(DatasetError, match="flip_pairs"):
        build_dataset(cfg_for(root, train="train.txt", flip="swap"), "train", train=True)
    (root / "pairs.txt").write_text("0 1\n")
    ds = build_dataset(cfg_for(root, train="train.txt", flip="swap", flip_pairs=str(root / "pairs.txt")),
                       "train", train=True)
    assert ds._train_tf.flip_pairs == {0: 1, 1: 0}


def test_config_validation():
    with pytest.raises(ValueError, match="format"):
        DataConfig(format="csv")
    with pytest.raises(ValueError, match="m7-n4"):
        DataConfig(rand_augment="m7")
    assert DataConfig(scale=[0.5, 1.0]).scale == (0.5, 1.0)


def test_check_dataset_report(videos):
    root, names = videos
    (root / "broken.mp4").write_bytes(b"")
    (root / "list.txt").write_text(f"{names[0]} 0\n{names[1]} 1\nbroken.mp4 1\nmissing.mp4 0\n")
    report = check_dataset(root / "list.txt", cfg_for(root))
    assert report.counts == {"0": 2, "1": 2} and report.num_samples == 4
    assert len(report.missing) == 1 and "missing.mp4" in report.missing[0]
    assert len(report.unreadable) == 1 and "empty" in report.unreadable[0][1]
    assert report.frame_counts == [T, T] and not report.ok
    text = report.to_text()
    assert "NOT OK" in text and "missing.mp4" in text and "broken.mp4" in text
    (root / "good.txt").write_text(f"{names[0]} 0\n{names[2]} 1\n")
    good = check_dataset(root / "good.txt", cfg_for(root))
    assert good.ok and good.to_text().endswith("OK")


def test_cache_decoded_gives_the_same_clips(tmp_path):
    import dataclasses

    from pks4.data.synth import generate_synth

    splits = generate_synth(tmp_path / "s", num_train_per_class=1, num_val_per_class=1, num_frames=8, size=32)
    cfg = splits.data_config(size=32, short_side=32, num_frames=4)
    from pks4.data import datasets

    datasets.clear_decoded_cache()
    plain = build_dataset(cfg, "val", train=False)
    cached = build_dataset(dataclasses.replace(cfg, cache_decoded=True), "val", train=False)
    for i in range(len(plain)):
        torch.testing.assert_close(cached[i].video, plain[i].video)
        torch.testing.assert_close(cached[i].video, plain[i].video)  # second read: from memory
    assert len(datasets._DECODED) == len(plain)
    again = build_dataset(dataclasses.replace(cfg, cache_decoded=True), "val", train=False)
    torch.testing.assert_close(again[0].video, plain[0].video)
    assert len(datasets._DECODED) == len(plain)  # a second dataset on the same files decodes nothing
    # a file rewritten in place is decoded again, not served stale
    victim = Path(plain.samples[0].path)
    other = Path(plain.samples[1].path)
    victim.write_bytes(other.read_bytes())
    torch.testing.assert_close(again[0].video, plain[1].video)
    datasets.clear_decoded_cache()


def test_a_list_whose_paths_end_in_a_number_is_not_read_as_raw_frames(tmp_path):
    """``clip 1 0`` is a video "clip 1" of class 0, or a folder "clip" of 1 frame: the folder on disk decides."""
    (tmp_path / "list.txt").write_text("clip 1 0\nclip 2 1\n")
    report = check_dataset(tmp_path / "list.txt", DataConfig(root=str(tmp_path)), max_videos=0)
    assert report.format == "list" and report.errors == []
    assert [m.split(": ", 1)[1] for m in report.missing] == [str(tmp_path / "clip 1"), str(tmp_path / "clip 2")]
    (tmp_path / "clip").mkdir()
    report = check_dataset(tmp_path / "list.txt", DataConfig(root=str(tmp_path)), max_videos=0)
    assert report.format == "rawframes" and report.missing == []
