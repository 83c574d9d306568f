"""The captioned events benchmark: captions that name an order of colours, a held-out split with every order of every
colour set, and clips whose time reversal is a clip of the reversed sequence (the frame average cannot tell)."""
import itertools
import json
import re
from dataclasses import replace

import numpy as np
import pytest

from pks4.data.captions import read_captions
from pks4.data.synth_events import (EVENTS, PALETTE, SEQUENCES, _scene, _segment_lengths, event_captions,
                                    generate_events, render_events, reversed_captions)
from pks4.data.video import read_frames


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    return generate_events(tmp_path_factory.mktemp("events"), seed=4, num_train=12, num_frames=16, size=32)


def test_captions_name_the_order_and_the_twin_reverses_it():
    assert len(SEQUENCES) == 6 * 5 * 4 and len(set(SEQUENCES)) == len(SEQUENCES)
    own, twin = event_captions(("red", "green", "blue")), reversed_captions(("red", "green", "blue"))
    assert own[0] == "the object turns red, then green, then blue"
    assert twin[0] == "the object turns blue, then green, then red"
    for a, b in zip(own, twin):  # the same words in another order: only time order tells them apart
        assert a != b and sorted(re.findall(r"\w+", a)) == sorted(re.findall(r"\w+", b))


def test_segment_lengths_are_long_enough_and_their_law_is_symmetric():
    rng = np.random.default_rng(0)
    draws = [_segment_lengths(rng, 16) for _ in range(3000)]
    assert all(sum(d) == 16 and min(d) >= 4 and len(d) == EVENTS for d in draws)
    counts = {d: draws.count(d) for d in set(draws)}
    assert len(counts) == 15  # every composition of 16 into three parts >= 4
    for d, n in counts.items():  # the reversed composition is as frequent (within sampling noise)
        assert abs(n - counts[d[::-1]]) < 90


def test_a_clip_played_backwards_is_a_clip_of_the_reversed_sequence():
    scene = _scene(np.random.default_rng(3), 16, 32)
    frames = render_events(("red", "green", "blue"), scene, 16, 32)
    end = tuple(s + d * 15 for s, d in zip(scene.start, scene.drift))
    twin = replace(scene, start=end, drift=tuple(-d for d in scene.drift), lengths=scene.lengths[::-1])
    np.testing.assert_array_equal(render_events(("blue", "green", "red"), twin, 16, 32), frames[::-1])
    red = (frames == np.array(PALETTE["red"], dtype=np.uint8)).all(axis=-1).sum(axis=(1, 2))  # red pixels per frame
    first = scene.lengths[0]
    assert (red[:first] > 0).all() and (red[first:] == 0).all()


def test_files_lists_and_captions(events):
    val = [ln.split() for ln in events.val.read_text().splitlines()]
    assert len(val) == 120 and len(events.train.read_text().splitlines()) == 12
    sequences = [SEQUENCES[int(label)] for _, label in val]
    by_set = {}
    for seq in sequences:
        by_set.setdefault(frozenset(seq), []).append(seq)
    assert len(by_set) == 20  # each colour set: all six orders, once
    assert all(sorted(v) == sorted(itertools.permutations(v[0])) for v in by_set.values())
    captions = read_captions(events.val_captions, "captions")
    assert len(captions.captions) == 360 and captions.captions[:3] == event_captions(sequences[0])
    classes = events.labels.read_text().split()
    assert len(classes) == 120 and classes[int(val[0][1])] == "_".join(sequences[0])
    frames = read_frames(str(events.root / val[0][0]), list(range(16)))
    assert np.asarray(frames).shape == (16, 32, 32, 3)
    assert json.loads((events.root / "manifest.json").read_text())["kind"] == "events"


def test_generation_is_deterministic_and_reused(events, tmp_path):
    again = generate_events(tmp_path / "again", seed=4, num_train=12, num_frames=16, size=32)
    for split in ("train.txt", "val.txt", "captions_train.json"):
        assert (again.root / split).read_text() == (events.root / split).read_text()
    first = (events.root / events.val.read_text().split()[0]).read_bytes()
    assert (again.root / events.val.read_text().split()[0]).read_bytes() == first
    stamp = (again.root / "manifest.json").stat().st_mtime_ns
    generate_events(tmp_path / "again", seed=4, num_train=12, num_frames=16, size=32)
    assert (again.root / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="cannot hold 3 events"):
        generate_events(tmp_path / "short", num_train=1, num_frames=2, size=32)
