"""`pks4 stream` on a tiny real mp4 and on camera paths that are not cameras; the running prediction equals the
causal model's forward on the frames so far, decoded and transformed as evaluation does."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pks4.cli import main
from pks4.data.synth import generate_synth, write_video
from pks4.data.transforms import EvalTransform
from pks4.data.video import read_frames
from pks4.engine.checkpoint import load_model_from_checkpoint, save_checkpoint
from pks4.engine.config import config_to_dict
from pks4.engine.stream import Frame, is_camera, read_frames_in_order, stream_predictions
from pks4.models.registry import create_model, model_from_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A causal tiny PKS4 trained for a few steps through `pks4 train` (accuracy is not the point here)."""
    root = tmp_path_factory.mktemp("stream")
    data = generate_synth(root / "synth", seed=3, num_train_per_class=1, num_val_per_class=0, num_frames=8, size=32)
    out = root / "run"
    argv = ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--data-root", str(data.root),
            "--labels", str(data.labels), "--frames", "4", "--size", "32", "--epochs", "1", "--batch-size", "5",
            "--out", str(out), "--workers", "0", "--set", "data.short_side=32", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "model.overrides.causal=true",
            "--set", "model.overrides.zero_init_residual=false"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """12 frames of 40x48 (not square, not the model's size: the transform resizes and crops) at 8 fps."""
    frames = np.zeros((12, 40, 48, 3), dtype=np.uint8)
    for t in range(12):
        frames[t, :, :, 2] = 40 + 10 * t
        frames[t, 10:22, 3 * t:3 * t + 12] = (230, 200, 30)  # a square moving right
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=8)


def _json_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_reads_every_frame_in_order(video):
    frames = list(read_frames_in_order(str(video)))
    assert [f.index for f in frames] == list(range(12))
    np.testing.assert_array_equal(np.stack([f.rgb for f in frames]), read_frames(video, range(12)).numpy())
    assert frames[0].time == 0.0 and frames[-1].time == pytest.approx(11 / 8)


def test_stream_json_equals_the_causal_forward_on_the_frames_so_far(run, video, capsys):
    assert main(["stream", str(video), "--checkpoint", str(run), "--json", "--frame-step", "2", "--topk", "3"]) == 0
    lines = _json_lines(capsys)
    assert [x["frame"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["source_frame"] for x in lines] == [0, 2, 4, 6, 8, 10]
    assert [x["time"] for x in lines] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    model, cfg, classes = load_model_from_checkpoint(run)
    tf = EvalTransform(32, 32, 1, cfg.data.mean, cfg.data.std)
    clip = tf(read_frames(video, range(0, 12, 2)))  # (1, 6, 3, 32, 32): decoded and transformed as in evaluation
    with torch.no_grad():
        probs = model.forward_running(clip).softmax(-1)[0]  # (6, K): the prediction after each frame
        assert torch.allclose(probs[-1], model(clip).softmax(-1)[0], atol=1e-6)
    for t, line in enumerate(lines):
        assert len(line["topk"]) == 3 and {x["label"] for x in line["topk"]} <= set(classes)
        for entry in line["topk"]:
            assert classes[entry["index"]] == entry["label"]
            assert entry["score"] == pytest.approx(float(probs[t, entry["index"]]), abs=2e-6)
        assert [x["index"] for x in line["topk"]] == probs[t].topk(3).indices.tolist()


def test_every_n_frames_max_frames_and_text(run, video, capsys):
    assert main(["stream", str(video), "--checkpoint", str(run), "--json", "--every", "5"]) == 0
    assert [x["frame"] for x in _json_lines(capsys)] == [5, 10, 12]  # and after the last frame
    assert main(["stream", str(video), "--checkpoint", str(run), "--json", "--every", "2", "--max-frames", "3"]) == 0
    assert [x["frame"] for x in _json_lines(capsys)] == [2, 3]
    assert main(["stream", str(video), "--checkpoint", str(run), "--topk", "2", "--max-frames", "2"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert len(text) == 2 and text[1].startswith("frame 2 (0.12 s): ") and text[1].count(",") == 1


def test_frame_step_and_the_final_prediction_without_a_checkpoint():
    model = create_model("pks4_vit_tiny", num_classes=3, causal=True, image_size=32).eval()
    rng = np.random.default_rng(0)
    frames = [Frame(i, i / 10, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(7)]
    tf = EvalTransform(32, 32, 1)
    preds = list(stream_predictions(model, frames, lambda rgb: tf(torch.from_numpy(rgb)[None])[0, 0], "abc",
                                    topk=1, frame_step=3, every=2))
    assert [(p["frame"], p["source_frame"]) for p in preds] == [(2, 3), (3, 6)]
    clip = tf(torch.from_numpy(np.stack([f.rgb for f in frames[::3]])))
    with torch.no_grad():
        expect = model(clip).softmax(-1)[0]
    assert preds[-1]["topk"][0]["index"] == int(expect.argmax())
    assert preds[-1]["topk"][0]["score"] == pytest.approx(float(expect.max()), abs=2e-6)


def test_is_camera():
    assert is_camera("/dev/video0") and is_camera("0") and is_camera("12")
    assert not is_camera("clip.mp4") and not is_camera("videos/0.mp4")


def _one_line_error(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pks4: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_a_camera_that_is_not_there(tmp_path, capsys):
    # the source is checked before the checkpoint is read: the message names the camera
    missing = str(tmp_path / "no_run")
    _one_line_error(["stream", "/dev/video97", "--checkpoint", missing], capsys, "/dev/video97", "no such camera")
    _one_line_error(["stream", "97", "--checkpoint", missing], capsys, "/dev/video97", "no such camera")
    # a character device that is not a camera: the camera input refuses it
    _one_line_error(["stream", "/dev/null", "--checkpoint", missing], capsys, "/dev/null",
                    "cannot be opened as a camera")


def test_a_file_that_is_not_a_video(tmp_path, run, capsys):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n" * 20)
    _one_line_error(["stream", str(notes), "--checkpoint", str(run)], capsys, str(notes), "not a readable video")
    _one_line_error(["stream", str(tmp_path / "gone.mp4"), "--checkpoint", str(run)], capsys, "gone.mp4", "not found")


def test_bad_options(run, video, capsys):
    for flag in ("--every", "--frame-step", "--topk", "--max-frames", "--size"):
        _one_line_error(["stream", str(video), "--checkpoint", str(run), flag, "0"], capsys, f"{flag} 0", ">= 1")


def _resave(run, tmp_path, name, config):
    """A checkpoint beside ``run`` holding the model ``name`` built from ``config`` (random weights)."""
    model, cfg, classes = load_model_from_checkpoint(run)
    other = model_from_config(name, config)
    meta = {"model_name": name, "model_config": dataclasses.asdict(other.config), "classes": classes,
            "config": config_to_dict(cfg)}
    return save_checkpoint(tmp_path / name, other, {}, meta)


def test_models_that_cannot_stream(run, video, tmp_path, capsys):
    model, _, _ = load_model_from_checkpoint(run)
    plain = _resave(run, tmp_path, "pks4_vit_tiny", dataclasses.asdict(model.config) | {"causal": False})
    _one_line_error(["stream", str(video), "--checkpoint", str(plain)], capsys, str(plain), "is not causal",
                    "model.overrides.causal=true")
    mamba = create_model("videomamba_tiny", num_classes=10, embed_dim=32, depth=2, image_size=32, num_frames=4)
    other = _resave(run, tmp_path, "videomamba_tiny", dataclasses.asdict(mamba.config))
    _one_line_error(["stream", str(video), "--checkpoint", str(other)], capsys, "videomamba_tiny", "no step-wise form")
