"""Text-video retrieval with a video-text model (Li et al. §4.4, Table 8): every caption against every video.

One path serves the evaluation during ``pks4 pretrain --task video-text``, ``pks4 text-retrieval`` (zero-shot or
after fine-tuning) and the video-text demo:

* :func:`encode_videos`: clips (:class:`~pks4.data.items.Batch` es of a ``CaptionDataset(per="video")``) -> unit
  vectors in the shared space, and the visual tokens the matching head reads when re-ranking;
* :func:`encode_texts`: captions -> unit vectors, and the text features the matching head reads;
* :func:`rank`: R@1/5/10, median and mean rank in both directions (:mod:`pks4.engine.retrieval_metrics`), plus
  the same after re-scoring each query's top-k with the matching head (UMT's re-ranking, ``rerank_`` prefix);
* :func:`caption_preference`: how often a clip's own caption scores above another given caption (the
  reversed-pair test of the built-in benchmark: its time-reversed twin).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pks4.data.captions import CaptionSet
from pks4.data.items import Batch
from pks4.engine.retrieval_metrics import (recall_summary, rerank_top_k, retrieval_metrics, text_to_video_ranks,
                                           video_to_text_ranks)
from pks4.models.text import WordPieceTokenizer
from pks4.models.video_text import VideoTextModel

__all__ = ["VideoCodes", "TextCodes", "encode_videos", "encode_texts", "rank", "caption_preference",
           "note_long_captions"]


def note_long_captions(captions: CaptionSet, tokenizer: WordPieceTokenizer, max_len: int,
                       log: Callable[[str], None]) -> list[str]:
    """Say once which captions of ``captions`` the tokenizer will cut at ``max_len`` tokens; returns them."""
    long = captions.long_captions(tokenizer.count_tokens, max_len)
    if long:
        shown = ", ".join(long[:5]) + (f", ... ({len(long) - 5} more)" if len(long) > 5 else "")
        log(f"note: {captions.source}: {len(long)} caption(s) longer than {max_len} tokens will be cut "
            f"(text.max_len): {shown}")
    return long


@dataclass
class VideoCodes:
    """Per video: ``embed`` (N, E) unit vectors; ``tokens`` (N, K, W) visual tokens in the text width (None unless
    re-ranking needs them); ``seen`` (N,) which videos were encoded (a skipped video, another process's shard)."""

    embed: Tensor
    tokens: Tensor | None
    seen: Tensor

    def gathered(self) -> "VideoCodes":
        """Every process's videos merged (under ``torchrun``; each encoded its shard), the same on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.embed, self.tokens, self.seen))
        embed, tokens, seen = (t.clone() if t is not None else None for t in parts[0])
        for e, k, s in parts[1:]:
            embed[s] = e[s]
            if tokens is not None:
                tokens[s] = k[s]
            seen |= s
        return VideoCodes(embed, tokens, seen)

    def check_complete(self) -> None:
        absent = (~self.seen).nonzero().flatten().tolist()
        if absent:
            raise ValueError(f"{len(absent)} of {len(self.seen)} videos gave no clip (first: video {absent[0]}); "
                             "retrieval ranks every video, so none may be skipped")


@dataclass
class TextCodes:
    """Per caption: ``embed`` (M, E) unit vectors; ``hidden`` / ``mask`` the text features and their mask (lists of
    (L_i, W) / (L_i,), None unless re-ranking needs them)."""

    embed: Tensor
    hidden: list[Tensor] | None = None
    mask: list[Tensor] | None = None


@torch.no_grad()
def encode_videos(model: VideoTextModel, batches: Iterable[Batch], count: int, *, device: torch.device,
                  keep_tokens: bool = False) -> VideoCodes:
    """Encode the clips of ``batches`` into codes of ``count`` videos (each item's ``extra["video_index"]`` says
    which); videos that never arrive stay unseen."""
    embed: Tensor | None = None
    tokens: Tensor | None = None
    seen = torch.zeros(count, dtype=torch.bool)
    for batch in batches:
        if batch.video is None:
            continue
        features = model.encode_visual(batch.video.to(device))
        emb = model.embed_visual(features).float().cpu()
        index = batch.extra["video_index"].long()
        if embed is None:
            embed = torch.zeros(count, emb.shape[-1])
        embed[index], seen[index] = emb, True
        if keep_tokens:
            kv = model.visual_to_text(features.tokens).to(torch.float16).cpu()  # half the memory of all tokens
            if tokens is None:
                tokens = torch.zeros(count, *kv.shape[1:], dtype=torch.float16)
            tokens[index] = kv
    if embed is None:
        embed = torch.zeros(count, model.cfg.embed_dim)
    return VideoCodes(embed, tokens, seen)


@torch.no_grad()
def encode_texts(model: VideoTextModel, tokenizer: WordPieceTokenizer, texts: Sequence[str], max_len: int, *,
                 device: torch.device, batch_size: int = 64, keep_hidden: bool = False) -> TextCodes:
    """Encode captions ``batch_size`` at a time (cut at ``max_len`` tokens)."""
    embeds, hidden, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], max_len).to(device)
        h = model.text(tokens.input_ids, tokens.attention_mask)
        embeds.append(model.embed_text(h).cpu())
        if keep_hidden:
            for k, n in enumerate(tokens.attention_mask.sum(dim=1).tolist()):
                hidden.append(h[k, :n].float().cpu())  # without the padding: re-ranking pads again per batch
                masks.append(tokens.attention_mask[k, :n].cpu())
    return TextCodes(torch.cat(embeds), hidden if keep_hidden else None, masks if keep_hidden else None)


def _matcher(model: VideoTextModel, texts: TextCodes, videos: VideoCodes,
             device: torch.device) -> Callable[[list[int], list[int]], Tensor]:
    """The matching head's "match" logit of (caption, video) index pairs."""
    def score(rows: list[int], cols: list[int]) -> Tensor:
        length = max(len(texts.hidden[i]) for i in rows)
        h = torch.zeros(len(rows), length, texts.hidden[rows[0]].shape[-1])
        m = torch.zeros(len(rows), length, dtype=torch.long)
        for k, i in enumerate(rows):
            h[k, :len(texts.hidden[i])], m[k, :len(texts.mask[i])] = texts.hidden[i], texts.mask[i]
        logits = model.match_logits(h.to(device), m.to(device), videos.tokens[cols].to(device, torch.float32))
        return logits[:, 1].float().cpu()
    return score


@torch.no_grad()
def rank(model: VideoTextModel, texts: TextCodes, videos: VideoCodes, caption_video: Sequence[int], *,
         rerank_k: int = 0, device: torch.device) -> dict[str, float]:
    """Retrieval metrics of every caption against every video (``caption_video[i]``: caption i's video), both
    ways; with ``rerank_k`` also those after re-scoring each query's top-k with the matching head."""
    videos.check_complete()
    sim = texts.embed @ videos.embed.t()  # (captions, videos)
    truth = torch.as_tensor(list(caption_video), dtype=torch.long)
    metrics = retrieval_metrics(sim, truth)
    if not rerank_k:
        return metrics
    score = _matcher(model, texts, videos, device)
    t2v = rerank_top_k(sim, rerank_k, lambda row, cols: score([row] * len(cols), cols.tolist()))
    v2t = rerank_top_k(sim.t(), rerank_k, lambda row, cols: score(cols.tolist(), [row] * len(cols)))
    out = {f"rerank_t2v_{k}": v for k, v in recall_summary(text_to_video_ranks(t2v, truth)).items()}
    v2t_ranks, _ = video_to_text_ranks(v2t.t(), truth)
    return metrics | out | {f"rerank_v2t_{k}": v for k, v in recall_summary(v2t_ranks).items()}


@torch.no_grad()
def caption_preference(model: VideoTextModel, tokenizer: WordPieceTokenizer, videos: VideoCodes,
                       pairs: Sequence[tuple[int, str, str]], max_len: int, *, device: torch.device
                       ) -> dict[str, float]:
    """Share (%) of ``(video, own caption, other caption)`` triples whose own caption scores higher, by the
    shared-space similarity (``by_similarity``) and, when ``videos.tokens`` is there, by the matching head
    (``by_matching_head``)."""
    own = encode_texts(model, tokenizer, [p[1] for p in pairs], max_len, device=device, keep_hidden=True)
    other = encode_texts(model, tokenizer, [p[2] for p in pairs], max_len, device=device, keep_hidden=True)
    index = torch.tensor([p[0] for p in pairs])
    emb = videos.embed[index]
    out = {"by_similarity": float(((own.embed * emb).sum(1) > (other.embed * emb).sum(1)).double().mean() * 100),
           "pairs": float(len(pairs))}
    if videos.tokens is not None:
        rows, cols = list(range(len(pairs))), index.tolist()
        won = _matcher(model, own, videos, device)(rows, cols) > _matcher(model, other, videos, device)(rows, cols)
        out["by_matching_head"] = float(won.double().mean() * 100)
    return out
