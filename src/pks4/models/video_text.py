"""The video-text model of Li et al. §4.4 (the UMT recipe) and its four objectives.

A visual encoder from the model registry (a VideoMamba, or any registered model through its
``forward_features``), a BERT text encoder whose upper layers cross-attend to visual tokens
(:mod:`pks4.models.text`), linear projections of both into one shared space, and the four objectives of
§4.4, each a loss function here:

* **vision-text contrastive** (VTC, :func:`contrastive_loss`): the symmetric InfoNCE over the batch's
  cosine similarities divided by a learnable temperature tau (initial 0.07, kept in [0.001, 0.5] as UMT
  does); several captions of one video in a batch are all positives (the targets share the mass).
* **vision-text matching** (VTM, :func:`matching_loss`): a 2-way head on the fused [CLS] of every positive
  pair and of two negatives per pair, mined from the contrastive similarities
  (:func:`sample_hard_negatives`: for each video a caption of another video drawn in proportion to
  softmax(sim), and for each caption another video likewise).
* **masked language modelling** (MLM, :func:`mask_caption_tokens`, :func:`mlm_loss`): UMT masks 50% of the
  word pieces (BERT's 80% [MASK] / 10% random / 10% kept), predicted from the caption fused with the
  visual tokens.
* **unmasked token alignment** (UTA): the visible visual tokens, read at the residual stream entering the
  last block, decoded and aligned with ``2 - 2 cos`` to a frozen CLIP's tokens -- the pieces of masked
  alignment pretraining (:mod:`pks4.models.videomamba_pretrain`), reused as they are.

**Masking.** In the masked phase the visual encoder runs only the visible tokens: 50% of the patches hidden
for images (one-frame clips), 80% for videos, chosen by the CLIP teacher's CLS attention (UMT's attention
masking), or uniformly at random without a teacher. The unmasked tuning phase (:meth:`VideoTextModel.set_masked`
False) runs every token and drops UTA. Masking needs a VideoMamba whose scan is a plain forward/backward flip (it
runs any subset of tokens); other registered encoders train unmasked.

**Several processes.** Under ``torchrun`` the contrastive objective compares each process's pairs with the
pairs of every process (UMT's all-gather): the features are gathered with their gradients
(:func:`gather_with_grad`), so the loss and its gradient are those of one batch of all the processes' pairs.
Matching negatives and masked words stay within each process's batch.

**Visual features.** A VideoMamba gives all its tokens after ``norm_f``; the pooled feature is
LayerNorm(CLS + mean of the patch tokens) (UMT's "cls+avg"). Another encoder gives its pooled
``forward_features`` as a single token. Cross-attention reads the tokens through one linear map into the
text width (Hugging Face's cross-attention takes keys and values of the text width; UMT's own BERT maps the
visual width inside the key/value projections: the same family of linear maps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from pks4.models.text import TextEncoder, TokenBatch
from pks4.models.videomamba import FLIP_SCANS, VideoMamba
from pks4.models.videomamba_pretrain import (AlignmentDecoder, attention_guided_mask, clip_teacher_targets,
                                             cosine_alignment_loss, visible_stream)

__all__ = [
    "LossWeights", "VideoTextConfig", "VisualFeatures", "VideoTextModel", "contrastive_loss",
    "sample_hard_negatives", "matching_loss", "mask_caption_tokens", "mlm_loss", "visual_width",
    "can_run_visible", "gather_with_grad",
]

IGNORE = -100  # label of tokens the MLM loss skips (PyTorch's cross-entropy default)


@dataclass
class LossWeights:
    """Weight of each objective; 0 switches it off (UMT: all 1; the unmasked tuning phase: uta 0)."""

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    uta: float = 1.0


@dataclass
class VideoTextConfig:
    """Heads, masking and objectives of the video-text model (defaults: UMT / Li et al. §4.4)."""

    embed_dim: int = 512  # shared vision-text space
    temp: float = 0.07  # initial contrastive temperature (learnable)
    temp_min: float = 0.001  # the temperature is clamped to [temp_min, temp_max] before every use (UMT)
    temp_max: float = 0.5
    video_mask_ratio: float = 0.8  # §4.4: 80% of each frame's patches hidden for videos
    image_mask_ratio: float = 0.5  # ... and 50% for images (one-frame clips)
    mask_sample: bool = True  # visible patches drawn in proportion to the teacher's attention; False = top-k
    mlm_prob: float = 0.5  # UMT's masking probability of word pieces
    hard_negatives: bool = True  # VTM negatives drawn from softmax(sim); False = uniformly among other videos
    weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        for name in ("video_mask_ratio", "image_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"video_text.{name}={getattr(self, name)}; expected a value in [0, 1)")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"video_text.mlm_prob={self.mlm_prob}; expected a value in (0, 1)")
        if not 0.0 < self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"video_text.temp={self.temp} must lie in [temp_min, temp_max] = "
                             f"[{self.temp_min}, {self.temp_max}], all positive")


# ---- the four objectives as functions -------------------------------------------------------------------
def _same_video(video_ids: Tensor | None, n: int, device: torch.device) -> Tensor:
    """(B, B) bool: entry (i, j) is True when pair i's video is pair j's video (the diagonal without ids)."""
    if video_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return video_ids.view(-1, 1) == video_ids.view(1, -1)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B_r, ...) of every process in rank order, with gradients flowing back to each owner
    (``torch.distributed.nn``'s all-gather; batches of different sizes are padded for the exchange). Without a
    process group, or with one process, ``x`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    counts = [int(n) for n in sizes]
    padded = F.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, max(counts) - len(x)))
    parts = dist_nn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def contrastive_loss(video: Tensor, text: Tensor, temp: Tensor | float, video_ids: Tensor | None = None, *,
                     gather: bool = False) -> Tensor:
    """VTC: mean of the video->text and text->video cross-entropies over ``cos(v_i, t_j) / temp``.

    video, text: (B, E) features of the batch's pairs (normalised here); video_ids (B,): pairs showing the same
    video are all positives, each row's target spread evenly over them (UMT); None = only the diagonal.
    ``gather``: each local row is compared with the pairs of every process (:func:`gather_with_grad`); the
    video ids must then be global (the same video has the same id in every process).
    """
    dtype = torch.promote_types(video.dtype, torch.float32)  # fp32 at least, also under bf16 autocast
    v, t = F.normalize(video.to(dtype), dim=-1), F.normalize(text.to(dtype), dim=-1)
    if video_ids is None:  # the pairs' positions, made global when gathered
        offset = _rank_offset(len(v), v.device) if gather else 0
        video_ids = torch.arange(len(v), device=v.device) + offset
    v_all, t_all = (gather_with_grad(v), gather_with_grad(t)) if gather else (v, t)
    ids_all = gather_with_grad(video_ids) if gather else video_ids
    targets = (video_ids.view(-1, 1) == ids_all.view(1, -1)).to(dtype)  # (B, B_all)
    targets = targets / targets.sum(dim=1, keepdim=True)
    v2t = -(F.log_softmax(v @ t_all.t() / temp, dim=1) * targets).sum(dim=1).mean()
    t2v = -(F.log_softmax(t @ v_all.t() / temp, dim=1) * targets).sum(dim=1).mean()
    return (v2t + t2v) / 2


def _rank_offset(n: int, device: torch.device) -> Tensor:
    """Index of this process's first pair among all processes' pairs."""
    sizes = gather_with_grad(torch.tensor([n], device=device))
    return sizes[:dist.get_rank()].sum() if dist.is_initialized() else torch.zeros((), dtype=torch.long)


def sample_hard_negatives(sim: Tensor, video_ids: Tensor | None = None, hard: bool = True,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Negatives for matching from the similarities ``sim`` (B_v, B_t) (already divided by the temperature).

    Returns (text index for each video, video index for each text), each (B,), never a pair of the same
    video: drawn with probability softmax(sim) restricted to the other videos (``hard``), else uniformly.
    """
    same = _same_video(video_ids, sim.shape[0], sim.device)
    if bool((~same).sum(dim=1).eq(0).any()):
        raise ValueError("vision-text matching needs at least two different videos in every batch "
                         "(each pair needs a negative); raise the batch size or mix the videos")
    logits = sim.float() if hard else torch.zeros_like(sim, dtype=torch.float)
    v2t = logits.masked_fill(same, float("-inf")).softmax(dim=1)
    t2v = logits.t().masked_fill(same, float("-inf")).softmax(dim=1)
    neg_text = torch.multinomial(v2t, 1, generator=generator).squeeze(1)
    neg_video = torch.multinomial(t2v, 1, generator=generator).squeeze(1)
    return neg_text, neg_video


def matching_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """VTM: 2-way cross-entropy, label 1 for the matching pairs (B, 2) and 0 for the negatives (N, 2)."""
    logits = torch.cat([pos_logits, neg_logits]).float()
    labels = torch.cat([torch.ones(len(pos_logits)), torch.zeros(len(neg_logits))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def mask_caption_tokens(input_ids: Tensor, attention_mask: Tensor, prob: float, mask_id: int, vocab_size: int,
                        special_ids: tuple[int, ...], generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
    """BERT's masking: each word piece (never padding or a special token) is chosen with ``prob``; a chosen
    one becomes [MASK] 80% of the time, a random id 10%, stays 10%. Returns (masked ids, labels), labels
    the original id at chosen positions and -100 elsewhere."""
    def draw(p: float) -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < p

    eligible = attention_mask.bool()
    for sid in special_ids:
        eligible &= input_ids != sid
    chosen = draw(prob) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    to_mask = draw(0.8) & chosen
    to_random = draw(0.5) & chosen & ~to_mask  # half of the remaining 20%
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    return torch.where(to_random, random_ids, ids), labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the chosen positions of (B, L, V) logits; 0 (with a gradient path) when none was."""
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


# ---- the model ----------------------------------------------------------------------------------------
def visual_width(visual: nn.Module) -> int:
    """Width of a registered model's pooled feature: the input of its linear classification head."""
    head = getattr(visual, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(visual).__name__} has no linear `head` to read its feature width from; the "
                        "video-text model takes registered models (forward_features + a linear head)")
    return head.in_features


def can_run_visible(visual: nn.Module) -> bool:
    """Whether the encoder can run a subset of its tokens (needed for masking)."""
    return isinstance(visual, VideoMamba) and visual.config.scan in FLIP_SCANS


class VisualFeatures(NamedTuple):
    """tokens (B, K, D) for cross-attention; pooled (B, D); stream (B, K, D) entering the last block (masked
    VideoMamba runs only, for UTA) and keep (B, K) the visible positions, else None."""

    tokens: Tensor
    pooled: Tensor
    stream: Tensor | None = None
    keep: Tensor | None = None


class VideoTextModel(nn.Module):
    """Visual encoder + text encoder + projections, temperature, matching head (and UTA decoder)."""

    def __init__(self, visual: nn.Module, text: TextEncoder, cfg: VideoTextConfig, *, mask_id: int,
                 special_ids: tuple[int, ...], teacher_dim: int | None = None) -> None:
        super().__init__()
        width = visual_width(visual)
        visual.head = nn.Identity()  # the classifier is not used: no dead parameters
        self.visual, self.text, self.cfg = visual, text, cfg
        self.mask_id, self.special_ids = mask_id, tuple(special_ids)
        self.pool_norm = nn.LayerNorm(width)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(text.width, cfg.embed_dim)
        self.visual_to_text = nn.Linear(width, text.width)
        self.itm_head = nn.Linear(text.width, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.decoder = AlignmentDecoder(width, teacher_dim) if teacher_dim else None
        self.masked = False  # the unmasked tuning phase until set_masked(True)
        self.gather = False  # compare the pairs of every process in the contrastive objective (set under DDP)

    def set_masked(self, masked: bool) -> None:
        """Masked pretraining (True: the visible tokens only, UTA) or the unmasked tuning phase (False)."""
        if masked and not can_run_visible(self.visual):
            raise ValueError(f"masking needs a VideoMamba with a flip scan {FLIP_SCANS} (it runs the visible tokens "
                             f"only); {type(self.visual).__name__} trains unmasked")
        self.masked = masked

    # ---- encoders ------------------------------------------------------------------------------------
    def encode_visual(self, clip: Tensor, keep: Tensor | None = None) -> VisualFeatures:
        """Clip (B, T, 3, H, W) -> visual features; ``keep`` (B, K) canonical positions runs the visible only."""
        if keep is None:
            if isinstance(self.visual, VideoMamba):
                tokens = self.visual.forward_tokens(clip)
            else:
                tokens = self.visual.forward_features(clip)[:, None]
            return VisualFeatures(tokens, self._pool(tokens))
        m = self.visual
        stream = visible_stream(m, clip, keep)
        plans = m.scan_plans(0, 0, stream.device, visible_only=True)  # a plain flip scan: no grid needed
        hidden, residual = m.forward_blocks(stream, plans, m.num_layers - 1, None)  # the last block: ends the pass
        tokens = m.final_norm(hidden, residual)
        return VisualFeatures(tokens, self._pool(tokens), stream, keep)

    def _pool(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] == 1:
            return self.pool_norm(tokens[:, 0])
        return self.pool_norm(tokens[:, 0] + tokens[:, 1:].mean(dim=1))  # UMT's "cls+avg"

    def embed_visual(self, features: VisualFeatures) -> Tensor:
        """Pooled visual feature -> unit vector in the shared space (B, E)."""
        return F.normalize(self.vision_proj(features.pooled).float(), dim=-1)

    def embed_text(self, hidden: Tensor) -> Tensor:
        """Text-only features (B, L, W) -> unit vector of [CLS] in the shared space (B, E)."""
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def match_logits(self, hidden: Tensor, attention_mask: Tensor, visual_tokens: Tensor) -> Tensor:
        """Matching logits (B, 2) of text features (B, L, W) with visual tokens already in the text width."""
        return self.itm_head(self.text.fuse(hidden, attention_mask, visual_tokens)[:, 0])

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)

    # ---- masking --------------------------------------------------------------------------------------
    def choose_visible(self, clip: Tensor, teacher: nn.Module | None) -> tuple[Tensor, Tensor | None]:
        """Visible positions (B, 1 + n_t*K) and the teacher's targets (B, 1 + n_t*N, C) (None without one)."""
        c = self.visual.config
        n_t = clip.shape[1] // c.tubelet
        grid = (clip.shape[-2] // c.patch_size, clip.shape[-1] // c.patch_size)
        ratio = self.cfg.image_mask_ratio if n_t == 1 else self.cfg.video_mask_ratio
        if teacher is None:
            targets, attn = None, torch.ones(clip.shape[0], n_t, grid[0] * grid[1], device=clip.device)
        else:
            was_training = teacher.training
            teacher.eval()
            targets, attn = clip_teacher_targets(teacher, clip, c.tubelet, grid)
            teacher.train(was_training)
        # without a teacher every patch weighs the same: drawn at random (a top-k would hide the same ones always)
        return attention_guided_mask(attn, ratio, self.cfg.mask_sample or teacher is None), targets

    # ---- the objectives on one batch ----------------------------------------------------------------------
    def losses(self, clip: Tensor, tokens: TokenBatch, video_ids: Tensor | None = None,
               teacher: nn.Module | None = None) -> dict[str, Tensor]:
        """Weighted losses of one batch of pairs (clip i with caption i): "vtc", "vtm", "mlm", "uta" (those
        switched on; UTA only in the masked phase with a teacher). The objective is their sum."""
        self.clamp_temperature()
        w = self.cfg.weights
        keep, targets = self.choose_visible(clip, teacher) if self.masked else (None, None)
        visual = self.encode_visual(clip, keep)
        ids, mask = tokens.input_ids, tokens.attention_mask
        hidden = self.text(ids, mask)
        v, t = self.embed_visual(visual), self.embed_text(hidden)
        kv = self.visual_to_text(visual.tokens)
        out: dict[str, Tensor] = {}
        if w.vtc:
            out["vtc"] = w.vtc * contrastive_loss(v, t, self.temp, video_ids, gather=self.gather)
        if w.vtm:
            out["vtm"] = w.vtm * self._matching(v, t, hidden, mask, kv, video_ids)
        if w.mlm:
            masked_ids, labels = mask_caption_tokens(ids, mask, self.cfg.mlm_prob, self.mask_id,
                                                     self.text.vocab_size, self.special_ids)
            fused = self.text.fuse(self.text(masked_ids, mask), mask, kv)
            out["mlm"] = w.mlm * mlm_loss(self.text.mlm_logits(fused), labels)
        if w.uta and targets is not None and self.decoder is not None:
            pred = self.decoder(visual.stream, keep, targets.shape[1])
            target = targets.gather(1, keep.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
            out["uta"] = w.uta * cosine_alignment_loss(pred, target)
        return out

    def _matching(self, v: Tensor, t: Tensor, hidden: Tensor, mask: Tensor, kv: Tensor,
                  video_ids: Tensor | None) -> Tensor:
        with torch.no_grad():
            neg_text, neg_video = sample_hard_negatives(v @ t.t() / self.temp, video_ids, self.cfg.hard_negatives)
        b = len(v)
        texts = torch.cat([hidden, hidden, hidden[neg_text]])  # positives, (text, other video), (other text, video)
        masks = torch.cat([mask, mask, mask[neg_text]])
        visual = torch.cat([kv, kv[neg_video], kv])
        logits = self.match_logits(texts, masks, visual)
        return matching_loss(logits[:b], logits[b:])
