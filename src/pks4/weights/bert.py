"""BERT folders for the text encoder of the video-text model (:mod:`pks4.models.text`).

A released BERT is a folder: ``vocab.txt``, ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``,
sharded or not). :func:`build_text_encoder` reads the vocabulary, builds the encoder and fills it from the
weights when the folder holds any: keys with or without the ``bert.`` prefix, TF-era ``gamma``/``beta`` names.
The fusion layers' cross-attention blocks are new (BERT has none) and keep their initialisation; every other gap,
and a tensor of another width, is a :class:`~pks4.weights.files.CheckpointError` naming the file and the key.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from pks4.models.text import TextConfig, TextEncoder, WordPieceTokenizer, load_tokenizer
from pks4.weights.files import CheckpointError, load_state_dict_strict, read_checkpoint_file, read_hf_config

__all__ = ["build_text_encoder", "load_bert_weights"]


def build_text_encoder(cfg: TextConfig) -> tuple[TextEncoder, WordPieceTokenizer]:
    """Tokenizer from ``cfg.path``/vocab.txt; encoder initialised from the BERT weights in that folder when it
    holds any (checked against ``cfg``: another width is refused, naming the file and key), else at random."""
    if not cfg.path:
        raise ValueError("text.path is empty: give a folder holding vocab.txt (and BERT weights to start from)")
    tokenizer = load_tokenizer(cfg.path, cfg.lowercase)
    encoder = TextEncoder(cfg, tokenizer.vocab_size, tokenizer.pad_id)
    if _weights_file(Path(cfg.path)) is not None:
        load_bert_weights(encoder, cfg.path)
    return encoder, tokenizer


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_CONFIG_KEYS = (("hidden_size", "width"), ("num_hidden_layers", "depth"), ("num_attention_heads", "heads"))


def _weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)


def _bert_key(key: str) -> str | None:
    """A BERT checkpoint key -> this encoder's key (None: not part of it: pooler, NSP head, tied decoder)."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.startswith(("pooler.", "cls.seq_relationship.", "cls.predictions.decoder.")) or key.endswith("position_ids"):
        return None
    key = key.replace("cls.predictions.", "mlm.")
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _check_config(folder: Path, cfg: TextConfig) -> None:
    saved = read_hf_config(folder)
    if saved is None:
        return
    for key, ours in _CONFIG_KEYS:
        if key in saved and saved[key] != getattr(cfg, ours):
            raise CheckpointError(folder / "config.json", f"{key} is {saved[key]}, but the text encoder is built "
                                  f"with text.{ours}={getattr(cfg, ours)}; set text.{ours}={saved[key]} to use it")


def load_bert_weights(encoder: TextEncoder, folder: str | os.PathLike) -> list[str]:
    """Fill ``encoder`` from a BERT folder (Hugging Face layout, ``bert.`` prefix or not, TF-era
    ``gamma``/``beta`` names). Only the fusion layers' cross-attention blocks (and an absent MLM head) may
    be missing: they keep their initialisation and are returned. Any other gap, or a tensor of another shape
    (a checkpoint of another width), raises ``CheckpointError`` naming the file and the key."""
    folder = Path(folder)
    _check_config(folder, encoder.cfg)
    state = {}
    for key, value in read_checkpoint_file(folder).items():
        ours = _bert_key(key)
        if ours is not None:
            state[ours] = value
    source = _weights_file(folder) or folder
    own = encoder.state_dict()
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(source, f"key {key!r} holds {tuple(value.shape)}, the text encoder expects "
                                  f"{tuple(own[key].shape)} (text.width {encoder.width}, vocabulary "
                                  f"{encoder.vocab_size} from vocab.txt)")
    report = load_state_dict_strict(encoder, state, source, allow_partial=["encoder.layer.*.crossattention.*",
                                                                            "mlm.*"])
    new = [k for k in report.missing if not k.startswith("encoder.layer.") or "crossattention" not in k]
    if new:
        warnings.warn(f"{source}: no masked-LM head in the checkpoint; {', '.join(new)} start at random", stacklevel=2)
    return report.missing
