"""Training objectives of Li et al.'s VideoMamba beyond plain classification: self-distillation (§3.3, §4.1)
and UMT-style masked alignment with a CLIP teacher (§3.4).

**Self-distillation.** Larger VideoMambas overfit; a well-trained smaller model guides the larger one:
a frozen VideoMamba-S teacher, a VideoMamba-M student whose final tokens pass a projector RMSNorm +
Linear(D_student, D_teacher = 384), and the loss ``CE(logits, y) + w * mean_tokens(2 - 2 cos(p, t))`` over
all L2-normalised tokens (CLS and patches) after each model's final norm.

**Masked alignment.** The frozen CLIP ViT (``pks4.models.clip_vit``) sees every frame; its last block's
CLS -> patch attention (mean over heads) picks the 20% of each frame's patches the student may see
(attention-guided masking at 80%: sampled without replacement in proportion to the attention, UMT's
"semantic" sampling; ``sample=False`` takes the top-k instead). CLS is always visible. The student runs only
the visible tokens, in their canonical order; its residual stream entering the last block (§3.4: "align only
the final outputs", which the official code reads at that point) gets a fixed sinusoidal position code of
each token's full-clip position, then the decoder Linear -> LayerNorm -> L2 norm, and is aligned to the
teacher's L2-normalised output tokens (``ln_post`` and projection on every token; the clip's CLS target is
the mean of the frames' CLS tokens) with ``2 - 2 cos``.

Where the teacher's patch grid differs from the student's, the teacher's frames are resized to match; with
tubelets of k frames, the teacher sees the first frame of each tubelet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pks4.layers.rmsnorm import RMSNorm
from pks4.models.clip_vit import CLIPVisionTransformer
from pks4.models.videomamba import VideoMamba, sinusoidal_pos_embed

__all__ = [
    "cosine_alignment_loss", "DistillProjector", "self_distillation_loss", "attention_guided_mask",
    "clip_teacher_targets", "AlignmentDecoder", "visible_stream", "MaskedAlignmentStudent", "masked_alignment_loss",
    "pretrain_step",
]


def cosine_alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of ``2 - 2 cos(pred, target)`` = ||p/|p| - t/|t|||^2; shapes (..., C)."""
    if pred.shape != target.shape:
        raise ValueError(f"alignment needs equal shapes, got prediction {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)}")
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)
    return (2.0 - 2.0 * cos).mean()


# ---- self-distillation --------------------------------------------------------------------------------------
class DistillProjector(nn.Module):
    """RMSNorm + Linear(D_student -> D_teacher) on the student's final tokens."""

    def __init__(self, student_dim: int, teacher_dim: int = 384) -> None:
        super().__init__()
        self.norm = RMSNorm(student_dim)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.norm(tokens))


def self_distillation_loss(student: VideoMamba, projector: DistillProjector, teacher: VideoMamba, clip: Tensor,
                           labels: Tensor, distill_weight: float = 1.0,
                           label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """CE on the student's logits + ``distill_weight`` * token alignment to the frozen teacher.

    Returns (loss, {"ce": ..., "distill": ...}). The teacher runs without gradients in eval mode.
    """
    tokens = student.forward_tokens(clip)  # (B, L, D_s)
    logits = student.forward_head(tokens[:, 0])
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        target = teacher.forward_tokens(clip)  # (B, L, D_t)
    teacher.train(was_training)
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    distill = cosine_alignment_loss(projector(tokens), target)
    return ce + distill_weight * distill, {"ce": float(ce.detach()), "distill": float(distill.detach())}


# ---- masked alignment ---------------------------------------------------------------------------------------
def attention_guided_mask(cls_attn: Tensor, mask_ratio: float = 0.8, sample: bool = True) -> Tensor:
    """Visible token positions from the teacher's CLS attention.

    Args:
        cls_attn: (B, T, N) attention of each frame's CLS on its N patches (non-negative).
        mask_ratio: fraction of each frame's patches hidden.
        sample: draw the visible patches in proportion to the attention (UMT); False = the top-k.
    Returns:
        (B, 1 + T*K) sorted positions in the canonical layout [CLS, (t, n)] with K = round(N (1 - ratio))
        visible patches per frame; position 0 (CLS) is always included.
    """
    if cls_attn.dim() != 3:
        raise ValueError(f"cls_attn must be (B, T, N), got {tuple(cls_attn.shape)}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, t, n = cls_attn.shape
    k = max(1, int(round(n * (1.0 - mask_ratio))))
    weights = cls_attn.float().clamp_min(0).reshape(b * t, n) + 1e-12  # every patch stays drawable
    if sample:
        picked = torch.multinomial(weights, k, replacement=False)
    else:
        picked = weights.topk(k, dim=-1).indices
    picked = picked.view(b, t, k) + 1 + torch.arange(t, device=cls_attn.device).view(1, t, 1) * n
    keep = torch.cat([picked.new_zeros(b, 1), picked.reshape(b, t * k)], dim=1)
    return keep.sort(dim=1).values


def _teacher_frames(teacher: CLIPVisionTransformer, clip: Tensor, tubelet: int, grid: tuple[int, int]) -> Tensor:
    frames = clip[:, ::tubelet].flatten(0, 1)  # (B*T', 3, H, W): first frame of each tubelet
    p = teacher.cfg.patch_size
    size = (grid[0] * p, grid[1] * p)
    if tuple(frames.shape[-2:]) != size:
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    return frames


@torch.no_grad()
def clip_teacher_targets(teacher: CLIPVisionTransformer, clip: Tensor, tubelet: int = 1,
                         grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Frozen CLIP on every (first-of-tubelet) frame -> (targets (B, 1 + T'*N, C) L2-normalised in the
    canonical layout, CLS attention (B, T', N) of the last block, mean over heads)."""
    b = clip.shape[0]
    if grid is None:
        grid = teacher.grid_size(clip.shape[-2], clip.shape[-1])
    frames = _teacher_frames(teacher, clip, tubelet, grid)
    x = teacher.forward_blocks(teacher.embed(frames), 0, teacher.num_blocks - 1)
    last = teacher.blocks[-1]
    attn = last.attn.attention_probs(last.ln_1(x))[:, :, 0, 1:].mean(dim=1)  # (B*T', N)
    x = last(x)
    tokens = teacher.forward_head(teacher.ln_post(x))  # projection on every token: (B*T', 1 + N, C)
    tokens = tokens.view(b, -1, *tokens.shape[1:])  # (B, T', 1 + N, C)
    targets = torch.cat([tokens[:, :, 0].mean(dim=1, keepdim=True), tokens[:, :, 1:].flatten(1, 2)], dim=1)
    return F.normalize(targets.float(), dim=-1), attn.view(b, tokens.shape[1], -1)


class AlignmentDecoder(nn.Module):
    """Linear -> LayerNorm -> L2 norm, after adding a fixed sinusoidal code of each token's clip position."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor, keep: Tensor, seq_len: int) -> Tensor:
        """tokens (B, K, D) at canonical positions ``keep`` (B, K) of a ``seq_len``-token clip -> (B, K, C)."""
        code = sinusoidal_pos_embed(seq_len, self.dim).to(tokens.device, tokens.dtype)[keep]  # (B, K, D)
        return F.normalize(self.norm(self.proj(tokens + code)), dim=-1)


def visible_stream(model: VideoMamba, clip: Tensor, keep: Tensor) -> Tensor:
    """The VideoMamba on the tokens at canonical positions ``keep`` (B, K) only -> the residual stream entering
    its last block (B, K, D), where §3.4 aligns the student. Running that last block on the result (as its
    first input, residual None) finishes the forward pass of the visible tokens."""
    tokens, (n_t, gh, gw) = model.embed(clip)
    visible = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    plans = model.scan_plans(n_t, gh * gw, tokens.device, visible_only=True)
    hidden, residual = model.forward_blocks(visible, plans, 0, model.num_layers - 1)
    if residual is None:  # a one-block model: its input is the stream entering that block
        return hidden.float()
    return residual + model.layers[-1].drop_path(hidden)


class MaskedAlignmentStudent(nn.Module):
    """What masked-alignment pretraining trains and saves: the VideoMamba and its alignment decoder."""

    def __init__(self, model: VideoMamba, teacher_dim: int, mask_ratio: float = 0.8, sample: bool = True) -> None:
        super().__init__()
        self.model = model
        self.decoder = AlignmentDecoder(model.config.embed_dim, teacher_dim)
        self.mask_ratio, self.sample = mask_ratio, sample

    def forward_visible(self, clip: Tensor, keep: Tensor) -> Tensor:
        """Visible tokens only -> the residual stream entering the last block (B, K, D)."""
        return visible_stream(self.model, clip, keep)


def masked_alignment_loss(student: MaskedAlignmentStudent, teacher: CLIPVisionTransformer, clip: Tensor) -> Tensor:
    """§3.4: attention-guided 80% masking, the student on visible tokens, ``2 - 2 cos`` to CLIP's tokens."""
    cfg = student.model.config
    grid = (clip.shape[-2] // cfg.patch_size, clip.shape[-1] // cfg.patch_size)
    was_training = teacher.training
    teacher.eval()
    targets, cls_attn = clip_teacher_targets(teacher, clip, cfg.tubelet, grid)
    teacher.train(was_training)
    keep = attention_guided_mask(cls_attn, student.mask_ratio, student.sample)
    pred = student.decoder(student.forward_visible(clip, keep), keep, targets.shape[1])
    target = targets.gather(1, keep.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
    return cosine_alignment_loss(pred, target)


def pretrain_step(student: MaskedAlignmentStudent, teacher: CLIPVisionTransformer, clip: Tensor) -> Tensor:
    """One masked-alignment loss on a clip batch (B, T, 3, H, W); the caller runs backward and the optimiser.

    ``teacher`` is frozen (no gradients reach it); only ``student`` (VideoMamba + decoder) is trained.
    """
    for p in teacher.parameters():
        p.requires_grad_(False)
    return masked_alignment_loss(student, teacher, clip)
