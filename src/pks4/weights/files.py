"""Reading checkpoint files of any model, and loading them strictly.

``read_checkpoint_file`` turns a safetensors file, a ``torch.save`` file (loaded with ``weights_only=True``:
pickles that would run code are refused), a TorchScript archive or a Hugging Face / open_clip folder into a flat
``{name: tensor}`` dict, unwrapping ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'module': ...}`` and a DDP
``module.`` prefix. ``read_hf_config`` and ``read_open_clip_config`` read what such a folder says about the
model. ``load_state_dict_strict`` loads a dict and refuses any missing, unexpected or shape-mismatched key
unless explicitly allowed, so a checkpoint never loads silently in part.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pks4.errors import UserError

__all__ = ["CheckpointError", "LoadReport", "read_checkpoint_file", "is_torchscript", "read_hf_config",
           "read_open_clip_config", "load_state_dict_strict"]

logger = logging.getLogger("pks4.weights")

_WRAPPER_KEYS = ("model", "state_dict", "module")
# Weight files a folder may hold: Hugging Face's names, then open_clip's (as its hub folders ship them).
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


def _key_list(keys: Sequence[str], limit: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (how OpenAI released CLIP), False for any other file or a folder."""
    path = Path(path)
    if not path.is_file():
        return False
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    # torch.save archives hold data.pkl + data/; TorchScript archives add compiled code and constants.
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(path, f"not a readable safetensors file ({err})") from err


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # OpenAI's released CLIP files are TorchScript; reading them stays necessary while torch
            # deprecates the format, so the deprecation notice would only be noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as err:
        raise CheckpointError(path, f"could not read the TorchScript archive ({err})") from err


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            path,
            "refused to unpickle: the file holds Python objects other than tensors and plain containers, "
            "and loading them could run arbitrary code. Re-save the weights you trust as a state dict or "
            f"safetensors. (weights_only load said: {first})",
        ) from err
    except Exception as err:
        raise CheckpointError(path, f"not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def _read_hf_folder(path: Path) -> dict[str, torch.Tensor]:
    for name in _HF_WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_safetensors(f) if name.endswith(".safetensors") else _unwrap(_read_pickle(f), f)
        shards = sorted(set(json.loads(f.read_text()).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f, "sharded index has an empty 'weight_map'")
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_checkpoint_file(path / shard))
        return out
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(path, f"folder holds none of {list(_HF_WEIGHT_FILES)}; found: {_key_list(found)}")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Strip {'model'|'state_dict'|'module': ...} wrappers and a DDP 'module.' prefix; keep the tensors."""
    for _ in range(8):
        if not isinstance(obj, Mapping):
            raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, f"no tensors found; top-level keys: {_key_list([str(k) for k in obj])}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    Handles ``.safetensors`` files, ``torch.save`` files (``weights_only=True``; a pickle that would run
    code raises ``CheckpointError``), TorchScript archives (their ``state_dict()``) and Hugging Face
    folders (``model.safetensors`` or ``pytorch_model.bin``, sharded or not).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if is_torchscript(path):
        return _read_torchscript(path)
    return _unwrap(_read_pickle(path), path)


def _beside(path: str | Path, name: str) -> Path:
    """File ``name`` in folder ``path``, or next to file ``path``."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / name


def _read_json_beside(path: str | Path, name: str) -> dict | None:
    """The JSON object in ``_beside(path, name)``; None when there is no such file."""
    cfg_file = _beside(path, name)
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(cfg_file, f"invalid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(cfg_file, f"expected a JSON object, found {type(cfg).__name__}")
    return cfg


def read_hf_config(path: str | Path) -> dict | None:
    """``config.json`` of a Hugging Face folder (or the folder of a file), vision part for ``CLIPModel``."""
    cfg = _read_json_beside(path, "config.json")
    return cfg.get("vision_config", cfg) if cfg is not None else None


def read_open_clip_config(path: str | Path) -> dict | None:
    """``model_cfg`` of the ``open_clip_config.json`` open_clip writes beside its weights (``quick_gelu``,
    ``vision_cfg``, ...); None when there is no such file."""
    cfg = _read_json_beside(path, "open_clip_config.json")
    if cfg is None:
        return None
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(_beside(path, "open_clip_config.json"), "expected a 'model_cfg' object")
    return model_cfg


# ---------------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did. ``missing``/``unexpected``/``mismatched`` hold only keys allowed by pattern."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    allow_partial: Sequence[str] | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module``; raise ``CheckpointError`` on any missing, unexpected or
    shape-mismatched key unless it matches one of the ``allow_partial`` glob patterns (e.g. ``"head.*"``).
    Allowed gaps are logged and returned in the report; mismatched allowed keys keep the module's values.
    """
    patterns = list(allow_partial or [])

    def allowed(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad_missing = [k for k in missing if not allowed(k)]
    bad_unexpected = [k for k in unexpected if not allowed(k)]
    bad_shapes = [f"{k}: {a} vs {b}" for k, a, b in mismatched if not allowed(k)]
    bad = []
    if bad_missing:
        bad.append(f"missing keys (in the model, not in the checkpoint): {_key_list(bad_missing)}")
    if bad_unexpected:
        bad.append(f"unexpected keys (in the checkpoint, not in the model): {_key_list(bad_unexpected)}")
    if bad_shapes:
        bad.append(f"shape mismatches (key: checkpoint vs model): {_key_list(bad_shapes)}")
    if bad:
        raise CheckpointError(source, f"does not fit {type(module).__name__}; " + "; ".join(bad))
    skip = {k for k, _, _ in mismatched}
    usable = {k: v for k, v in state_dict.items() if k in own and k not in skip}
    module.load_state_dict(usable, strict=False)
    report = LoadReport(str(source), sorted(usable), missing, unexpected, mismatched)
    if not report.complete:
        logger.warning("%s: partial load into %s allowed by %s: missing %s, unexpected %s, mismatched %s",
                       source, type(module).__name__, patterns, missing, unexpected,
                       [k for k, _, _ in mismatched])
    return report
