"""Loading official VideoMamba checkpoints (Li et al.) and pks4's own into :class:`pks4.models.videomamba.VideoMamba`.

The released files use the model's own key names, so loading is 1:1 after a few documented conversions:

* ImageNet files are wrapped as ``{'model': state_dict}`` (unwrapped by
  :func:`pks4.weights.files.read_checkpoint_file`;
  the official loader forgets this and silently loads nothing) and carry a 2-D patch kernel (D, 3, 16, 16):
  it is inflated to the model's tubelet (``config.inflate``: "center" as the official loader, "repeat_avg"
  as Park et al. §4.1). They have no ``temporal_pos_embedding``: it starts at zero.
* Another resolution: the spatial embedding is resized bicubically (CLS row kept); another frame count:
  the temporal one linearly (StretchySnake-style flexing uses the same functions).
* Park's joint embedding (``pos_embed="joint"``) is made from an image / Li checkpoint by ``config.pos_init``
  (Park Table 3): "expand" repeats the (hw, d) table over the n_t steps, "interpolate_spatial" stretches it
  along the token axis to hw*n_t rows, "interpolate_dim" stretches each row to d*n_t channels and splits
  them into n_t rows (both stretched layouts are read as (hw, n_t), the order the paper writes, and then
  put in the model's (n_t, hw) order), "random" keeps the model's random table. A Li video checkpoint's
  temporal table is added on top. The image CLS position row is folded into ``cls_token``, since Park's
  CLS has no position embedding, so the CLS input is the one the image model saw.
* A model without a learned embedding ("sinusoidal", "none") drops the checkpoint's tables.
* Masked-pretraining files (Li §3.4, UMT-style: ``videomamba_*_mask_pt``) also hold what only pretraining uses:
  the alignment decoders to the CLIP teacher (``clip_decoder.*``; UMT-style encoders also ``clip_projector.*``,
  ``final_clip_decoder.*`` and the decoders' position codes) and the pretraining encoder's final ``norm``,
  which stays outside its alignment loss (the student is aligned before it) and is not the classifier's
  ``norm_f``. They are recognised, dropped and listed in a warning; ``norm_f`` keeps its initialisation, as in
  the official fine-tuning. Every encoder key must still match.

Everything else must match: a missing, unexpected or mis-shaped key raises ``CheckpointError`` naming it.
A head with another class count (or no head) is an error unless ``reinit_head=True``; then the model's fresh
head is kept and the report says so. Every conversion is listed in the returned report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pks4.layers.posembed import inflate_patch_kernel, resize_pos_embed_2d, resize_temporal_pos_embed
from pks4.models.videomamba import VideoMamba, resize_joint_pos_embed
from pks4.weights.files import CheckpointError, LoadReport, _key_list, load_state_dict_strict, read_checkpoint_file

__all__ = ["VideoMambaLoadReport", "load_videomamba_checkpoint", "load_videomamba_state_dict",
           "convert_videomamba_state_dict", "joint_pos_from_image", "PRETRAINING_ONLY_KEYS"]

logger = logging.getLogger("pks4.weights")

# Key prefixes of official masked-pretraining models that a classifier has no place for (module docstring).
PRETRAINING_ONLY_KEYS = ("clip_decoder.", "final_clip_decoder.", "clip_projector.", "clip_pos_embed",
                         "clip_img_pos_embed")


@dataclass
class VideoMambaLoadReport:
    """What :func:`load_videomamba_checkpoint` did: the strict-load report plus every conversion applied."""

    load: LoadReport
    conversions: list[str] = field(default_factory=list)
    head_reinitialised: bool = False
    dropped: list[str] = field(default_factory=list)  # masked-pretraining keys left out


def _drop_pretraining_keys(sd: dict[str, Tensor], model: VideoMamba, source: str | Path) -> list[str]:
    """Remove the keys only masked pretraining uses (in place); returns them, sorted. A file without any
    decoder key is not a pretraining file: its other keys are left for the strict load to judge."""
    dropped = sorted(k for k in sd if k.startswith(PRETRAINING_ONLY_KEYS))
    if not dropped:
        return []
    if "norm_f.weight" not in sd:  # the pretraining encoder's final norm (outside its loss), not norm_f
        dropped += sorted(k for k in sd if k in ("norm.weight", "norm.bias"))
    for key in dropped:
        del sd[key]
    logger.warning("%s: masked-pretraining checkpoint: %d keys a %s classifier has no place for were dropped "
                   "(norm_f and the head keep their initialisation): %s", source, len(dropped), model.model_name,
                   _key_list(dropped, limit=len(dropped)))
    return dropped


def _square(n: int, key: str, source: str | Path) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointError(source, f"{key}: {n} grid positions is not a square grid")
    return side


def _patch_kernel(w: Tensor, model: VideoMamba, source: str | Path, notes: list[str]) -> Tensor:
    """2-D kernels are inflated to the tubelet; a 3-D one must already fit."""
    target = tuple(model.patch_embed.proj.weight.shape)
    if w.ndim == 4 and tuple(w.shape) == target[:2] + target[3:]:
        notes.append(f"patch_embed.proj.weight: 2-D kernel {tuple(w.shape)} inflated to tubelet {target[2]} "
                     f"({model.config.inflate})")
        return inflate_patch_kernel(w, target[2], mode=model.config.inflate)
    if tuple(w.shape) != target:
        raise CheckpointError(source, f"patch_embed.proj.weight has shape {tuple(w.shape)}, the model needs "
                                      f"{target} (or the 2-D kernel {target[:2] + target[3:]})")
    return w


def joint_pos_from_image(spatial: Tensor, n_t: int, mode: str) -> Tensor:
    """Park Table 3: an image embedding (N, D) (no CLS row) -> joint (1, n_t * N, D) in (t, n) order."""
    n, d = spatial.shape
    if mode == "expand":
        return spatial.unsqueeze(0).expand(n_t, n, d).reshape(1, n_t * n, d)
    if mode == "interpolate_spatial":  # stretch along the token axis to (N*n_t) rows, read as (N, n_t)
        stretched = resize_temporal_pos_embed(spatial, n * n_t).reshape(n, n_t, d)
    elif mode == "interpolate_dim":  # stretch every row to D*n_t channels, split into n_t rows
        stretched = resize_temporal_pos_embed(spatial.t(), d * n_t).t().reshape(n, n_t, d)
    else:
        raise ValueError(f"no image-based initialisation for pos_init={mode!r}")
    return stretched.transpose(0, 1).reshape(1, n_t * n, d)


def _separable_pos(sd: dict[str, Tensor], model: VideoMamba, source: str | Path, notes: list[str],
                   is_image: bool) -> None:
    """Li layout: resize p_s (bicubic, CLS row kept) and p_t (linear); an image file gets p_t = 0."""
    cfg, g = model.config, model.config.grid
    pos = sd["pos_embed"]
    old = _square(pos.shape[1] - 1, "pos_embed", source)
    if old != g:
        sd["pos_embed"] = resize_pos_embed_2d(pos, (g, g), (old, old), num_prefix=1, mode="bicubic")
        notes.append(f"pos_embed: grid {old}x{old} resized to {g}x{g} (bicubic)")
    temporal = sd.get("temporal_pos_embedding")
    if temporal is None and is_image:
        sd["temporal_pos_embedding"] = torch.zeros_like(model.temporal_pos_embedding)
        notes.append("temporal_pos_embedding: absent (image checkpoint), set to zero")
    elif temporal is not None and temporal.shape[1] != cfg.num_temporal:
        sd["temporal_pos_embedding"] = resize_temporal_pos_embed(temporal, cfg.num_temporal)
        notes.append(f"temporal_pos_embedding: {temporal.shape[1]} steps resized to {cfg.num_temporal} (linear)")


def _joint_pos(sd: dict[str, Tensor], model: VideoMamba, source: str | Path, notes: list[str]) -> None:
    """Park layout: resize a joint table, or build one from a Li / image checkpoint by ``pos_init``."""
    cfg, g = model.config, model.config.grid
    pos, temporal = sd.pop("pos_embed"), sd.pop("temporal_pos_embedding", None)
    n_tokens = cfg.num_temporal * g * g
    if temporal is None and pos.shape[1] == n_tokens:  # pks4's own Park checkpoint, same sizes
        sd["pos_embed"] = pos
        return
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old * old != pos.shape[1] - 1 or "cls_token" not in sd:
        raise CheckpointError(source, f"pos_embed {tuple(pos.shape)} is neither the model's joint table "
                                      f"(1, {n_tokens}, D) nor an image table (1, 1 + h*w, D) with a cls_token; "
                                      "for a joint table of another size pass joint_thw")
    spatial = resize_pos_embed_2d(pos[0], (g, g), (old, old), num_prefix=1, mode="bicubic")
    sd["cls_token"] = sd["cls_token"] + spatial[:1].reshape(1, 1, -1)
    notes.append("pos_embed: CLS position row folded into cls_token (Park's CLS has no position embedding)")
    if cfg.pos_init == "random":
        sd["pos_embed"] = model.pos_embed.detach().clone()
        notes.append("pos_embed: image table not used (pos_init='random'), model's random table kept")
        return
    joint = joint_pos_from_image(spatial[1:], cfg.num_temporal, cfg.pos_init)
    notes.append(f"pos_embed: joint table made from the {old}x{old} image table by pos_init={cfg.pos_init!r}")
    if temporal is not None:
        steps = resize_temporal_pos_embed(temporal, cfg.num_temporal)  # (1, n_t, D)
        joint = joint + steps.repeat_interleave(g * g, dim=1)
        notes.append("pos_embed: the checkpoint's temporal_pos_embedding added per step")
    sd["pos_embed"] = joint


def _resize_own_joint(sd: dict[str, Tensor], model: VideoMamba, source: str | Path, notes: list[str],
                      old_thw: tuple[int, int, int]) -> None:
    cfg, g = model.config, model.config.grid
    sd["pos_embed"] = resize_joint_pos_embed(sd["pos_embed"], old_thw, (cfg.num_temporal, g, g))
    notes.append(f"pos_embed: joint table {old_thw} resized to {(cfg.num_temporal, g, g)}")


def _position_tables(sd: dict[str, Tensor], model: VideoMamba, source: str | Path, notes: list[str],
                     joint_thw: tuple[int, int, int] | None, is_image: bool) -> None:
    kind = model.config.pos_embed
    if "pos_embed" not in sd:
        if kind in ("separable", "joint"):
            raise CheckpointError(source, "missing keys (in the model, not in the checkpoint): pos_embed")
        return
    if kind == "separable":
        _separable_pos(sd, model, source, notes, is_image)
    elif kind == "joint" and joint_thw is not None:
        _resize_own_joint(sd, model, source, notes, joint_thw)
    elif kind == "joint":
        _joint_pos(sd, model, source, notes)
    else:
        dropped = [k for k in ("pos_embed", "temporal_pos_embedding") if sd.pop(k, None) is not None]
        notes.append(f"{', '.join(dropped)}: dropped, the model uses pos_embed={kind!r}")


def convert_videomamba_state_dict(sd: dict[str, Tensor], model: VideoMamba, source: str | Path = "<state dict>",
                                  *, joint_thw: tuple[int, int, int] | None = None) -> tuple[dict, list[str]]:
    """Turn an official / pks4 VideoMamba state dict into one shaped for ``model``; returns (dict, notes).

    ``joint_thw``: the (n_t, h, w) grid a joint ``pos_embed`` of another size was stored for (a joint
    table of the model's own size needs nothing).
    """
    sd, notes = dict(sd), []
    is_image = "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].ndim == 4
    if "patch_embed.proj.weight" in sd:
        sd["patch_embed.proj.weight"] = _patch_kernel(sd["patch_embed.proj.weight"], model, source, notes)
    _position_tables(sd, model, source, notes, joint_thw, is_image)
    return sd, notes


def _check_head(sd: dict[str, Tensor], model: VideoMamba, source: str | Path, reinit_head: bool) -> bool:
    """True when the head will be re-initialised; raises when it does not fit and that was not asked for."""
    want = tuple(model.head.weight.shape)
    got = tuple(sd["head.weight"].shape) if "head.weight" in sd else None
    if got == want:
        return False
    if not reinit_head:
        what = "has no head" if got is None else f"has a head of shape {got}"
        raise CheckpointError(source, f"the checkpoint {what}, the model's head.weight is {want} "
                                      f"({model.num_classes} classes); pass reinit_head=True to start a new head")
    sd.pop("head.weight", None)
    sd.pop("head.bias", None)
    return True


def load_videomamba_state_dict(model: VideoMamba, raw: dict[str, Tensor], source: str | Path, *,
                               reinit_head: bool = False, joint_thw: tuple[int, int, int] | None = None
                               ) -> VideoMambaLoadReport:
    """Load an already read official / pks4 VideoMamba state dict into ``model`` (see
    :func:`load_videomamba_checkpoint`)."""
    raw = dict(raw)
    dropped = _drop_pretraining_keys(raw, model, source)
    sd, notes = convert_videomamba_state_dict(raw, model, source, joint_thw=joint_thw)
    reinit = _check_head(sd, model, source, reinit_head)
    allowed = (["head.weight", "head.bias"] if reinit else []) + (["norm_f.*"] if dropped else [])
    load = load_state_dict_strict(model, sd, source, allow_partial=allowed or None)
    if dropped:
        notes.append(f"masked-pretraining keys dropped: {_key_list(dropped, limit=len(dropped))}")
    if reinit:
        notes.append(f"head: re-initialised for {model.num_classes} classes (checkpoint head not used)")
    for note in notes:
        logger.info("%s: %s", source, note)
    return VideoMambaLoadReport(load, notes, reinit, dropped)


def load_videomamba_checkpoint(model: VideoMamba, path: str | Path, *, reinit_head: bool = False,
                               joint_thw: tuple[int, int, int] | None = None) -> VideoMambaLoadReport:
    """Load an official VideoMamba checkpoint (image, video or masked-pretraining; wrapped or plain) or a pks4 one
    into ``model``.

    Raises ``CheckpointError`` naming the keys on any missing / unexpected / mis-shaped tensor; with
    ``reinit_head=True`` a head of another class count (or none) is replaced by the model's fresh head and
    reported. Returns the report of everything done.
    """
    return load_videomamba_state_dict(model, read_checkpoint_file(path), path, reinit_head=reinit_head,
                                      joint_thw=joint_thw)
