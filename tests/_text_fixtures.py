"""Tiny text-side pieces the video-text tests share: a WordPiece vocabulary learnt from the built-in
benchmark's caption templates, and a 3-layer BERT configuration (2 text-only layers, 1 fusion layer)."""
from pathlib import Path

from pks4.data.synth_captions import CAPTION_TEMPLATES, COLOUR_NAMES, class_captions
from pks4.models.text import TextConfig, build_vocab


def caption_corpus() -> list[str]:
    return [c for name in CAPTION_TEMPLATES for _, colour in COLOUR_NAMES for c in class_captions(name, colour)]


def tiny_text_folder(folder: Path) -> Path:
    build_vocab(caption_corpus(), folder)
    return folder


def tiny_text_config(folder: Path, **overrides) -> TextConfig:
    settings = dict(path=str(folder), width=32, depth=3, fusion_layer=2, heads=2, max_len=16, dropout=0.0)
    return TextConfig(**{**settings, **overrides})
