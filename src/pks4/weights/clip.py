"""Reading CLIP vision towers: OpenAI CLIP (TorchScript or state dict), open_clip and Hugging Face
(``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``) files and folders.

:func:`read_clip_tower` returns what a checkpoint says about its tower (:class:`ClipTowerCheckpoint`): the
tensors renamed to :class:`pks4.models.clip_vit.CLIPVisionTransformer`'s keys, the shape inferred from them
(width and patch from ``conv1``, depth from the block indices, image size from the position grid, output_dim
from ``proj``) and, where the file states them, the activation, layer-norm eps and head count:

* a TorchScript archive is OpenAI's release, trained with QuickGELU;
* a Hugging Face folder's ``config.json``: ``hidden_act`` ("quick_gelu" for OpenAI's converted weights, "gelu"
  for most others), ``layer_norm_eps``, ``num_attention_heads``;
* an open_clip folder's ``open_clip_config.json``: ``quick_gelu`` (absent means GELU: LAION's towers).

A bare state dict states none of them; QuickGELU (OpenAI's) and width / 64 heads are then assumed unless the
caller asks otherwise. :func:`clip_tower_config` reconciles a request with the checkpoint (a requested
activation that contradicts the file is an error unless forced); :func:`load_pretrained_backbone` builds the
tower 1:1 or not at all.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pks4.layers.posembed import resize_pos_embed_2d
from pks4.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
from pks4.weights.files import (CheckpointError, _key_list, is_torchscript, load_state_dict_strict,
                                read_checkpoint_file, read_hf_config, read_open_clip_config)

__all__ = ["ClipTowerCheckpoint", "clip_vision_state_dict", "infer_clip_vision_config", "read_clip_tower",
           "resize_tower_checkpoint", "clip_tower_config", "load_pretrained_backbone"]

logger = logging.getLogger("pks4.weights")

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


@dataclass
class ClipTowerCheckpoint:
    """What a CLIP checkpoint says about its vision tower."""

    config: CLIPVisionConfig  # shape from the tensors; activation / eps / heads as stated, else assumed
    state_dict: dict[str, torch.Tensor]  # in CLIPVisionTransformer's key names
    layout: str  # "openai" (OpenAI / open_clip / pks4 names) | "hf"
    stated: dict[str, Any]  # what the file states beyond its tensors: "quick_gelu", "ln_eps", "heads"
    source: str


def _stated_by_hf_config(path: str | Path) -> dict[str, Any]:
    hf = read_hf_config(path) or {}
    out: dict[str, Any] = {}
    if "hidden_act" in hf:
        if hf["hidden_act"] not in ("quick_gelu", "gelu"):
            raise CheckpointError(path, f"config.json hidden_act={hf['hidden_act']!r}: the CLIP tower supports "
                                        "'quick_gelu' and 'gelu'")
        out["quick_gelu"] = hf["hidden_act"] == "quick_gelu"
    if "layer_norm_eps" in hf:
        out["ln_eps"] = float(hf["layer_norm_eps"])
    if "num_attention_heads" in hf:
        out["heads"] = int(hf["num_attention_heads"])
    return out


def _stated_by_file(path: str | Path, layout: str) -> dict[str, Any]:
    """Activation / eps / heads the file itself states (see the module docstring)."""
    if is_torchscript(path):
        return {"quick_gelu": True}
    if layout == "hf":
        return _stated_by_hf_config(path)
    open_clip = read_open_clip_config(path)
    return {} if open_clip is None else {"quick_gelu": bool(open_clip.get("quick_gelu", False))}


def read_clip_tower(path: str | Path, *, heads: int | None = None) -> ClipTowerCheckpoint:
    """Read the CLIP vision tower of any supported file or folder. ``heads`` overrides the head count (which
    the tensors do not fix: the file's statement, else width / 64)."""
    vision, layout = clip_vision_state_dict(read_checkpoint_file(path), path)
    stated = _stated_by_file(path, layout)
    cfg = infer_clip_vision_config(vision, path, heads=heads if heads is not None else stated.get("heads"),
                                   quick_gelu=stated.get("quick_gelu", True), ln_eps=stated.get("ln_eps", 1e-5))
    return ClipTowerCheckpoint(cfg, vision, layout, stated, str(path))


def resize_tower_checkpoint(tower: ClipTowerCheckpoint, image_size: int) -> ClipTowerCheckpoint:
    """The checkpoint re-stored for ``image_size`` px frames: position embedding resized bicubically once."""
    cfg = tower.config
    if image_size == cfg.image_size:
        return tower
    if image_size % cfg.patch_size:
        raise CheckpointError(tower.source, f"image_size {image_size} is not a multiple of patch {cfg.patch_size}")
    vision = dict(tower.state_dict)
    vision["positional_embedding"] = resize_pos_embed_2d(vision["positional_embedding"].float(),
                                                         image_size // cfg.patch_size)
    return replace(tower, config=replace(cfg, image_size=image_size), state_dict=vision)


# Fields a checkpoint's tensors fix: a request for another value cannot be honoured.
_SHAPE_FIELDS = ("patch_size", "width", "layers", "mlp_ratio", "output_dim")
# Fields a file may state or not; a request contradicting the file is an error unless ``force_activation``.
_STATED_FIELDS = ("quick_gelu", "ln_eps", "heads")
# Training options: never in a checkpoint.
_TRAINING_FIELDS = ("drop_path", "force_activation")


def clip_tower_config(tower: ClipTowerCheckpoint, requested: Mapping[str, Any],
                      defaults: CLIPVisionConfig) -> CLIPVisionConfig:
    """The tower config to build for ``tower`` (already at the wanted image size, see
    :func:`resize_tower_checkpoint`) when a model config asks for the ``requested`` tower fields.

    The checkpoint decides its shape (a request for another width, depth, ... is an error) and, where the file
    states them, activation, eps and heads (a contradicting request is an error unless ``force_activation``);
    a request for a field the file does not state is honoured; training options come from the request, else
    from ``defaults``.
    """
    found, src = tower.config, tower.source
    bad = [f"{k}={requested[k]!r} (the checkpoint's tensors give {getattr(found, k)!r})" for k in _SHAPE_FIELDS
           if k in requested and requested[k] != getattr(found, k)]
    if bad:
        raise CheckpointError(src, "the requested tower does not fit the checkpoint: " + ", ".join(bad))
    contradicted = [k for k in _STATED_FIELDS if k in requested and k in tower.stated
                    and requested[k] != tower.stated[k]]
    if contradicted and not requested.get("force_activation", defaults.force_activation):
        said = ", ".join(f"{k}={tower.stated[k]!r}" for k in contradicted)
        asked = ", ".join(f"{k}={requested[k]!r}" for k in contradicted)
        raise CheckpointError(src, f"the checkpoint says {said} but the model config asks for {asked}: its features "
                                   "would be wrong. Drop the request, or set force_activation=True to build it anyway")
    chosen = {k: requested[k] for k in _STATED_FIELDS if k in requested}  # unstated, agreeing or forced
    chosen |= {k: requested.get(k, getattr(defaults, k)) for k in _TRAINING_FIELDS}
    return replace(found, **chosen)


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
        quick_gelu: activation override, applied even where the file states another. Default: what the file
            states (see the module docstring), else QuickGELU (OpenAI weights need it).
        heads: attention heads override for a file that does not state them. Default: width / 64.
    """
    tower = read_clip_tower(path, heads=heads)
    if image_size is not None:
        tower = resize_tower_checkpoint(tower, image_size)
    cfg = tower.config if quick_gelu is None else replace(tower.config, quick_gelu=quick_gelu)
    model = CLIPVisionTransformer(cfg)
    load_state_dict_strict(model, tower.state_dict, path)
    logger.info("loaded CLIP vision tower (%s layout) from %s: %s", tower.layout, path, cfg)
    return model
