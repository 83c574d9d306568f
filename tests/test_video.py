"""Reading real video files written in tmp_path: frame accuracy, seeking, metadata fallbacks, bad inputs."""
from __future__ import annotations

import sys

import av
import numpy as np
import pytest
import torch

from pks4.data.synth import write_video
from pks4.data.video import DataError, VideoError, probe_video, read_frames, read_raw_frames, read_sampled


def ramp(t: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame i is flat grey 8 + 12 i, so a decoded frame's index can be read off its mean."""
    return np.stack([np.full((h, w, 3), 8 + 12 * i, np.uint8) for i in range(t)])


def frame_ids(frames: torch.Tensor) -> list[int]:
    return [round((float(f.float().mean()) - 8) / 12) for f in frames]


@pytest.fixture
def clip20(tmp_path):
    # keyframe every 4 frames so reads of late frames really seek
    return write_video(tmp_path / "ramp.mp4", ramp(20), fps=10, options={"g": "4", "bf": "2"})


def test_read_frames_returns_requested_frames(clip20):
    out = read_frames(clip20, [0, 5, 19, 7, 7])
    assert out.dtype == torch.uint8 and out.shape == (5, 32, 48, 3)
    assert frame_ids(out) == [0, 5, 19, 7, 7]


def test_seeking_matches_sequential_decode(clip20):
    with av.open(str(clip20)) as c:
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    late = read_frames(clip20, [13, 17, 18]).numpy()
    np.testing.assert_array_equal(late, full[[13, 17, 18]])


def test_indices_past_end_repeat_last_frame(clip20):
    assert frame_ids(read_frames(clip20, [18, 19, 25, 40])) == [18, 19, 19, 19]


def test_one_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", ramp(1), fps=25)
    assert probe_video(path).num_frames == 1
    out = read_frames(path, range(8))
    assert out.shape[0] == 8 and (out == out[0]).all()


def test_probe_metadata(clip20):
    info = probe_video(clip20)
    assert (info.num_frames, info.fps, info.height, info.width) == (20, 10.0, 32, 48)
    assert info.duration == pytest.approx(2.0)


def test_read_sampled_gets_count_from_header(clip20):
    seen = []
    frames, idx = read_sampled(clip20, lambda n: seen.append(n) or [0, n - 1])
    assert seen == [20] and idx == [0, 19] and frame_ids(frames) == [0, 19]


def test_frame_count_fallback_without_header_count(tmp_path):
    # Matroska stores no frame count; the count comes from the duration.
    path = write_video(tmp_path / "gray.mkv", ramp(6)[..., 0], fps=10, codec="ffv1")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert probe_video(path).num_frames == 6


def test_grayscale_becomes_three_channels(tmp_path):
    path = write_video(tmp_path / "gray.mkv", ramp(3)[..., 0], fps=10, codec="ffv1")
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).format.name == "gray"
    out = read_frames(path, [2])
    assert out.shape == (1, 32, 48, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert int(out[0, 0, 0, 0]) == 8 + 24


def test_odd_size(tmp_path):
    path = write_video(tmp_path / "odd.mp4", ramp(4, 33, 47), fps=10)
    assert probe_video(path).height == 33 and probe_video(path).width == 47
    assert read_frames(path, [3]).shape == (1, 33, 47, 3)


def test_rotation_metadata_is_applied(tmp_path):
    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # white block top-left
    path = write_video(tmp_path / "rot.mp4", frames, fps=10, rotation=90)
    info = probe_video(path)
    assert (info.height, info.width) == (48, 32)
    out = read_frames(path, [0])[0].numpy()
    # a 90 degree counter-clockwise turn carries the top-left corner to the bottom-left
    assert out[-4:, :4].mean() > 200 and out[:4, :4].mean() < 50


def test_variable_frame_rate_samples_by_time(tmp_path):
    times = [0.0, 0.1, 0.2, 0.5, 0.6, 1.0, 1.05, 1.1]
    path = write_video(tmp_path / "vfr.mp4", ramp(8), fps=10, timestamps=times)
    info = probe_video(path)
    assert info.num_frames == 8 and info.duration == pytest.approx(1.2, abs=0.01)
    ids = frame_ids(read_frames(path, range(8)))
    assert ids == sorted(ids) and ids[0] == 0 and ids[-1] == 7
    # 8 frames spread over 1.2 s: index 4 is at ~0.65 s, where the frame from 0.6 s is on screen
    assert ids[4] == 4


def test_unicode_and_spaces_in_path(tmp_path):
    path = write_video(tmp_path / "dossier été" / "vidéo 1 ☃.mp4", ramp(3), fps=10)
    assert frame_ids(read_frames(path, [1])) == [1]


@pytest.mark.parametrize("kind", ["missing", "zero", "truncated", "text", "jpg", "dir"])
def test_bad_inputs_raise_video_error_naming_the_file(tmp_path, clip20, kind):
    target = tmp_path / "bad.mp4"
    if kind == "zero":
        target.write_bytes(b"")
    elif kind == "truncated":
        data = clip20.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        target.write_text("this is not a video\n" * 20)
    elif kind == "jpg":
        target = tmp_path / "still.jpg"
        with av.open(str(target), "w", format="image2") as c:
            s = c.add_stream("mjpeg", rate=1)
            s.width, s.height, s.pix_fmt = 16, 16, "yuvj420p"
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
            c.mux(s.encode())
    elif kind == "dir":
        target = tmp_path / "folder.mp4"
        target.mkdir()
    with pytest.raises(VideoError) as err:
        read_frames(target, [0])
    assert str(target) in str(err.value) and isinstance(err.value, DataError)
    expected = {"missing": "not found", "zero": "empty", "truncated": "truncated", "text": "not a readable",
                "jpg": "still image", "dir": "directory"}[kind]
    assert expected in err.value.reason
    with pytest.raises(VideoError):
        probe_video(target)


def _write_frames_dir(d, n, h=20, w=30, ext="png"):
    d.mkdir(parents=True)
    for i in range(n):
        img = np.full((h, w, 3), 10 + 20 * i, np.uint8)
        with av.open(str(d / f"img_{i + 1:05d}.{ext}"), "w", format="image2") as c:
            s = c.add_stream("png", rate=1)
            s.width, s.height, s.pix_fmt = w, h, "rgb24"
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(s.encode())


def test_read_raw_frames(tmp_path):
    d = tmp_path / "frames"
    _write_frames_dir(d, 5)
    out = read_raw_frames(d, [0, 4, 2], template="img_{:05d}.png")
    assert out.shape == (3, 20, 30, 3) and [int(f[0, 0, 0]) for f in out] == [10, 90, 50]
    clamped = read_raw_frames(d, [3, 9], template="img_{:05d}.png", num_frames=5)
    assert [int(f[0, 0, 0]) for f in clamped] == [70, 90]
    with pytest.raises(VideoError, match="img_00010.png"):
        read_raw_frames(d, [9], template="img_{:05d}.png")


def test_read_raw_frames_without_pillow(tmp_path, monkeypatch):
    d = tmp_path / "frames"
    _write_frames_dir(d, 2)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails: PyAV decodes the images
    out = read_raw_frames(d, [1], template="img_{:05d}.png")
    assert int(out[0, 0, 0, 0]) == 30


def test_decoding_in_a_forked_process_after_the_parent_decoded(tmp_path):
    # the parent's cached scaler must not be reused across fork (its threads do not exist in the child)
    import multiprocessing

    from pks4.data.synth import write_video
    from pks4.data.video import read_frames

    path = tmp_path / "v.mp4"
    write_video(path, np.zeros((4, 32, 32, 3), dtype=np.uint8), fps=4)
    read_frames(path, [0, 1])
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_frames_shape, (str(path),))
        assert result.get(timeout=60) == (2, 32, 32, 3)


def _frames_shape(path):
    from pks4.data.video import read_frames

    return tuple(read_frames(path, [0, 1]).shape)
