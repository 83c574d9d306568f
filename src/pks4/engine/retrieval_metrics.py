"""Text-video retrieval metrics: recall at K and median rank, both directions, several captions per video.

A similarity matrix ``sim`` (texts x videos) and ``caption_video`` (the video of each text) are all it takes.

* **Text-to-video**: each caption ranks every video; its rank is the position of its own video.
* **Video-to-text**: each video ranks every caption; its rank is the position of its best-placed own
  caption (the usual rule when a video has several captions, MSRVTT's 20 or MSVD's ~40). Videos without
  a caption are left out (and counted).
* **Paragraph-to-video** (DiDeMo, ActivityNet) is the one-caption-per-video case: join each video's
  sentences first (:meth:`pks4.data.captions.CaptionSet.paragraphs`).

Ranks start at 1. **Ties count against the query**: a video scoring the same as the right one is ranked
above it, so a model that gives every pair the same score gets the worst ranks, not R@1 = 100%.
R@K is the percentage of queries ranked within K; MdR the median rank (the mean of the two middle ranks for
an even count), MnR the mean rank.

**Re-ranking** (UMT): the top-k candidates of each query by similarity are re-scored by a slower scorer,
the vision-text matching head (:func:`rerank_top_k`); they stay above every other candidate and the rest
keep their order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["text_to_video_ranks", "video_to_text_ranks", "recall_summary", "retrieval_metrics", "rerank_top_k"]

RECALL_AT = (1, 5, 10)


def _check(sim: Tensor, caption_video: Tensor) -> None:
    if sim.dim() != 2:
        raise ValueError(f"similarity must be a (texts, videos) matrix, got shape {tuple(sim.shape)}")
    if caption_video.shape != (sim.shape[0],):
        raise ValueError(f"caption_video must name one video per text: {tuple(caption_video.shape)} for "
                         f"{sim.shape[0]} texts")
    if len(caption_video) and (caption_video.min() < 0 or caption_video.max() >= sim.shape[1]):
        raise ValueError(f"caption_video holds video indices outside [0, {sim.shape[1]})")


def text_to_video_ranks(sim: Tensor, caption_video: Tensor) -> Tensor:
    """(texts,) 1-based rank of each caption's video among all videos (ties ranked above it)."""
    caption_video = torch.as_tensor(caption_video, dtype=torch.long)
    _check(sim, caption_video)
    own = sim.gather(1, caption_video.view(-1, 1))  # (texts, 1)
    return (sim >= own).sum(dim=1)


def video_to_text_ranks(sim: Tensor, caption_video: Tensor) -> tuple[Tensor, int]:
    """(videos with captions,) 1-based rank of each video's best-placed own caption among all captions, and
    the number of videos left out because no caption names them."""
    caption_video = torch.as_tensor(caption_video, dtype=torch.long)
    _check(sim, caption_video)
    scores = sim.t()  # (videos, texts)
    own = caption_video.view(1, -1) == torch.arange(scores.shape[0]).view(-1, 1)  # (videos, texts)
    has_caption = own.any(dim=1)
    best = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # best own caption's score
    ranks = (scores >= best).sum(dim=1)
    return ranks[has_caption], int((~has_caption).sum())


def recall_summary(ranks: Tensor, recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """{"r1", "r5", "r10" (percent), "mdr", "mnr"} of 1-based ranks."""
    if ranks.numel() == 0:
        raise ValueError("no queries to summarise (empty rank list)")
    r = ranks.double()
    out = {f"r{k}": float((r <= k).double().mean() * 100) for k in recall_at}
    out["mdr"] = float(r.quantile(0.5))  # the mean of the two middle ranks for an even count
    out["mnr"] = float(r.mean())
    return out


def retrieval_metrics(sim: Tensor, caption_video: Tensor, recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Both directions: {"t2v_r1", ..., "t2v_mdr", "t2v_mnr", "v2t_r1", ..., "v2t_mnr"}, plus "texts",
    "videos" and "videos_without_caption"."""
    sim = sim.detach().float().cpu()
    caption_video = torch.as_tensor(caption_video, dtype=torch.long).cpu()
    t2v = recall_summary(text_to_video_ranks(sim, caption_video), recall_at)
    v2t_ranks, uncaptioned = video_to_text_ranks(sim, caption_video)
    v2t = recall_summary(v2t_ranks, recall_at)
    out = {f"t2v_{k}": v for k, v in t2v.items()} | {f"v2t_{k}": v for k, v in v2t.items()}
    return out | {"texts": float(sim.shape[0]), "videos": float(sim.shape[1]),
                  "videos_without_caption": float(uncaptioned)}


def rerank_top_k(sim: Tensor, k: int, score: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Re-score each row's top-``k`` columns of ``sim`` (queries x candidates) with ``score(row, columns)``
    (a (k,) tensor, higher = better) and lift them above every other column; the others keep their
    similarity. Rank the result as usual: the first k places follow ``score``, the rest ``sim``."""
    if k < 1:
        raise ValueError(f"rerank k={k}; expected at least 1")
    k = min(k, sim.shape[1])
    out = sim.detach().float().cpu().clone()
    top = out.topk(k, dim=1).indices  # (rows, k)
    floor = float(out.max()) + 1.0  # above every plain similarity
    for row in range(out.shape[0]):
        scores = torch.as_tensor(score(row, top[row]), dtype=torch.float).flatten().cpu()
        if scores.shape != (k,):
            raise ValueError(f"rerank scorer returned {tuple(scores.shape)} scores for {k} candidates")
        out[row, top[row]] = scores - scores.min() + floor  # order kept, lowest re-scored one at the floor
    return out
