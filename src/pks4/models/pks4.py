"""PKS4: Parallel Kinematic Selective State Space Scanners (Zeng et al., 2026), read against its section 3.

A CLIP ViT runs every frame as an image (§3.2). ONE module is inserted after block ``l`` (default 8):

    Z  -> split CLS / patches                                    (Eq. 1)
    Zp -> Kinematic Prior Encoder: correlation, then variation    (Eq. 2, 12-18)
       -> KS4: one Mamba scanner shared by all patches, run along time in parallel (B*N sequences of T tokens)
                                                                  (Eq. 3-4, 19-25)
       -> reassemble and add to the pre-KPE patch tokens          (Eq. 5)
    zcls -> light temporal route (TokenT1D, TSM or TokenShift)    (Eq. 6, Table 9)
    concat and continue with block l+1 ...                        (Eq. 7)

then ln_post + projection per frame, temporal average pooling and a linear head (Eq. 8-9).

Choices where the paper is silent (each is a config field, so the alternative stays one switch away):

* **Context frames** (Table 8: 0/2/4/6, default 4): the offsets are symmetric, tau in {-2, -1, +1, +2} for 4.
  The scanner is causal, so letting the prior see both neighbours gives every frame the same evidence. With 0
  context frames the correlation compares a frame with itself (spatial self-similarity, tau = 0) and the
  variation operator has nothing to difference, so it is skipped.
* **Clip ends** (``temporal_pad``): "replicate" clamps t + tau into the clip, so an out-of-clip neighbour is the
  edge frame itself: zero variation, self-correlation, i.e. "no evidence of motion". "zero" pads with zeros.
* **Projections** (chosen to reproduce Table 5's parameter ladder within 0.1%): psi_corr is a two-layer MLP
  (K*81 -> C -> C) and F^corr = F + psi_corr(S) so appearance still reaches the variation operator (Eq. 16 leaves
  open whether it does); psi_var is Linear(K*C -> C/4) and phi is GELU + Linear(C/4 -> C) (Eq. 14, 18). The KPE
  input passes a LayerNorm first: residual-stream features are not normalised and differences of them would
  otherwise be dominated by a few large channels.
* **Spatial context of psi_corr** (``corr_context``): Eq. 16 says the correlation responses "within the
  temporal-spatial neighborhood are aggregated and mapped back" without saying whether the map looks beyond one
  position. The default (1) maps each position's scores alone, which is what Table 5's parameter counts allow.
  ``corr_context=k`` makes psi_corr's first layer a k x k convolution over the patch grid, so each position also
  reads the displacement scores of its neighbours. This matters for motion whose direction varies across the
  object: a rotation moves every patch along its tangent, so its sense (the curl of the displacement field) is
  a product of "where the patch sits relative to the centre" and "where it moved" for per-position layers, but
  a linear function of the neighbouring scores for a convolution, whose weights carry the relative offsets.
  The built-in benchmark measures the difference (``benchmarks/ablation_ladder.md``).
* **The skip connection** (``skip_from``): Eq. 25 adds u_t (the KPE-enhanced token) and Eq. 5 adds the pre-KPE
  token again; taken literally the residual stream would be doubled. They are read as one skip: the patch
  tokens leaving the module are Z_p + W_out(y * silu(g)) ("pre_kpe"), so the KPE only shapes what drives the
  scanner, as §3.4 says. "post_kpe" keeps Z_hat_p + W_out(...) instead.
* **Stable initialisation** (§3.5.2): phi and the scanner's out_proj start at zero, so the model equals the
  image backbone at step 0 (near-identity residuals); TokenT1D starts as a shift (Eq. 6).
* **Bidirectional** (Table 7) uses the project's shared-projection mixer: +0.23M parameters, where the paper's
  95.5M implies two independent Mamba blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import handle_torch_function, has_torch_function

from pks4.layers.geometry import TokenGeometry
from pks4.layers.vit import LayerNorm
from pks4.models.base import check_ranges
from pks4.models.clip_vit import CLIP_VIT_B16, CLIPVisionConfig, CLIPVisionTransformer, ClipVideoHooks
from pks4.ssm.mixer import MambaMixer

CLS_ROUTES = ("t1d", "tsm", "tokenshift", "none")
CORRELATIONS = ("fast", "reference")


@dataclass
class PKS4Config:
    """Everything needed to rebuild a PKS4 model (saved inside every checkpoint)."""

    backbone: CLIPVisionConfig = field(default_factory=lambda: CLIP_VIT_B16)
    num_classes: int = 174  # Something-Something V2
    num_frames: int = 8  # nominal clip length (for profiling); the module accepts any T >= 1
    use_module: bool = True  # False = the frame-average baseline of Table 5
    insert_layer: int = 8  # the module runs after this many blocks (Table 6: 8 is best for B/16)
    use_ks4: bool = True  # Table 5 ladder
    use_var: bool = True
    use_corr: bool = True
    context_frames: int = 4  # Table 8
    corr_window: int = 9  # spatial search window of the correlation (9x9, §4.2)
    corr_context: int = 1  # psi_corr's first layer: 1 = per position (paper counts), k = k x k conv over the grid
    correlation: str = "fast"  # how Eq. 15 is computed: "fast" (one matmul + gather) | "reference" (plain)
    var_ratio: float = 0.25  # width of the variation projection, as a fraction of C
    d_state: int = 16  # §4.2
    d_conv: int = 4
    expand: int = 2
    bidirectional: bool = False  # Table 7: unidirectional is the default
    cls_route: str = "t1d"  # Table 9: t1d (TokenT1D) | tsm | tokenshift | none
    skip_from: str = "pre_kpe"  # see the module docstring
    temporal_pad: str = "replicate"  # "replicate" | "zero"
    zero_init_residual: bool = True
    head_dropout: float = 0.0
    scan_backend: str = "auto"
    pretrained: str = ""  # CLIP checkpoint the builder (pks4.weights.create_model) reads first; "" = random init

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):  # rebuilt from a checkpoint's saved config
            self.backbone = CLIPVisionConfig(**self.backbone)
        check_ranges(self, at_least_one=("num_classes", "num_frames", "corr_window", "d_state", "d_conv", "expand"),
                     positive=("var_ratio",), rates=("head_dropout",))
        if self.use_module and not 0 <= self.insert_layer <= self.backbone.layers:
            raise ValueError(f"insert_layer {self.insert_layer} outside [0, {self.backbone.layers}]")
        if self.cls_route not in CLS_ROUTES:
            raise ValueError(f"cls_route {self.cls_route!r} not in {CLS_ROUTES}")
        if self.context_frames < 0 or self.context_frames % 2:
            raise ValueError(f"context_frames must be an even number >= 0, got {self.context_frames}")
        if self.skip_from not in ("pre_kpe", "post_kpe") or self.temporal_pad not in ("replicate", "zero"):
            raise ValueError(f"bad skip_from={self.skip_from!r} or temporal_pad={self.temporal_pad!r}")
        if self.corr_window % 2 != 1:
            raise ValueError(f"corr_window must be odd, got {self.corr_window}")
        if self.corr_context < 1 or self.corr_context % 2 != 1:
            raise ValueError(f"corr_context must be an odd kernel size >= 1, got {self.corr_context}")
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"correlation {self.correlation!r} not in {CORRELATIONS}")


# ---- Kinematic Prior Encoder (§3.3) --------------------------------------------------------------------------
def temporal_offsets(context_frames: int) -> list[int]:
    """Symmetric neighbour offsets: 4 -> [-2, -1, 1, 2]; 0 -> [0] (self only)."""
    half = context_frames // 2
    return [o for o in range(-half, half + 1) if o != 0] or [0]


def gather_neighbours(f: Tensor, offsets: list[int], pad: str) -> Tensor:
    """f (B, T, ...) -> (B, T, K, ...) with entry [:, t, k] = f[:, t + offsets[k]] (clip ends: ``pad``)."""
    t = f.shape[1]
    idx = torch.arange(t, device=f.device)[:, None] + torch.tensor(offsets, device=f.device)[None, :]
    out = f[:, idx.clamp(0, t - 1)]  # (B, T, K, ...)
    if pad == "zero":
        inside = ((idx >= 0) & (idx < t)).to(f.dtype)
        out = out * inside.view(1, t, len(offsets), *([1] * (f.dim() - 2)))
    return out


def _displacements(window: int) -> list[tuple[int, int]]:
    return [(du, dv) for du in range(window) for dv in range(window)]


def local_correlation_ref(f: Tensor, offsets: list[int], window: int, pad: str) -> Tensor:
    """Eq. 15 written plainly (the reference for :func:`local_correlation`).

    Args:
        f: channel-normalised features, channels last (B, T, H, W, C).
    Returns:
        (B, T, H, W, K * window**2), ordered (tau, du, dv); positions outside the grid correlate to 0.
    """
    b, t, h, w, c = f.shape
    r = window // 2
    target = F.pad(gather_neighbours(f, offsets, pad), (0, 0, r, r, r, r))  # (B, T, K, H+2r, W+2r, C)
    query = f.unsqueeze(2)  # (B, T, 1, H, W, C)
    scores = [(query * target[:, :, :, du : du + h, dv : dv + w]).sum(-1) for du, dv in _displacements(window)]
    return torch.stack(scores, dim=3).permute(0, 1, 4, 5, 2, 3).reshape(b, t, h, w, -1)


def _window_index(h: int, w: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each grid position, the flat indices of its window**2 neighbours (N, window**2) and their validity."""
    r = window // 2
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    d = torch.arange(-r, r + 1, device=device)
    yy = ys.reshape(-1, 1, 1) + d.view(1, -1, 1)  # (N, du, 1)
    xx = xs.reshape(-1, 1, 1) + d.view(1, 1, -1)  # (N, 1, dv)
    valid = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).reshape(h * w, -1)
    index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(h * w, -1)
    return index, valid


def local_correlation(f: Tensor, offsets: list[int], window: int, pad: str) -> Tensor:
    """Eq. 15: S[t, tau, p, delta] = <f_t(p), f_{t+tau}(p + delta)> for |delta| <= window // 2.

    Same contract as :func:`local_correlation_ref` (tests hold them equal, gradients included). Computed as one
    batched matmul per frame pair (all N x N similarities) followed by a gather of each position's window: on
    CPU and GPU a matmul over N <= 256 patches is far faster than window**2 elementwise passes, although it
    spends N / window**2 times the multiply-adds (2.4x for 14x14 patches and a 9x9 window).
    """
    b, t, h, w, c = f.shape
    n, k = h * w, len(offsets)
    target = gather_neighbours(f, offsets, pad).reshape(b * t, k, n, c)
    sim = f.reshape(b * t, 1, n, c) @ target.transpose(-1, -2)  # (B*T, K, N, N)
    index, valid = _window_index(h, w, window, f.device)
    s = sim[:, :, torch.arange(n, device=f.device)[:, None], index] * valid  # (B*T, K, N, window**2)
    return s.permute(0, 2, 1, 3).reshape(b, t, h, w, k * window * window)


def correlation_scores(f: Tensor, offsets: list[int], window: int, pad: str, impl: str = "fast") -> Tensor:
    """Eq. 15 through the path ``impl`` names ("fast": :func:`local_correlation`, "reference":
    :func:`local_correlation_ref`); the correlation operator's one entry point.

    It takes part in torch's function-override protocol (``torch.overrides.handle_torch_function``), so a
    ``TorchFunctionMode`` sees one call of this operator: ``pks4 profile`` books the operator's own cost there
    (K * w^2 * C multiply-adds per token) instead of counting whatever the chosen path spends internally.
    """
    if has_torch_function((f,)):
        return handle_torch_function(correlation_scores, (f,), f, offsets, window, pad, impl)
    if impl == "fast":
        return local_correlation(f, offsets, window, pad)
    if impl == "reference":
        return local_correlation_ref(f, offsets, window, pad)
    raise ValueError(f"correlation {impl!r} not in {CORRELATIONS}")


class GridConv(nn.Conv2d):
    """A k x k convolution over the patch grid of channels-last maps: (B, T, H, W, D_in) -> (B, T, H, W, D_out).

    Zero padding keeps the grid size; positions outside the grid contribute nothing, as in Eq. 15's scores.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int) -> None:
        super().__init__(in_dim, out_dim, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, h, w, d = x.shape
        y = super().forward(x.reshape(b * t, h, w, d).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(b, t, h, w, -1)


class CorrelationOperator(nn.Module):
    """O_corr (Eq. 15-16): local space-time correlation of normalised features, projected by psi_corr.

    ``context`` is the spatial kernel of psi_corr's first layer (see the module docstring): 1 is a per-position
    Linear, k > 1 a :class:`GridConv` that also reads the neighbours' scores. ``impl`` picks the path computing
    Eq. 15 (see :func:`correlation_scores`).
    """

    def __init__(self, dim: int, offsets: list[int], window: int, pad: str, context: int = 1,
                 impl: str = "fast") -> None:
        super().__init__()
        self.offsets, self.window, self.pad, self.impl = offsets, window, pad, impl
        scores = len(offsets) * window**2
        first = nn.Linear(scores, dim) if context == 1 else GridConv(scores, dim, context)
        self.psi = nn.Sequential(first, nn.GELU(), nn.Linear(dim, dim))

    def forward(self, f: Tensor) -> Tensor:
        """f (B, T, H, W, C) -> F^corr (B, T, H, W, C) = f + psi_corr(S)."""
        s = correlation_scores(F.normalize(f, dim=-1), self.offsets, self.window, self.pad, self.impl)
        return f + self.psi(s)


class VariationOperator(nn.Module):
    """O_var (Eq. 17-18): temporal differences over the neighbourhood, jointly projected by psi_var."""

    def __init__(self, dim: int, out_dim: int, offsets: list[int], pad: str) -> None:
        super().__init__()
        self.offsets, self.pad = offsets, pad
        self.psi = nn.Linear(len(offsets) * dim, out_dim)

    def forward(self, f: Tensor) -> Tensor:
        """f (B, T, H, W, C) -> F^var (B, T, H, W, out_dim)."""
        diffs = gather_neighbours(f, self.offsets, self.pad) - f.unsqueeze(2)  # Delta_{t,tau} (B,T,K,H,W,C)
        return self.psi(diffs.movedim(2, -2).flatten(-2))


class KinematicPriorEncoder(nn.Module):
    """KPE (Eq. 12-14): Z_hat_p = Z_p + phi(O_var(O_corr(F)))."""

    def __init__(self, dim: int, cfg: PKS4Config) -> None:
        super().__init__()
        offsets = temporal_offsets(cfg.context_frames)
        self.norm = LayerNorm(dim)
        self.corr = (CorrelationOperator(dim, offsets, cfg.corr_window, cfg.temporal_pad, cfg.corr_context,
                                         cfg.correlation) if cfg.use_corr else None)
        use_var = cfg.use_var and offsets != [0]
        var_dim = max(1, int(dim * cfg.var_ratio))
        self.var = VariationOperator(dim, var_dim, offsets, cfg.temporal_pad) if use_var else None
        self.phi = nn.Sequential(nn.GELU(), nn.Linear(var_dim if use_var else dim, dim))
        if cfg.zero_init_residual:
            nn.init.zeros_(self.phi[1].weight)
            nn.init.zeros_(self.phi[1].bias)

    def forward(self, zp: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """zp (B, T, N, C) -> (B, T, N, C)."""
        b, t, n, c = zp.shape
        f = self.norm(zp).view(b, t, *grid_hw, c)  # Eq. 12, channels last
        if self.corr is not None:
            f = self.corr(f)
        if self.var is not None:
            f = self.var(f)
        return zp + self.phi(f).view(b, t, n, c)


# ---- KS4 (§3.4) and the CLS route -------------------------------------------------------------------------
class KS4(nn.Module):
    """Kinematic Selective State Space Scanner: LayerNorm + Mamba mixer along time (Eq. 19-25), no skip.

    The skip of Eq. 25 is added by the caller (see ``skip_from``); returns W_out(y * silu(g)).
    """

    def __init__(self, dim: int, cfg: PKS4Config) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mixer = MambaMixer(dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                bidirectional=cfg.bidirectional, scan_backend=cfg.scan_backend)
        if cfg.zero_init_residual:
            nn.init.zeros_(self.mixer.out_proj.weight)

    def forward(self, seq: Tensor) -> Tensor:
        """seq (B*N, T, C): one temporal trajectory per patch (Eq. 3) -> update (B*N, T, C)."""
        return self.mixer(self.norm(seq))


def _shift_channels(x: Tensor, fold: int) -> Tensor:
    """x (B, T, C): channels [:fold] take the next frame, [fold:2fold] the previous one, the rest stay."""
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out


class ClsTemporalRoute(nn.Module):
    """Eq. 6: temporal exchange for the CLS tokens (B, T, C).

    ``t1d``: TokenT1D, a depthwise Conv1d (k=3) initialised as a shift of 1/8 of the channels each way
    (learnable); ``tsm``: the same shift, fixed (TSM's 1/8 + 1/8); ``tokenshift``: a fixed shift of 1/4 of
    the channels each way (TokenShift's fold); ``none``: identity.
    """

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = None
        if kind == "t1d":
            fold = dim // 8
            self.conv = nn.Conv1d(dim, dim, 3, padding=1, groups=dim, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:fold, 0, 2] = 1.0  # reads frame t+1
                self.conv.weight[fold : 2 * fold, 0, 0] = 1.0  # reads frame t-1
                self.conv.weight[2 * fold :, 0, 1] = 1.0  # identity

    def forward(self, z: Tensor) -> Tensor:
        if self.kind == "t1d":
            return self.conv(z.transpose(1, 2)).transpose(1, 2)
        if self.kind == "tsm":
            return _shift_channels(z, z.shape[-1] // 8)
        if self.kind == "tokenshift":
            return _shift_channels(z, z.shape[-1] // 4)
        return z


class PKS4Module(nn.Module):
    """The single inserted module: tokens (B, T, 1 + N, C) -> (B, T, 1 + N, C) (Eq. 1-7)."""

    def __init__(self, dim: int, cfg: PKS4Config) -> None:
        super().__init__()
        self.skip_from = cfg.skip_from
        self.kpe = KinematicPriorEncoder(dim, cfg) if (cfg.use_var or cfg.use_corr) else None
        self.ks4 = KS4(dim, cfg) if cfg.use_ks4 else None
        self.cls_route = ClsTemporalRoute(dim, cfg.cls_route)

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        b, t, n1, c = tokens.shape
        if n1 - 1 != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"PKS4 module got {n1 - 1} patch tokens for a {grid_hw[0]}x{grid_hw[1]} grid")
        z_cls, z_p = tokens[:, :, 0], tokens[:, :, 1:]  # Eq. 1
        z_hat = self.kpe(z_p, grid_hw) if self.kpe is not None else z_p  # Eq. 2
        if self.ks4 is None:
            z_new = z_hat  # KPE alone (ablation): its output is the module's output
        else:
            seq = z_hat.transpose(1, 2).reshape(b * (n1 - 1), t, c)  # Eq. 3: 'b t n c -> (b n) t c'
            update = self.ks4(seq).view(b, n1 - 1, t, c).transpose(1, 2)  # Eq. 4, reassembled
            z_new = (z_p if self.skip_from == "pre_kpe" else z_hat) + update  # Eq. 5 / 25
        return torch.cat([self.cls_route(z_cls).unsqueeze(2), z_new], dim=2)  # Eq. 6-7


# ---- the model -----------------------------------------------------------------------------------------------
class PKS4Model(ClipVideoHooks, nn.Module):
    """CLIP ViT + one PKS4 module + temporal average pooling + linear head. Input (B, T, 3, H, W).

    Built with random weights; ``pks4.weights.create_model(name, pretrained=...)`` builds the tower from a
    CLIP checkpoint first and then attaches the module and head.
    """

    def __init__(self, cfg: PKS4Config, model_name: str = "pks4") -> None:
        super().__init__()
        self.config, self.model_name = cfg, model_name
        self.backbone = CLIPVisionTransformer(cfg.backbone)
        width = cfg.backbone.width
        self.module = PKS4Module(width, cfg) if cfg.use_module else None
        feat_dim = cfg.backbone.output_dim or width
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(feat_dim, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def frame_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """x (B, T, 3, H, W) -> per-frame features v_t (B, T, D) (§3.1 'video-level prediction')."""
        self._check_input(x)
        b, t = x.shape[:2]
        grid_hw = self.backbone.grid_size(x.shape[-2], x.shape[-1], geometry)
        tokens = self.backbone.embed(x.flatten(0, 1), geometry)  # (B*T, 1+N, C)
        if self.module is None:
            tokens = self.backbone.forward_blocks(tokens)
        else:
            tokens = self.backbone.forward_blocks(tokens, 0, self.config.insert_layer)
            tokens = self.module(tokens.view(b, t, *tokens.shape[1:]), grid_hw).flatten(0, 1)
            tokens = self.backbone.forward_blocks(tokens, self.config.insert_layer)
        v = self.backbone.forward_head(self.backbone.forward_head_tokens(tokens))
        return v.view(b, t, -1)

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Pooled clip feature (B, D): temporal average of the frame features (Eq. 8)."""
        return self.frame_features(x, geometry=geometry).mean(dim=1)
