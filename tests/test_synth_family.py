"""The benchmark family: every kind is deterministic, its pairs differ only in frame order, bad requests fail
clearly, and the clips show what the class names say."""
from __future__ import annotations

import numpy as np
import pytest

from pks4.cli import main
from pks4.data.synth import KINDS, check_request, generate_synth, get_kind, render_pair_clip
from pks4.data.video import read_frames

PAIRS = [(name, k) for name, kind in KINDS.items() for k in range(len(kind.pairs))]
NEW_KINDS = [name for name in KINDS if name != "classic"]


def _clip(kind: str, label: int, seed: int = 0, frames: int = 8, size: int = 64) -> np.ndarray:
    return render_pair_clip(KINDS[kind], label, np.random.default_rng([seed, label // 2]), frames, size)


def test_registry_lists_at_least_four_new_kinds_with_paired_classes():
    assert "classic" in KINDS and len(NEW_KINDS) >= 4
    for kind in KINDS.values():
        assert len(kind.classes) == 2 * len(kind.pairs) == len(set(kind.classes))
        assert kind.sizes[0] <= 64 and kind.sizes[1] >= 128 and kind.frames[0] <= 8 and kind.frames[1] >= 32
        for a, b in kind.flip_pairs:
            assert a in kind.classes and b in kind.classes


@pytest.mark.parametrize("kind, pair", PAIRS)
def test_reversed_class_is_the_same_clip_played_backwards(kind, pair):
    """With the same random state the backward class draws exactly the forward frames in reverse, so the frame
    multiset (and the mean frame) of a clip and of its reversed twin are identical: order-blind models are at
    chance within the pair by construction."""
    forward, backward = _clip(kind, 2 * pair), _clip(kind, 2 * pair + 1)
    assert forward.shape == (8, 64, 64, 3) and forward.dtype == np.uint8
    assert np.array_equal(backward, forward[::-1])
    assert sorted(f.tobytes() for f in forward) == sorted(f.tobytes() for f in backward)
    assert np.array_equal(forward.mean(0), backward.mean(0))
    change = np.abs(forward[-1].astype(int) - forward[0].astype(int)).mean()
    assert change > 3  # something visible happens between the first and the last frame


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_renderers_are_deterministic_in_the_seed(kind):
    label = len(KINDS[kind].classes) - 1
    assert np.array_equal(_clip(kind, label, seed=1), _clip(kind, label, seed=1))
    assert not np.array_equal(_clip(kind, label, seed=1), _clip(kind, label, seed=2))


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("frames, size", [(8, 64), (32, 128), (16, 96)])
def test_every_kind_draws_its_design_range(kind, frames, size):
    clip = _clip(kind, 0, frames=frames, size=size)
    assert clip.shape == (frames, size, size, 3)


def test_generated_files_decode_to_the_same_bytes_for_the_same_seed(tmp_path):
    args = dict(kind="occlusion", num_train_per_class=1, num_val_per_class=0, num_frames=8, size=64)
    a = generate_synth(tmp_path / "a", seed=7, **args)
    b = generate_synth(tmp_path / "b", seed=7, **args)
    c = generate_synth(tmp_path / "c", seed=8, **args)
    assert a.labels.read_text().split() == list(KINDS["occlusion"].classes) and a.num_classes == 8
    rels = [line.split()[0] for line in a.train.read_text().splitlines()]
    assert len(rels) == 8 and b.train.read_text() == a.train.read_text()
    for rel in rels:
        assert np.array_equal(read_frames(a.root / rel, range(8)).numpy(), read_frames(b.root / rel, range(8)).numpy())
    assert not np.array_equal(read_frames(a.root / rels[0], range(8)).numpy(),
                              read_frames(c.root / rels[0], range(8)).numpy())
    assert "no class" in a.flip_pairs.read_text()  # a flip changes nothing here: the file says so, lists nothing


def test_pair_property_survives_encoding(tmp_path):
    args = dict(kind="sweep", num_train_per_class=1, num_val_per_class=0, num_frames=8, size=64)
    splits = generate_synth(tmp_path / "s", seed=3, **args)
    from pks4.data.synth import ENCODER_OPTIONS, write_video

    twin = write_video(tmp_path / "twin.mp4", _clip("sweep", 1, seed=5)[::-1], 8, crf=None, options=ENCODER_OPTIONS)
    ref = write_video(tmp_path / "ref.mp4", _clip("sweep", 0, seed=5), 8, crf=None, options=ENCODER_OPTIONS)
    assert np.array_equal(read_frames(twin, range(8)).numpy(), read_frames(ref, range(8)).numpy())
    assert [ln.split() for ln in splits.flip_pairs.read_text().splitlines()] == [
        ["sweeping_right", "sweeping_left"], ["wiping_right", "wiping_left"]]


def test_unknown_kind_and_undrawable_sizes_list_what_is_available():
    with pytest.raises(ValueError, match="unknown synth kind 'nope'.*classic.*sweep.*busy.*occlusion.*dynamics"):
        get_kind("nope")
    with pytest.raises(ValueError, match=r"size 20: kind 'sweep' draws 32-256 px \(expected at least 32\)"):
        check_request("sweep", 16, 20)
    with pytest.raises(ValueError, match=r"num_frames 4: kind 'dynamics' draws 8-64 frames.*available kinds"):
        generate_synth("unused", kind="dynamics", num_frames=4)
    with pytest.raises(ValueError, match="at most 256"):
        check_request("busy", 16, 300)
    with pytest.raises(ValueError, match="num_val_per_class -1"):
        generate_synth("unused", num_val_per_class=-1)


@pytest.mark.parametrize("argv, words", [
    (["--kind", "nope"], ["unknown synth kind 'nope'", "dynamics (32-256 px, 8-64 frames)"]),
    (["--kind", "busy", "--frames", "4"], ["--frames 4", "kind 'busy'", "at least 8"]),
    (["--kind", "sweep", "--size", "512"], ["--size 512", "at most 256"]),
])
def test_cli_bad_kind_requests_are_one_clear_line(argv, words, tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pks4: error:") and len(err.splitlines()) == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_new_kind(tmp_path, capsys):
    out = tmp_path / "dyn"
    argv = ["data", "synth", str(out), "--kind", "dynamics", "--train-per-class", "1", "--val-per-class", "0",
            "--frames", "8", "--size", "32"]
    assert main(argv) == 0
    assert "8 classes of kind dynamics" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().split()[:2] == ["speeding_up", "slowing_down"]


# ---- what the class names say ---------------------------------------------------------------------------------
def _shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Integer (dx, dy) that moves frame a onto frame b, by phase correlation of the grey images."""
    fa, fb = (np.fft.fft2(f.astype(float).mean(-1) - f.mean()) for f in (a, b))
    cross = fb * np.conj(fa)
    peak = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(np.argmax(peak), peak.shape)
    n = a.shape[0]
    return (dx if dx <= n // 2 else dx - n), (dy if dy <= n // 2 else dy - n)


@pytest.mark.parametrize("label, axis, sign", [(0, 0, 1), (1, 0, -1), (2, 1, 1), (3, 1, -1)])
def test_sweeps_move_the_whole_frame_the_named_way(label, axis, sign):
    for seed in range(3):
        clip = _clip("sweep", label, seed=seed, frames=16)
        steps = [_shift(clip[i], clip[i + 1])[axis] for i in range(15)]
        assert sign * np.median(steps) > 0  # most frame-to-frame shifts point the named way


def test_zoom_light_and_speed_unfold_the_named_way():
    def fine_detail(frame):  # energy of the grey image's Laplacian: zooming in magnifies, so detail drops
        g = frame.astype(float).mean(-1)
        return np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean()

    for seed in range(3):
        zoom = _clip("sweep", 4, seed=seed, frames=16)
        assert fine_detail(zoom[-1]) < fine_detail(zoom[0])
        light = _clip("sweep", 6, seed=seed, frames=16).astype(float)
        assert light[-1].mean() > 1.5 * light[0].mean()
        speed = _clip("dynamics", 0, seed=seed, frames=16).astype(int)
        steps = np.abs(np.diff(speed, axis=0)).mean(axis=(1, 2, 3))
        assert steps[-4:].mean() > steps[:4].mean()  # speeding up: the late frames change most
