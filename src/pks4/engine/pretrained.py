"""A trained model for inference, wherever it is kept, and the Hub layout it can be saved in.

Three places hold a trained model, and :func:`load_for_inference` reads all of them:

* a run directory (``pks4 train --out``): its best checkpoint, else its newest valid one;
* a checkpoint (directory, or its ``model.safetensors`` with pks4 metadata);
* a folder in the Hugging Face Hub layout, written by :func:`save_pretrained`:

  - ``config.json``: the registry name and model config (enough to rebuild the network), ``id2label`` /
    ``label2id``, how clips are made (frames, size, short side, sampling, normalisation) and the test views,
    plus a ``training`` record (data, recipe, measured accuracy) that the model card is written from;
  - ``model.safetensors``: the weights as plain float tensors, with no pks4 metadata inside, so the folder
    reads with ``json`` and ``safetensors`` alone (any framework, no pks4);
  - ``README.md``: the model card, generated from ``config.json``.

Each comes back as the network (eval mode) and an :class:`InferenceSpec`: what inference needs besides the
weights. A folder whose ``config.json`` is missing, unreadable or does not fit its weights is refused with a
message naming the file and the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pks4.data.datasets import DataConfig
from pks4.engine.checkpoint import (WEIGHTS_FILE, CheckpointError, load_model_from_checkpoint, load_weights_into,
                                    plain_state_dict, read_weights, resolve_checkpoint, unwrap)

__all__ = ["CONFIG_FILE", "CARD_FILE", "FORMAT_VERSION", "InferenceSpec", "load_for_inference",
           "is_pretrained_folder", "read_pretrained_config", "pretrained_config", "save_pretrained", "model_card"]

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
_REQUIRED = ("architecture", "model_config", "id2label", "num_frames", "image_size", "short_side", "image_mean",
             "image_std", "sampling", "views")


@dataclass
class InferenceSpec:
    """What inference needs besides the weights: class names, how clips are made, the test views."""

    classes: list[str]
    data: DataConfig  # num_frames, size, short_side, sampling, dense_stride, mean, std (the paths are not used)
    views: str  # FRAMESxCLIPSxCROPS
    kernel_resize: str = "bicubic"  # patch-kernel resizing at another size (StretchySnake)
    training: dict[str, Any] = field(default_factory=dict)  # data, recipe, metrics: what the model card shows

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def is_pretrained_folder(path: str | Path) -> bool:
    """True for a folder holding ``config.json`` (the Hub layout), as opposed to a run or checkpoint."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def load_for_inference(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, InferenceSpec]:
    """The model (eval mode, on ``map_location``) and its :class:`InferenceSpec` from a Hub folder, a run
    directory or a checkpoint. A folder with ``model.safetensors`` but no pks4 metadata must have ``config.json``."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_FILE and is_pretrained_folder(p.parent):
        p = p.parent  # the weights file of a Hub folder: its config.json says what they are
    if is_pretrained_folder(p):
        return _load_pretrained(p, map_location)
    if p.is_dir() and (p / WEIGHTS_FILE).is_file() and not (p / "state.pt").is_file():
        raise CheckpointError(f"{p / CONFIG_FILE}: missing; a folder written by save_pretrained (pks4 "
                              f"export-pretrained) holds {CONFIG_FILE} beside {WEIGHTS_FILE}")
    model, cfg, classes = load_model_from_checkpoint(p, map_location=map_location)
    weights = resolve_checkpoint(p)
    spec = InferenceSpec(classes=classes, data=cfg.data, views=cfg.eval.views,
                         kernel_resize=cfg.flex.kernel_resize, training=_training_record(weights, cfg))
    return model, spec


# ------------------------------------------------------------------------------------------------ reading


def read_pretrained_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hub folder, checked: required keys, ``id2label`` numbered 0..K-1, ``label2id`` its
    inverse, ``num_labels`` and the model's ``num_classes`` equal to K. Errors name the file and the key."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a folder written by save_pretrained holds {CONFIG_FILE} beside "
                              f"{WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, got {type(config).__name__}")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}: not a pks4 model folder (write one "
                              "with save_pretrained or pks4 export-pretrained)")
    if int(config.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config['format_version']} is newer than this pks4 reads "
                              f"({FORMAT_VERSION}); upgrade pks4")
    _check_labels(config, path)
    if not isinstance(config["model_config"], dict):
        raise CheckpointError(f"{path}: 'model_config' must be an object, got {type(config['model_config']).__name__}")
    return config


def _check_labels(config: dict[str, Any], path: Path) -> None:
    id2label = config["id2label"]
    if not isinstance(id2label, dict) or not id2label:
        raise CheckpointError(f"{path}: 'id2label' must be a non-empty object {{\"0\": name, ...}}")
    k = len(id2label)
    if sorted(id2label, key=lambda x: (len(str(x)), str(x))) != [str(i) for i in range(k)]:
        raise CheckpointError(f"{path}: 'id2label' keys must be \"0\" to \"{k - 1}\", got {sorted(id2label)[:5]}...")
    heads = config["model_config"].get("num_classes") if isinstance(config["model_config"], dict) else None
    if heads is not None and heads != k:
        raise CheckpointError(f"{path}: 'id2label' has {k} labels but model_config.num_classes is {heads}")
    if config.get("num_labels", k) != k:
        raise CheckpointError(f"{path}: 'num_labels' is {config['num_labels']} but 'id2label' has {k} labels")
    label2id = config.get("label2id")
    if label2id is not None and label2id != {v: int(i) for i, v in id2label.items()}:
        raise CheckpointError(f"{path}: 'label2id' is not the inverse of 'id2label'")


def _load_pretrained(folder: Path, map_location: str | torch.device) -> tuple[nn.Module, InferenceSpec]:
    from pks4.models.registry import model_from_config

    config = read_pretrained_config(folder)
    source = folder / CONFIG_FILE
    try:
        model = model_from_config(config["architecture"], config["model_config"])
    except KeyError as exc:
        raise CheckpointError(f"{source}: 'architecture': {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: 'model_config' does not fit {config['architecture']!r}: {exc}") from None
    tensors, _ = read_weights(folder / WEIGHTS_FILE)
    try:
        load_weights_into(model, tensors, str(folder / WEIGHTS_FILE))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} -- the weights do not fit the network {source} describes "
                              f"({config['architecture']})") from None
    model.to(map_location).eval()
    data = DataConfig(num_frames=int(config["num_frames"]), size=int(config["image_size"]),
                      short_side=int(config["short_side"]), sampling=config["sampling"],
                      dense_stride=int(config.get("dense_stride", 4)), mean=tuple(config["image_mean"]),
                      std=tuple(config["image_std"]))
    classes = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    return model, InferenceSpec(classes=classes, data=data, views=str(config["views"]),
                                kernel_resize=config.get("kernel_resize", "bicubic"),
                                training=dict(config.get("training") or {}))


# ------------------------------------------------------------------------------------------------ writing


def pretrained_config(model: nn.Module, spec: InferenceSpec) -> dict[str, Any]:
    """The ``config.json`` of ``model`` with ``spec`` (plain JSON values only)."""
    from pks4.version import __version__

    module = unwrap(model)
    model_config = asdict(module.config)
    if "pretrained" in model_config:
        model_config["pretrained"] = ""  # the weights are in model.safetensors; never re-read a CLIP file
    d = spec.data
    return {
        "library_name": "pks4", "pks4_version": __version__, "format_version": FORMAT_VERSION,
        "architecture": module.model_name, "architectures": [type(module).__name__],
        "model_config": json.loads(json.dumps(model_config)),
        "num_labels": len(spec.classes), "id2label": {str(i): c for i, c in enumerate(spec.classes)},
        "label2id": {c: i for i, c in enumerate(spec.classes)},
        "num_frames": d.num_frames, "image_size": d.size, "short_side": d.short_side,
        "image_mean": list(d.mean), "image_std": list(d.std), "sampling": d.sampling,
        "dense_stride": d.dense_stride, "views": spec.views, "kernel_resize": spec.kernel_resize,
        "training": spec.training,
    }


def save_pretrained(model: nn.Module, spec: InferenceSpec, folder: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``folder`` (created if needed).

    Each file is written beside its final name and renamed into place, so an interrupted save leaves the old
    file or the new one, never half of one."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; save_pretrained writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    config = pretrained_config(model, spec)
    tmp = out / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(plain_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    for name, text in ((CONFIG_FILE, json.dumps(config, indent=2) + "\n"), (CARD_FILE, model_card(config))):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out


# ------------------------------------------------------------------------------------------------ model card


def _run_dir(weights: Path) -> Path | None:
    """The run directory above a checkpoint's weights file (``<run>/checkpoints/<name>/model.safetensors``)."""
    for parent in list(weights.resolve().parents)[:3]:
        if (parent / "metrics.jsonl").is_file():
            return parent
    return None


def _training_record(weights: Path, cfg: Any) -> dict[str, Any]:
    """Data, recipe and the validation accuracy the run measured (its ``metrics.jsonl``), for the model card."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    record: dict[str, Any] = {
        "data": {"format": d.format, "train": d.train, "val": d.val, "root": d.root},
        "recipe": {"model": cfg.model.name, "epochs": t.epochs, "batch_size": t.batch_size, "lr": o.lr,
                   "schedule": o.schedule, "weight_decay": o.weight_decay, "label_smoothing": t.label_smoothing,
                   "ema_decay": t.ema_decay, "amp": t.amp, "frames": d.num_frames, "size": d.size},
    }
    run = _run_dir(weights)
    rows = []
    if run is not None:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and row.get("kind") == "val" and "top1" in row:
                rows.append(row)
    if rows:
        best = max(rows, key=lambda r: r["top1"])
        record["metrics"] = {"best_val_top1": best["top1"], "best_val_top5": best.get("top5"),
                             "best_epoch": best.get("epoch"), "last_val_top1": rows[-1]["top1"],
                             "val_clips": best.get("samples"), "val_views": cfg.eval.val_views or "1 centre view",
                             "source": "metrics.jsonl of the training run"}
    return record


def model_card(config: dict[str, Any]) -> str:
    """``README.md`` of a Hub folder, from its ``config.json`` alone (so re-saving gives the same card)."""
    training = config.get("training") or {}
    data, recipe, metrics = training.get("data") or {}, training.get("recipe") or {}, training.get("metrics")
    labels = ", ".join(config["id2label"][str(i)] for i in range(len(config["id2label"])))
    lines = ["---", "library_name: pks4", "pipeline_tag: video-classification", "tags: [video-classification, "
             "state-space-model]", "---", "", f"# {config['architecture']}", "",
             f"A `{config['architecture']}` video classifier ({config['architectures'][0]}) with "
             f"{config['num_labels']} classes: {labels}.", "",
             "## Input", "",
             f"{config['num_frames']} frames per clip ({config['sampling']} sampling), resized to a short side of "
             f"{config['short_side']} px and cropped to {config['image_size']} x {config['image_size']}, "
             f"normalised with mean {config['image_mean']} and std {config['image_std']}; test views "
             f"{config['views']} (frames x clips x crops), softmax per view, then the mean.", ""]
    lines += ["## Training", ""]
    if data:
        lines.append("Data: " + ", ".join(f"{k} `{v}`" for k, v in data.items() if v) + ".")
    if recipe:
        lines.append("Recipe: " + ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None) + ".")
    if metrics:
        lines += ["", "## Measured accuracy", "",
                  f"Validation top-1 {metrics['best_val_top1']:.2f}% (top-5 {metrics.get('best_val_top5') or 0:.2f}%) "
                  f"at epoch {metrics.get('best_epoch')}, on {metrics.get('val_clips')} clips with "
                  f"{metrics.get('val_views')}; last evaluation {metrics['last_val_top1']:.2f}% "
                  f"(from the {metrics.get('source')})."]
    else:
        lines += ["", "No accuracy was recorded with these weights."]
    lines += ["", "## Use", "", "```python", "import pks4", "",
              'clf = pks4.VideoClassifier.from_pretrained("path/to/this/folder")',
              'print(clf("clip.mp4"))  # {"label": ..., "score": ..., "topk": [...]}', "```", ""]
    return "\n".join(lines)
