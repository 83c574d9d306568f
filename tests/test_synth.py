"""The built-in temporal benchmark: deterministic, complete, readable, and temporally paired by construction."""
from __future__ import annotations

import numpy as np
import pytest

from pks4.data.synth import (
    CLASSES,
    ENCODER_OPTIONS,
    FLIP_PAIRS,
    PAIRS,
    generate_synth,
    render_clip,
    sample_params,
    write_video,
)
from pks4.data.video import probe_video, read_frames

TINY = dict(num_train_per_class=2, num_val_per_class=1, num_frames=8, size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth_a"), seed=3, **TINY)


def _entries(path):
    return [ln.rsplit(maxsplit=1) for ln in path.read_text().splitlines()]


def test_lists_classes_and_files(tiny):
    assert tiny.labels.read_text().split() == list(CLASSES) and tiny.num_classes == len(CLASSES) == 10
    for lst, per_class in ((tiny.train, 2), (tiny.val, 1)):
        entries = _entries(lst)
        labels = [int(lab) for _, lab in entries]
        assert sorted(set(labels)) == list(range(10)) and len(labels) == 10 * per_class
        for rel, _ in entries:
            assert (tiny.root / rel).is_file()
    pairs = [ln.split() for ln in tiny.flip_pairs.read_text().splitlines()]
    assert [tuple(p) for p in pairs] == list(FLIP_PAIRS)


def test_files_decode_with_video_reader(tiny):
    rel, _ = _entries(tiny.val)[0]
    info = probe_video(tiny.root / rel)
    assert (info.num_frames, info.height, info.width) == (8, 32, 32)
    assert read_frames(tiny.root / rel, range(8)).shape == (8, 32, 32, 3)


def test_same_seed_same_data(tiny, tmp_path):
    again = generate_synth(tmp_path / "b", seed=3, **TINY)
    assert again.train.read_text() == tiny.train.read_text()
    assert again.val.read_text() == tiny.val.read_text()
    rel, _ = _entries(tiny.train)[5]
    assert np.array_equal(read_frames(tiny.root / rel, range(8)).numpy(),
                          read_frames(again.root / rel, range(8)).numpy())
    other = generate_synth(tmp_path / "c", seed=4, **TINY)
    assert not np.array_equal(read_frames(other.root / rel, range(8)).numpy(),
                              read_frames(tiny.root / rel, range(8)).numpy())


def test_data_config_builds_a_dataset(tiny):
    from pks4.data.datasets import build_dataset

    cfg = tiny.data_config(num_frames=4)
    train = build_dataset(cfg, "train", train=True)
    assert train.classes == list(CLASSES) and train[0].video.shape == (4, 3, 32, 32)
    assert train._train_tf.flip_pairs == {0: 1, 1: 0, 6: 7, 7: 6}


def test_existing_output_is_reused(tiny):
    rel, _ = _entries(tiny.train)[0]
    before = (tiny.root / rel).stat().st_mtime_ns
    generate_synth(tiny.root, seed=3, **TINY)
    assert (tiny.root / rel).stat().st_mtime_ns == before


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_pair_members_show_the_same_frames_in_reverse(pair):
    rng = np.random.default_rng(pair)
    params = sample_params(rng, PAIRS[pair][0], 8, 32)
    forward = render_clip(2 * pair, params, 8, 32)
    backward = render_clip(2 * pair + 1, params, 8, 32)
    assert np.array_equal(backward, forward[::-1])
    # the frame multiset is identical, so any order-blind model sees the same evidence for both classes
    as_set = lambda clip: sorted(f.tobytes() for f in clip)  # noqa: E731
    assert as_set(forward) == as_set(backward)
    assert not np.array_equal(forward[0], forward[-1])  # something does change over time


def test_pair_property_survives_encoding(tmp_path):
    params = sample_params(np.random.default_rng(2), "scale", 8, 32)
    paths = [write_video(tmp_path / f"{k}.mp4", render_clip(4 + k, params, 8, 32), 8, crf=None,
                         options=ENCODER_OPTIONS) for k in range(2)]
    approach, recede = (read_frames(p, range(8)).numpy() for p in paths)
    assert np.array_equal(recede, approach[::-1])


def _object_centroids(clip, color):
    xs, ys = [], []
    for frame in clip:
        mask = np.all(frame == np.array(color, np.uint8), axis=-1)
        yy, xx = np.nonzero(mask)
        xs.append(xx.mean())
        ys.append(yy.mean())
    return np.array(xs), np.array(ys)


@pytest.mark.parametrize("label, axis, sign", [(0, 0, 1), (1, 0, -1), (2, 1, 1), (3, 1, -1)])
def test_motion_direction_matches_class_name(label, axis, sign):
    params = sample_params(np.random.default_rng(7), PAIRS[label // 2][0], 8, 64)
    clip = render_clip(label, params, 8, 64)
    centre = _object_centroids(clip, params.color)[axis]
    assert sign * (centre[-1] - centre[0]) > 8  # pixels travelled, net of camera jitter


@pytest.mark.parametrize("label, turn", [(6, 1), (7, -1)])
def test_rotation_direction_matches_class_name(label, turn):
    params = sample_params(np.random.default_rng(11), "rotate", 8, 64)
    assert params.shape == "dial"  # a disc whose hand (marker colour) runs from the centre to the rim
    clip = render_clip(label, params, 8, 64)
    angles = []
    for frame in clip:
        body = np.all(frame == np.array(params.color, np.uint8), axis=-1)
        dot = np.all(frame == np.array(params.marker, np.uint8), axis=-1)
        yy, xx = np.nonzero(body | dot)
        my, mx = np.nonzero(dot)
        angles.append(np.arctan2(my.mean() - yy.mean(), mx.mean() - xx.mean()))
    # with y pointing down, a growing angle is a clockwise turn on screen
    assert turn * np.diff(np.unwrap(angles)).mean() > np.deg2rad(5)
