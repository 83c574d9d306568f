"""Golden frame indices and crop boxes: these numbers define what 'a clip' and 'a view' mean."""
from __future__ import annotations

import numpy as np
import pytest

from pks4.data.sampling import ViewSpec, dense_indices, parse_views, segment_indices, spatial_crop_boxes


@pytest.mark.parametrize(
    "num_total, num_frames, expected",
    [
        (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
        (10, 4, [1, 3, 6, 8]),
        (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (3, 8, [0, 0, 0, 1, 1, 2, 2, 2]),  # fewer frames than asked: repeats, in order
        (1, 4, [0, 0, 0, 0]),
        (100, 3, [16, 50, 83]),
    ],
)
def test_segment_test_indices_golden(num_total, num_frames, expected):
    assert segment_indices(num_total, num_frames, train=False) == expected


def test_segment_multi_clip_interleaves():
    assert segment_indices(16, 4, train=False, clip_index=0, num_clips=2) == [1, 5, 9, 13]
    assert segment_indices(16, 4, train=False, clip_index=1, num_clips=2) == [3, 7, 11, 15]


@pytest.mark.parametrize("num_total, num_frames", [(16, 8), (10, 4), (3, 8), (250, 8), (1, 2)])
def test_segment_train_stays_in_its_segment_and_covers_it(num_total, num_frames):
    rng = np.random.default_rng(0)
    seen = [set() for _ in range(num_frames)]
    seg = num_total / num_frames
    for _ in range(400):
        idx = segment_indices(num_total, num_frames, train=True, rng=rng)
        assert idx == sorted(idx) and 0 <= min(idx) and max(idx) < num_total
        for i, j in enumerate(idx):
            seen[i].add(j)
    for i, s in enumerate(seen):
        lo = int(np.floor(i * seg))
        hi = max(lo + 1, int(np.floor((i + 1) * seg)))
        assert s == set(range(lo, min(hi, num_total))), f"segment {i}"  # every frame of the segment reachable


def test_segment_train_is_reproducible_with_rng():
    a = segment_indices(300, 8, train=True, rng=np.random.default_rng(5))
    b = segment_indices(300, 8, train=True, rng=np.random.default_rng(5))
    assert a == b


@pytest.mark.parametrize(
    "num_total, clip_index, num_clips, expected",
    [
        (100, 0, 1, [34, 38, 42, 46, 50, 54, 58, 62]),
        (100, 0, 3, [11, 15, 19, 23, 27, 31, 35, 39]),
        (100, 2, 3, [57, 61, 65, 69, 73, 77, 81, 85]),
        (32, 0, 1, [0, 4, 8, 12, 16, 20, 24, 28]),
        (20, 0, 1, [1, 3, 6, 8, 11, 13, 16, 18]),  # shorter than the window: spread over the whole video
        (5, 0, 1, [0, 0, 1, 2, 2, 3, 4, 4]),
    ],
)
def test_dense_test_indices_golden(num_total, clip_index, num_clips, expected):
    assert dense_indices(num_total, 8, 4, train=False, clip_index=clip_index, num_clips=num_clips) == expected


def test_dense_train_window_is_random_but_strided():
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(300):
        idx = dense_indices(50, 4, 3, train=True, rng=rng)
        assert np.all(np.diff(idx) == 3) and idx[-1] < 50
        starts.add(idx[0])
    assert starts == set(range(0, 50 - 12 + 1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 frames"):
        segment_indices(0, 8, train=False)
    with pytest.raises(ValueError, match="clip_index"):
        dense_indices(10, 2, 2, train=False, clip_index=3, num_clips=2)


def test_crop_boxes_golden():
    assert spatial_crop_boxes(256, 340, 224, 1) == [(16, 58, 224, 224)]
    assert spatial_crop_boxes(256, 340, 224, 3) == [(16, 0, 224, 224), (16, 58, 224, 224), (16, 116, 224, 224)]
    assert spatial_crop_boxes(340, 256, 224, 3) == [(0, 16, 224, 224), (58, 16, 224, 224), (116, 16, 224, 224)]
    assert spatial_crop_boxes(64, 64, 64, 3) == [(0, 0, 64, 64)] * 3
    with pytest.raises(ValueError, match="does not fit"):
        spatial_crop_boxes(200, 300, 224, 1)


def test_parse_views():
    assert parse_views("8x2x3") == ViewSpec(frames=8, clips=2, crops=3)
    assert parse_views("16") == ViewSpec(16, 1, 1)
    assert parse_views("8x3") == ViewSpec(8, 3, 1)
    assert parse_views("8x2x3").num_views == 6 and str(parse_views("8x2x3")) == "8x2x3"
    for bad in ("8x", "axb", "8x0x1", ""):
        with pytest.raises(ValueError):
            parse_views(bad)
