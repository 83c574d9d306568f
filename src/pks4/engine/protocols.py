"""Evaluation protocols of StretchySnake (§5): the resolution x frames grid (Table 1), video retrieval,
linear probing on frozen features (Table 2) and 2-D embedding maps (Fig. 4), for any checkpoint.

Every protocol runs the model at a chosen (T, H) and patch policy (the token geometry of
:func:`pks4.models.base.geometry_for`, passed to the model's forward), and classifies
through :func:`pks4.engine.infer.run_views` (the one inference path). Accuracies are percentages.

* Retrieval: features of the training set are the gallery, validation clips the queries; a query is a hit
  when its cosine nearest neighbour in the gallery has its class (top-1; top-k = any of the k nearest).
* Linear probe: multinomial logistic regression on frozen, standardised features, full-batch L-BFGS with an
  L2 penalty (the frozen-model protocol of Table 2).
* Embedding maps: PCA always; t-SNE as well when scikit-learn can be imported (not a dependency).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pks4.data.flex_sampler import data_config_at, resized_video_dataset
from pks4.engine.infer import aggregate_views, run_views
from pks4.data.flex_sampler import data_config_at, resized_video_dataset
from pks4.engine.loader import BatchStream, LoaderOptions, sequential_stream
from pks4.layers.geometry import TokenGeometry
from pks4.models.base import at_geometry, geometry_for

__all__ = [
    "GridResult", "parse_grid", "extract_features", "classify", "eval_grid", "write_grid", "plot_grid",
    "retrieval_topk", "retrieval", "ProbeResult", "linear_probe", "project_2d", "plot_embedding", "embed",
    "patch_policy", "CheckpointData", "load_checkpoint_data",
]


# ---- running a model at one (T, H) ----------------------------------------------------------------------------
def _loader(dataset: Dataset, frames: int | None, size: int | None, batch_size: int, num_workers: int,
            skip_bad: bool) -> BatchStream:
    if frames is not None and size is not None:
        dataset = resized_video_dataset(dataset, frames, size)
    return sequential_stream(dataset, batch_size, LoaderOptions(num_workers), skip_bad=skip_bad)


def _shape_of(model: nn.Module, video: Tensor, policy: str | int, kernel_resize: str) -> TokenGeometry:
    """(N, T, 3, H, W) or (N, V, T, 3, H, W) -> the token geometry the policy gives for its (T, H, W)."""
    t, h, w = video.shape[-4], video.shape[-2], video.shape[-1]
    return geometry_for(model, t, min(h, w), policy, kernel_resize=kernel_resize)


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, frames: int | None = None, size: int | None = None,
                     policy: str | int = "native", batch_size: int = 8, num_workers: int = 0,
                     kernel_resize: str = "bicubic", skip_bad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Clip embeddings ``model.forward_features`` (B, D) of every item, averaged over test views.

    Returns (features (N, D) float32 on CPU, labels (N,), dataset indices (N,)). ``frames``/``size`` load the
    dataset at that shape (see :func:`pks4.data.flex_sampler.resized_video_dataset`); None keeps the dataset's
    own. ``skip_bad``: leave unreadable videos out (else the first one ends the run, named).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels, indices = [], [], []
    for batch in _loader(dataset, frames, size, batch_size, num_workers, skip_bad):
        if batch.video is None:
            continue
        video = batch.video
        views = video if video.ndim == 6 else video.unsqueeze(1)  # (N, V, T, 3, H, W)
        geometry = _shape_of(model, views, policy, kernel_resize)
        f = model.forward_features(views.flatten(0, 1).to(device), geometry=geometry).float()
        feats.append(f.view(views.shape[0], views.shape[1], -1).mean(1).cpu())
        labels.append(batch.label)
        indices.append(batch.index)
    model.train(was_training)
    if not feats:
        raise ValueError(f"no readable clips in {type(dataset).__name__} ({len(dataset)} items)")
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


@torch.no_grad()
def classify(model: nn.Module, dataset: Dataset, *, frames: int | None = None, size: int | None = None,
             policy: str | int = "native", batch_size: int = 8, num_workers: int = 0,
             kernel_resize: str = "bicubic", skip_bad: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the model's own head at one (T, H): softmax per view, then the mean."""
    from pks4.engine.infer import topk_accuracy

    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in _loader(dataset, frames, size, batch_size, num_workers, skip_bad):
        if batch.video is None:
            continue
        at_shape = at_geometry(model, _shape_of(model, batch.video, policy, kernel_resize))
        probs.append(aggregate_views(run_views(at_shape, batch.video, chunk=batch_size)).cpu())
        labels.append(batch.label)
    model.train(was_training)
    acc = topk_accuracy(torch.cat(probs), torch.cat(labels), (1, 5))
    return {"top1": acc[1], "top5": acc[5], "samples": float(sum(len(y) for y in labels))}


# ---- retrieval and linear probing --------------------------------------------------------------------------------
def retrieval_topk(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                   ks: Sequence[int] = (1,)) -> dict[int, float]:
    """Percent of queries whose k cosine-nearest gallery items include their class."""
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"retrieval needs (Nq, D) queries and (Ng, D) gallery, got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    sims = F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T  # (Nq, Ng)
    nearest = sims.topk(min(max(ks), gallery.shape[0]), dim=1).indices
    hits = gallery_labels[nearest] == query_labels.view(-1, 1)
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def retrieval(model: nn.Module, gallery: Dataset, queries: Dataset, *, frames: int | None = None,
              size: int | None = None, policy: str | int = "native", ks: Sequence[int] = (1, 5),
              batch_size: int = 8, num_workers: int = 0, kernel_resize: str = "bicubic",
              skip_bad: bool = False) -> dict[str, float]:
    """Video retrieval (§5.2): gallery = training clips, queries = validation clips, both at (T, H)."""
    kw = dict(frames=frames, size=size, policy=policy, batch_size=batch_size, num_workers=num_workers,
              kernel_resize=kernel_resize, skip_bad=skip_bad)
    g, gy, _ = extract_features(model, gallery, **kw)
    q, qy, _ = extract_features(model, queries, **kw)
    return {f"top{k}": v for k, v in retrieval_topk(q, qy, g, gy, ks).items()}


@dataclass
class ProbeResult:
    """A trained linear probe: accuracies (%) and the classifier on standardised features."""

    top1: float
    train_top1: float
    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)
    mean: Tensor  # (D,) feature standardisation, from the training features
    std: Tensor  # (D,)
    losses: list[float] = field(default_factory=list)

    def predict(self, feats: Tensor) -> Tensor:
        return ((feats.float() - self.mean) / self.std) @ self.weight.T + self.bias


def linear_probe(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor, *,
                 num_classes: int | None = None, steps: int = 300, weight_decay: float = 1e-4,
                 optimizer: str = "lbfgs", lr: float | None = None, seed: int = 0) -> ProbeResult:
    """Multinomial logistic regression on frozen features (Table 2, "linear probing").

    ``optimizer``: "lbfgs" (full batch, strong Wolfe line search, ``steps`` iterations) or "adamw"
    (``steps`` full-batch steps). The L2 penalty ``weight_decay * |W|^2`` keeps separable data finite.
    """
    x = train_feats.float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # standardise: features of different models differ in scale
    x = (x - mean) / std
    y = train_labels.long()
    k = int(num_classes or int(max(y.max(), val_labels.max())) + 1)
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(k, x.shape[1], generator=gen)).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    losses: list[float] = []

    def loss_fn() -> Tensor:
        return F.cross_entropy(x @ w.T + b, y) + weight_decay * (w * w).sum()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=lr or 1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            losses.append(loss.detach().item())
            return loss

        opt.step(closure)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW([w, b], lr=lr or 1e-2, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
    else:
        raise ValueError(f"linear_probe optimizer {optimizer!r}; expected 'lbfgs' or 'adamw'")
    result = ProbeResult(0.0, 0.0, w.detach(), b.detach(), mean, std, losses)
    result.train_top1 = 100.0 * (result.predict(train_feats).argmax(1) == y).double().mean().item()
    result.top1 = 100.0 * (result.predict(val_feats).argmax(1) == val_labels.long()).double().mean().item()
    return result


# ---- the resolution x frames grid (Table 1) ---------------------------------------------------------------------
@dataclass
class GridResult:
    """One metric over frames (rows) x sizes (columns)."""

    frames: list[int]
    sizes: list[int]
    values: np.ndarray  # (len(frames), len(sizes)), percent
    metric: str = "top1"
    policy: str = "native"
    seen: list[tuple[int, int]] = field(default_factory=list)  # (T, H) cells seen in training (shaded)

    @property
    def spread(self) -> float:
        """max - min over the grid (points): how much the accuracy moves with the input size."""
        return float(np.nanmax(self.values) - np.nanmin(self.values))

    def to_markdown(self, label: str = "") -> str:
        head = f"| {label or self.metric} | " + " | ".join(f"{s} px" for s in self.sizes) + " | mean |"
        rule = "|" + "---|" * (len(self.sizes) + 2)
        rows = []
        for i, t in enumerate(self.frames):
            cells = [f"**{v:.1f}**" if (t, s) in self.seen else f"{v:.1f}" for s, v in zip(self.sizes, self.values[i])]
            rows.append(f"| {t} frames | " + " | ".join(cells) + f" | {np.nanmean(self.values[i]):.1f} |")
        return "\n".join([head, rule, *rows])

    def to_rows(self) -> list[dict[str, Any]]:
        return [{"frames": t, "size": s, self.metric: float(self.values[i, j]), "policy": self.policy}
                for i, t in enumerate(self.frames) for j, s in enumerate(self.sizes)]


def parse_grid(items: Sequence[str]) -> tuple[list[int], list[int]]:
    """``["frames=8,16", "size=96,128"]`` -> ([8, 16], [96, 128]); keys ``frames`` and ``size``/``sizes``."""
    out: dict[str, list[int]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = {"sizes": "size", "frame": "frames"}.get(key.strip(), key.strip())
        if not sep or key not in ("frames", "size"):
            raise ValueError(f"--grid {item!r}: expected frames=T1,T2,... or size=H1,H2,...")
        try:
            out[key] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid {item!r}: values must be integers") from None
    if set(out) != {"frames", "size"} or not out["frames"] or not out["size"]:
        raise ValueError(f"--grid needs both frames=... and size=..., got {list(items)}")
    return out["frames"], out["size"]


def eval_grid(model: nn.Module, dataset: Dataset, frames: Sequence[int], sizes: Sequence[int], *,
              policy: str | int = "native", metric: str = "top1", gallery: Dataset | None = None,
              batch_size: int = 8, num_workers: int = 0, seen: Sequence[tuple[int, int]] = (),
              log: Any = None, kernel_resize: str = "bicubic", skip_bad: bool = False) -> GridResult:
    """Evaluate one checkpoint at every (T, H) of frames x sizes (Table 1).

    ``metric``: "top1" (the model's head) or "retrieval" (top-1 nearest neighbour against ``gallery`` encoded
    at the same (T, H), the paper's Table 1 metric).
    """
    if metric not in ("top1", "retrieval"):
        raise ValueError(f"eval_grid metric {metric!r}; expected 'top1' or 'retrieval'")
    if metric == "retrieval" and gallery is None:
        raise ValueError("eval_grid(metric='retrieval') needs a gallery dataset (the training clips)")
    values = np.full((len(frames), len(sizes)), np.nan)
    kw = dict(policy=policy, batch_size=batch_size, num_workers=num_workers, kernel_resize=kernel_resize,
              skip_bad=skip_bad)
    for i, t in enumerate(frames):
        for j, s in enumerate(sizes):
            if metric == "top1":
                values[i, j] = classify(model, dataset, frames=t, size=s, **kw)["top1"]
            else:
                values[i, j] = retrieval(model, gallery, dataset, frames=t, size=s, ks=(1,), **kw)["top1"]
            if log is not None:
                log(f"{t} frames x {s} px ({policy}): {metric} {values[i, j]:.2f}")
    return GridResult(list(frames), list(sizes), values, metric, str(policy), [tuple(c) for c in seen])


def plot_grid(result: GridResult, png_path: str | Path, title: str = "") -> None:
    """Heat map of the grid, cells annotated, cells seen in training outlined (Table 1's grey cells)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(1.1 * len(result.sizes) + 2.2, 0.6 * len(result.frames) + 1.6))
    im = ax.imshow(result.values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, t in enumerate(result.frames):
        for j, s in enumerate(result.sizes):
            v = result.values[i, j]
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=9)
            if (t, s) in result.seen:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(result.sizes)), [str(s) for s in result.sizes])
    ax.set_yticks(range(len(result.frames)), [str(t) for t in result.frames])
    ax.set_xlabel("test size (px)")
    ax.set_ylabel("test frames")
    ax.set_title(title or f"{result.metric} (%), patch policy {result.policy}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_grid(result: GridResult, out_dir: str | Path, name: str = "grid", title: str = "") -> dict[str, Path]:
    """``<name>.csv`` (one row per cell), ``<name>.md`` (the table) and ``<name>.png`` (heat map)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    rows = result.to_rows()
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(result.to_markdown() + f"\n\nspread (max - min): {result.spread:.1f} points\n")
    plot_grid(result, paths["png"], title)
    return paths


# ---- embedding maps (Fig. 4) ------------------------------------------------------------------------------------
def project_2d(feats: Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) by PCA (centred SVD) or t-SNE (scikit-learn, when importable)."""
    x = feats.double()
    if method == "pca":
        x = x - x.mean(0)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        return (x @ v[:2].T).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE  # optional: only when scikit-learn is installed

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
    raise ValueError(f"2-D projection {method!r}; expected 'pca' or 'tsne'")


def _has_sklearn() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def plot_embedding(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None, png_path: str | Path,
                   title: str = "") -> None:
    """Scatter of a 2-D map coloured by class, legend with class names (up to 20 classes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    uniq = np.unique(labels)
    cmap = plt.get_cmap("tab20" if len(uniq) > 10 else "tab10")
    for n, c in enumerate(uniq):
        sel = labels == c
        name = classes[c] if classes is not None and c < len(classes) else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(n % cmap.N), label=name)
    if len(uniq) <= 20:
        ax.legend(fontsize=7, markerscale=1.2, loc="best")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def embed(model: nn.Module, dataset: Dataset, out_path: str | Path, *, frames: int | None = None,
          size: int | None = None, policy: str | int = "native", classes: Sequence[str] | None = None,
          batch_size: int = 8, num_workers: int = 0, methods: Sequence[str] | None = None,
          kernel_resize: str = "bicubic", skip_bad: bool = False) -> dict[str, Path]:
    """Write clip embeddings to ``out_path`` (.npz: features, labels, indices; or .safetensors) and one 2-D
    map PNG per method next to it (``<stem>_pca.png``, ``<stem>_tsne.png``)."""
    feats, labels, indices = extract_features(model, dataset, frames=frames, size=size, policy=policy,
                                              batch_size=batch_size, num_workers=num_workers,
                                              kernel_resize=kernel_resize, skip_bad=skip_bad)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"features": feats.contiguous(), "labels": labels, "indices": indices}, str(out))
    else:
        out = out.with_suffix(".npz")
        np.savez(out, features=feats.numpy(), labels=labels.numpy(), indices=indices.numpy())
    paths = {"features": out}
    methods = list(methods) if methods is not None else ["pca"] + (["tsne"] if _has_sklearn() else [])
    where = f"T={frames or 'data'}, H={size or 'data'}, patch {policy}"
    for method in methods:
        png = out.with_name(f"{out.stem}_{method}.png")
        plot_embedding(project_2d(feats, method), labels.numpy(), classes, png, f"{method.upper()} of clip "
                       f"embeddings ({where})")
        paths[method] = png
    return paths


# ---- a checkpoint and its data -----------------------------------------------------------------------------------
def patch_policy(text: str | int) -> str | int:
    """``--patch-policy`` text: "native", "static_tokens" or a patch size."""
    return int(text) if str(text).isdigit() else text


@dataclass
class CheckpointData:
    """A checkpoint's model with the datasets a protocol runs on: ``data_cfg`` is the data config at the asked
    (T, H), ``run`` the checkpoint's own run config."""

    model: nn.Module
    data_cfg: Any
    classes: list[str]
    datasets: dict[str, Dataset]
    run: Any


def load_checkpoint_data(checkpoint: str, splits: Sequence[str], *, device: str = "auto", data: str | None = None,
                         train_data: str | None = None, data_root: str | None = None, frames: int | None = None,
                         size: int | None = None) -> CheckpointData:
    """Rebuild the model of ``checkpoint`` and read its evaluation datasets (``splits``: "train" / "val").

    ``data`` / ``train_data`` replace the run's validation / training lists (paths then relative to
    ``data_root``, default the list's folder); ``frames`` / ``size`` load clips at that shape, the test-time short
    side scaled with the size.
    """
    from pks4.data.datasets import build_dataset
    from pks4.engine.checkpoint import load_model_from_checkpoint

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, cfg, classes = load_model_from_checkpoint(checkpoint, map_location=device)
    given = bool(data or train_data)
    data_cfg = replace(cfg.data, train=train_data or cfg.data.train, val=data or cfg.data.val,
                       root=data_root if data_root is not None else ("" if given else cfg.data.root))
    if frames or size:  # short side scaled with the size
        data_cfg = data_config_at(data_cfg, frames or None, size or None)
    datasets = {s: build_dataset(data_cfg, s, train=False) for s in splits}
    return CheckpointData(model, data_cfg, classes, datasets, cfg)
