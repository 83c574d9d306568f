"""``pks4 stream``: the running prediction of a causal model on a video file or a camera, one frame at a time.

    source (a file, or a camera /dev/videoN through PyAV's video4linux2 input)
      -> decoded frames, in order, one at a time
      -> every ``frame_step``-th frame through the run's evaluation transform (short side, centre crop, the
         normalisation; the same function evaluation uses, so a frame looks as it did in testing)
      -> ``model.step(frame, state)`` (a causal PKS4: :meth:`pks4.models.pks4.PKS4Model.step`)
      -> the top-k of the frames so far, printed every N frames (text or JSON lines) and after the last one.

Nothing is kept but the current frame and the model's stream state, whose size does not grow with the stream
(``benchmarks/stream_memory.md``), so a camera can run for as long as it delivers frames.
A model's prediction after frame t is what it predicts for the clip of frames 0..t: feed frames at the rate it
was trained on (``frame_step``: a model trained on 8 of a 16-frame video's frames wants every second frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import av
import numpy as np
import torch
from torch import Tensor

from pks4.data.video import VideoError, _to_rgb, probe_video

__all__ = ["StreamingModel", "Frame", "is_camera", "read_frames_in_order", "frame_transform",
           "stream_predictions", "stream_checkpoint"]

CAMERA_FORMAT = "video4linux2"  # FFmpeg's Linux camera input, bundled with PyAV's wheels


@runtime_checkable
class StreamingModel(Protocol):
    """A model that runs frame by frame (a causal PKS4 or its frame-average baseline)."""

    def init_stream_state(self, batch: int = 1) -> Any: ...

    def step(self, frame: Tensor, state: Any, *, geometry: Any = None) -> tuple[Tensor, Any]: ...


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the source, seconds since the source's first frame, RGB (H, W, 3) uint8."""

    index: int
    time: float
    rgb: np.ndarray


# ---- video -> frames ----------------------------------------------------------------------------------------
def is_camera(source: str) -> bool:
    """A camera is named by its device (``/dev/video0``) or by its number (``0``); anything else is a file."""
    return source.isdigit() or source.startswith("/dev/")


def _camera_path(source: str) -> str:
    return f"/dev/video{source}" if source.isdigit() else source


def _open_camera(device: str) -> av.container.InputContainer:
    path = Path(device)
    if not path.exists():
        raise VideoError(device, "no such camera device (is it connected? `ls /dev/video*` lists the cameras)")
    if not path.is_char_device():
        raise VideoError(device, "is not a camera device (expected a character device such as /dev/video0)")
    try:
        return av.open(device, format=CAMERA_FORMAT)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(device, f"cannot be opened as a camera through {CAMERA_FORMAT} "
                                 f"({getattr(e, 'strerror', None) or e})") from e


def _open_source(source: str) -> tuple[av.container.InputContainer, str]:
    """(open container, the name errors use): a camera device, or a file checked to hold a readable video."""
    if is_camera(source):
        device = _camera_path(source)
        return _open_camera(device), device
    probe_video(source)  # a missing, empty, still-image or non-video file fails here, naming it
    try:
        return av.open(source), source
    except av.error.FFmpegError as e:  # the file changed since the probe
        raise VideoError(source, f"not a readable video ({e.strerror or e})") from e


def read_frames_in_order(source: str) -> Iterator[Frame]:
    """The frames of ``source`` (a file or a camera, see :func:`is_camera`), decoded one at a time, in order.

    Errors (no such camera, not a video, a decoding failure) are :class:`pks4.data.video.VideoError` naming
    the source.
    """
    container, name = _open_source(source)
    index = 0
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1  # frames are wanted one at a time, as soon as they arrive
        first = None
        for frame in container.decode(stream):
            seconds = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
            first = seconds if first is None else first
            yield Frame(index, seconds - first, _to_rgb(frame))
            index += 1
    except av.error.FFmpegError as e:
        raise VideoError(name, f"decoding failed after {index} frames ({e.strerror or e})") from e
    finally:
        container.close()


# ---- frames -> model inputs -> predictions --------------------------------------------------------------------
def frame_transform(data_cfg: Any, size: int) -> Callable[[np.ndarray], Tensor]:
    """RGB (H, W, 3) uint8 -> (3, size, size): the evaluation transform of ``data_cfg`` (one centre crop)."""
    from pks4.data.transforms import EvalTransform

    tf = EvalTransform(size=size, short_side=max(data_cfg.short_side, size), num_crops=1, mean=data_cfg.mean,
                       std=data_cfg.std)
    return lambda rgb: tf(torch.from_numpy(rgb).unsqueeze(0))[0, 0]


def _prediction(logits: Tensor, classes: Sequence[str], topk: int, seen: int, frame: Frame) -> dict[str, Any]:
    from pks4.engine.infer import topk_labels

    return {"frame": seen, "source_frame": frame.index, "time": round(frame.time, 3),
            "topk": topk_labels(logits.float().softmax(-1), classes, topk)[0]}


@torch.no_grad()
def stream_predictions(model: StreamingModel, frames: Iterable[Frame], transform: Callable[[np.ndarray], Tensor],
                       classes: Sequence[str], *, topk: int = 5, frame_step: int = 1, every: int = 1,
                       max_frames: int | None = None, geometry: Any = None) -> Iterator[dict[str, Any]]:
    """Run every ``frame_step``-th frame through ``model.step``; yield the running top-k after every ``every``
    model frames and after the last one: ``{"frame": frames seen by the model, "source_frame", "time" (s),
    "topk": [{"label", "index", "score"}, ...]}``. Stops after ``max_frames`` model frames (None: the end)."""
    device = next(model.parameters()).device
    state = model.init_stream_state(1)
    seen, pending = 0, None
    for frame in frames:
        if frame.index % frame_step:
            continue
        logits, state = model.step(transform(frame.rgb).unsqueeze(0).to(device), state, geometry=geometry)
        seen += 1
        pending = _prediction(logits, classes, topk, seen, frame)
        if seen % every == 0:
            yield pending
            pending = None
        if max_frames is not None and seen >= max_frames:
            break
    if pending is not None:
        yield pending


def _check_counts(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 1")


def stream_checkpoint(checkpoint: str | Path, source: str, *, topk: int = 5, frame_step: int = 1, every: int = 1,
                      max_frames: int | None = None, size: int | None = None, device: str = "auto"
                      ) -> Iterator[dict[str, Any]]:
    """:func:`stream_predictions` of a causal checkpoint (or run dir) on ``source``, with the run's class names
    and evaluation transform; ``size`` (default: the run's ``data.size``) embeds frames of another size with
    the stored patch size. Bad options, the source and the model are checked before the first frame."""
    from pks4.engine.checkpoint import load_model_from_checkpoint
    from pks4.engine.infer import _device
    from pks4.models.base import geometry_for

    _check_counts(topk=topk, frame_step=frame_step, every=every, max_frames=max_frames, size=size)
    frames = read_frames_in_order(source)
    first = next(frames, None)  # opens the source: a missing camera or a non-video fails before the model loads
    model, cfg, classes = load_model_from_checkpoint(checkpoint, map_location=_device(device))
    _check_streaming(model, checkpoint)
    size = size or cfg.data.size
    geometry = None if size == cfg.data.size else geometry_for(model, 1, size)
    chain = frames if first is None else _prepend(first, frames)
    yield from stream_predictions(model, chain, frame_transform(cfg.data, size), classes, topk=topk,
                                  frame_step=frame_step, every=every, max_frames=max_frames, geometry=geometry)


def _prepend(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    yield first
    yield from rest


def _check_streaming(model: Any, checkpoint: str | Path) -> None:
    name = getattr(model, "model_name", type(model).__name__)
    if not isinstance(model, StreamingModel):
        raise ValueError(f"{checkpoint}: model {name} has no step-wise form; `pks4 stream` runs causal PKS4 "
                         "models (trained with --set model.overrides.causal=true)")
    if not getattr(model.config, "causal", False):
        raise ValueError(f"{checkpoint}: model {name} is not causal (its frame t reads later frames); train one "
                         "with --set model.overrides.causal=true to stream")
