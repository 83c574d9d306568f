"""``pks4.VideoClassifier``: a trained model as one Python object -- load it, classify, embed, save it.

>>> clf = pks4.VideoClassifier.from_pretrained("runs/demo/pks4")   # run dir, checkpoint or Hub folder
>>> clf("clip.mp4")                        # {"path", "label", "score", "topk": [{label, index, score}, ...]}
>>> clf(["a.mp4", "b.webm"])               # one such dict per video
>>> clf.embed(["a.mp4", "b.webm"])         # (2, D) clip features
>>> clf.save_pretrained("my-model")        # config.json + model.safetensors + README.md (the Hub layout)

Every answer goes through :mod:`pks4.engine.infer`, the path ``pks4 predict`` and evaluation take (same
frame sampling, views, softmax-per-view averaging and batch size), so for the same settings the classifier
and the command line print the same numbers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pks4.engine.infer import (DEFAULT_BATCH, aggregate_views, embed_views, frames_to_views, predict_videos,
                               resolve_amp, run_views, topk_labels, video_scores)
from pks4.engine.pretrained import InferenceSpec, load_for_inference, save_pretrained

__all__ = ["VideoClassifier"]

Video = Any  # a file path, or the uint8 frames (L, H, W, 3) of one video


def _device(pref: str | torch.device) -> torch.device:
    if str(pref) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


class VideoClassifier:
    """A trained video classifier: ``clf(video)``, ``clf.embed(video)``, ``clf.timeline(long_video, window)``.

    A video is a file path or the uint8 RGB frames (L, H, W, 3) of one video (sampled and cropped like a file);
    a float tensor (T, 3, H, W), (B, T, 3, H, W) or (B, V, T, 3, H, W) is taken as clips already made (what
    :meth:`preprocess` returns) and goes to the model as it is.

    ``device``: auto | cpu | cuda | cuda:N. ``dtype``: auto (bf16 autocast on a GPU, fp32 on the CPU) | fp32 |
    bf16 (on an AVX-512 CPU 1.26x faster for PKS4-B/16) | fp16. ``views``: FRAMESxCLIPSxCROPS (default: the
    model's own).
    ``batch_size`` videos go through the model at once; ``num_workers`` processes decode files.
    """

    def __init__(self, model: nn.Module, spec: InferenceSpec, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", views: str | None = None, batch_size: int = DEFAULT_BATCH,
                 num_workers: int = 0, topk: int = 5) -> None:
        from pks4.data.sampling import parse_views

        self.device = _device(device)
        self.amp_dtype = resolve_amp(dtype, self.device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.views = parse_views(views or spec.views)
        if batch_size < 1 or num_workers < 0 or topk < 1:
            raise ValueError(f"batch_size {batch_size}, num_workers {num_workers}, topk {topk}: expected "
                             ">= 1, >= 0 and >= 1")
        self.batch_size, self.num_workers, self.topk = batch_size, num_workers, topk

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "VideoClassifier":
        """Load a run directory, a checkpoint, or a folder written by :meth:`save_pretrained`; ``kwargs`` as in
        the constructor (device, dtype, views, batch_size, num_workers, topk)."""
        model, spec = load_for_inference(path, map_location=_device(kwargs.get("device", "auto")))
        return cls(model, spec, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the Hub layout (``config.json``, ``model.safetensors``, ``README.md``) into ``path``."""
        return save_pretrained(self.model, self.spec, path)

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def id2label(self) -> dict[int, str]:
        return self.spec.id2label

    @property
    def label2id(self) -> dict[str, int]:
        return self.spec.label2id

    # ---- answers ---------------------------------------------------------------------------------------------
    def __call__(self, inputs: Any, *, topk: int | None = None, views: str | None = None) -> Any:
        """Top-k labels: one ``{"path", "label", "score", "topk"}`` dict for one video, a list for several."""
        videos, clips, single = _split(inputs)
        k = self.topk if topk is None else topk
        if clips is not None:
            tops = topk_labels(self._clip_scores(clips), self.classes, k)
            results = [{"label": t[0]["label"], "score": t[0]["score"], "topk": t} for t in tops]
        else:
            results = predict_videos(self.model, videos, self.classes, str(self._views(views)), self.spec.data.size,
                                     self.spec.data, k, self.amp_dtype, batch_size=self.batch_size,
                                     num_workers=self.num_workers)
        return results[0] if single else results

    def scores(self, inputs: Any, *, views: str | None = None) -> torch.Tensor:
        """(N, K) class probabilities (softmax per view, then the mean over views), one row per video."""
        videos, clips, _ = _split(inputs)
        if clips is not None:
            return self._clip_scores(clips)
        return video_scores(self.model, videos, self._views(views), self.spec.data.size, self.spec.data,
                            batch_size=self.batch_size, num_workers=self.num_workers, amp_dtype=self.amp_dtype)

    def embed(self, inputs: Any, *, views: str | None = None) -> torch.Tensor:
        """(N, D) clip features (``model.forward_features``, averaged over the views), one row per video."""
        videos, clips, _ = _split(inputs)
        if clips is not None:
            return self._clip_scores(clips, features=True)
        return video_scores(self.model, videos, self._views(views), self.spec.data.size, self.spec.data,
                            features=True, batch_size=self.batch_size, num_workers=self.num_workers,
                            amp_dtype=self.amp_dtype)

    def preprocess(self, video: Video, *, views: str | None = None) -> torch.Tensor:
        """One video -> its test views (V, T, 3, size, size), normalised, as the model receives them."""
        from pks4.data.datasets import load_video_views

        spec = self._views(views)
        if isinstance(video, (str, os.PathLike)):
            return load_video_views(video, spec.frames, self.spec.data.size, spec, self.spec.data)
        return frames_to_views(torch.as_tensor(video), spec, self.spec.data.size, self.spec.data)

    def timeline(self, path: str | os.PathLike, window: str | float, stride: str | float | None = None,
                 fps: float | None = None) -> Any:
        """Classify a long video window by window: a :class:`pks4.engine.timeline.Timeline` (``window`` /
        ``stride`` in frames at ``fps``, default the video's own rate, or seconds as ``"2s"``); each window is
        one clip of the model's frames and crops."""
        from pks4.engine.timeline import predict_timeline, window_views

        return predict_timeline(self.model, path, self.classes, self.spec.data, window_views(self.views), window,
                                stride, fps, amp_dtype=self.amp_dtype, batch_size=self.batch_size)

    # ---- internals -------------------------------------------------------------------------------------------
    def _views(self, views: str | None) -> Any:
        from pks4.data.sampling import parse_views

        return parse_views(views) if views else self.views

    def _clip_scores(self, clips: torch.Tensor, features: bool = False) -> torch.Tensor:
        out = []
        for start in range(0, len(clips), self.batch_size):
            batch = clips[start:start + self.batch_size]
            if features:
                out.append(embed_views(self.model, batch, amp_dtype=self.amp_dtype).mean(dim=1).cpu())
            else:
                out.append(aggregate_views(run_views(self.model, batch, amp_dtype=self.amp_dtype)).cpu())
        return torch.cat(out)


def _split(inputs: Any) -> tuple[list[Video] | None, torch.Tensor | None, bool]:
    """-> (videos, None, single) for paths / uint8 frames, or (None, clips (N, V, T, 3, H, W), single)."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs], None, True
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        x = torch.as_tensor(inputs)
        if x.dtype == torch.uint8 and x.shape[-1:] == (3,) and x.ndim in (4, 5):
            return ([x] if x.ndim == 4 else list(x)), None, x.ndim == 4
        if x.is_floating_point() and x.ndim in (4, 5, 6) and x.shape[-3] == 3:
            clips = {4: lambda: x[None, None], 5: lambda: x[:, None], 6: lambda: x}[x.ndim]()
            return None, clips, x.ndim == 4
        raise ValueError(f"a tensor input must be uint8 frames (L, H, W, 3) / (B, L, H, W, 3) or float clips "
                         f"(T, 3, H, W) / (B, T, 3, H, W) / (B, V, T, 3, H, W); got {x.dtype} {tuple(x.shape)}")
    if isinstance(inputs, Sequence) and inputs:
        for item in inputs:
            if not isinstance(item, (str, os.PathLike, np.ndarray, torch.Tensor)):
                raise TypeError(f"expected video file paths or uint8 frame arrays, got {type(item).__name__}")
        return list(inputs), None, False
    raise TypeError(f"expected a video path, a list of them, or a tensor; got {type(inputs).__name__}"
                    + (" (empty)" if isinstance(inputs, Sequence) else ""))
