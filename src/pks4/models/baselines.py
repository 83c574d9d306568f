"""The two video baselines PKS4 is measured against, built on the same CLIP ViT (no copy of it here).

* **Joint space-time attention** (TimeSformer's "joint" variant, Bertasius et al. 2021): one CLS token and all
  T*N patch tokens of a clip go through the CLIP blocks together, so every block attends over T*N + 1 tokens and
  the cost grows quadratically with the number of frames (the complexity PKS4's §1 argues against). A learned
  temporal position embedding is added to the patch tokens; it starts at zero, so an image checkpoint gives
  the image model's features on a single frame.
* **ST-Adapter** (Pan et al. 2022, the multi-adapter baseline of PKS4 Table 1): before the attention of EVERY
  block, patch tokens pass a bottleneck adapter x + up(dwconv3d(down(x))) whose depthwise Conv3d has a (3, 1, 1)
  kernel, i.e. mixes each channel over three neighbouring frames at the same position. The up-projection starts
  at zero (identity adapters at step 0); the CLS token bypasses the adapter as in ST-Adapter. The backbone is
  frozen by default: only the adapters and the head train (7.1M trainable for B/16 with bottleneck 384, the
  paper's "7M").

Both take clips (B, T, 3, H, W) and meet the video-model contract of :mod:`pks4.models.base`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from pks4.layers.geometry import TokenGeometry
from pks4.layers.posembed import resize_temporal_pos_embed
from pks4.models.clip_vit import CLIP_VIT_B16, CLIP_VIT_L14, CLIPVisionConfig, CLIPVisionTransformer, ClipVideoHooks
from pks4.models.pks4_variants import TINY_BACKBONE
from pks4.models.registry import ModelSpec


@dataclass
class JointViTConfig:
    """A CLIP ViT attending over all frames' tokens at once (TimeSformer-joint)."""

    backbone: CLIPVisionConfig = field(default_factory=lambda: CLIP_VIT_B16)
    num_classes: int = 174
    num_frames: int = 8  # length of the learned temporal embedding; other T interpolate it linearly
    head_dropout: float = 0.0
    pretrained: str = ""  # CLIP checkpoint the builder (pks4.weights.create_model) reads first; "" = random init

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = CLIPVisionConfig(**self.backbone)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")


@dataclass
class STAdapterConfig:
    """A frozen CLIP ViT with one depthwise-3D-conv adapter before the attention of every block."""

    backbone: CLIPVisionConfig = field(default_factory=lambda: CLIP_VIT_B16)
    num_classes: int = 174
    num_frames: int = 8  # nominal clip length (for profiling); the adapters accept any T
    adapter_dim: int = 384  # bottleneck width (ST-Adapter's B/16 setting)
    adapter_kernel_t: int = 3  # temporal extent of the depthwise Conv3d kernel (t, 1, 1)
    freeze_backbone: bool = True  # ST-Adapter trains adapters + head only
    head_dropout: float = 0.0
    pretrained: str = ""  # CLIP checkpoint the builder (pks4.weights.create_model) reads first; "" = random init

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = CLIPVisionConfig(**self.backbone)
        if self.adapter_kernel_t % 2 != 1:
            raise ValueError(f"adapter_kernel_t must be odd (same-length output), got {self.adapter_kernel_t}")


class _ClipVideoModel(ClipVideoHooks, nn.Module):
    """What both baselines share: the CLIP tower, the linear head and the engine-facing interface."""

    def __init__(self, cfg: JointViTConfig | STAdapterConfig, model_name: str) -> None:
        super().__init__()
        self.config, self.model_name = cfg, model_name
        self.backbone = CLIPVisionTransformer(cfg.backbone)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(cfg.backbone.output_dim or cfg.backbone.width, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)


class JointSpaceTimeViT(_ClipVideoModel):
    """CLIP ViT over 1 + T*N tokens: a single CLS, then frame-major patch tokens (TimeSformer-joint)."""

    def __init__(self, cfg: JointViTConfig, model_name: str = "vit_joint") -> None:
        super().__init__(cfg, model_name)
        self.temporal_embedding = nn.Parameter(torch.zeros(cfg.num_frames, cfg.backbone.width))
        self.temporal_embedding._no_weight_decay = True

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """x (B, T, 3, H, W) -> ln_post(CLS) @ proj (B, D)."""
        self._check_input(x)
        b, t = x.shape[:2]
        tokens = self.backbone.embed(x.flatten(0, 1), geometry)  # (B*T, 1+N, D), each frame with its own CLS
        tokens = tokens.view(b, t, *tokens.shape[1:])
        pos_t = self.temporal_embedding
        if t != pos_t.shape[0]:
            pos_t = resize_temporal_pos_embed(pos_t, t)
        patches = tokens[:, :, 1:] + pos_t[None, :, None].to(tokens.dtype)  # (B, T, N, D)
        cls = tokens[:, 0, :1]  # (B, 1, D): the CLS rows are identical across frames, keep one
        seq = torch.cat([cls, patches.flatten(1, 2)], dim=1)  # 'b t n d -> b (t n) d', CLS first
        seq = self.backbone.forward_blocks(seq)  # joint attention over 1 + T*N tokens
        return self.backbone.forward_head(self.backbone.forward_head_tokens(seq))

    @torch.no_grad()
    def _resize_frames(self, frames: int) -> None:
        """The learned temporal embedding is re-stored for ``frames`` steps (linear, as at run time)."""
        pos_t = resize_temporal_pos_embed(self.temporal_embedding.detach(), frames)
        self.temporal_embedding = nn.Parameter(pos_t.clone())
        self.temporal_embedding._no_weight_decay = True


class STAdapter(nn.Module):
    """x + up(dwconv3d(down(x))) on the patch tokens (B, T, 1+N, D); the CLS token passes unchanged."""

    def __init__(self, dim: int, bottleneck: int, kernel_t: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0),
                              groups=bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)  # identity at step 0: the frozen image model is untouched
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        b, t, n1, d = tokens.shape
        z = self.down(tokens[:, :, 1:])  # (B, T, N, r)
        z = z.view(b, t, *grid_hw, -1).permute(0, 4, 1, 2, 3)  # (B, r, T, H, W)
        z = self.conv(z).permute(0, 2, 3, 4, 1).reshape(b, t, n1 - 1, -1)
        update = torch.cat([torch.zeros_like(tokens[:, :, :1]), self.up(z)], dim=2)
        return tokens + update


class STAdapterViT(_ClipVideoModel):
    """Frame-wise CLIP ViT with an ST-Adapter before every block's attention, temporal average pooling."""

    def __init__(self, cfg: STAdapterConfig, model_name: str = "stadapter") -> None:
        super().__init__(cfg, model_name)
        width = cfg.backbone.width
        self.adapters = nn.ModuleList(STAdapter(width, cfg.adapter_dim, cfg.adapter_kernel_t)
                                      for _ in range(cfg.backbone.layers))
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)

    def _block(self, i: int, tokens: Tensor, t: int, grid_hw: tuple[int, int]) -> Tensor:
        x = self.adapters[i](tokens.view(-1, t, *tokens.shape[1:]), grid_hw).flatten(0, 1)
        return self.backbone.blocks[i](x)

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """x (B, T, 3, H, W) -> temporal average of the per-frame image embeddings (B, D)."""
        self._check_input(x)
        b, t = x.shape[:2]
        grid_hw = self.backbone.grid_size(x.shape[-2], x.shape[-1], geometry)
        tokens = self.backbone.embed(x.flatten(0, 1), geometry)  # (B*T, 1+N, D)
        for i in range(self.backbone.num_blocks):
            if self.backbone.grad_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(self._block, i, tokens, t, grid_hw, use_reentrant=False)
            else:
                tokens = self._block(i, tokens, t, grid_hw)
        v = self.backbone.forward_head(self.backbone.forward_head_tokens(tokens))  # (B*T, D)
        return v.view(b, t, -1).mean(dim=1)


MODELS = {
    "vit_b16_joint": ModelSpec(JointSpaceTimeViT, JointViTConfig, dict(backbone=CLIP_VIT_B16),
                               "CLIP ViT-B/16 with joint space-time attention (TimeSformer-joint)", "clip_tower"),
    "vit_tiny_joint": ModelSpec(JointSpaceTimeViT, JointViTConfig, dict(backbone=TINY_BACKBONE, num_classes=10),
                                "tiny joint space-time attention ViT", "clip_tower"),
    "stadapter_vit_b16": ModelSpec(STAdapterViT, STAdapterConfig, dict(backbone=CLIP_VIT_B16, adapter_dim=384),
                                   "ST-Adapter (depthwise 3D-conv adapter in every block) on frozen CLIP ViT-B/16",
                                   "clip_tower"),
    "stadapter_vit_l14": ModelSpec(STAdapterViT, STAdapterConfig, dict(backbone=CLIP_VIT_L14, adapter_dim=384),
                                   "ST-Adapter on frozen CLIP ViT-L/14 (19.1M trainable; PKS4 Table 1: 20M)",
                                   "clip_tower"),
    "stadapter_vit_tiny": ModelSpec(STAdapterViT, STAdapterConfig,
                                    dict(backbone=TINY_BACKBONE, adapter_dim=64, num_classes=10),
                                    "tiny ST-Adapter ViT", "clip_tower"),
}
