"""Reading video: PyAV decoding of only the frames a sampler asks for, and raw-frame folders.

Frame index ``i`` of a video means "the frame on screen at time ``start + i / fps``", where ``fps`` is the
stream's average rate. For constant-frame-rate files that is exactly the ``i``-th decoded frame; for
variable-frame-rate files it samples by time, so a clip covers the same stretch of the video however the
frames happen to be spaced.

Indices past the end of the video are clamped to its last frame, so a video shorter than the clip asked for
yields repeated frames instead of an error (a 1-frame video gives a clip of one frame repeated).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

__all__ = [
    "DataError",
    "VideoError",
    "VideoInfo",
    "probe_video",
    "read_frames",
    "read_sampled",
    "read_raw_frames",
    "read_image",
]

# Demuxers that FFmpeg uses for single still images: opening a .jpg "works" but yields one frame, which
# is nearly always a mistake worth a clear message.
_IMAGE_FORMATS = ("image2", "_pipe")
_IMAGE_CODECS = {"mjpeg", "png", "bmp", "tiff", "webp", "gif", "jpeg2000", "jpegls", "ljpeg"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class DataError(Exception):
    """Base class for every data-pipeline error (bad videos, bad lists, bad configs)."""


class VideoError(DataError):
    """A video file that cannot be read; ``path`` names the file and ``reason`` the problem."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts; ``height``/``width`` are the displayed size (after rotation metadata)."""

    num_frames: int
    fps: float
    duration: float
    height: int
    width: int


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open ``path`` for decoding, turning every failure into a VideoError that says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise VideoError(p, "file not found")
    if p.is_dir():
        raise VideoError(p, "is a directory, not a video file (for frame folders use the rawframes format)")
    if p.stat().st_size == 0:
        raise VideoError(p, "file is empty (0 bytes)")
    try:
        container = av.open(str(p), mode="r")
    except av.error.FFmpegError as e:
        raise VideoError(p, f"not a readable video (FFmpeg: {e.strerror or e}); "
                            "the file may be corrupt, truncated or not a video at all") from e
    try:
        fmt = container.format.name
        if any(tag in fmt for tag in _IMAGE_FORMATS) or p.suffix.lower() in _IMAGE_SUFFIXES:
            raise VideoError(p, f"is a still image ({fmt}), not a video; pass a video file, or a folder of "
                                "frames with the rawframes format")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(p, f"contains no video stream (streams: {', '.join(kinds)}); "
                                "a truncated mp4 loses its index and shows up like this")
    except BaseException:
        container.close()
        raise
    # One decoding thread per video: data-loader workers already decode several videos in parallel, and for
    # the few frames a clip needs, FFmpeg's own threads cost more to start than they save (2x on small clips).
    container.streams.video[0].thread_count = 1
    return container


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 25.0  # FFmpeg's own default when a container states no rate


def _stream_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:  # in AV_TIME_BASE (microseconds) units
        return container.duration / 1_000_000
    return 0.0


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Last-resort frame count: demux (no decoding) and count packets that carry data."""
    container.seek(0)
    return sum(1 for pkt in container.demux(stream) if pkt.size > 0)


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # ``rotation`` is the display matrix's counter-clockwise angle; np.rot90 turns counter-clockwise too.
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


_REFORMATTERS = threading.local()
_INHERITED: list = []


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """RGB uint8 (H, W, 3) with rotation metadata applied; grayscale and odd sizes convert here.

    The conversion goes through one reformatter per thread and process: ``frame.to_ndarray(format=...)``
    builds a new swscale context for every frame, which costs ~8 ms even for a 64x64 frame (about 90x the
    conversion); a context inherited through fork hangs, as its worker threads do not exist in the child.
    """
    owner, reformatter = getattr(_REFORMATTERS, "value", (None, None))
    if owner != os.getpid():  # a forked data-loader worker must not use its parent's (threaded) scaler...
        if reformatter is not None:
            _INHERITED.append(reformatter)  # ...nor free it: freeing waits for threads the child does not have
        reformatter = VideoReformatter()
        _REFORMATTERS.value = (os.getpid(), reformatter)
    img = reformatter.reformat(frame, format="rgb24").to_ndarray()
    rotation = getattr(frame, "rotation", 0) or 0
    return _rotate(img, rotation)


def _frame_count(container: av.container.InputContainer,
                 stream: av.video.stream.VideoStream) -> tuple[int, float, float]:
    """(num_frames, fps, duration) from headers: stated count, else duration x fps, else counted packets."""
    fps = _stream_fps(stream)
    duration = _stream_duration(container, stream)
    num_frames = int(stream.frames or 0)
    if num_frames <= 0 and duration > 0:
        num_frames = max(1, round(duration * fps))
    if num_frames <= 0:
        num_frames = _count_packets(container, stream)
        container.seek(0)
    if duration <= 0:
        duration = num_frames / fps
    return num_frames, fps, duration


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate, duration and displayed size of ``path``.

    The count comes from the stream header; when the container does not store it (webm, mkv), it is
    estimated as duration x fps, and when the duration is missing too, packets are counted. The first frame
    is decoded to learn the rotation and to check that the file really decodes.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        num_frames, fps, duration = _frame_count(container, stream)
        img = _to_rgb(_first_frame(container, stream, path))
        return VideoInfo(num_frames=num_frames, fps=fps, duration=duration, height=img.shape[0], width=img.shape[1])
    finally:
        container.close()


def _first_frame(container: av.container.InputContainer, stream, path) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except av.error.FFmpegError as e:
        raise VideoError(path, f"decoding failed on the first frame ({e.strerror or e}); file is corrupt") from e
    raise VideoError(path, "video stream holds no decodable frames (file truncated or corrupt)")


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Decode the frames at ``indices`` of ``path`` as a uint8 tensor (T, H, W, 3), RGB, rotation applied.

    Only what is needed is decoded: the reader seeks to the keyframe at or before the first wanted frame,
    decodes forward and stops after the last one. Indices may repeat and come in any order; indices past the
    end of the video are clamped to its last frame, so a video with fewer frames than asked for yields
    repeated frames.
    """
    idx = [int(i) for i in indices]
    return read_sampled(path, lambda num_frames: idx)[0]


def read_sampled(path: str | os.PathLike, choose: Callable[[int], Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """Open ``path`` once, call ``choose(num_frames)`` for the indices, decode them: (frames, indices).

    ``num_frames`` is the header count (see ``probe_video``), so samplers need no separate probing pass.
    Frames are uint8 (T, H, W, 3) as in ``read_frames``.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        num_frames, fps, _ = _frame_count(container, stream)
        idx = [int(i) for i in choose(num_frames)]
        if not idx:
            raise ValueError(f"read_frames({path}): no frame indices given")
        if min(idx) < 0:
            raise ValueError(f"read_frames({path}): negative frame index {min(idx)} in {idx}")
        wanted = sorted(set(idx))
        try:
            found = _decode_wanted(container, stream, wanted, fps, seek=True)
            if found is None:  # seek overshot or timestamps missing: decode from the start instead
                container.seek(0)
                found = _decode_wanted(container, stream, wanted, fps, seek=False)
        except av.error.FFmpegError as e:
            raise VideoError(path, f"decoding failed ({e.strerror or e}); file is corrupt or truncated") from e
        if not found:
            raise VideoError(path, "video stream holds no decodable frames (file truncated or corrupt)")
        return torch.from_numpy(np.stack([found[i] for i in idx])), idx
    finally:
        container.close()


def _decode_wanted(container, stream, wanted: list[int], fps: float, *, seek: bool) -> dict[int, np.ndarray] | None:
    """Map each wanted index to its RGB frame; None when the seek landed past the first wanted frame."""
    tb = stream.time_base
    start = stream.start_time or 0
    first_time = wanted[0] / fps
    seeking = seek and first_time > 0.5 and tb is not None
    if seeking:
        container.seek(start + int(first_time / tb), stream=stream, backward=True, any_frame=False)
    found: dict[int, np.ndarray] = {}
    pending = list(wanted)
    prev: av.VideoFrame | None = None
    counter = -1
    for frame in container.decode(stream):
        counter += 1
        if frame.pts is None or tb is None:
            if seeking:
                return None
            pos = counter
        else:
            pos = round(float((frame.pts - start) * tb) * fps)
        if prev is None and pending and pos > pending[0]:
            if seeking:
                return None
            prev = frame  # a stream starting late: its first frame stands in for the earlier instants
        while pending and pending[0] < pos:
            found[pending.pop(0)] = _to_rgb(prev)
        if not pending:
            break
        prev = frame
    if prev is not None:  # end of stream: remaining indices are past the end and repeat the last frame
        last = _to_rgb(prev)
        for i in pending:
            found[i] = last
    return found


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as RGB uint8 (H, W, 3), via PIL when installed, else PyAV's image decoders."""
    p = Path(path)
    if not p.is_file():
        raise VideoError(p, "frame image not found")
    if p.stat().st_size == 0:
        raise VideoError(p, "frame image is empty (0 bytes)")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        if Image is not None:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))
        with av.open(str(p)) as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24")
    except (OSError, ValueError, StopIteration, av.error.FFmpegError) as e:
        raise VideoError(p, f"cannot decode frame image ({e})") from e


def read_raw_frames(
    dir: str | os.PathLike,
    indices: Sequence[int],
    template: str = "img_{:05d}.jpg",
    *,
    start_index: int = 1,
    num_frames: int | None = None,
) -> torch.Tensor:
    """Frames of a raw-frame folder as uint8 (T, H, W, 3).

    Index ``i`` reads ``template.format(i + start_index)`` (MMAction2 folders start at ``img_00001.jpg``).
    With ``num_frames`` given, indices past it are clamped to the last frame, as for videos.
    """
    d = Path(dir)
    if not d.is_dir():
        raise VideoError(d, "raw-frame folder not found")
    idx = [int(i) for i in indices]
    if not idx or min(idx) < 0:
        raise ValueError(f"read_raw_frames({d}): need non-negative frame indices, got {idx}")
    if num_frames is not None:
        if num_frames <= 0:
            raise VideoError(d, f"raw-frame folder said to hold {num_frames} frames")
        idx = [min(i, num_frames - 1) for i in idx]
    cache: dict[int, np.ndarray] = {}
    for i in sorted(set(idx)):
        f = d / template.format(i + start_index)
        if not f.is_file():
            raise VideoError(d, f"frame file {f.name} (index {i}) missing; expected names like "
                                f"{template.format(start_index)}")
        cache[i] = read_image(f)
    shapes = {a.shape for a in cache.values()}
    if len(shapes) > 1:
        raise VideoError(d, f"frames differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack([cache[i] for i in idx]))

