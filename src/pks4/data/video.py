"""Reading video: PyAV decoding of only the frames a sampler asks for, and raw-frame folders.

Frame index ``i`` of a video means "the frame on screen at time ``start + i / fps``", where ``fps`` is the
stream's average rate. For constant-frame-rate files that is exactly the ``i``-th decoded frame; for
variable-frame-rate files it samples by time, so a clip covers the same stretch of the video however the
frames happen to be spaced.

Indices past the end of the video are clamped to its last frame, so a video shorter than the clip asked for
yields repeated frames instead of an error (a 1-frame video gives a clip of one frame repeated).

What a header says is checked against the packets before it is trusted (:func:`_timeline`):

* The frame count comes from the header (mp4's sample table), or duration x rate where the container stores
  no count (webm, mkv). The last keyframe interval is demuxed (no decoding) to see where the stream really
  ends and how far apart its frames are; when that disagrees with the header (a webm whose header claims
  0.05 s or 3600 s for 24 frames, timestamps muxed with the wrong time base), the packets are counted and the
  clip is sampled from the frames that exist, with a warning. ``probe_video`` reports the disagreement in
  ``VideoInfo.mismatch`` (``pks4 data check`` lists such files). Seek-based sparse decoding stays the path for
  every file whose header holds.
* Raw elementary streams (``.h264``, ``.m2v``: no container, no index, no timestamps) are counted packet by
  packet and decoded from the start; a frame's index is its place in decoding order.
* An audio file whose only picture is its cover art, and a still image, are errors naming the file.
* A frame size that changes mid-stream (a VP9 or H.264 stream re-initialised at another resolution) is
  resized to the size the stream declares, that of its first frame, with a warning.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

from pks4.errors import UserError, describe_os_error, file_kind

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
_NO_TIMESTAMPS = 0x0080  # AVFMT_NOTIMESTAMPS: raw elementary streams, which have neither index nor timestamps
_ATTACHED_PIC = 0x0400  # AV_DISPOSITION_ATTACHED_PIC: a cover picture stored beside audio, not a video


class DataError(UserError):
    """Base class for every data-pipeline error (bad videos, bad lists, bad configs)."""


class VideoError(DataError):
    """A video file that cannot be read; ``path`` names the file and ``reason`` the problem."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts; ``height``/``width`` are the displayed size (after rotation metadata). ``mismatch`` says
    how the header disagreed with the packets ("" when it held); the other fields are then the packets'."""

    num_frames: int
    fps: float
    duration: float
    height: int
    width: int
    mismatch: str = ""


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open ``path`` for decoding, turning every failure into a VideoError that says what is wrong."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:  # missing, a symlink loop, a name too long, a folder without permission
        reason = "file not found" if isinstance(e, FileNotFoundError) else describe_os_error(e, path=False)
        raise VideoError(p, reason) from None
    kind = file_kind(st.st_mode)
    if kind == "a directory":
        raise VideoError(p, "is a directory, not a video file (for frame folders use the rawframes format)")
    if kind is not None:  # reading a FIFO blocks until a writer comes, a device may never end
        raise VideoError(p, f"is {kind}, not a regular file; copy the video to a file first")
    if st.st_size == 0:
        raise VideoError(p, "file is empty (0 bytes)")
    try:
        container = av.open(str(p), mode="r")
    except PermissionError as e:  # PyAV's own PermissionError derives from both
        raise VideoError(p, "permission denied (cannot read the file)") from e
    except av.error.FFmpegError as e:
        raise VideoError(p, f"not a readable video (FFmpeg: {e.strerror or e}); "
                            "the file may be corrupt, truncated or not a video at all") from e
    try:
        fmt = container.format.name
        if any(tag in fmt for tag in _IMAGE_FORMATS) or p.suffix.lower() in _IMAGE_SUFFIXES:
            raise VideoError(p, f"is a still image ({fmt}), not a video; pass a video file, or a folder of "
                                "frames with the rawframes format")
        _video_stream(container, p)
    except BaseException:
        container.close()
        raise
    return container


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.video.stream.VideoStream:
    """The first video stream that is not a cover picture, set to decode on one thread."""
    covers = []
    for stream in container.streams.video:
        if int(getattr(stream, "disposition", 0) or 0) & _ATTACHED_PIC:
            covers.append(stream)
            continue
        # One decoding thread per video: data-loader workers already decode several videos in parallel, and for
        # the few frames a clip needs, FFmpeg's own threads cost more to start than they save (2x on small clips).
        stream.thread_count = 1
        return stream
    if covers:
        raise VideoError(path, f"holds audio and a cover picture ({covers[0].codec_context.name}) but no video "
                               "stream: an audio file, not a video")
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    raise VideoError(path, f"contains no video stream (streams: {', '.join(kinds)}); "
                           "a truncated mp4 loses its index and shows up like this")


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


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # ``rotation`` is the display matrix's counter-clockwise angle; np.rot90 turns counter-clockwise too.
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


_REFORMATTERS = threading.local()
_INHERITED: list = []


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) with rotation metadata applied; grayscale and odd sizes convert here. With ``size``
    (width, height) a frame of another size is scaled to it in the same conversion.

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
    width, height = size if size is not None and size != (frame.width, frame.height) else (None, None)
    img = reformatter.reformat(frame, format="rgb24", width=width, height=height).to_ndarray()
    rotation = getattr(frame, "rotation", 0) or 0
    return _rotate(img, rotation)


# ------------------------------------------------------------------------------------- the frame timeline


@dataclass(frozen=True)
class _Timeline:
    """How decoded frames map to indices: ``round((pts - start) * time_base * fps)``, or decoding order when
    ``by_time`` is False (no timestamps). ``mismatch`` describes a header that the packets contradicted."""

    num_frames: int
    fps: float
    duration: float
    by_time: bool = True
    mismatch: str = ""


def _tolerance(num_frames: int) -> int:
    # Rounding of duration x rate, a last frame shown a little longer, an edit list: a few frames, never a factor.
    return max(2, round(0.05 * num_frames))


def _packets(container, stream) -> tuple[int, list[float]]:
    """Data packets from the current position to the end: how many, and the times (seconds from the stream
    start, sorted) of those that carry a timestamp."""
    tb, start = stream.time_base, stream.start_time or 0
    count, times = 0, []
    try:
        for pkt in container.demux(stream):
            if pkt.size <= 0:
                continue
            count += 1
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if ts is not None and tb is not None:
                times.append(float((ts - start) * tb))
    except av.error.FFmpegError:  # a truncated file: its readable packets are what exists
        pass
    return count, sorted(times)


def _tail_agrees(container, stream, header: _Timeline) -> bool:
    """Whether the last keyframe interval ends where the header says and its frames are ~1/fps apart.

    Costs one seek and the demuxing (no decoding) of that interval.
    """
    try:
        container.seek((stream.start_time or 0) + int(header.duration / stream.time_base), stream=stream,
                       backward=True, any_frame=False)
    except (av.error.FFmpegError, OSError, OverflowError):  # OverflowError: past what a timestamp holds
        return False
    _, times = _packets(container, stream)
    if not times or abs(times[-1] * header.fps + 1 - header.num_frames) > _tolerance(header.num_frames):
        return False
    if len(times) >= 3:  # spacing of packets that follow each other, in frames of the header's rate
        spacing = (times[-1] - times[0]) / (len(times) - 1) * header.fps
        return 0.5 <= spacing <= 2.0
    return True


def _seconds(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


def _rewind(container) -> bool:
    """Seek back to the start; False when the container cannot seek (then it must be reopened)."""
    try:
        container.seek(0)
        return True
    except (av.error.FFmpegError, OSError):
        return False


def _timeline(container, stream, path) -> _Timeline:
    """Frame count and rate from the header, checked against the packets (module docstring)."""
    fps = _stream_fps(stream)
    if int(container.format.flags) & _NO_TIMESTAMPS or stream.time_base is None:
        n, _ = _packets(container, stream)
        if n == 0:
            raise VideoError(path, "video stream holds no data packets (file truncated or corrupt)")
        return _Timeline(n, fps, n / fps, by_time=False)
    duration = _stream_duration(container, stream)
    stated = int(stream.frames or 0)
    n_header = stated if stated > 0 else (max(1, round(duration * fps)) if duration > 0 else 0)
    header = _Timeline(n_header, fps, duration if duration > 0 else n_header / max(fps, 1e-9))
    if n_header > 0 and _tail_agrees(container, stream, header):
        return header
    if not _rewind(container):
        raise VideoError(path, "cannot seek back to the start to count its frames; remux it into mp4 or mkv")
    n, times = _packets(container, stream)
    if n == 0:
        raise VideoError(path, "video stream holds no data packets (file truncated or corrupt)")
    if n_header > 0 and abs(n - n_header) <= _tolerance(n_header):
        return header  # the tail looked odd (variable rate), but the count holds
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (len(times) - 1) / span if span > 0 else fps  # mean spacing: right for any time base
    if n_header <= 0:  # nothing stated at all: the count is the truth, no need to warn
        return _Timeline(n, fps, n / fps)
    note = (f"the header gives {n_header} frame(s) ({_seconds(header.duration)} s at {fps:g} fps) but the stream "
            f"holds {n} frames over {_seconds(n / rate)} s")
    return _Timeline(n, rate, n / rate, mismatch=note)


class _Source:
    """One open video: its container, its video stream and the checked timeline."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.container = _open(path)
        try:
            self.stream = _video_stream(self.container, path)
            self.timeline = _timeline(self.container, self.stream, path)
        except BaseException:
            self.container.close()
            raise
        self.size = (self.stream.codec_context.width, self.stream.codec_context.height)
        if 0 in self.size:
            self.size = None  # unknown: every frame keeps its own size

    def restart(self) -> None:
        """Back to the first packet, reopening the file when the container cannot seek (raw streams)."""
        if not _rewind(self.container):
            self.container.close()
            self.container = _open(self.path)
            self.stream = _video_stream(self.container, self.path)

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate, duration and displayed size of ``path``.

    The count comes from the stream header; when the container does not store it (webm, mkv), it is
    estimated as duration x fps, and when the duration is missing too, packets are counted. Either is checked
    against the last packets (module docstring). The first frame is decoded to learn the rotation and to check
    that the file really decodes.
    """
    with _Source(path) as src:
        src.restart()
        img = _to_rgb(_first_frame(src.container, src.stream, path))
        t = src.timeline
        return VideoInfo(num_frames=t.num_frames, fps=t.fps, duration=t.duration, height=img.shape[0],
                         width=img.shape[1], mismatch=t.mismatch)


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

    ``num_frames`` is the checked header count (see ``probe_video``), so samplers need no separate probing
    pass. Frames are uint8 (T, H, W, 3) as in ``read_frames``.
    """
    with _Source(path) as src:
        t = src.timeline
        if t.mismatch:
            warnings.warn(f"{path}: {t.mismatch}; sampling from the {t.num_frames} frames that exist", stacklevel=2)
        idx = [int(i) for i in choose(t.num_frames)]
        if not idx:
            raise ValueError(f"read_frames({path}): no frame indices given")
        if min(idx) < 0:
            raise ValueError(f"read_frames({path}): negative frame index {min(idx)} in {idx}")
        wanted = sorted(set(idx))
        convert = _Converter(src.size)
        try:
            found = _decode_wanted(src, wanted, convert, seek=t.by_time) if t.by_time else None
            if found is None:  # no timestamps, the seek overshot, or timestamps missing: decode from the start
                src.restart()
                found = _decode_wanted(src, wanted, convert, seek=False)
        except av.error.FFmpegError as e:
            raise VideoError(path, f"decoding failed ({e.strerror or e}); file is corrupt or truncated") from e
        if not found:
            raise VideoError(path, "video stream holds no decodable frames (file truncated or corrupt)")
        if convert.resized:
            warnings.warn(f"{path}: frame size changes mid-stream ({', '.join(sorted(convert.resized))}); frames "
                          f"resized to {src.size[0]}x{src.size[1]}, the first frame's size", stacklevel=2)
        return torch.from_numpy(np.stack([found[i] for i in idx])), idx


class _Converter:
    """``_to_rgb`` at the stream's declared size; remembers the other sizes it had to scale from."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        self.size = size
        self.resized: set[str] = set()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is not None and (frame.width, frame.height) != self.size:
            self.resized.add(f"{frame.width}x{frame.height}")
        return _to_rgb(frame, self.size)


def _decode(container, stream, *, to_the_end: bool):
    """Decoded frames; with ``to_the_end`` False a decoding error ends the stream instead of raising: the
    header promised frames the packets do not have (a truncated file), so a cut last packet is expected."""
    try:
        yield from container.decode(stream)
    except av.error.FFmpegError:
        if to_the_end:
            raise


def _decode_wanted(src: _Source, wanted: list[int], convert: _Converter, *,
                   seek: bool) -> dict[int, np.ndarray] | None:
    """Map each wanted index to its RGB frame; None when seeking failed or landed past the first wanted frame.

    Without ``seek`` the container must stand at the start of the stream.
    """
    container, stream, t = src.container, src.stream, src.timeline
    tb = stream.time_base
    start = stream.start_time or 0
    seeking = seek and tb is not None
    if seeking:
        first_time = wanted[0] / t.fps
        try:
            container.seek(start + int(first_time / tb) if first_time > 0.5 else 0, stream=stream,
                           backward=True, any_frame=False)
        except (av.error.FFmpegError, OSError, OverflowError):
            return None
    found: dict[int, np.ndarray] = {}
    pending = list(wanted)
    prev: av.VideoFrame | None = None
    counter = -1
    for frame in _decode(container, stream, to_the_end=not t.mismatch):
        counter += 1
        if not t.by_time or frame.pts is None or tb is None:
            if seeking:
                return None
            pos = counter
        else:
            pos = round(float((frame.pts - start) * tb) * t.fps)
        if prev is None and pending and pos > pending[0]:
            if seeking:
                return None
            prev = frame  # a stream starting late: its first frame stands in for the earlier instants
        while pending and pending[0] < pos:
            found[pending.pop(0)] = convert(prev)
        if not pending:
            break
        prev = frame
    if prev is not None:  # end of stream: remaining indices are past the end and repeat the last frame
        last = convert(prev)
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

