"""A long video as a timeline: a window slides over it and every window is classified like a clip.

Windows and strides are counted in frames at a stated rate ``fps`` (default: the video's own) or in seconds
(``"2s"``). Window ``k`` covers the instants ``[k * stride, k * stride + window)`` at that rate; its clip takes
``T`` of them by the model's sampling rule (segment centres, or dense), exactly as a video file of ``window``
frames would be sampled, and goes through the shared inference path (views, softmax per view, mean).

The file is decoded once, front to back, frame by frame (PyAV demuxes and decodes packet by packet; nothing
seeks). Only frames that a window still to be scored samples are kept, converted to RGB once, and dropped as
soon as no later window needs them, so the frames held are bounded by ``window / stride`` windows of ``T``
frames whatever the video's length (``Timeline.peak_frames_held`` reports the count). A window that would run
past the end of the video is not scored; a video shorter than one window is an error.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import av
import numpy as np
import torch
from torch import nn

__all__ = ["Span", "parse_span", "Timeline", "stream_instants", "window_starts", "window_views", "predict_timeline",
           "timeline_checkpoint"]


@dataclass(frozen=True)
class Span:
    """A window or stride length: ``value`` frames (at the timeline's rate) or seconds."""

    value: float
    unit: str  # "frames" | "seconds"

    def frames(self, fps: float, option: str) -> int:
        """The length in frames at ``fps``; at least one frame, or an error naming ``option``."""
        n = int(self.value) if self.unit == "frames" else round(self.value * fps)
        if n < 1:
            raise ValueError(f"{option} {self}: shorter than one frame at {fps:g} fps")
        return n

    def __str__(self) -> str:
        return f"{self.value:g}s" if self.unit == "seconds" else f"{int(self.value)}"


def parse_span(text: str | float | int | Span, option: str = "--window") -> Span:
    """``8`` (frames) | ``"8"`` | ``"2s"`` | ``"2.5s"`` (seconds) -> :class:`Span`; zero or negative is an error."""
    if isinstance(text, Span):
        span = text
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        if isinstance(text, float) and not text.is_integer():
            raise ValueError(f"{option} {text}: a frame count must be a whole number (write '{text}s' for seconds)")
        span = Span(float(text), "frames")
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|seconds|f|frames)?\s*", str(text))
        if not m:
            raise ValueError(f"{option} {text!r}: expected a frame count such as 8, or seconds such as 2s")
        unit = "seconds" if (m.group(2) or "f").startswith("s") else "frames"
        if unit == "frames" and not float(m.group(1)).is_integer():
            raise ValueError(f"{option} {text!r}: a frame count must be a whole number (write '{text}s' for seconds)")
        span = Span(float(m.group(1)), unit)
    if span.value <= 0:
        raise ValueError(f"{option} {text}: must be greater than 0")
    return span


@dataclass
class Timeline:
    """Per-window class probabilities of one video; times in seconds at ``fps``."""

    path: str
    fps: float
    window: int  # frames at fps
    stride: int
    classes: list[str]
    starts: list[int]  # first frame of every window
    probs: torch.Tensor  # (num_windows, K)
    num_frames: int  # frames (at fps) decoded from the video
    peak_frames_held: int = 0  # most decoded frames held at once (bounded by window / stride, not the length)
    extra: dict[str, Any] = field(default_factory=dict)

    def span_seconds(self, i: int) -> tuple[float, float]:
        return self.starts[i] / self.fps, (self.starts[i] + self.window) / self.fps

    def to_dict(self, topk: int = 5) -> dict[str, Any]:
        """JSON-ready: the settings and, per window, its frames, times and top-k."""
        from pks4.engine.infer import topk_labels

        windows = []
        for i, top in enumerate(topk_labels(self.probs, self.classes, topk)):
            start, end = self.span_seconds(i)
            windows.append({"start": round(start, 4), "end": round(end, 4), "start_frame": self.starts[i],
                            "end_frame": self.starts[i] + self.window, "label": top[0]["label"],
                            "score": top[0]["score"], "topk": top})
        return {"path": self.path, "fps": self.fps, "window_frames": self.window, "stride_frames": self.stride,
                "window_seconds": round(self.window / self.fps, 4), "stride_seconds": round(self.stride / self.fps, 4),
                "frames": self.num_frames, "windows": windows}

    def to_csv(self, topk: int = 5, header: bool = True) -> str:
        """One row per window: path, index, start/end (s and frames), then label_i, score_i for i = 1..k."""
        k = min(topk, len(self.classes))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if header:
            writer.writerow(["path", "window", "start_s", "end_s", "start_frame", "end_frame"]
                            + [f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "score")])
        for i, w in enumerate(self.to_dict(k)["windows"]):
            writer.writerow([self.path, i, w["start"], w["end"], w["start_frame"], w["end_frame"]]
                            + [v for t in w["topk"] for v in (t["label"], t["score"])])
        return buf.getvalue()

    def plot(self, png_path: str | Path, max_classes: int = 8) -> Path:
        """Probability over time (window centres) of the classes that ever rank first, with the top-1 band."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        centres = [(s + self.window / 2) / self.fps for s in self.starts]
        best = self.probs.argmax(dim=1)
        shown = sorted(set(best.tolist()), key=lambda c: -float(self.probs[:, c].max()))[:max_classes]
        fig, (ax, band) = plt.subplots(2, 1, figsize=(11.5, 4.2), sharex=True, height_ratios=[5, 1])
        colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(shown)}
        for c in shown:
            ax.plot(centres, self.probs[:, c].numpy(), marker=".", color=colours[c], label=self.classes[c])
        ax.set(ylabel="probability", ylim=(0, 1.02), title=f"{Path(self.path).name}: window {self.window} frames "
               f"({self.window / self.fps:g} s), stride {self.stride} at {self.fps:g} fps")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        for i, s in enumerate(self.starts):
            c = int(best[i])
            band.axvspan(s / self.fps + (self.window - self.stride) / (2 * self.fps),
                         s / self.fps + (self.window + self.stride) / (2 * self.fps), color=colours.get(c, "0.5"))
        band.set(yticks=[], xlabel="time (s)", ylabel="top-1")
        fig.tight_layout()
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        return Path(png_path)


# -------------------------------------------------------------------------------------------- decoding


def stream_instants(container: Any, stream: Any, fps: float) -> Iterator[tuple[int, Any]]:
    """``(j, frame)`` for j = 0, 1, 2, ...: the decoded frame on screen at time ``j / fps``, in one pass.

    A frame sits at instant ``round(pts_seconds * fps)`` (as in :func:`pks4.data.video.read_frames`), and it
    stays on screen until the next one: at a rate above the video's, frames repeat; below it, some are skipped.
    The last instant is the last frame's. Frames are yielded as PyAV frames: the caller converts the ones it needs.
    """
    from pks4.data.video import _stream_fps

    tb, start, native = stream.time_base, stream.start_time or 0, _stream_fps(stream)
    prev, nxt = None, 0
    for counter, frame in enumerate(container.decode(stream)):
        if frame.pts is None or tb is None:
            pos = round(counter * fps / native)
        else:
            pos = round(float((frame.pts - start) * tb) * fps)
        prev = frame if prev is None else prev  # a stream starting late: its first frame stands in before it
        while nxt < pos:
            yield nxt, prev
            nxt += 1
        prev = frame
    if prev is not None:
        last = max(nxt, pos)
        while nxt <= last:
            yield nxt, prev
            nxt += 1


def window_views(views: Any) -> Any:
    """The views of one window: the model's frames and crops, one clip (the window is the clip's time span)."""
    from pks4.data.sampling import ViewSpec

    return ViewSpec(views.frames, 1, views.crops)


def window_starts(j: int, window: int, stride: int) -> range:
    """Starts (multiples of ``stride``) of the windows that cover instant ``j``."""
    first = max(0, math.ceil((j - window + 1) / stride))
    return range(first * stride, j + 1, stride)


# -------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def predict_timeline(model: nn.Module, path: str | Path, classes: Sequence[str], data_cfg: Any, views: Any,
                     window: Any, stride: Any = None, fps: float | None = None, *,
                     amp_dtype: torch.dtype | None = None, batch_size: int = 4, progress: bool = False) -> Timeline:
    """Classify every window of ``path`` (``window`` / ``stride``: frames at ``fps`` or seconds, see
    :func:`parse_span`; stride defaults to the window) with ``views`` (a ViewSpec) made as in evaluation."""
    from pks4.data.datasets import _sampler
    from pks4.data.video import VideoError, _open, _stream_fps, _to_rgb
    from pks4.engine.infer import progress_bar

    win_span, stride_span = parse_span(window, "--window"), parse_span(stride or window, "--stride")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps {fps}: must be greater than 0")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(fps or _stream_fps(stream))
        win, step = win_span.frames(rate, "--window"), stride_span.frames(rate, "--stride")
        offsets = _sampler(data_cfg, views.frames, False, views.clips)(win)  # instants each window samples
        scorer = _WindowScorer(model, data_cfg, views, amp_dtype, batch_size)
        held: dict[int, np.ndarray] = {}
        needed, peak, next_start, last = set(offsets), 0, 0, -1
        bar = progress_bar(None, "windows", progress)
        try:
            for j, frame in stream_instants(container, stream, rate):
                last = j
                if any(j - s in needed for s in window_starts(j, win, step)):
                    held[j] = _to_rgb(frame)
                    peak = max(peak, len(held))
                if j == next_start + win - 1:  # the window starting at next_start has all its frames
                    scorer.add(np.stack([held[next_start + o] for o in offsets]))
                    next_start += step
                    held = {i: f for i, f in held.items() if i >= next_start}
                    bar.update(1)
        except av.error.FFmpegError as exc:
            raise VideoError(path, f"decoding failed at frame {last + 1} ({exc}); file is corrupt or "
                                   "truncated") from exc
        finally:
            bar.close()
    finally:
        container.close()
    frames = last + 1
    if next_start == 0:
        raise VideoError(path, f"{frames} frames at {rate:g} fps ({frames / rate:.2f} s) is shorter than one "
                               f"window ({win} frames, {win / rate:.2f} s); give a shorter --window")
    return Timeline(str(path), rate, win, step, list(classes), list(range(0, next_start, step)), scorer.result(),
                    frames, peak)


class _WindowScorer:
    """Windows' sampled frames -> views -> probabilities, ``batch_size`` windows per forward."""

    def __init__(self, model: nn.Module, data_cfg: Any, views: Any, amp_dtype: torch.dtype | None,
                 batch_size: int) -> None:
        self.model, self.cfg, self.views, self.amp, self.batch_size = model, data_cfg, views, amp_dtype, batch_size
        self.pending: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        model.eval()

    def add(self, frames: np.ndarray) -> None:
        from pks4.engine.infer import clip_views

        self.pending.append(clip_views(torch.from_numpy(frames), self.views, self.cfg.size, self.cfg))
        if len(self.pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        from pks4.engine.infer import aggregate_views, run_views

        if self.pending:
            batch = torch.stack(self.pending)  # (B, V, T, 3, H, W)
            self.probs.append(aggregate_views(run_views(self.model, batch, amp_dtype=self.amp)).cpu())
            self.pending = []

    def result(self) -> torch.Tensor:
        self._flush()
        return torch.cat(self.probs)


def timeline_checkpoint(checkpoint: str | Path, videos: Sequence[str | Path], window: Any, stride: Any = None,
                        fps: float | None = None, views: str | None = None, device: str = "auto",
                        amp: str = "auto", batch_size: int = 4, progress: bool = False) -> list[Timeline]:
    """:func:`predict_timeline` for each video with the model and settings of a run dir, checkpoint or Hub
    folder; ``views`` defaults to one clip of the model's frames (crops as the model's views)."""
    from pks4.data.sampling import parse_views
    from pks4.engine.infer import _device, resolve_amp
    from pks4.engine.pretrained import load_for_inference

    parse_span(window, "--window"), parse_span(stride or window, "--stride")  # fail before loading
    amp_dtype = resolve_amp(amp, _device(device))
    model, info = load_for_inference(checkpoint, map_location=_device(device))
    spec = parse_views(views) if views else window_views(parse_views(info.views))
    return [predict_timeline(model, v, info.classes, info.data, spec, window, stride, fps, amp_dtype=amp_dtype,
                             batch_size=batch_size, progress=progress) for v in videos]
