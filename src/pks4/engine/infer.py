"""The one inference path: multi-view scoring, aggregation and metrics, shared by eval, predict and the demo.

Multi-view testing (#frames x #clips x #crops, e.g. 8x2x3) scores every view separately, takes the softmax
per view and averages the probabilities (PKS4 section 4.2 / Table 3 test protocol). Accuracies are reported in
percent. ``frame_order`` (Park et al. Table 1: sequential, blockwise, pairwise, interleaved) reorders every view's
frames before the model sees them, for any model, to test how much a model relies on temporal order.

Every forward runs under ``amp_dtype`` autocast when one is given (:func:`resolve_amp` turns ``auto`` into bf16 /
fp16 on a GPU and fp32 on the CPU, where bf16 is an explicit choice: ``benchmarks/predict_speed.md``).
Video files are decoded in DataLoader workers for evaluation and prediction alike, and a progress bar (stderr,
only on a terminal, shown after two seconds) follows any longer run.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pks4.data.items import Batch

__all__ = [
    "EvalOutput", "aggregate_views", "run_views", "embed_views", "topk_accuracy", "mean_class_accuracy",
    "confusion_matrix", "compute_metrics", "save_confusion_matrix", "evaluate", "predict_videos", "topk_labels",
    "evaluate_checkpoint", "predict_checkpoint", "AMP_CHOICES", "resolve_amp", "progress_bar", "clip_views",
    "frames_to_views", "video_scores", "DEFAULT_BATCH",
]

AMP_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Videos per batch in prediction (the command line and the Python API use the same value, so their answers match
# bit for bit: another batch size may change the float sums).
DEFAULT_BATCH = 4


@dataclass
class EvalOutput:
    """Per-sample results of :func:`evaluate`, ordered by dataset index."""

    probs: torch.Tensor  # (N, K) view-averaged probabilities
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) dataset indices


def aggregate_views(logits: torch.Tensor) -> torch.Tensor:
    """(N, V, K) logits -> (N, K) probabilities: softmax per view, then the mean over views."""
    if logits.ndim != 3:
        raise ValueError(f"aggregate_views expects logits (N, V, K), got shape {tuple(logits.shape)}")
    return logits.float().softmax(dim=-1).mean(dim=1)


def resolve_amp(amp: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (or a dtype) -> the autocast dtype for ``device``; None = fp32.

    ``auto`` is bf16 on a GPU that supports it (fp16 otherwise) and fp32 on the CPU. On the development CPU
    (AVX-512 with bf16 instructions) bf16 autocast made the PKS4-B/16 forward 1.26x faster (1.32x in an earlier
    run), while for the tiny demo model the load of other jobs moved the times more than the dtype did (median
    ratios 0.90x and 1.48x in two runs; ``benchmarks/predict_speed.md``). A gain that depends on the model and
    the CPU's bf16 instructions does not make a default: the CPU keeps fp32's exact answers, ``bf16`` is one
    argument away.
    """
    if amp is None or isinstance(amp, torch.dtype):
        return None if amp in (None, torch.float32) else amp
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp {amp!r}: expected one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def progress_bar(total: int | None, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr that appears only after two seconds, and never when stderr is not a terminal."""
    from tqdm import tqdm

    on = enabled and sys.stderr.isatty() and not os.environ.get("PKS4_NO_PROGRESS")
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not on, delay=2.0, leave=False, dynamic_ncols=True)


@torch.no_grad()
def _per_view(fn: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor, device: torch.device, chunk: int,
              amp_dtype: torch.dtype | None, frame_order: str | None) -> torch.Tensor:
    """``fn`` over (N, V, T, 3, H, W) clips in chunks of views -> (N, V, ...) float32; (N, T, 3, H, W) is one view."""
    if views.ndim == 5:
        views = views.unsqueeze(1)
    if views.ndim != 6:
        raise ValueError(f"expected views (N, V, T, 3, H, W), got shape {tuple(views.shape)}")
    n, v = views.shape[:2]
    flat = views.flatten(0, 1)  # (N*V, T, 3, H, W): views are independent clips
    if frame_order is not None:
        from pks4.data.frame_order import perturb_frame_order

        flat = perturb_frame_order(flat, frame_order)
    outs = []
    for start in range(0, flat.shape[0], chunk):
        x = flat[start:start + chunk].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outs.append(fn(x).float())
    return torch.cat(outs).view(n, v, *outs[0].shape[1:])


def run_views(model: nn.Module, views: torch.Tensor, chunk: int = 16,
              amp_dtype: torch.dtype | None = None, frame_order: str | None = None) -> torch.Tensor:
    """Score (N, V, T, 3, H, W) clips view by view -> logits (N, V, K); a (N, T, 3, H, W) input is one view.

    ``frame_order`` (None = as sampled) permutes each view's frames first (:mod:`pks4.data.frame_order`).
    """
    return _per_view(model, views, next(model.parameters()).device, chunk, amp_dtype, frame_order)


def embed_views(model: nn.Module, views: torch.Tensor, chunk: int = 16,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled clip features ``model.forward_features`` of (N, V, T, 3, H, W) clips -> (N, V, D)."""
    return _per_view(model.forward_features, views, next(model.parameters()).device, chunk, amp_dtype, None)


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percent of samples whose label is among the k highest scores (k clipped to the class count)."""
    if len(labels) == 0:
        return {k: 0.0 for k in ks}
    order = probs.topk(min(max(ks), probs.shape[1]), dim=1).indices
    hits = order == labels.view(-1, 1)
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def mean_class_accuracy(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Percent top-1 accuracy averaged over the classes present in ``labels`` (each class weighs the same)."""
    cm = confusion_matrix(probs.argmax(dim=1), labels, num_classes)
    per_class = cm.diag().double() / cm.sum(dim=1).clamp(min=1).double()
    present = cm.sum(dim=1) > 0
    return 100.0 * per_class[present].mean().item() if present.any() else 0.0


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``{"top1", "top5", "mean_class"}`` in percent."""
    acc = topk_accuracy(probs, labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "mean_class": mean_class_accuracy(probs, labels, num_classes)}


def save_confusion_matrix(cm: torch.Tensor, classes: Sequence[str], csv_path: str | Path,
                          png_path: str | Path | None = None) -> None:
    """Write the matrix as CSV (header = predicted class) and, optionally, as a PNG heat map."""
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true\\pred", *classes])
        for name, row in zip(classes, cm.tolist()):
            writer.writerow([name, *row])
    if png_path is None:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    side = min(20.0, 2.0 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    rows = cm.float() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 60:  # beyond that the tick labels are unreadable anyway
        ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _gather(local: list[torch.Tensor]) -> list[torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [t.cpu() for t in local])
    return [torch.cat([p[i] for p in parts]) for i in range(len(local))]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], amp_dtype: torch.dtype | None = None,
             chunk: int = 16, progress: Any = None, frame_order: str | None = None) -> EvalOutput:
    """Score every :class:`~pks4.data.items.Batch` of ``loader`` and gather all ranks' per-sample scores.

    Under DDP each rank scores its shard; the scores are gathered and de-duplicated by dataset index (the
    distributed sampler pads the last shard with repeats), so every rank returns the full, ordered result.
    ``progress``: True for a :func:`progress_bar` over the batches (pass it on the main rank only), or any
    object with ``update(n)``.
    """
    if progress is True:
        progress = progress_bar(len(loader) if hasattr(loader, "__len__") else None, "evaluating")
    elif progress is False:
        progress = None
    was_training = model.training
    model.eval()
    probs, labels, indices = [], [], []
    for batch in loader:
        if batch.video is None:  # every clip of the batch was skipped as unreadable
            continue
        probs.append(aggregate_views(run_views(model, batch.video, chunk, amp_dtype, frame_order)).cpu())
        labels.append(batch.label)
        indices.append(batch.index)
        if progress is not None:
            progress.update(1)
    if hasattr(progress, "close"):
        progress.close()
    model.train(was_training)
    k = _num_classes(model)
    local = [torch.cat(probs) if probs else torch.zeros(0, k),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)]
    p, y, i = _gather(local)
    i, first = _unique_first(i)
    return EvalOutput(p[first], y[first], i)


def _unique_first(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    first = torch.full((len(uniq),), len(indices), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(indices)), reduce="amin")
    return uniq, first


def _num_classes(model: nn.Module) -> int:
    from pks4.engine.checkpoint import unwrap

    module = unwrap(model)
    return int(getattr(module, "num_classes", 0))


def topk_labels(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row, the ``k`` best ``{"label", "index", "score"}`` entries."""
    k = min(k, probs.shape[1])
    scores, idx = probs.topk(k, dim=1)
    return [[{"label": classes[j], "index": int(j), "score": round(float(s), 6)} for s, j in zip(srow, irow)]
            for srow, irow in zip(scores.tolist(), idx.tolist())]


def clip_views(frames: torch.Tensor, spec: Any, size: int, data_cfg: Any) -> torch.Tensor:
    """Sampled frames of ``spec.clips`` clips, uint8 (clips*T, H, W, 3) -> test views (clips*crops, T, 3, size, size),
    resized, cropped and normalised exactly as evaluation does it (``data_cfg``: short side, mean, std)."""
    from pks4.data.datasets import _eval_views

    return _eval_views(frames, spec, size, data_cfg)


def frames_to_views(frames: torch.Tensor, spec: Any, size: int, data_cfg: Any) -> torch.Tensor:
    """Every frame of one video, uint8 (L, H, W, 3) -> its test views, sampled as a file of those L frames is."""
    from pks4.data.datasets import _sampler

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8 or len(frames) == 0:
        raise ValueError(f"expected the frames of one video as uint8 (L, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    index = _sampler(data_cfg, spec.frames, False, spec.clips)(len(frames))
    return clip_views(frames[torch.as_tensor(index)], spec, size, data_cfg)


class _VideoViews(Dataset):
    """Videos (file paths, or uint8 frames (L, H, W, 3)) -> test views; a bad file yields its message, which the
    main process raises again (an error raised inside a DataLoader worker loses its type and comes back as a
    traceback)."""

    def __init__(self, videos: Sequence[Any], spec: Any, size: int, data_cfg: Any) -> None:
        self.videos, self.spec, self.size, self.cfg = list(videos), spec, size, data_cfg

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        from pks4.data.datasets import load_video_views
        from pks4.data.video import DataError

        item = self.videos[i]
        try:
            if isinstance(item, (str, os.PathLike)):
                return load_video_views(item, self.spec.frames, self.size, self.spec, self.cfg)
            return frames_to_views(torch.as_tensor(item), self.spec, self.size, self.cfg)
        except DataError as exc:
            return str(exc)


def _stack_views(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else torch.stack(items)


@torch.no_grad()
def video_scores(model: nn.Module, videos: Sequence[Any], spec: Any, size: int, data_cfg: Any, *,
                 features: bool = False, batch_size: int = DEFAULT_BATCH, num_workers: int = 0,
                 amp_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Videos (paths or uint8 frames (L, H, W, 3)) -> (N, K) probabilities (softmax per view, then the mean), or
    with ``features`` (N, D) clip features averaged over the views. ``num_workers`` processes decode."""
    from pks4.data.video import DataError

    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch size {batch_size} / workers {num_workers}: expected >= 1 / >= 0")
    loader = DataLoader(_VideoViews(videos, spec, size, data_cfg), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_stack_views)
    bar = progress_bar(len(videos), "videos", progress)
    model.eval()
    out = []
    for batch in loader:
        if isinstance(batch, str):
            raise DataError(batch)
        if features:
            out.append(embed_views(model, batch, amp_dtype=amp_dtype).mean(dim=1).cpu())
        else:
            out.append(aggregate_views(run_views(model, batch, amp_dtype=amp_dtype)).cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


def predict_videos(model: nn.Module, paths: Sequence[Any], classes: Sequence[str], views: str,
                   size: int, data_cfg: Any, topk: int = 5, amp_dtype: torch.dtype | None = None, *,
                   batch_size: int = DEFAULT_BATCH, num_workers: int = 0, progress: bool = False
                   ) -> list[dict[str, Any]]:
    """Multi-view prediction: ``{"path", "label", "score", "topk": [{label, index, score}, ...]}`` per video.

    A video is a file path or its uint8 frames (L, H, W, 3) (then without "path"); ``label``/``score`` repeat
    the best entry of ``topk``. ``pks4 predict`` and :class:`pks4.VideoClassifier` both answer through here.
    """
    from pks4.data.sampling import parse_views

    if topk < 1:
        raise ValueError(f"topk {topk}: expected at least 1")
    probs = video_scores(model, paths, parse_views(views), size, data_cfg, batch_size=batch_size,
                         num_workers=num_workers, amp_dtype=amp_dtype, progress=progress)
    results = []
    for item, top in zip(paths, topk_labels(probs, classes, topk)):
        where = {"path": str(item)} if isinstance(item, (str, os.PathLike)) else {}
        results.append({**where, "label": top[0]["label"], "score": top[0]["score"], "topk": top})
    return results


def _device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def _check_patch_policy(policy: str | int) -> str | int:
    """``native`` | ``static_tokens`` | a patch size (int or digits), checked before any loading."""
    from pks4.models.base import PATCH_POLICIES

    if isinstance(policy, int) or str(policy).isdigit():
        if int(policy) < 1:
            raise ValueError(f"patch policy {policy!r}: a patch size must be >= 1")
        return int(policy)
    if policy not in PATCH_POLICIES:
        raise ValueError(f"patch policy {policy!r}: expected one of {', '.join(PATCH_POLICIES)} or a patch size")
    return policy


def _at_shape(model: nn.Module, frames: int, size: int, trained_size: int, policy: str | int, method: str
              ) -> nn.Module:
    """``model`` embedding ``size`` px frames with the patch of ``policy`` (:func:`pks4.models.base.geometry_for`:
    resized patch kernel, bicubic position embeddings). At the size it was trained at with its stored patch
    nothing changes, so the plain forward runs there."""
    from pks4.models.base import at_geometry, geometry_for

    if size == trained_size and policy == "native":
        return model
    return at_geometry(model, geometry_for(model, frames, size, policy, kernel_resize=method))


def evaluate_checkpoint(checkpoint: str | Path, data_list: str | None = None, data_root: str | None = None,
                        views: str | None = None, batch_size: int | None = None, out_dir: str | Path | None = None,
                        device: str = "auto", num_workers: int = 2, frame_order: str | None = None,
                        frames: int | None = None, size: int | None = None, patch_policy: str | int = "native",
                        amp: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Multi-view evaluation of a checkpoint (or run dir) on its validation list or ``data_list``.

    Returns ``{"top1", "top5", "mean_class", "views", "samples", "frame_order", "size", "patch_policy"}``
    (accuracies in percent); with ``out_dir`` also writes ``confusion_matrix.csv`` / ``.png`` there.
    ``frame_order`` (Park et al. Table 1) reorders the frames of every view before the model; None or
    "sequential" keeps them. ``frames`` / ``size`` evaluate at any clip length and frame size (StretchySnake);
    ``patch_policy`` is ``native`` (stored patch, the grid follows the size), ``static_tokens`` (patch scaled
    to keep the trained token grid) or a patch size. ``amp`` as in :func:`resolve_amp`; ``progress`` shows a bar.
    """
    from dataclasses import replace

    from pks4.data.datasets import build_dataset
    from pks4.data.flex_sampler import data_config_at
    from pks4.data.frame_order import FRAME_ORDERS
    from pks4.data.sampling import parse_views
    from pks4.engine.checkpoint import load_model_from_checkpoint
    from pks4.engine.loader import LoaderOptions, sequential_stream

    if frame_order is not None and frame_order not in FRAME_ORDERS:  # before minutes of loading, not after
        raise ValueError(f"frame order {frame_order!r}: expected one of {', '.join(FRAME_ORDERS)}")
    patch_policy = _check_patch_policy(patch_policy)
    amp_dtype = resolve_amp(amp, _device(device))
    model, cfg, classes = load_model_from_checkpoint(checkpoint, map_location=_device(device))
    data_cfg = replace(cfg.data, val=data_list or cfg.data.val, root=data_root if data_root is not None else
                       (cfg.data.root if not data_list else ""))
    spec = parse_views(views or cfg.eval.views)
    if frames is not None:
        spec = replace(spec, frames=frames)
    if size is not None:
        data_cfg = data_config_at(data_cfg, spec.frames, size)
    dataset = build_dataset(data_cfg, "val", train=False, views=spec)
    if len(dataset.classes) > len(classes):
        raise ValueError(f"{data_cfg.val}: {len(dataset.classes)} classes but the checkpoint has {len(classes)}")
    loader = sequential_stream(dataset, batch_size or cfg.eval.batch_size,
                               LoaderOptions(num_workers, cfg.train.loader_timeout), skip_bad=data_cfg.skip_bad_videos)
    at_shape = _at_shape(model, spec.frames, data_cfg.size, cfg.data.size, patch_policy, cfg.flex.kernel_resize)
    out = evaluate(at_shape, loader, amp_dtype=amp_dtype, frame_order=frame_order, progress=progress)
    metrics = compute_metrics(out.probs, out.labels, len(classes))
    if out_dir is not None:
        cm = confusion_matrix(out.probs.argmax(1), out.labels, len(classes))
        save_confusion_matrix(cm, classes, Path(out_dir) / "confusion_matrix.csv",
                              Path(out_dir) / "confusion_matrix.png")
    return {**metrics, "views": str(spec), "samples": int(len(out.labels)),
            "frame_order": frame_order or "sequential", "size": data_cfg.size, "patch_policy": patch_policy}


def predict_checkpoint(checkpoint: str | Path, videos: Sequence[str | Path], views: str | None = None,
                       topk: int = 5, device: str = "auto", frames: int | None = None, size: int | None = None,
                       patch_policy: str | int = "native", amp: str = "auto", batch_size: int = DEFAULT_BATCH,
                       num_workers: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """:func:`predict_videos` with the model, class names and data settings of a run dir, a checkpoint or a
    folder written by ``save_pretrained``; ``frames`` / ``size`` / ``patch_policy`` as in
    :func:`evaluate_checkpoint`, ``amp`` as in :func:`resolve_amp`."""
    from dataclasses import replace

    from pks4.data.flex_sampler import data_config_at
    from pks4.data.sampling import parse_views
    from pks4.data.flex_sampler import data_config_at
    from pks4.engine.pretrained import load_for_inference

    patch_policy = _check_patch_policy(patch_policy)
    amp_dtype = resolve_amp(amp, _device(device))
    model, info = load_for_inference(checkpoint, map_location=_device(device))
    spec = parse_views(views or info.views)
    spec = replace(spec, frames=frames) if frames is not None else spec
    data_cfg = data_config_at(info.data, spec.frames, size) if size is not None else info.data
    at_shape = _at_shape(model, spec.frames, data_cfg.size, info.data.size, patch_policy, info.kernel_resize)
    return predict_videos(at_shape, videos, info.classes, str(spec), data_cfg.size, data_cfg, topk, amp_dtype,
                          batch_size=batch_size, num_workers=num_workers, progress=progress)
