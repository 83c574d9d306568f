"""Long videos: window spans, one-pass frame stream, per-window scores against a plain reference, flat memory."""
import csv
import io
import json
import tracemalloc

import av
import numpy as np
import pytest
import torch

import pks4
import pks4.data.video as video_module
from inference_fixtures import FPS, clf, data, long_video, run, val_videos  # noqa: F401 (fixtures)
from pks4.cli import main
from pks4.data.datasets import _sampler
from pks4.data.synth import write_video
from pks4.data.video import DataError, read_frames
from pks4.engine.timeline import Span, parse_span, stream_instants, window_starts


def test_parse_span():
    assert parse_span("8") == Span(8, "frames") and parse_span(8) == Span(8, "frames")
    assert parse_span("2s") == Span(2, "seconds") and parse_span(" 2.5 s") == Span(2.5, "seconds")
    assert parse_span("0.5sec").frames(8, "--window") == 4 and parse_span("16f").frames(30, "--window") == 16
    for bad, words in (("0", "greater than 0"), ("0s", "greater than 0"), ("-2", "expected a frame count"),
                       ("2.5", "whole number"), ("two", "expected a frame count"), (2.5, "whole number")):
        with pytest.raises(ValueError, match=words) as info:
            parse_span(bad, "--stride")
        assert "--stride" in str(info.value)
    with pytest.raises(ValueError, match="--window 0.01s: shorter than one frame at 8 fps"):
        parse_span("0.01s").frames(8, "--window")


def test_window_starts_golden():
    assert list(window_starts(0, 16, 8)) == [0]
    assert list(window_starts(15, 16, 8)) == [0, 8]
    assert list(window_starts(16, 16, 8)) == [8, 16]
    assert list(window_starts(21, 4, 8)) == []  # stride longer than the window: instant 21 is in no window
    assert list(window_starts(17, 4, 8)) == [16]


def _levels(path, n):
    """A video whose frame k is a flat grey of level 10 k, so a decoded frame tells which one it is."""
    frames = np.stack([np.full((16, 16, 3), 10 * k, np.uint8) for k in range(n)])
    return write_video(path, frames, FPS, crf=None, options={"x264-params": "keyint=1:qp=0"})


def _instants(path, fps):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = stream_instants(container, stream, fps)
        return [(j, round(float(video_module._to_rgb(f).mean()) / 10)) for j, f in frames]


@pytest.mark.parametrize("fps", [8.0, 16.0, 4.0, 3.0])
def test_stream_instants_against_a_plain_reference(tmp_path, fps):
    path = _levels(tmp_path / "levels.mp4", 20)
    got = _instants(path, fps)
    # plain reference: frame k sits at instant round(k * fps / 8); instant j shows the last frame at or before it
    pos = [round(k * fps / FPS) for k in range(20)]
    expected = [(j, max(k for k in range(20) if pos[k] <= j)) for j in range(pos[-1] + 1)]
    assert got == expected
    if fps == FPS:
        assert got == [(k, k) for k in range(20)]


def test_windows_match_a_plain_reference_and_the_file_path(clf, data, long_video):
    tl = clf.timeline(long_video, 16, 8)
    assert (tl.fps, tl.window, tl.stride, tl.num_frames) == (8.0, 16, 8, 96)
    assert tl.starts == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80] and tl.probs.shape == (11, 10)
    frames = read_frames(long_video, range(96))  # plain reference: decode everything, slice the windows
    ref = clf.scores([frames[s:s + 16] for s in tl.starts], views="8x1x1")
    torch.testing.assert_close(tl.probs, ref, rtol=1e-5, atol=1e-6)
    single = clf.timeline(val_videos(data)[0], 16)  # one window over a whole 16-frame file = the file's answer
    assert torch.equal(single.probs, clf.scores(val_videos(data)[0], views="8x1x1"))
    seconds = clf.timeline(long_video, "2s", "1s")
    assert seconds.starts == tl.starts and torch.equal(seconds.probs, tl.probs)
    slow = clf.timeline(long_video, 16, 8, fps=4)  # 16 frames at 4 fps = 4 s windows
    assert slow.window == 16 and slow.starts == [0, 8, 16, 24, 32] and slow.span_seconds(1) == (2.0, 6.0)


def test_each_needed_frame_is_converted_once(clf, long_video, monkeypatch):
    calls = []

    def counting(frame):
        calls.append(frame.pts)
        return original(frame)

    original = video_module._to_rgb
    monkeypatch.setattr(video_module, "_to_rgb", counting)
    tl = clf.timeline(long_video, 16, 8)
    offsets = _sampler(clf.spec.data, 8, False, 1)(16)
    needed = {s + o for s in tl.starts for o in offsets}
    assert len(calls) == len(needed) == len(set(calls))


def _noise_video(path, n):
    rng = np.random.default_rng(0)
    return write_video(path, rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8), FPS, crf=30)


def test_memory_is_flat_in_the_videos_length(clf, tmp_path, monkeypatch):
    # PyAV hands frames over in buffers tracemalloc does not see; a NumPy copy of each makes them count
    original = video_module._to_rgb
    monkeypatch.setattr(video_module, "_to_rgb", lambda frame: original(frame).copy())
    paths = {n: _noise_video(tmp_path / f"noise{n}.mp4", n) for n in (48, 192)}
    clf.timeline(paths[48], 16, 8)  # warm-up: first-call allocations are not the timeline's
    peaks, held = {}, {}
    for n, path in paths.items():
        tracemalloc.start()
        tl = clf.timeline(path, 16, 8)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        held[n] = tl.peak_frames_held
        assert len(tl.starts) == (n - 16) // 8 + 1
    assert held[48] == held[192] <= 3 * 8  # at most the frames of the windows open at once
    frame_bytes = 96 * 96 * 3
    # keeping the 144 extra frames of the long video would add 4 MB; the peaks differ by less than 10 frames
    assert abs(peaks[192] - peaks[48]) < 10 * frame_bytes, peaks


def test_timeline_outputs_json_csv_and_plot(run, long_video, tmp_path, capsys):
    assert main(["predict", str(long_video), "--checkpoint", str(run), "--window", "16", "--stride", "8",
                 "--json", "--topk", "2", "--out", str(tmp_path / "tl")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["window_frames"] == 16 and got["stride_seconds"] == 1.0 and len(got["windows"]) == 11
    w = got["windows"][1]
    assert (w["start"], w["end"], w["start_frame"], w["end_frame"]) == (1.0, 3.0, 8, 24) and len(w["topk"]) == 2
    assert w["label"] == w["topk"][0]["label"]
    assert json.loads((tmp_path / "tl" / "six.timeline.json").read_text()) == got
    assert (tmp_path / "tl" / "six.timeline.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tl" / "six.timeline.csv").read_text())))
    assert len(rows) == 11 and rows[1]["start_s"] == "1.0" and rows[1]["label_1"] == w["label"]
    assert main(["predict", str(long_video), str(long_video), "--checkpoint", str(run), "--window", "2s",
                 "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("path,window,start_s") and len(lines) == 1 + 2 * 6  # stride = window: 6 each
    assert main(["predict", str(long_video), "--checkpoint", str(run), "--window", "16", "--stride", "8"]) == 0
    text = capsys.readouterr().out
    assert "11 windows of 16 frames (2 s), stride 8, at 8 fps" in text and "1.00 -     3.00 s" in text


@pytest.mark.parametrize("args, words", [
    (["--window", "32"], ["shorter than one window", "16 frames", "32 frames"]),
    (["--window", "3s"], ["shorter than one window", "2.00 s"]),
    (["--window", "8", "--stride", "0"], ["--stride 0", "greater than 0"]),
    (["--window", "0"], ["--window 0"]),
    (["--window", "8", "--fps", "0"], ["--fps 0"]),
    (["--stride", "4"], ["--stride", "give --window"]),
    (["--window", "8", "--json", "--csv"], ["--json or --csv"]),
    (["--window", "8", "--frames", "4"], ["--frames/--size"]),
])
def test_bad_timeline_input_is_one_clear_line(run, data, args, words, capsys):
    assert main(["predict", val_videos(data)[0], "--checkpoint", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pks4: error:") and len(err.splitlines()) == 1
    for word in words:
        assert word in err


def test_short_video_error_names_the_file(clf, data):
    with pytest.raises(DataError, match=r"moving_right_000.mp4: 16 frames at 8 fps \(2.00 s\) is shorter"):
        clf.timeline(val_videos(data)[0], 17)
