"""Reading other people's checkpoints.

Generic part (any model): ``read_checkpoint_file`` turns a safetensors file, a ``torch.save`` file (loaded
with ``weights_only=True``: pickles that would run code are refused), a TorchScript archive or a Hugging Face
folder into a flat ``{name: tensor}`` dict, unwrapping ``{'model': ...}`` / ``{'state_dict': ...}`` /
``{'module': ...}`` and a DDP ``module.`` prefix. ``load_state_dict_strict`` loads it and refuses any missing,
unexpected or shape-mismatched key unless explicitly allowed, so a checkpoint never loads silently in part.

CLIP part: ``load_pretrained_backbone`` reads the CLIP vision tower from OpenAI CLIP (TorchScript or state
dict), open_clip and Hugging Face (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``)
files and infers the tower's shape from the tensors.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pks4.layers.posembed import resize_pos_embed_2d
from pks4.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer

__all__ = [
    "CheckpointError",
    "LoadReport",
    "read_checkpoint_file",
    "read_hf_config",
    "load_state_dict_strict",
    "clip_vision_state_dict",
    "infer_clip_vision_config",
    "load_pretrained_backbone",
]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


class CheckpointError(Exception):
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


def _is_torchscript(path: Path) -> bool:
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
    if _is_torchscript(path):
        return _read_torchscript(path)
    return _unwrap(_read_pickle(path), path)


def read_hf_config(path: str | Path) -> dict | None:
    """``config.json`` of a Hugging Face folder (or the folder of a file), vision part for ``CLIPModel``."""
    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(cfg_file, f"invalid JSON ({err})") from err
    return cfg.get("vision_config", cfg) if isinstance(cfg, dict) else None


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


# ---------------------------------------------------------------------------------------------------------
# CLIP vision tower
# ---------------------------------------------------------------------------------------------------------

# Buffers some CLIP files carry that hold no weights: OpenAI's TorchScript scalars and HF's position ids.
_HARMLESS = {"input_resolution", "context_length", "vocab_size", "embeddings.position_ids"}

_HF_RENAMES = [
    (r"embeddings\.class_embedding", "class_embedding"),
    (r"embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),  # sic: the HF name is misspelt
    (r"post_layernorm\.(weight|bias)", r"ln_post.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
]
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _hf_to_openai(vision: Mapping[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Rename HF vision keys (prefix already stripped) to OpenAI's; q/k/v become in_proj's row blocks.
    Unknown keys pass through unchanged so the strict load reports them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in vision.items():
        m = _HF_QKV.fullmatch(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        for pattern, repl in _HF_RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = t
    for (layer, kind), parts in sorted(qkv.items()):
        absent = [f"encoder.layers.{layer}.self_attn.{n}_proj.{kind}" for n in "qkv" if n not in parts]
        if absent:
            raise CheckpointError(source, f"attention projection incomplete, missing {_key_list(absent)}")
        suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{suffix}"] = torch.cat([parts[n] for n in "qkv"], dim=0)
    return out


def _unique_prefix(state_dict: Mapping[str, torch.Tensor], anchor: str, sibling: str) -> str | None:
    """The prefix p for which p+anchor and p+sibling are both keys; None if there is none."""
    found = sorted({k[: -len(anchor)] for k in state_dict if k.endswith(anchor)
                    and k[: -len(anchor)] + sibling in state_dict})
    if len(found) > 1:
        raise CheckpointError("<state dict>", f"several CLIP vision towers under prefixes {found}")
    return found[0] if found else None


def clip_vision_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str | Path = "<state dict>"
) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the CLIP vision tower out of a checkpoint and rename it to ``CLIPVisionTransformer``'s keys.

    Returns (state dict, layout) with layout "openai" (OpenAI / open_clip / pks4 keys, any prefix such as
    ``visual.``) or "hf" (Hugging Face, with or without ``vision_model.``). Other towers (text) are left out.
    """
    try:
        oa = _unique_prefix(state_dict, "conv1.weight", "class_embedding")
        hf = _unique_prefix(state_dict, "embeddings.patch_embedding.weight", "embeddings.class_embedding")
    except CheckpointError as err:
        raise CheckpointError(source, err.message) from None
    if oa is not None:
        vision = {k[len(oa):]: v for k, v in state_dict.items() if k.startswith(oa)}
        return {k: v for k, v in vision.items() if k not in _HARMLESS}, "openai"
    if hf is not None:
        outer = hf[: -len("vision_model.")] if hf.endswith("vision_model.") else hf
        proj_key = outer + "visual_projection.weight"
        vision = {k[len(hf):]: v for k, v in state_dict.items() if k.startswith(hf) and k != proj_key}
        vision = _hf_to_openai({k: v for k, v in vision.items() if k not in _HARMLESS}, source)
        if proj_key in state_dict:
            vision["proj"] = state_dict[proj_key].T.contiguous()  # HF Linear weight (out, in) = proj.T
        return vision, "hf"
    raise CheckpointError(
        source,
        "not a CLIP vision checkpoint: expected OpenAI/open_clip keys ('visual.conv1.weight', "
        "'visual.class_embedding', ...) or Hugging Face keys ('[vision_model.]embeddings.patch_embedding.weight', "
        f"...); found keys: {_key_list(sorted(state_dict))}",
    )


def _require(sd: Mapping[str, torch.Tensor], key: str, ndim: int, source: str | Path) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(source, f"missing '{key}', needed to infer the tower's shape")
    if t.ndim != ndim:
        raise CheckpointError(source, f"'{key}' has shape {tuple(t.shape)}, expected {ndim} dims")
    return t


def infer_clip_vision_config(
    sd: Mapping[str, torch.Tensor],
    source: str | Path = "<state dict>",
    *,
    heads: int | None = None,
    quick_gelu: bool = True,
    ln_eps: float = 1e-5,
) -> CLIPVisionConfig:
    """Tower shape from OpenAI-named tensors: width and patch from ``conv1``, depth from the block indices,
    image size from the position embedding's grid, output_dim from ``proj``; heads default to width / 64."""
    conv = _require(sd, "conv1.weight", 4, source)
    pos = _require(sd, "positional_embedding", 2, source)
    width, _, ph, pw = conv.shape
    if ph != pw:
        raise CheckpointError(source, f"'conv1.weight' {tuple(conv.shape)} has a non-square patch")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(source, "no 'transformer.resblocks.N.*' keys")
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise CheckpointError(source, f"'positional_embedding' {tuple(pos.shape)} is not 1 + a square grid")
    if heads is None:
        if width % 64:
            raise CheckpointError(source, f"width {width} is not a multiple of 64; pass heads= explicitly")
        heads = width // 64
    fc = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
    proj = sd.get("proj")
    return CLIPVisionConfig(
        image_size=grid * ph,
        patch_size=ph,
        width=width,
        layers=max(blocks) + 1,
        heads=heads,
        mlp_ratio=fc.shape[0] / width if fc is not None else 4.0,
        output_dim=None if proj is None else int(proj.shape[1]),
        quick_gelu=quick_gelu,
        ln_eps=ln_eps,
    )


def load_pretrained_backbone(
    path: str | Path,
    *,
    image_size: int | None = None,
    quick_gelu: bool | None = None,
    heads: int | None = None,
) -> CLIPVisionTransformer:
    """Build a ``CLIPVisionTransformer`` from a CLIP checkpoint file or Hugging Face folder, 1:1 or not at all.

    Args:
        path: OpenAI CLIP (TorchScript or state dict), open_clip state dict, or Hugging Face
            ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` folder or file.
        image_size: native resolution for the returned tower; the position embedding is resized bicubically
            once here (other sizes are still accepted at run time).
        quick_gelu: activation override. Default: the HF config's ``hidden_act`` when there is one, else
            QuickGELU (OpenAI weights need it; open_clip models trained without it need ``False``).
        heads: attention heads override. Default: the HF config, else width / 64 (every CLIP tower).
    """
    sd = read_checkpoint_file(path)
    vision, layout = clip_vision_state_dict(sd, path)
    hf_cfg = read_hf_config(path) if layout == "hf" else None
    if quick_gelu is None:
        quick_gelu = hf_cfg.get("hidden_act", "quick_gelu") == "quick_gelu" if hf_cfg else True
    if heads is None and hf_cfg:
        heads = hf_cfg.get("num_attention_heads")
    ln_eps = float(hf_cfg.get("layer_norm_eps", 1e-5)) if hf_cfg else 1e-5
    cfg = infer_clip_vision_config(vision, path, heads=heads, quick_gelu=quick_gelu, ln_eps=ln_eps)
    if image_size is not None and image_size != cfg.image_size:
        if image_size % cfg.patch_size:
            raise CheckpointError(path, f"image_size {image_size} is not a multiple of patch {cfg.patch_size}")
        new_grid = image_size // cfg.patch_size
        vision["positional_embedding"] = resize_pos_embed_2d(vision["positional_embedding"].float(), new_grid)
        cfg = replace(cfg, image_size=image_size)
    model = CLIPVisionTransformer(cfg)
    load_state_dict_strict(model, vision, path)
    logger.info("loaded CLIP vision tower (%s layout) from %s: %s", layout, path, cfg)
    return model
