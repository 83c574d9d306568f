"""VideoMamba, both of them, as one model with options.

* **Li et al.** (ECCV 2024, "VideoMamba: State Space Model for Efficient Video Understanding"), §3.2:
  a Conv3d tubelet embedding (1x16x16 by default), a CLS token prepended, a spatial position embedding
  ``p_s`` over (hw + 1) positions (CLS at index 0) plus a temporal one ``p_t`` over t steps that is not added
  to CLS (their Eq. 7), tokens flattened spatial-first (frame after frame), L bidirectional Mamba blocks
  ("B-Mamba": RMSNorm, the residual added in fp32 before the norm), a final norm and a linear head on CLS.
  Registry names ``videomamba_tiny/small/middle`` as in the official code; parameter names equal the
  released checkpoints (``cls_token, pos_embed, temporal_pos_embedding, patch_embed.proj, layers.i.norm,
  layers.i.mixer.*, norm_f, head``), so those load 1:1 through :mod:`pks4.weights.videomamba`.
* **Park et al.** (ECCV 2024, "VideoMamba: Spatio-Temporal Selective State Space Model"), §4: d = 384,
  24 blocks, 2x16x16 tubelets, a CLS token, ONE position embedding over all n_t*n_h*n_w video tokens
  (§4.2, Table 3) and the spatio-temporal forward/backward SSM with three backward orders (§4.4, Table 2).

What differs between the two is data: the tubelet, the position-embedding layout and the scan order.
Every block runs the project's one bidirectional mixer (:class:`pks4.ssm.mixer.MambaMixer`); a scan order is
a pair of permutations of the token sequence (see :func:`scan_orders`).

Readings where the papers leave room (each is a config field):

* **Scan orders of Li et al. Fig. 4.** Canonical token layout is [CLS, (t, h, w) spatial-first].
  ``spatial_first``: forward over the canonical order, backward over its exact reverse (the official code).
  ``temporal_first``: forward location by location, each location's tokens in time order ((h, w, t)),
  backward its reverse. ``spatiotemporal_v1`` ("conducting half"): the two directions of one B-Mamba layer
  are split between the two orders -- forward spatial-first, backward reversed temporal-first -- so it costs
  the same as one bidirectional scan. ``spatiotemporal_v2`` ("full, 2x computation"): each layer runs both
  bidirectional scans with the same weights and averages them (averaging keeps the output scale of a
  pretrained single-scan layer).
* **Park et al.'s backward orders** (Table 2) over the forward spatial-first order:
  ``spatiotemporal_reversal`` reverses all tokens (identical to ``spatial_first``), ``spatial_reversal``
  reverses the tokens inside each frame and keeps the frame order, ``temporal_reversal`` reverses the frame
  order and keeps the order inside each frame.
* **Where CLS sits.** In every order CLS is first in the forward direction and last in the backward one.
  Its output is the sum of both directions, so the backward scan is where CLS reads the whole clip; with the
  global reversal this is exactly the official "flip the whole sequence, CLS included".
* **Park's six position embeddings** (Table 3): ``pos_embed`` = "none" | "sinusoidal" | "joint" (learned),
  and for "joint" ``pos_init`` = "random" | "interpolate_spatial" | "interpolate_dim" | "expand" says how an
  image checkpoint's (hw, d) embedding becomes the (n_t*hw, d) one (done by the checkpoint loader). Park's
  CLS token gets no position embedding ("P is added to input tokens z", then CLS is prepended).
* **Park's norm.** The text says "layer normalization" in the Vim/Mamba block design; the default here is
  RMSNorm so Li et al.'s released ImageNet VideoMamba-S (d = 384, 24 blocks) initialises it 1:1;
  ``norm="layernorm"`` is the alternative.
* **Initialisation.** ``init="mamba"`` keeps Mamba's dt initialisation (softplus(dt_bias) in [1e-3, 0.1]);
  ``init="official"`` reproduces the official code, whose generic Linear init zeroes ``dt_proj.bias``
  (initial dt = 0.69). Checkpoints load identically either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from pks4.layers.geometry import NativeGeometry, TokenGeometry, patch_embed
from pks4.layers.posembed import resize_patch_kernel, resize_pos_embed_2d, resize_temporal_pos_embed
from pks4.layers.rmsnorm import RMSNorm
from pks4.layers.vit import DropPath
from pks4.models.base import check_ranges
from pks4.models.registry import ModelSpec
from pks4.ssm.mixer import MambaMixer

__all__ = [
    "VideoMambaConfig", "VideoMamba", "VideoMambaBlock", "scan_orders", "sinusoidal_pos_embed",
    "resize_joint_pos_embed", "SCAN_ORDERS", "POS_EMBEDS", "POS_INITS", "MODELS",
]

SCAN_ORDERS = ("spatial_first", "temporal_first", "spatiotemporal_v1", "spatiotemporal_v2",
               "spatiotemporal_reversal", "spatial_reversal", "temporal_reversal")
POS_EMBEDS = ("separable", "joint", "sinusoidal", "none")
POS_INITS = ("random", "interpolate_spatial", "interpolate_dim", "expand")
# Orders whose forward direction is the canonical order and backward its exact reverse: these stay so on
# any subsequence, which masked pretraining (visible tokens only) relies on.
FLIP_SCANS = ("spatial_first", "spatiotemporal_reversal")


@dataclass
class VideoMambaConfig:
    """Everything needed to rebuild a VideoMamba model (saved inside every checkpoint)."""

    embed_dim: int = 192  # Ti 192 / S 384 / M 576 (Li Table 1); Park d = 384
    depth: int = 24  # Ti/S 24, M 32; Park L = 24
    patch_size: int = 16
    tubelet: int = 1  # frames per token: Li 1, Park 2
    image_size: int = 224  # size the spatial position embedding is stored for; others are interpolated
    num_frames: int = 8  # frames the temporal / joint position embedding is stored for
    num_classes: int = 400  # Kinetics-400
    in_chans: int = 3
    d_state: int = 16  # Li §3.3: Mamba's defaults, state 16, expansion 2
    d_conv: int = 4
    expand: int = 2
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    scan: str = "spatial_first"  # one of SCAN_ORDERS (module docstring)
    pos_embed: str = "separable"  # Li: "separable" (p_s + p_t); Park: "joint" | "sinusoidal" | "none"
    pos_init: str = "expand"  # Park Table 3, used when a joint embedding is made from an image checkpoint
    inflate: str = "center"  # 2-D -> tubelet kernel: "center" (official Li loader) | "repeat_avg" (Park §4.1)
    drop_path: float = 0.0  # maximum stochastic-depth rate (Li: Ti/S/M 0.1/0.35/0.8 on video, see recipes)
    head_dropout: float = 0.0
    init: str = "mamba"  # "mamba" | "official" (module docstring)
    scan_backend: str = "auto"
    pretrained: str = ""  # official / pks4 VideoMamba checkpoint the builder (pks4.weights.create_model) loads
    # after building the model; its head is re-initialised

    def __post_init__(self) -> None:
        checks = (("scan", self.scan, SCAN_ORDERS), ("pos_embed", self.pos_embed, POS_EMBEDS),
                  ("pos_init", self.pos_init, POS_INITS), ("norm", self.norm, ("rmsnorm", "layernorm")),
                  ("inflate", self.inflate, ("center", "repeat_avg")), ("init", self.init, ("mamba", "official")))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"VideoMambaConfig.{name}={value!r}; expected one of {allowed}")
        check_ranges(self, at_least_one=("patch_size", "image_size", "num_frames", "tubelet", "embed_dim", "depth",
                                         "num_classes", "in_chans", "d_state", "d_conv", "expand"),
                     positive=("norm_eps",), rates=("drop_path", "head_dropout"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of the tubelet {self.tubelet}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_temporal(self) -> int:
        return self.num_frames // self.tubelet


# ---- scan orders (Li Fig. 4, Park Table 2) ----------------------------------------------------------------
def scan_orders(scan: str, n_t: int, n_s: int) -> list[tuple[Tensor, Tensor]]:
    """Visiting orders of a bidirectional layer over the canonical layout [CLS, (t, s) spatial-first].

    Returns one ``(forward, backward)`` pair of permutations of ``range(1 + n_t * n_s)`` per scan the layer
    runs (two for ``spatiotemporal_v2``). CLS (position 0) is first forward and last backward.
    """
    if scan not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {scan!r}; expected one of {SCAN_ORDERS}")
    grid = torch.arange(n_t * n_s).view(n_t, n_s) + 1  # canonical positions of the video tokens
    cls = torch.zeros(1, dtype=torch.long)
    spatial_first, temporal_first = grid.flatten(), grid.t().flatten()

    def pair(forward: Tensor, backward: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([cls, forward]), torch.cat([backward, cls])

    if scan in ("spatial_first", "spatiotemporal_reversal"):
        return [pair(spatial_first, spatial_first.flip(0))]
    if scan == "temporal_first":
        return [pair(temporal_first, temporal_first.flip(0))]
    if scan == "spatiotemporal_v1":
        return [pair(spatial_first, temporal_first.flip(0))]
    if scan == "spatiotemporal_v2":
        return [pair(spatial_first, spatial_first.flip(0)), pair(temporal_first, temporal_first.flip(0))]
    if scan == "spatial_reversal":
        return [pair(spatial_first, grid.flip(1).flatten())]
    return [pair(spatial_first, grid.flip(0).flatten())]  # temporal_reversal


@dataclass(frozen=True)
class _ScanPlan:
    """One scan as the mixer runs it: the sequence is put in ``forward`` order (None = as it is), the
    backward direction visits ``backward`` (indices into that order; None = its reverse), ``restore`` undoes
    the forward permutation."""

    forward: Tensor | None
    restore: Tensor | None
    backward: Tensor | None


def _plan(forward: Tensor, backward: Tensor, device: torch.device) -> _ScanPlan:
    length = len(forward)
    identity = torch.equal(forward, torch.arange(length))
    restore = torch.empty_like(forward)
    restore[forward] = torch.arange(length)
    backward_rel = restore[backward]  # where each backward-visited token sits in the forward order
    is_flip = torch.equal(backward_rel, torch.arange(length - 1, -1, -1))
    return _ScanPlan(None if identity else forward.to(device), None if identity else restore.to(device),
                     None if is_flip else backward_rel.to(device))


# ---- position embeddings ----------------------------------------------------------------------------------
def sinusoidal_pos_embed(length: int, dim: int) -> Tensor:
    """Fixed sine/cosine table (length, dim) of the Transformer (Park Table 3 "Sinusoid")."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.pow(10000.0, -2.0 * (torch.arange(dim) // 2).double() / dim)
    angle = pos * freq
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float()


def resize_joint_pos_embed(pos: Tensor, old_thw: tuple[int, int, int], new_thw: tuple[int, int, int]) -> Tensor:
    """Resize a joint embedding (1, t*h*w, D) in (t, h, w) order: bicubic over space, linear over time."""
    (t0, h0, w0), (t1, h1, w1) = old_thw, new_thw
    d = pos.shape[-1]
    if pos.shape[-2] != t0 * h0 * w0:
        raise ValueError(f"joint position embedding {tuple(pos.shape)} does not hold {t0}x{h0}x{w0} tokens")
    grid = pos.reshape(t0, h0 * w0, d)
    if (h0, w0) != (h1, w1):  # every frame's grid resized at once: channels (t, D) side by side
        flat = grid.transpose(0, 1).reshape(h0 * w0, t0 * d)
        flat = resize_pos_embed_2d(flat, (h1, w1), (h0, w0), num_prefix=0, mode="bicubic")
        grid = flat.reshape(h1 * w1, t0, d).transpose(0, 1)
    if t0 != t1:
        grid = resize_temporal_pos_embed(grid.reshape(t0, -1), t1).reshape(t1, h1 * w1, d)
    return grid.reshape(1, t1 * h1 * w1, d)


# ---- the B-Mamba block ------------------------------------------------------------------------------------
def _make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class VideoMambaBlock(nn.Module):
    """Add -> norm -> bidirectional mixer, returning (mixer output, residual) as Mamba's blocks do.

    The residual stream is carried in fp32: ``residual = residual + drop_path(hidden)`` before the norm,
    so bf16 mixer outputs never accumulate rounding error over 24-32 blocks.
    """

    def __init__(self, dim: int, mixer: MambaMixer, norm: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.mixer, self.norm = mixer, norm
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None, plans: list[_ScanPlan]) -> tuple[Tensor, Tensor]:
        """hidden, residual: (B, L, D); residual is None for the first block."""
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        h = self.norm(residual.to(self.norm.weight.dtype))
        return self.mix(h, plans), residual

    def mix(self, h: Tensor, plans: list[_ScanPlan]) -> Tensor:
        """The mixer run once per scan plan; several scans (spatiotemporal_v2) are averaged."""
        out = None
        for plan in plans:
            if plan.forward is None:
                y = self.mixer(h, plan.backward)
            else:
                y = self.mixer(h[:, plan.forward], plan.backward)[:, plan.restore]
            out = y if out is None else out + y
        return out / len(plans) if len(plans) > 1 else out


# ---- the model --------------------------------------------------------------------------------------------
class PatchEmbed3d(nn.Module):
    """Conv3d over (tubelet x patch x patch) cubes: (B, C, T, H, W) -> (B, D, T', H', W').

    ``patch`` and ``grid_hw`` other than the stored ones resize the kernel (StretchySnake Eq. 4, see
    :func:`pks4.layers.geometry.patch_embed`)."""

    def __init__(self, in_chans: int, dim: int, patch: int, tubelet: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, (tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: Tensor, patch: int, grid_hw: tuple[int, int], kernel_resize: str = "bicubic") -> Tensor:
        return patch_embed(x, self.proj.weight, self.proj.bias, patch, grid_hw, kernel_resize)


class VideoMamba(nn.Module):
    """VideoMamba classifier for clips (B, T, 3, H, W); the options select Li's or Park's model."""

    def __init__(self, cfg: VideoMambaConfig, model_name: str = "videomamba") -> None:
        super().__init__()
        self.config, self.model_name = cfg, model_name
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed3d(cfg.in_chans, d, cfg.patch_size, cfg.tubelet)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        n_s = cfg.grid**2
        if cfg.pos_embed == "separable":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_s + 1, d))  # index 0 = CLS (Li Eq. 7)
            self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_temporal, d))
        elif cfg.pos_embed == "joint":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_temporal * n_s, d))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear over depth
        # Block i drops the previous block's output, so block 0 has nothing to drop and the last rate goes
        # to the final add before norm_f (as the official code does).
        block_rates = [0.0] + rates[:-1]
        self.layers = nn.ModuleList(
            VideoMambaBlock(d, self._make_mixer(), _make_norm(cfg.norm, d, cfg.norm_eps), r) for r in block_rates
        )
        self.drop_path_f = DropPath(cfg.drop_path)
        self.norm_f = _make_norm(cfg.norm, d, cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(d, cfg.num_classes)
        self.grad_checkpointing = False
        self._plans: dict[tuple, list[_ScanPlan]] = {}
        self.reset_parameters()

    def _make_mixer(self) -> MambaMixer:
        c = self.config
        return MambaMixer(c.embed_dim, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, bias=False,
                          conv_bias=True, bidirectional=True, scan_backend=c.scan_backend)

    def reset_parameters(self) -> None:
        """Official scheme: Linear weights ~ N(0, 0.02) truncated, biases 0, out_proj scaled by 1/sqrt(depth)
        (GPT-2's residual scaling), position embeddings N(0, 0.02), CLS and temporal embedding 0."""
        official = self.config.init == "official"
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and (official or not name.endswith(("dt_proj", "dt_proj_b"))):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.config.depth)
        if isinstance(getattr(self, "pos_embed", None), nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.config.pos_embed != "separable":
            # Without a CLS position embedding a zero CLS stays zero: its own gate z = in_proj(0) = 0 closes
            # the mixer output at that position in every block, so the head would read a constant.
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- properties the engine reads ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_layers(self) -> int:
        return self.config.depth

    # ---- embedding --------------------------------------------------------------------------------------
    def _pos_tokens(self, n_t: int, hw: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """(position embedding of the video tokens (1, n_t*h*w, D) or None, CLS position (1, 1, D) or None)."""
        c, g = self.config, self.config.grid
        kind = c.pos_embed
        if kind == "none":
            return None, None
        if kind == "sinusoidal":
            return sinusoidal_pos_embed(n_t * hw[0] * hw[1], c.embed_dim).to(self.cls_token.device, dtype)[None], None
        if kind == "joint":
            pos = self.pos_embed
            if (n_t, *hw) != (c.num_temporal, g, g):
                pos = resize_joint_pos_embed(pos, (c.num_temporal, g, g), (n_t, *hw))
            return pos.to(dtype), None
        spatial = self.pos_embed
        if tuple(hw) != (g, g):
            spatial = resize_pos_embed_2d(spatial, hw, (g, g), num_prefix=1, mode="bicubic")
        temporal = self.temporal_pos_embedding
        if n_t != c.num_temporal:
            temporal = resize_temporal_pos_embed(temporal, n_t)
        video = spatial[:, 1:].unsqueeze(1) + temporal.unsqueeze(2)  # (1, n_t, h*w, D): p_s + p_t (Eq. 7)
        return video.flatten(1, 2).to(dtype), spatial[:, :1].to(dtype)

    def token_layout(self, x: Tensor, geometry: TokenGeometry | None = None) -> tuple[int, tuple[int, int]]:
        """(patch size, token grid) for a clip (B, T, C, H, W): the stored patch and (H/p, W/p), or what
        ``geometry`` asks for; checks the clip's shape."""
        c = self.config
        if x.dim() != 5 or x.shape[2] != c.in_chans:
            raise ValueError(f"{self.model_name} expects clips (B, T, {c.in_chans}, H, W), got {tuple(x.shape)}")
        t, h, w = x.shape[1], x.shape[-2], x.shape[-1]
        if geometry is not None and not geometry.is_plain:
            if t % c.tubelet:
                raise ValueError(f"{self.model_name} expects clips (B, T, {c.in_chans}, H, W) with T divisible by "
                                 f"the tubelet {c.tubelet}, got {tuple(x.shape)}")
            return geometry.layout(h, w, c.patch_size)
        if t % c.tubelet or h % c.patch_size or w % c.patch_size:
            raise ValueError(f"{self.model_name}: clip {tuple(x.shape)} needs T divisible by the tubelet "
                             f"{c.tubelet} and H, W by the patch size {c.patch_size}")
        return c.patch_size, (h // c.patch_size, w // c.patch_size)

    def embed(self, x: Tensor, geometry: TokenGeometry | None = None) -> tuple[Tensor, tuple[int, int, int]]:
        """Clip (B, T, 3, H, W) -> tokens (B, 1 + n_t*h*w, D) in the canonical layout, and (n_t, h, w).

        ``geometry`` embeds with another patch size and token grid (StretchySnake Eq. 4-6): the stored kernel and
        position embeddings are resized inside this call, so gradients reach them.
        """
        patch, grid_hw = self.token_layout(x, geometry)
        method = geometry.kernel_resize if geometry is not None else "bicubic"
        tokens = self.patch_embed(x.transpose(1, 2), patch, grid_hw, method)  # (B, D, n_t, h, w)
        n_t = tokens.shape[2]
        tokens = tokens.flatten(2).transpose(1, 2)  # 'b d t h w -> b (t h w) d', spatial-first
        return self.with_positions_and_cls(tokens, n_t, grid_hw), (n_t, *grid_hw)

    def with_positions_and_cls(self, tokens: Tensor, n_t: int, grid: tuple[int, int]) -> Tensor:
        """Patch tokens (B, n_t*h*w, D), spatial-first -> position embeddings added, CLS token (with its own
        position, where the configuration has one) in front: (B, 1 + n_t*h*w, D)."""
        pos, cls_pos = self._pos_tokens(n_t, grid, tokens.dtype)
        if pos is not None:
            tokens = tokens + pos
        cls = self.cls_token.to(tokens.dtype)
        if cls_pos is not None:
            cls = cls + cls_pos
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    # ---- blocks -----------------------------------------------------------------------------------------
    def scan_plans(self, n_t: int, n_s: int, device: torch.device, visible_only: bool = False) -> list[_ScanPlan]:
        """The configured scan order for a (n_t, n_s) token grid, cached per grid and device."""
        if visible_only:
            if self.config.scan not in FLIP_SCANS:
                raise ValueError(f"{self.model_name}: running a subset of tokens needs a scan whose backward "
                                 f"order is the reverse of the forward one {FLIP_SCANS}, got {self.config.scan!r}")
            return [_ScanPlan(None, None, None)]
        key = (self.config.scan, n_t, n_s, str(device))
        if key not in self._plans:
            self._plans[key] = [_plan(f, b, device) for f, b in scan_orders(self.config.scan, n_t, n_s)]
        return self._plans[key]

    def forward_blocks(self, hidden: Tensor, plans: list[_ScanPlan], start: int = 0, end: int | None = None,
                       residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Run blocks [start, end) -> (last mixer output, fp32 residual stream entering its add)."""
        for layer in self.layers[start:end]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = torch.utils.checkpoint.checkpoint(layer, hidden, residual, plans,
                                                                     use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, plans)
        return hidden, residual

    def final_norm(self, hidden: Tensor, residual: Tensor | None) -> Tensor:
        """The last residual add, then norm_f: all tokens (B, L, D)."""
        residual = hidden if residual is None else residual + self.drop_path_f(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_tokens(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Clip -> every token after norm_f (B, 1 + n_t*h*w, D), CLS first (used by self-distillation)."""
        tokens, (n_t, gh, gw) = self.embed(x, geometry)
        hidden, residual = self.forward_blocks(tokens, self.scan_plans(n_t, gh * gw, tokens.device))
        return self.final_norm(hidden, residual)

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Pooled clip feature (B, D): the normalised CLS token."""
        return self.forward_tokens(x, geometry=geometry)[:, 0]

    def forward_head(self, feat: Tensor) -> Tensor:
        return self.head(self.head_drop(feat))

    def forward(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x, geometry=geometry))

    # ---- what the engine asks of every model (pks4.models.base.VideoModel) ---------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def native_geometry(self) -> NativeGeometry:
        c = self.config
        return NativeGeometry(frames=c.num_frames, size=c.image_size, patch=c.patch_size, tubelet=c.tubelet)

    @torch.no_grad()
    def resize(self, frames: int | None = None, size: int | None = None, patch: int | None = None,
               kernel_resize: str = "bicubic") -> None:
        """Re-store the model for another native geometry, in place (what a fine-tune at another size does;
        build the optimizer afterwards): the tubelet kernel (Eq. 4), the spatial (bicubic) and temporal (linear)
        position embeddings or Park's joint one; the config follows."""
        old = self.config
        new = replace(old, num_frames=old.num_frames if frames is None else int(frames),
                      image_size=old.image_size if size is None else int(size),
                      patch_size=old.patch_size if patch is None else int(patch))  # validates the new shape
        proj = self.patch_embed.proj
        kernel = proj.weight if new.patch_size == old.patch_size else resize_patch_kernel(
            proj.weight, new.patch_size, kernel_resize)
        self.patch_embed = PatchEmbed3d(new.in_chans, new.embed_dim, new.patch_size, new.tubelet).to(kernel)
        self.patch_embed.proj.weight.copy_(kernel)
        self.patch_embed.proj.bias.copy_(proj.bias)
        (g0, g1), (t0, t1) = (old.grid, new.grid), (old.num_temporal, new.num_temporal)
        if new.pos_embed == "separable" and g1 != g0:
            self.pos_embed = nn.Parameter(resize_pos_embed_2d(self.pos_embed, (g1, g1), (g0, g0), num_prefix=1))
        if new.pos_embed == "separable" and t1 != t0:
            self.temporal_pos_embedding = nn.Parameter(resize_temporal_pos_embed(self.temporal_pos_embedding, t1))
        if new.pos_embed == "joint" and (t1, g1) != (t0, g0):
            self.pos_embed = nn.Parameter(resize_joint_pos_embed(self.pos_embed, (t0, g0, g0), (t1, g1, g1)))
        self.config = new

    def no_weight_decay(self) -> set[str]:
        names = {n for n in ("cls_token", "pos_embed", "temporal_pos_embedding") if hasattr(self, n)}
        return names | {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def is_new_parameter(self, name: str) -> bool:
        """Only the head is new when fine-tuning from an image or video checkpoint."""
        return name.startswith("head.")

    def layer_id(self, name: str) -> int:
        """Depth for layer-wise LR decay: embeddings 0, block i -> i + 1, norm_f and head num_layers + 1."""
        if name.startswith(("cls_token", "pos_embed", "temporal_pos_embedding", "patch_embed.")):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1


# ---- registry ---------------------------------------------------------------------------------------------
_PARK = dict(embed_dim=384, depth=24, tubelet=2, num_frames=16, pos_embed="joint", pos_init="expand",
             scan="spatiotemporal_reversal", inflate="repeat_avg")
_MICRO = dict(embed_dim=64, depth=4, patch_size=8, image_size=64, num_frames=8, num_classes=10)

def _spec(defaults: dict, description: str) -> ModelSpec:
    return ModelSpec(VideoMamba, VideoMambaConfig, defaults, description, checkpoint="videomamba")


MODELS = {
    "videomamba_tiny": _spec(dict(embed_dim=192, depth=24),
                             "VideoMamba-Ti (Li et al.): d 192, 24 blocks, 1x16x16 tubelets"),
    "videomamba_small": _spec(dict(embed_dim=384, depth=24), "VideoMamba-S (Li et al.): d 384, 24 blocks"),
    "videomamba_middle": _spec(dict(embed_dim=576, depth=32), "VideoMamba-M (Li et al.): d 576, 32 blocks"),
    "videomamba_park": _spec(_PARK, "VideoMamba (Park et al.): d 384, 24 blocks, 2x16x16 tubelets, joint pos-embed"),
    "videomamba_li_micro": _spec(dict(_MICRO), "tiny Li-style VideoMamba for tests and the CPU demo"),
    "videomamba_park_micro": _spec({**_PARK, **_MICRO}, "tiny Park-style VideoMamba for tests and the CPU demo"),
}
