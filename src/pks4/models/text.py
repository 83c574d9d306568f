"""The text side of the video-text model (Li et al. §4.4, the UMT recipe): a BERT whose upper layers also
read the visual tokens.

**Layout.** A BERT (BERT-base by default: 12 layers, width 768, 12 heads) split at ``fusion_layer`` (UMT: 9):
layers ``[0, fusion_layer)`` read the caption alone and give the text feature of the contrastive objective;
layers ``[fusion_layer, depth)`` add a cross-attention block after their self-attention whose keys and values
are the visual tokens, for vision-text matching and masked language modelling. The layers, embeddings and
the MLM transform are Hugging Face ``transformers`` modules (``BertEmbeddings``, ``BertLayer`` with
``add_cross_attention``, ``BertPredictionHeadTransform``); the MLM decoder is tied to the word embeddings as
in BERT. Parameter names follow BERT's (``embeddings.*``, ``encoder.layer.i.*``), so a released BERT
checkpoint fills every layer and only the cross-attention blocks start new.

Self-attention is bidirectional in every layer. (Hugging Face builds cross-attention layers only for
decoder configurations, whose *model* adds a causal mask; the layers are run here with an explicit padding
mask, which the attention functions honour without any causal mask.)

**Tokens.** WordPiece from a ``vocab.txt`` (``tokenizers``' ``BertWordPieceTokenizer``), ``[CLS] ... [SEP]``,
at most ``max_len`` tokens per caption (UMT: 32); longer captions are cut with a note, empty ones refused.

**Real BERT weights** are a folder (``vocab.txt``, ``config.json``, ``model.safetensors`` or
``pytorch_model.bin``) read by :func:`pks4.weights.bert.build_text_encoder`: nothing is downloaded and the hub is
never contacted (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from pks4.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # folders only: never ask the hub for anything

try:
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPredictionHeadTransform
except ImportError as err:  # the text side is an optional extra
    raise ImportError("the video-text model needs the optional text extra: pip install 'pks4[text]' "
                      f"(transformers and tokenizers); import failed with: {err}") from err

__all__ = ["TextConfig", "TokenBatch", "WordPieceTokenizer", "load_tokenizer", "build_vocab", "TextEncoder",
           "bert_config", "SPECIAL_TOKENS", "VOCAB_FILE", "TextFolderError"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"


class TextFolderError(UserError, FileNotFoundError):
    """A text folder that is missing or holds no ``vocab.txt`` (the message names it)."""


@dataclass
class TextConfig:
    """Shape of the text encoder. Defaults are BERT-base with UMT's fusion point."""

    path: str = ""  # folder holding vocab.txt, and optionally config.json + BERT weights to start from
    width: int = 768  # hidden size; a weights folder of another width is refused
    depth: int = 12
    fusion_layer: int = 9  # layers [fusion_layer, depth) cross-attend to visual tokens (UMT: 9 of 12)
    heads: int = 12
    mlp_ratio: float = 4.0
    max_len: int = 32  # tokens per caption, [CLS] and [SEP] included (UMT max_txt_l 32)
    max_positions: int = 512  # BERT's position table; captions never exceed it
    dropout: float = 0.1  # BERT's hidden and attention dropout
    lowercase: bool = True  # bert-base-uncased

    def __post_init__(self) -> None:
        if not 0 <= self.fusion_layer < self.depth:
            raise ValueError(f"text.fusion_layer={self.fusion_layer}: expected 0 <= fusion_layer < depth "
                             f"({self.depth}), so at least one layer cross-attends to the visual tokens")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")
        if not 3 <= self.max_len <= self.max_positions:
            raise ValueError(f"text.max_len={self.max_len}: expected 3..{self.max_positions} "
                             "([CLS], at least one word piece, [SEP])")


# ---- tokens -------------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """Token ids (B, L) and attention mask (B, L; 1 = token, 0 = padding) of a caption batch, padded to the
    longest caption; ``truncated`` lists the captions that were cut at ``max_len``."""

    input_ids: Tensor
    attention_mask: Tensor
    truncated: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.truncated)


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer over a vocabulary (the lines of a ``vocab.txt``; ``tokenizers`` does the work).
    ``words`` is that vocabulary in id order (what a checkpoint keeps, so it needs no folder to be read)."""

    def __init__(self, words: Sequence[str], lowercase: bool = True, source: str = "vocabulary") -> None:
        self.words, self.source = list(words), source
        absent = [name for name in SPECIAL_TOKENS if name not in set(self.words)]
        if absent:
            raise ValueError(f"{source}: the vocabulary lacks BERT's special tokens {absent}")
        ids: dict[str, int] = {}
        for i, word in enumerate(self.words):
            ids.setdefault(word, i)
        self._tok = BertWordPieceTokenizer(ids, lowercase=lowercase)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[n] for n in SPECIAL_TOKENS)
        self.vocab_size = len(self.words)

    def __call__(self, texts: Sequence[str], max_len: int) -> TokenBatch:
        """``[CLS] pieces [SEP]`` per caption, cut to ``max_len`` tokens, padded to the longest."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"caption {i} of the batch is empty ({text!r}); captions need at least one word")
        self._tok.enable_truncation(max_len)
        self._tok.no_padding()
        encodings = self._tok.encode_batch(texts)
        length = max(len(e.ids) for e in encodings)
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = 1
        return TokenBatch(ids, mask, [i for i, e in enumerate(encodings) if e.overflowing])

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with [CLS] and [SEP], uncut (to find captions that ``max_len`` would cut)."""
        self._tok.no_truncation()
        return len(self._tok.encode(text).ids)


def load_tokenizer(folder: str | os.PathLike, lowercase: bool = True) -> WordPieceTokenizer:
    """The tokenizer of a BERT folder; the folder must hold ``vocab.txt``."""
    vocab = Path(folder) / VOCAB_FILE
    if not Path(folder).is_dir():
        raise TextFolderError(f"{folder}: text folder not found (expected a folder holding {VOCAB_FILE})")
    if not vocab.is_file():
        raise TextFolderError(f"{folder}: no {VOCAB_FILE} in the text folder (a BERT folder holds vocab.txt, "
                                "config.json and the weights; `pks4 data captions` or pks4.models.text.build_vocab writes one)")
    words = vocab.read_text(encoding="utf-8").splitlines()
    return WordPieceTokenizer(words, lowercase, source=str(vocab))


def build_vocab(texts: Sequence[str], folder: str | os.PathLike, lowercase: bool = True) -> Path:
    """Write ``folder/vocab.txt`` holding every word of ``texts`` whole, plus each of their characters alone and
    as a ``##`` continuation (so an unseen word still splits into pieces). For small closed corpora such as
    the built-in benchmark's captions; a real run uses BERT's own vocab.txt. Deterministic: sorted (the
    WordPiece trainer of ``tokenizers`` picks among tied merges differently from run to run). Returns the file."""
    normalizer, pre = BertNormalizer(lowercase=lowercase), BertPreTokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = {c for w in words for c in w}
    vocab = [*SPECIAL_TOKENS, *sorted(words), *sorted(chars - words), *sorted(f"##{c}" for c in chars)]
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / VOCAB_FILE
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


# ---- the encoder --------------------------------------------------------------------------------------------
def bert_config(cfg: TextConfig, vocab_size: int, pad_id: int, cross_attention: bool) -> BertConfig:
    """Hugging Face config of one half of the encoder (``cross_attention``: the upper, fusion layers)."""
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                      num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      max_position_embeddings=cfg.max_positions, pad_token_id=pad_id,
                      is_decoder=cross_attention, add_cross_attention=cross_attention, attn_implementation="sdpa")


def _additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, K) with 1 = attend -> (B, 1, 1, K) additive mask: 0 where attended, the dtype's minimum elsewhere."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _run_layer(layer: nn.Module, hidden: Tensor, **kwargs) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> LayerNorm, then logits against the (tied) word embeddings."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._words = [word_embeddings]  # a list: tied, not registered twice

    def forward(self, hidden: Tensor) -> Tensor:
        return self.transform(hidden) @ self._words[0].weight.t() + self.bias


class TextEncoder(nn.Module):
    """Captions (B, L) -> token features (B, L, width); the upper layers fuse visual tokens (B, N, width)."""

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        plain = bert_config(cfg, vocab_size, pad_id, cross_attention=False)
        fused = bert_config(cfg, vocab_size, pad_id, cross_attention=True)
        self.embeddings = BertEmbeddings(plain)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(fused if i >= cfg.fusion_layer else plain, layer_idx=i)
                                           for i in range(cfg.depth))
        self.mlm = MLMHead(plain, self.embeddings.word_embeddings)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only pass through layers [0, fusion_layer): (B, L) -> (B, L, width); [CLS] is token 0."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"text encoder expects input_ids and attention_mask of one shape (B, L), got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        hidden = self.embeddings(input_ids=input_ids)
        mask = _additive_mask(attention_mask, hidden.dtype)
        for layer in self.encoder.layer[:self.cfg.fusion_layer]:
            hidden = _run_layer(layer, hidden, attention_mask=mask)
        return hidden

    def fuse(self, hidden: Tensor, attention_mask: Tensor, visual: Tensor, visual_mask: Tensor | None = None) -> Tensor:
        """Layers [fusion_layer, depth) on text features (B, L, W), cross-attending to ``visual`` (B, N, W)."""
        if visual.shape[-1] != self.width or visual.shape[0] != hidden.shape[0]:
            raise ValueError(f"visual tokens {tuple(visual.shape)} do not fit text features {tuple(hidden.shape)}: "
                             f"expected (B, N, {self.width}) with the same batch")
        mask = _additive_mask(attention_mask, hidden.dtype)
        if visual_mask is None:
            visual_mask = torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device)
        cross = _additive_mask(visual_mask, hidden.dtype)
        for layer in self.encoder.layer[self.cfg.fusion_layer:]:
            hidden = _run_layer(layer, hidden, attention_mask=mask, encoder_hidden_states=visual.to(hidden.dtype),
                                encoder_attention_mask=cross)
        return hidden

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Fused features (B, L, W) -> vocabulary logits (B, L, V)."""
        return self.mlm(hidden)
