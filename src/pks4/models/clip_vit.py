"""CLIP vision tower (Radford et al.), the spatial backbone of PKS4 (§3.2, Eqs. 10-11).

Parameter names equal OpenAI CLIP's vision keys without the ``visual.`` prefix, so released weights load
one-to-one (see ``pks4.weights``). The token tensor is reachable between any two blocks:
``embed`` -> ``forward_blocks(x, 0, l)`` -> (insert a module here) -> ``forward_blocks(x, l, None)`` ->
``forward_head_tokens`` / ``forward_head``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
from torch import nn

from pks4.layers.geometry import NativeGeometry, TokenGeometry, patch_embed
from pks4.layers.posembed import resize_patch_kernel, resize_pos_embed_2d
from pks4.layers.vit import LayerNorm, ResidualAttentionBlock
from pks4.models.base import check_ranges

__all__ = [
    "CLIPVisionConfig",
    "CLIPVisionTransformer",
    "CLIP_VIT_B16",
    "CLIP_VIT_L14",
    "CLIP_VIT_TINY",
    "ClipVideoHooks",
]


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP vision tower. Defaults are ViT-B/16 as released by OpenAI."""

    image_size: int = 224  # training resolution; other sizes interpolate the position embedding
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12  # CLIP uses 64-dim heads: width // 64
    mlp_ratio: float = 4.0
    output_dim: int | None = 512  # joint image-text space; None = no projection
    quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU and need it
    ln_eps: float = 1e-5
    drop_path: float = 0.0  # maximum stochastic-depth rate, increased linearly over depth
    # A pretrained checkpoint fixes the activation (and eps, heads) where its files state them: a contradicting
    # request is refused by the builder (pks4.weights.create_model) unless this is set.
    force_activation: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("image_size", "patch_size", "width", "layers", "heads"),
                     positive=("mlp_ratio", "ln_eps"), rates=("drop_path",))
        if self.output_dim is not None and self.output_dim < 1:
            raise ValueError(f"CLIPVisionConfig.output_dim={self.output_dim!r}; expected an int >= 1 or None")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads != 0:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


CLIP_VIT_B16 = CLIPVisionConfig()
CLIP_VIT_L14 = CLIPVisionConfig(patch_size=14, width=1024, layers=24, heads=16, output_dim=768)
# ~0.9M parameters: fast enough for unit tests and the CPU demo, 64-dim heads like the real towers.
CLIP_VIT_TINY = CLIPVisionConfig(patch_size=16, width=128, layers=4, heads=2, output_dim=128)


class CLIPVisionTransformer(nn.Module):
    """Patch embedding + CLS + position embedding, pre-LN, transformer blocks, post-LN on CLS, projection."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        scale = d**-0.5  # CLIP's init scale for the embeddings and the projection
        self.conv1 = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, d))
        self.ln_pre = LayerNorm(d, eps=cfg.ln_eps)
        act = "quick_gelu" if cfg.quick_gelu else "gelu"
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(d, cfg.heads, cfg.mlp_ratio, act, cfg.ln_eps, rate) for rate in rates
        )
        self.ln_post = LayerNorm(d, eps=cfg.ln_eps)
        self.proj = None if cfg.output_dim is None else nn.Parameter(scale * torch.randn(d, cfg.output_dim))
        self.grad_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.resblocks)

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should skip: the embeddings, whose scale carries meaning."""
        return {"class_embedding", "positional_embedding"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def token_layout(self, height: int, width: int, geometry: TokenGeometry | None = None
                     ) -> tuple[int, tuple[int, int]]:
        """(patch size, patch grid) for an input of height x width pixels: the stored patch size and
        (H/p, W/p), or what ``geometry`` asks for (:class:`pks4.layers.geometry.TokenGeometry`)."""
        if geometry is not None and not geometry.is_plain:
            return geometry.layout(height, width, self.cfg.patch_size)
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {p}")
        return p, (height // p, width // p)

    def grid_size(self, height: int, width: int, geometry: TokenGeometry | None = None) -> tuple[int, int]:
        """Patch grid (gh, gw) for an input of height x width pixels (see :meth:`token_layout`)."""
        return self.token_layout(height, width, geometry)[1]

    def pos_embed_for(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Position embedding (1 + H*W, D) for a patch grid, bicubically resized when it is not the native one."""
        g = self.cfg.grid
        if tuple(grid_hw) == (g, g):
            return self.positional_embedding
        return resize_pos_embed_2d(self.positional_embedding, grid_hw, (g, g), num_prefix=1, mode="bicubic")

    def embed(self, images: torch.Tensor, geometry: TokenGeometry | None = None) -> torch.Tensor:
        """images (B, 3, H, W) -> tokens (B, 1 + N, D): patches, CLS first, position embedding, ln_pre.

        ``geometry`` embeds with another patch size and token grid (StretchySnake Eq. 4-5): the stored kernel
        and position embedding are resized inside this call, so gradients reach them.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        patch, grid_hw = self.token_layout(images.shape[-2], images.shape[-1], geometry)
        method = geometry.kernel_resize if geometry is not None else "bicubic"
        x = patch_embed(images, self.conv1.weight, self.conv1.bias, patch, grid_hw, method)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        x = x + self.pos_embed_for(grid_hw).to(x.dtype)
        return self.ln_pre(x)

    def forward_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks [start, end) on tokens (B, 1 + N, D) (Eqs. 10-11 per block)."""
        end = self.num_blocks if end is None else end
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"block range [{start}, {end}) is outside [0, {self.num_blocks}]")
        for blk in self.transformer.resblocks[start:end]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block (B, 1 + N, D) -> ln_post(CLS) (B, D)."""
        return self.ln_post(x[:, 0])

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """ln_post(CLS) (B, D) -> image embedding (B, output_dim) = features @ proj (identity if no proj)."""
        return features if self.proj is None else features @ self.proj

    def forward_features(self, images: torch.Tensor, *, geometry: TokenGeometry | None = None) -> torch.Tensor:
        """images (B, 3, H, W) -> ln_post(CLS) (B, D), before the projection."""
        return self.forward_head_tokens(self.forward_blocks(self.embed(images, geometry)))

    def encode_image(self, images: torch.Tensor, *, geometry: TokenGeometry | None = None) -> torch.Tensor:
        """CLIP's image embedding (B, output_dim), unnormalised like ``CLIP.encode_image``."""
        return self.forward_head(self.forward_features(images, geometry=geometry))

    def forward(self, images: torch.Tensor, *, geometry: TokenGeometry | None = None) -> torch.Tensor:
        return self.encode_image(images, geometry=geometry)

    @torch.no_grad()
    def resize(self, size: int | None = None, patch: int | None = None, kernel_resize: str = "bicubic") -> None:
        """Re-store the tower for ``size`` px frames cut into ``patch`` px patches (None keeps the value), in
        place: the patch kernel is resized (Eq. 4) and the position embedding follows the new grid (Eq. 5)."""
        size = self.cfg.image_size if size is None else int(size)
        patch = self.cfg.patch_size if patch is None else int(patch)
        cfg = replace(self.cfg, image_size=size, patch_size=patch)  # validates size % patch
        kernel = self.conv1.weight
        if patch != kernel.shape[-1]:
            kernel = resize_patch_kernel(kernel, patch, kernel_resize)
        pos = self.pos_embed_for((cfg.grid, cfg.grid))
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=patch, stride=patch, bias=False,
                               device=kernel.device, dtype=kernel.dtype)
        self.conv1.weight.copy_(kernel)
        self.positional_embedding = nn.Parameter(pos.detach().clone())
        self.cfg = cfg



class ClipVideoHooks:
    """The video-model contract (:class:`pks4.models.base.VideoModel`) shared by the classifiers built on this
    tower (PKS4, the frame-average, joint-attention and ST-Adapter baselines). The class using it sets
    ``config`` (with ``backbone``, ``num_frames`` and ``num_classes``), ``model_name``, ``backbone`` (this
    tower), ``head_drop`` and ``head``, and defines ``forward_features(x, *, geometry=None)``."""

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_layers(self) -> int:
        return self.config.backbone.layers

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"{self.model_name} expects clips (B, T, 3, H, W), got {tuple(x.shape)}")

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """The linear classifier on the pooled clip feature (PKS4 Eq. 9)."""
        return self.head(self.head_drop(feat))

    def forward(self, x: torch.Tensor, *, geometry: TokenGeometry | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, geometry=geometry))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def native_geometry(self) -> NativeGeometry:
        b = self.config.backbone
        return NativeGeometry(frames=self.config.num_frames, size=b.image_size, patch=b.patch_size)

    def resize(self, frames: int | None = None, size: int | None = None, patch: int | None = None,
               kernel_resize: str = "bicubic") -> None:
        """Re-store the model for another native geometry, in place (what a fine-tune at another size does;
        build the optimizer afterwards): the tower's kernel and position embedding (see
        :meth:`CLIPVisionTransformer.resize`) and anything stored per frame; the config follows."""
        if frames is not None and (isinstance(frames, bool) or int(frames) < 1):
            raise ValueError(f"{self.model_name}.resize: frames={frames!r}; expected an int >= 1")
        if size is not None or patch is not None:
            self.backbone.resize(size, patch, kernel_resize)
            self.config.backbone = self.backbone.cfg
        if frames is not None:
            self._resize_frames(int(frames))
            self.config.num_frames = int(frames)

    def _resize_frames(self, frames: int) -> None:
        """Models that run frame by frame store nothing per frame; the joint-attention ViT overrides this."""

    def no_weight_decay(self) -> set[str]:
        names = {"backbone.class_embedding", "backbone.positional_embedding"}
        return names | {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def is_new_parameter(self, name: str) -> bool:
        """Parameters that do not come from the image backbone (inserted modules, adapters, the head)."""
        return not name.startswith("backbone.")

    def layer_id(self, name: str) -> int:
        """Depth for layer-wise LR decay (PKS4 §3.5.2): embeddings 0, block i -> i + 1, the rest (ln_post, proj,
        inserted modules, the head) num_layers + 1, i.e. exempt from decay."""
        if name.startswith(("backbone.conv1", "backbone.class_embedding", "backbone.positional_embedding",
                            "backbone.ln_pre")):
            return 0
        if name.startswith("backbone.transformer.resblocks."):
            return int(name.split(".")[3]) + 1
        return self.num_layers + 1
