"""Makers of unusual and broken media files, all written here with PyAV (no binary fixtures): headers that lie
about the duration, timestamps muxed with the wrong time base, raw elementary streams, audio with a cover
picture, a frame size that changes mid-stream, a truncated mp4 whose index outlives its data."""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pks4.data.synth import write_video

_MKV_DURATION = b"\x44\x89\x88"  # Matroska Segment Info "Duration" element, 8-byte float (FFmpeg writes it so)


def ramp(t: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame i is flat grey 8 + 8 i, so a decoded frame's index can be read off its mean (t <= 30)."""
    return np.stack([np.full((h, w, 3), 8 + 8 * i, np.uint8) for i in range(t)])


def frame_ids(frames) -> list[int]:
    return [round((float(f.float().mean()) - 8) / 8) for f in frames]


def webm_with_header_duration(path: Path, frames: np.ndarray, fps: int, seconds: float) -> Path:
    """A VP9 webm whose Segment Duration claims ``seconds``, whatever its frames say."""
    write_video(path, frames, fps, codec="libvpx-vp9", options={"deadline": "realtime", "cpu-used": "8"})
    data = bytearray(path.read_bytes())
    at = data.find(_MKV_DURATION)
    assert at > 0, "no Duration element: the Matroska muxer changed"
    data[at + 3:at + 11] = struct.pack(">d", seconds * 1000.0)  # in TimestampScale units (1 ms)
    path.write_bytes(bytes(data))
    return path


def mkv_with_wrong_time_base(path: Path, frames: np.ndarray, fps: int) -> Path:
    """An mkv that declares ``fps`` but whose frames are stamped 1 ms apart (muxed with the wrong time base)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 1000)
            c.mux(s.encode(vf))
        c.mux(s.encode())
    return path


def raw_stream(path: Path, frames: np.ndarray, fps: int, fmt: str = "h264", codec: str = "libx264") -> Path:
    """An elementary stream without container: no index, no timestamps, seeking refused (h264)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"g": "4"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def audio_with_cover(path: Path, audio_codec: str, fmt: str | None = None) -> Path:
    """One second of silence with a PNG cover picture (an mp3 / m4a / flac as a music player keeps it)."""
    with av.open(str(path), "w", format=fmt) as c:
        audio = c.add_stream(audio_codec, rate=44100)
        audio.layout = "mono"
        cover = c.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 32, 32, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        for pkt in cover.encode(av.VideoFrame.from_ndarray(ramp(1, 32, 32)[0], format="rgb24")) + cover.encode():
            c.mux(pkt)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 44100), np.float32), format="fltp", layout="mono")
        silence.sample_rate, silence.pts = 44100, 0
        c.mux(audio.encode(silence) + audio.encode())
    return path


def size_change(path: Path, first: np.ndarray, second: np.ndarray, fps: int, codec: str,
                fmt: str | None = None) -> Path:
    """``first`` then ``second`` (another frame size) in one stream: the second part comes from a new encoder,
    as when a WebRTC sender or a broadcast switches resolution."""
    options = {"g": "4"} if codec == "libx264" else {"deadline": "realtime", "cpu-used": "8"}
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = first.shape[2], first.shape[1], "yuv420p"
        s.options, s.thread_count = options, 1
        for f in first:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
        cc = av.CodecContext.create(codec, "w")
        cc.width, cc.height, cc.pix_fmt = second.shape[2], second.shape[1], "yuv420p"
        cc.time_base, cc.framerate, cc.options, cc.thread_count = Fraction(1, fps), Fraction(fps), options, 1
        packets = []
        for i, f in enumerate(second):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = len(first) + i, cc.time_base
            packets += cc.encode(vf)
        for pkt in packets + cc.encode(None):
            pkt.stream = s
            c.mux(pkt)
    return path


def truncated_faststart_mp4(path: Path, frames: int = 48) -> Path:
    """An mp4 with its index in front (``movflags=faststart``) cut in half: the index lists frames whose data is
    gone, as a download or copy stopped early leaves it."""
    noise = np.random.default_rng(0).integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8)  # incompressible
    full = path.with_name(path.stem + ".full.mp4")
    with av.open(str(full), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"g": "4", "crf": "10"}
        for f in noise:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
