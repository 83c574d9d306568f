"""The video-text task (Li et al. §4.4): model, losses and zero-shot retrieval for a generic training loop.

**The interface a loop drives** (nothing else is needed):

* ``task.model`` -- an ``nn.Module`` holding every trainable parameter (:class:`VideoTextModel`); optimise,
  checkpoint, wrap in DDP and move to a device through it. The frozen CLIP teacher is ``task.teacher``:
  not part of ``task.model``, never optimised, never saved (it is rebuilt from its config on resume).
* ``task.loss(batch) -> dict[str, Tensor]`` -- the weighted objectives of one training batch, ``"vtc"``,
  ``"vtm"``, ``"mlm"``, ``"uta"`` (those switched on) and ``"loss"``, their sum: run backward on ``"loss"``,
  log the rest. ``batch`` is what :class:`pks4.data.captions.CaptionDataset` (``per="caption"``) gives
  through the default collation: ``{"video": (B, T, 3, H, W), "caption": list of B str, "video_index":
  (B,)}``; captions showing the same video are all positives of each other.
* ``task.evaluate(loader) -> dict[str, float]`` -- zero-shot retrieval over ``loader.dataset``, a
  ``CaptionDataset`` with ``per="video"`` (every video once; its ``captions`` are encoded here):
  ``t2v_r1/r5/r10/mdr/mnr`` and ``v2t_...`` (:mod:`pks4.engine.retrieval_metrics`), and the same with a
  ``rerank_`` prefix when ``rerank_k`` > 0 (the top-k of each query re-scored by the matching head). The
  model's train/eval mode is restored afterwards.
* ``task.set_masked(flag)`` -- switch between the masked phase and the unmasked tuning phase (§4.4: one
  epoch unmasked after the masked pretraining).

:func:`build_video_text_task` builds all of it from a :class:`VideoTextTaskConfig`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pks4.engine.retrieval_metrics import (recall_summary, rerank_top_k, retrieval_metrics, text_to_video_ranks,
                                           video_to_text_ranks)
from pks4.models.text import TextConfig, WordPieceTokenizer, build_text_encoder
from pks4.models.video_text import VideoTextConfig, VideoTextModel, can_run_visible

__all__ = ["VideoTextTaskConfig", "VideoTextTask", "build_video_text_task"]

Log = Callable[[str], None]


@dataclass
class VideoTextTaskConfig:
    """Everything that builds the task: the visual encoder (a registry name and its overrides), the text
    encoder, the model's heads and objectives, the teacher of the masked phase and the evaluation."""

    visual: str = "videomamba_middle"  # any registered model; masking needs a VideoMamba
    visual_overrides: dict[str, Any] = field(default_factory=dict)
    text: TextConfig = field(default_factory=TextConfig)
    model: VideoTextConfig = field(default_factory=VideoTextConfig)
    use_teacher: bool = True  # a frozen CLIP guides the masking and is UTA's target (masked phase only)
    teacher_path: str = ""  # CLIP vision weights; "" = a seeded random tower of teacher_arch (pipeline tests)
    teacher_arch: str = "b16"  # b16 | l14 | tiny
    rerank_k: int = 0  # evaluation: re-score each query's top-k with the matching head (UMT); 0 = off
    eval_batch_size: int = 64  # captions encoded per step in evaluation


class VideoTextTask:
    """Model + tokenizer + (optional) frozen teacher; see the module docstring for the interface."""

    def __init__(self, model: VideoTextModel, tokenizer: WordPieceTokenizer, teacher: nn.Module | None = None, *,
                 max_len: int = 32, rerank_k: int = 0, eval_batch_size: int = 64, log: Log = print) -> None:
        w = model.cfg.weights
        if w.uta and model.cfg.masked and teacher is None:
            raise ValueError("video_text weights.uta > 0 aligns to a CLIP teacher, and none is given: set use_teacher "
                             "(teacher_path), or weights.uta=0 to train without alignment")
        if teacher is not None and model.decoder is None and w.uta:
            raise ValueError("a teacher is given but the model has no alignment decoder (built without teacher_dim)")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.model, self.tokenizer, self.teacher = model, tokenizer, teacher
        self.max_len, self.rerank_k, self.eval_batch_size, self.log = max_len, rerank_k, eval_batch_size, log
        self._noted_truncation = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_masked(self, masked: bool) -> None:
        """Masked pretraining (True) or the unmasked tuning phase (False: all tokens, no UTA)."""
        if masked and not can_run_visible(self.model.visual):
            raise ValueError(f"{type(self.model.visual).__name__} cannot run the visible tokens only: it trains "
                             "unmasked")
        self.model.cfg = replace(self.model.cfg, masked=masked)

    # ---- training ---------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The weighted objectives of one batch (see the module docstring)."""
        device = self.device
        tokens = self.tokenizer(batch["caption"], self.max_len).to(device)
        if tokens.truncated and not self._noted_truncation:
            self._noted_truncation = True
            self.log(f"note: captions longer than {self.max_len} tokens are cut (first seen: "
                     f"{batch['caption'][tokens.truncated[0]][:80]!r}); text.max_len sets the limit")
        video_ids = torch.as_tensor(batch["video_index"], device=device)
        return self.model.losses(batch["video"].to(device), tokens, video_ids, self.teacher)

    # ---- evaluation -------------------------------------------------------------------------------------
    def note_long_captions(self, captions: Any) -> list[str]:
        """Say once which captions of a :class:`CaptionSet` the tokenizer will cut; returns them."""
        long = captions.long_captions(self.tokenizer.count_tokens, self.max_len)
        if long:
            shown = ", ".join(long[:5]) + (f", ... ({len(long) - 5} more)" if len(long) > 5 else "")
            self.log(f"note: {captions.source}: {len(long)} caption(s) longer than {self.max_len} tokens will be cut "
                     f"(text.max_len): {shown}")
        return long

    @torch.no_grad()
    def _encode_videos(self, loader: DataLoader) -> tuple[Tensor, Tensor | None]:
        n = len(loader.dataset)
        embeds, kv = [None] * n, [None] * n
        for batch in loader:
            if batch is None:
                raise ValueError("an evaluation batch held only unreadable videos; retrieval needs every video")
            features = self.model.encode_visual(batch["video"].to(self.device))
            emb = self.model.embed_visual(features).cpu()
            tokens = self.model.visual_to_text(features.tokens).cpu() if self.rerank_k else None
            for k, i in enumerate(batch["video_index"].tolist()):
                embeds[i] = emb[k]
                if tokens is not None:
                    kv[i] = tokens[k]
        if any(e is None for e in embeds):
            raise ValueError(f"the evaluation loader skipped {sum(e is None for e in embeds)} of {n} videos; "
                             "retrieval ranks every video")
        return torch.stack(embeds), (torch.stack(kv) if self.rerank_k else None)

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        embeds, hidden = [], []
        for start in range(0, len(texts), self.eval_batch_size):
            tokens = self.tokenizer(texts[start:start + self.eval_batch_size], self.max_len).to(self.device)
            h = self.model.text(tokens.input_ids, tokens.attention_mask)
            embeds.append(self.model.embed_text(h).cpu())
            if self.rerank_k:
                hidden += [(h[k].cpu(), tokens.attention_mask[k].cpu()) for k in range(len(h))]
        return torch.cat(embeds), hidden

    def _match_score(self, hidden: list[tuple[Tensor, Tensor]], kv: Tensor) -> Callable[[list[int], list[int]], Tensor]:
        def score(texts: list[int], videos: list[int]) -> Tensor:
            d = self.device
            length = max(int(hidden[i][1].sum()) for i in texts)  # drop padding beyond the longest caption
            h = torch.stack([hidden[i][0][:length] for i in texts]).to(d)
            m = torch.stack([hidden[i][1][:length] for i in texts]).to(d)
            return self.model.match_logits(h, m, kv[videos].to(d))[:, 1].cpu()  # the "match" logit
        return score

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Zero-shot retrieval metrics over ``loader.dataset`` (a ``CaptionDataset`` with ``per="video"``)."""
        if getattr(loader.dataset, "per", None) != "video" or not hasattr(loader.dataset, "captions"):
            raise ValueError("evaluate() ranks every video once: pass a loader over CaptionDataset(..., per='video'), "
                             f"got {type(loader.dataset).__name__} per={getattr(loader.dataset, 'per', None)!r}")
        captions = loader.dataset.captions
        was_training = self.model.training
        self.model.eval()
        try:
            self.note_long_captions(captions)
            videos, kv = self._encode_videos(loader)
            texts, hidden = self._encode_texts(list(captions.captions))
            sim = texts @ videos.t()  # (texts, videos)
            truth = torch.as_tensor(captions.caption_video)
            metrics = retrieval_metrics(sim, truth)
            if self.rerank_k:
                metrics |= self._reranked(sim, truth, self._match_score(hidden, kv))
        finally:
            self.model.train(was_training)
        return metrics

    def _reranked(self, sim: Tensor, truth: Tensor,
                  score: Callable[[list[int], list[int]], Tensor]) -> dict[str, float]:
        t2v = rerank_top_k(sim, self.rerank_k, lambda row, cols: score([row] * len(cols), cols.tolist()))
        v2t = rerank_top_k(sim.t(), self.rerank_k, lambda row, cols: score(cols.tolist(), [row] * len(cols)))
        out = {f"rerank_t2v_{k}": v for k, v in recall_summary(text_to_video_ranks(t2v, truth)).items()}
        v2t_ranks, _ = video_to_text_ranks(v2t.t(), truth)
        return out | {f"rerank_v2t_{k}": v for k, v in recall_summary(v2t_ranks).items()}


def build_video_text_task(cfg: VideoTextTaskConfig, log: Log = print) -> VideoTextTask:
    """Visual encoder from the registry, text encoder (and tokenizer) from ``cfg.text.path``, the frozen CLIP
    teacher when the masked phase uses one, and the model around them."""
    from pks4.engine.pretrain import TeacherConfig, build_teacher
    from pks4.models.registry import create_model

    visual = create_model(cfg.visual, **cfg.visual_overrides)
    text, tokenizer = build_text_encoder(cfg.text)
    teacher = None
    if cfg.use_teacher and cfg.model.masked:
        teacher = build_teacher(TeacherConfig(path=cfg.teacher_path, arch=cfg.teacher_arch), log)
    teacher_dim = (teacher.cfg.output_dim or teacher.cfg.width) if teacher is not None else None
    model = VideoTextModel(visual, text, cfg.model, mask_id=tokenizer.mask_id,
                           special_ids=(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id),
                           teacher_dim=teacher_dim if cfg.model.weights.uta else None)
    return VideoTextTask(model, tokenizer, teacher, max_len=cfg.text.max_len, rerank_k=cfg.rerank_k,
                         eval_batch_size=cfg.eval_batch_size, log=log)
