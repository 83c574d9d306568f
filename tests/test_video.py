"""Reading real video files written in tmp_path: frame accuracy, seeking, metadata fallbacks, bad inputs."""
from __future__ import annotations

import os
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


# ------------------------------------------------------------ headers that disagree with what decodes

import warnings  # noqa: E402

import bad_videos as bv  # noqa: E402
from pks4.data.sampling import segment_indices  # noqa: E402


def _centre_clip(path, frames=8):
    return read_sampled(path, lambda n: segment_indices(n, frames, train=False))


def _decode_order(path) -> list[np.ndarray]:
    """The plain reference: every frame PyAV decodes, in order, converted without any sampling logic."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("seconds", [0.05, 3600.0])
def test_webm_whose_header_lies_about_its_duration_is_sampled_from_its_frames(tmp_path, seconds):
    path = bv.webm_with_header_duration(tmp_path / "lying.webm", bv.ramp(24), 24, seconds)
    with av.open(str(path)) as c:  # the lie is really in the file
        assert c.duration == pytest.approx(seconds * 1e6, rel=1e-6)
    with pytest.warns(UserWarning, match=r"lying\.webm: the header gives .* holds 24 frames"):
        frames, idx = _centre_clip(path)
    assert idx == [1, 4, 7, 10, 13, 16, 19, 22]  # segments of the 24 frames that exist
    assert bv.frame_ids(frames) == idx
    np.testing.assert_array_equal(frames.numpy(), np.stack(_decode_order(path))[idx])  # agrees with a plain decode
    info = probe_video(path)
    assert info.num_frames == 24 and info.duration == pytest.approx(1.0, abs=0.01)
    assert "the header gives" in info.mismatch and "24 frames" in info.mismatch


def test_timestamps_muxed_with_the_wrong_time_base_are_sampled_from_the_frames(tmp_path):
    # declares 24 fps, stamps frames 1 ms apart: duration x rate says 2 frames, 24 decode
    path = bv.mkv_with_wrong_time_base(tmp_path / "timebase.mkv", bv.ramp(24), 24)
    with pytest.warns(UserWarning, match="holds 24 frames"):
        frames, idx = _centre_clip(path)
    assert bv.frame_ids(frames) == idx == [1, 4, 7, 10, 13, 16, 19, 22]
    assert probe_video(path).num_frames == 24


def test_truncated_mp4_whose_index_outlives_its_data(tmp_path):
    path = bv.truncated_faststart_mp4(tmp_path / "cut.mp4")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 48  # the index still lists every frame
    info = probe_video(path)
    assert 0 < info.num_frames < 48 and "48 frame(s)" in info.mismatch
    with pytest.warns(UserWarning, match="cut.mp4"):
        frames, idx = _centre_clip(path)
    assert frames.shape == (8, 32, 48, 3) and max(idx) < info.num_frames


@pytest.mark.parametrize("name, make", [
    ("cfr.mp4", lambda p: write_video(p, bv.ramp(24), fps=24, options={"g": "4"})),
    ("cfr.webm", lambda p: write_video(p, bv.ramp(24), fps=24, codec="libvpx-vp9",
                                       options={"deadline": "realtime", "cpu-used": "8"})),
    ("gray.mkv", lambda p: write_video(p, bv.ramp(24)[..., 0], fps=24, codec="ffv1")),
    ("vfr.mp4", lambda p: write_video(p, bv.ramp(8), fps=10, timestamps=[0, 0.1, 0.2, 0.5, 0.6, 1.0, 1.05, 1.1])),
    ("still_tail.mp4", lambda p: write_video(p, bv.ramp(6), fps=10, timestamps=[0, 0.1, 0.2, 0.3, 0.4, 5.0])),
])
def test_truthful_headers_raise_no_warning(tmp_path, name, make):
    path = make(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frames, _ = _centre_clip(path)
        assert probe_video(path).mismatch == ""
    assert frames.shape[0] == 8


def test_header_check_keeps_seeking_for_truthful_files(tmp_path, monkeypatch):
    # The fast path stays the fast path: a late frame of an honest file is reached by a seek, not by decoding
    # from the start (a decode from the start would see frame 0 first).
    path = write_video(tmp_path / "long.mp4", bv.ramp(30), fps=10, options={"g": "5"})
    first_pts = []
    real = av.container.InputContainer.decode

    def watch(self, *args, **kwargs):
        for i, frame in enumerate(real(self, *args, **kwargs)):
            if i == 0:
                first_pts.append(frame.pts)
            yield frame

    monkeypatch.setattr(av.container.InputContainer, "decode", watch)
    assert bv.frame_ids(read_frames(path, [27])) == [27]
    assert first_pts and first_pts[-1] > 0


# ---------------------------------------------------------------------- raw streams, covers, size changes


def test_raw_h264_stream_is_counted_and_decoded_from_the_start(tmp_path):
    path = bv.raw_stream(tmp_path / "clip.h264", bv.ramp(30), 10)
    with av.open(str(path)) as c, pytest.raises(OSError):
        c.seek(0)  # no index: the demuxer refuses to seek
    info = probe_video(path)
    assert info.num_frames == 30 and info.mismatch == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frames, idx = _centre_clip(path)
    assert bv.frame_ids(frames) == idx == segment_indices(30, 8, train=False)
    assert bv.frame_ids(read_frames(path, [29, 0, 35])) == [29, 0, 29]  # past the end: the last frame


def test_raw_mpeg2_stream_reads_by_decoding_order(tmp_path):
    path = bv.raw_stream(tmp_path / "clip.m2v", bv.ramp(20), 10, fmt="mpeg2video", codec="mpeg2video")
    assert probe_video(path).num_frames == 20
    assert bv.frame_ids(read_frames(path, [0, 13, 19])) == [0, 13, 19]


@pytest.mark.parametrize("name, codec, fmt", [("song.mp3", "libmp3lame", None), ("song.m4a", "aac", "mp4"),
                                              ("song.flac", "flac", None)])
def test_audio_with_a_cover_picture_is_not_a_video(tmp_path, name, codec, fmt):
    path = bv.audio_with_cover(tmp_path / name, codec, fmt)
    with av.open(str(path)) as c:
        assert c.streams.video  # FFmpeg shows the cover as a video stream of one picture
    for read in (probe_video, lambda p: read_frames(p, [0])):
        with pytest.raises(VideoError, match=r"cover picture .* an audio file") as err:
            read(path)
        assert name in str(err.value)


@pytest.mark.parametrize("name, codec, fmt", [("switch.webm", "libvpx-vp9", None), ("switch.ts", "libx264", "mpegts")])
def test_frame_size_change_mid_stream_is_resized_to_the_first_frames_size(tmp_path, name, codec, fmt):
    path = bv.size_change(tmp_path / name, bv.ramp(12), bv.ramp(24, 64, 96)[12:], 12, codec, fmt)
    sizes = {(f.shape[1], f.shape[0]) for f in _decode_order(path)}
    assert sizes == {(48, 32), (96, 64)}
    with pytest.warns(UserWarning, match=rf"{name}: frame size changes mid-stream \(96x64\); .* 48x32"):
        frames = read_frames(path, [0, 5, 13, 20])
    assert frames.shape == (4, 32, 48, 3) and bv.frame_ids(frames) == [0, 5, 13, 20]


# ------------------------------------------------------------------------------- what the path points at


def test_fifo_symlink_loop_and_long_name_are_errors_naming_the_path(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop)
    long = tmp_path / ("v" * 300 + ".mp4")
    for path, words in ((fifo, "FIFO"), (loop, "symbolic links"), (long, "file name too long")):
        with pytest.raises(VideoError, match=words) as err:
            probe_video(path)
        assert err.value.path == str(path)
