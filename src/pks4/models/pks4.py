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

Causal mode (``causal=True``, for live video; the paper has no such mode, so every choice here is ours). The
output at frame t reads frames <= t only, so a prediction exists after every frame and :meth:`PKS4Model.step`
computes it from one frame and a state of constant size, equal to the full-clip forward on the frames so far:

* **KPE neighbourhood** (``causal_offsets``): "past" (default) keeps all K context frames and puts them in the
  past, tau in {-K, ..., -1} (-4..-1 for Table 8's 4). The count of neighbours is what Table 8 varies and measures
  (4 beats 2), psi_corr / psi_var keep their shapes (Table 5's parameter counts hold) and a stream keeps K frames.
  "past_half" keeps only the symmetric window's past side, tau in {-K/2, ..., -1}: the same reach into the past
  as the non-causal model, half the neighbours and smaller projections. Clip starts follow ``temporal_pad``
  ("replicate": a missing past frame is the first frame, i.e. no evidence of motion yet).
* **CLS route**: the k=3 kernel of Eq. 6 moves to frames (t-2, t-1, t), zero-padded before the first frame. Its
  shift initialisation keeps the channels that read t-1 and turns the ones that read t+1 to t-2, so the route
  still mixes two distinct neighbours; TSM and TokenShift shift the same channel groups from t-1 and t-2.
* **Scanner**: unidirectional (Table 7's default); ``bidirectional=True`` is refused, the backward scan reads the
  future. The mixer's convolution and scan are causal already, so the stream runs them through ``step()``.
* **Pooling** (``temporal_pool``): "mean" is Eq. 8 over the frames seen so far, a running mean in a stream; a
  model trained on T-frame clips then gives, after T frames, exactly its clip prediction. "last" takes the
  newest frame's feature instead (every frame's output already summarises its past through the scanner and the
  CLS route); it reacts faster to a change of action, but training then grades one frame per clip.
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
CAUSAL_OFFSETS = ("past", "past_half")
TEMPORAL_POOLS = ("mean", "last")


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
    causal: bool = False  # frame t reads frames <= t only (live video, PKS4Model.step); see the module docstring
    causal_offsets: str = "past"  # causal KPE neighbours: "past" tau = -K..-1 | "past_half" tau = -K/2..-1
    temporal_pool: str = "mean"  # Eq. 8 "mean" (a running mean when streaming) | "last" (the newest frame)

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
        if self.causal_offsets not in CAUSAL_OFFSETS:
            raise ValueError(f"causal_offsets {self.causal_offsets!r} not in {CAUSAL_OFFSETS}")
        if self.temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(f"temporal_pool {self.temporal_pool!r} not in {TEMPORAL_POOLS}")
        if self.causal and self.bidirectional:
            raise ValueError("causal=True needs bidirectional=False: the backward scan reads future frames")

    @property
    def offset_mode(self) -> str:
        """How :func:`temporal_offsets` places the KPE's neighbours: "symmetric" or a causal mode."""
        return self.causal_offsets if self.causal else "symmetric"


# ---- Kinematic Prior Encoder (§3.3) --------------------------------------------------------------------------
OFFSET_MODES = ("symmetric",) + CAUSAL_OFFSETS


def temporal_offsets(context_frames: int, mode: str = "symmetric") -> list[int]:
    """The KPE's neighbour offsets tau for ``context_frames`` = K (Table 8).

    "symmetric": 4 -> [-2, -1, 1, 2]; causal "past": 4 -> [-4, -3, -2, -1]; causal "past_half": 4 -> [-2, -1];
    0 -> [0] (the frame itself) in every mode.
    """
    half = context_frames // 2
    if mode not in OFFSET_MODES:
        raise ValueError(f"offset mode {mode!r} not in {OFFSET_MODES}")
    if mode == "past":
        return list(range(-context_frames, 0)) or [0]
    if mode == "past_half":
        return list(range(-half, 0)) or [0]
    return [o for o in range(-half, half + 1) if o != 0] or [0]


def gather_neighbours(f: Tensor, offsets: list[int], pad: str, start: int = 0) -> Tensor:
    """f (B, T, ...) -> (B, T - start, K, ...) with entry [:, i, k] = f[:, start + i + offsets[k]].

    Indices outside [0, T) follow ``pad`` ("replicate" clamps them into the clip, "zero" zeroes them). ``start``
    skips frames that only serve as neighbours (a stream's remembered past, see :func:`temporal_neighbours`).
    """
    t = f.shape[1]
    idx = torch.arange(start, t, device=f.device)[:, None] + torch.tensor(offsets, device=f.device)[None, :]
    out = f[:, idx.clamp(0, t - 1)]  # (B, T - start, K, ...)
    if pad == "zero":
        inside = ((idx >= 0) & (idx < t)).to(f.dtype)
        out = out * inside.view(1, t - start, len(offsets), *([1] * (f.dim() - 2)))
    return out


def temporal_neighbours(f: Tensor, offsets: list[int], pad: str, past: Tensor | None = None) -> Tensor:
    """The neighbours (B, T, K, ...) of f's frames (B, T, ...); ``past`` (B, P, ...): the frames a stream saw
    before f (at most the reach of ``offsets``), None for a whole clip.

    In a stream that has seen fewer frames than the reach, ``past`` holds all of them, so the first frame of
    the window is the clip's first frame and ``pad`` treats the window's start as the clip's start: a stream
    gets exactly the neighbours the whole clip would give.
    """
    if past is None:
        return gather_neighbours(f, offsets, pad)
    return gather_neighbours(torch.cat([past, f], dim=1), offsets, pad, start=past.shape[1])


def temporal_reach(offsets: list[int]) -> int:
    """How many past frames ``offsets`` read: what a stream keeps for them."""
    return max(0, -min(offsets))


def remember(cache: dict[str, Tensor] | None, key: str, x: Tensor, keep: int) -> Tensor | None:
    """In a stream (``cache`` not None): return the frames kept under ``key`` before ``x`` (B, T, ...), and
    keep the last ``keep`` frames of them followed by ``x``. For a whole clip (no cache): None, nothing kept.

    The kept frames are a copy, so a stream holds exactly ``keep`` frames per key, whatever its length.
    """
    if cache is None:
        return None
    past = cache.get(key)
    if keep > 0:
        frames = x if past is None else torch.cat([past, x], dim=1)
        cache[key] = frames[:, -keep:].clone()
    return past


def _displacements(window: int) -> list[tuple[int, int]]:
    return [(du, dv) for du in range(window) for dv in range(window)]


def correlate_ref(f: Tensor, targets: Tensor, window: int) -> Tensor:
    """Eq. 15 written plainly (the reference for :func:`correlate`).

    Args:
        f: channel-normalised features, channels last (B, T, H, W, C).
        targets: their normalised temporal neighbours (B, T, K, H, W, C) (:func:`temporal_neighbours`).
    Returns:
        (B, T, H, W, K * window**2), ordered (tau, du, dv); positions outside the grid correlate to 0.
    """
    b, t, h, w, c = f.shape
    r = window // 2
    target = F.pad(targets, (0, 0, r, r, r, r))  # (B, T, K, H+2r, W+2r, C)
    query = f.unsqueeze(2)  # (B, T, 1, H, W, C)
    scores = [(query * target[:, :, :, du : du + h, dv : dv + w]).sum(-1) for du, dv in _displacements(window)]
    return torch.stack(scores, dim=3).permute(0, 1, 4, 5, 2, 3).reshape(b, t, h, w, -1)


def local_correlation_ref(f: Tensor, offsets: list[int], window: int, pad: str) -> Tensor:
    """:func:`correlate_ref` of a whole clip with its own neighbours at ``offsets``."""
    return correlate_ref(f, gather_neighbours(f, offsets, pad), window)


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


def correlate(f: Tensor, targets: Tensor, window: int) -> Tensor:
    """Eq. 15: S[t, tau, p, delta] = <f_t(p), f_{t+tau}(p + delta)> for |delta| <= window // 2.

    Same contract as :func:`correlate_ref` (tests hold them equal, gradients included). Computed as one
    batched matmul per frame pair (all N x N similarities) followed by a gather of each position's window: on
    CPU and GPU a matmul over N <= 256 patches is far faster than window**2 elementwise passes, although it
    spends N / window**2 times the multiply-adds (2.4x for 14x14 patches and a 9x9 window).
    """
    b, t, h, w, c = f.shape
    n, k = h * w, targets.shape[2]
    target = targets.reshape(b * t, k, n, c)
    sim = f.reshape(b * t, 1, n, c) @ target.transpose(-1, -2)  # (B*T, K, N, N)
    index, valid = _window_index(h, w, window, f.device)
    s = sim[:, :, torch.arange(n, device=f.device)[:, None], index] * valid  # (B*T, K, N, window**2)
    return s.permute(0, 2, 1, 3).reshape(b, t, h, w, k * window * window)


def local_correlation(f: Tensor, offsets: list[int], window: int, pad: str) -> Tensor:
    """:func:`correlate` of a whole clip with its own neighbours at ``offsets``."""
    return correlate(f, gather_neighbours(f, offsets, pad), window)


def correlation_scores(f: Tensor, offsets: list[int], window: int, pad: str, impl: str = "fast",
                       past: Tensor | None = None) -> Tensor:
    """Eq. 15 through the path ``impl`` names ("fast": :func:`correlate`, "reference": :func:`correlate_ref`);
    the correlation operator's one entry point. ``past``: a stream's earlier frames (:func:`temporal_neighbours`).

    It takes part in torch's function-override protocol (``torch.overrides.handle_torch_function``), so a
    ``TorchFunctionMode`` sees one call of this operator: ``pks4 profile`` books the operator's own cost there
    (K * w^2 * C multiply-adds per token) instead of counting whatever the chosen path spends internally.
    """
    if has_torch_function((f,)):
        return handle_torch_function(correlation_scores, (f,), f, offsets, window, pad, impl, past=past)
    if impl not in CORRELATIONS:
        raise ValueError(f"correlation {impl!r} not in {CORRELATIONS}")
    targets = temporal_neighbours(f, offsets, pad, past)
    return correlate(f, targets, window) if impl == "fast" else correlate_ref(f, targets, window)


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

    def forward(self, f: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """f (B, T, H, W, C) -> F^corr (B, T, H, W, C) = f + psi_corr(S); ``cache``: a stream's (see
        :func:`remember`), which keeps the normalised frames the offsets reach back to."""
        normed = F.normalize(f, dim=-1)
        past = remember(cache, "corr", normed, temporal_reach(self.offsets))
        s = correlation_scores(normed, self.offsets, self.window, self.pad, self.impl, past=past)
        return f + self.psi(s)


class VariationOperator(nn.Module):
    """O_var (Eq. 17-18): temporal differences over the neighbourhood, jointly projected by psi_var."""

    def __init__(self, dim: int, out_dim: int, offsets: list[int], pad: str) -> None:
        super().__init__()
        self.offsets, self.pad = offsets, pad
        self.psi = nn.Linear(len(offsets) * dim, out_dim)

    def forward(self, f: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """f (B, T, H, W, C) -> F^var (B, T, H, W, out_dim); ``cache`` as in :class:`CorrelationOperator`."""
        past = remember(cache, "var", f, temporal_reach(self.offsets))
        diffs = temporal_neighbours(f, self.offsets, self.pad, past) - f.unsqueeze(2)  # Delta_{t,tau} (B,T,K,H,W,C)
        return self.psi(diffs.movedim(2, -2).flatten(-2))


class KinematicPriorEncoder(nn.Module):
    """KPE (Eq. 12-14): Z_hat_p = Z_p + phi(O_var(O_corr(F)))."""

    def __init__(self, dim: int, cfg: PKS4Config) -> None:
        super().__init__()
        offsets = temporal_offsets(cfg.context_frames, cfg.offset_mode)
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

    def forward(self, zp: Tensor, grid_hw: tuple[int, int], cache: dict[str, Tensor] | None = None) -> Tensor:
        """zp (B, T, N, C) -> (B, T, N, C); ``cache``: a stream's, T frames at a time (:meth:`PKS4Model.step`)."""
        b, t, n, c = zp.shape
        f = self.norm(zp).view(b, t, *grid_hw, c)  # Eq. 12, channels last
        if self.corr is not None:
            f = self.corr(f, cache)
        if self.var is not None:
            f = self.var(f, cache)
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

    def forward(self, seq: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """seq (B*N, T, C): one temporal trajectory per patch (Eq. 3) -> update (B*N, T, C).

        In a stream (``cache``) the tokens go through the mixer's recurrent ``step()`` one frame at a time; the
        cache holds its convolution window ("conv") and SSM state ("ssm"), a constant size (Eq. 23 with h_{t-1}).
        """
        u = self.norm(seq)
        if cache is None:
            return self.mixer(u)
        if "conv" not in cache:
            cache["conv"], cache["ssm"] = self.mixer.allocate_inference_cache(u.shape[0], u.device, u.dtype)
        steps = [self.mixer.step(u[:, i], cache["conv"], cache["ssm"]) for i in range(u.shape[1])]
        return torch.stack(steps, dim=1)


def _shift_channels(x: Tensor, fold: int) -> Tensor:
    """x (B, T, C): channels [:fold] take the next frame, [fold:2fold] the previous one, the rest stay."""
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out


CLS_REACH = 2  # the causal CLS route reads frames t-2, t-1 and t


def _causal_window(z: Tensor, past: Tensor | None) -> Tensor:
    """z (B, T, C) preceded by its CLS_REACH earlier frames -> (B, CLS_REACH + T, C): a stream's remembered
    frames, zeros before the first frame (the zero padding of Eq. 6's convolution)."""
    have = 0 if past is None else past.shape[1]
    parts = [z.new_zeros(z.shape[0], CLS_REACH - have, z.shape[2])] + ([past] if have else []) + [z]
    return torch.cat(parts, dim=1)


def _shift_channels_causal(window: Tensor, fold: int) -> Tensor:
    """A :func:`_causal_window` (B, 2 + T, C) -> (B, T, C): channels [:fold] take frame t-2, [fold:2fold]
    frame t-1, the rest stay (the groups :func:`_shift_channels` takes from t+1 and t-1)."""
    t = window.shape[1] - CLS_REACH
    return torch.cat([window[:, :t, :fold], window[:, 1 : t + 1, fold : 2 * fold], window[:, 2:, 2 * fold :]], -1)


class ClsTemporalRoute(nn.Module):
    """Eq. 6: temporal exchange for the CLS tokens (B, T, C).

    ``t1d``: TokenT1D, a depthwise Conv1d (k=3) initialised as a shift of 1/8 of the channels each way
    (learnable); ``tsm``: the same shift, fixed (TSM's 1/8 + 1/8); ``tokenshift``: a fixed shift of 1/4 of
    the channels each way (TokenShift's fold); ``none``: identity. ``causal``: the kernel reads frames
    (t-2, t-1, t) and the group that read t+1 reads t-2 (see the module docstring).
    """

    def __init__(self, dim: int, kind: str, causal: bool = False) -> None:
        super().__init__()
        self.kind, self.causal = kind, causal
        self.conv = None
        if kind == "t1d":
            fold = dim // 8
            self.conv = nn.Conv1d(dim, dim, 3, padding=0 if causal else 1, groups=dim, bias=False)
            # kernel taps: (t-1, t, t+1), or (t-2, t-1, t) when causal
            later, earlier, present = (0, 1, 2) if causal else (2, 0, 1)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:fold, 0, later] = 1.0  # reads frame t+1 (causal: t-2)
                self.conv.weight[fold : 2 * fold, 0, earlier] = 1.0  # reads frame t-1
                self.conv.weight[2 * fold :, 0, present] = 1.0  # identity

    def forward(self, z: Tensor, cache: dict[str, Tensor] | None = None) -> Tensor:
        """z (B, T, C) -> (B, T, C); ``cache``: a stream's (causal routes only), keeping the last two frames."""
        if self.kind == "none":
            return z
        fold = z.shape[-1] // (4 if self.kind == "tokenshift" else 8)
        if not self.causal:
            if self.kind == "t1d":
                return self.conv(z.transpose(1, 2)).transpose(1, 2)
            return _shift_channels(z, fold)
        window = _causal_window(z, remember(cache, "cls", z, CLS_REACH))
        if self.kind == "t1d":
            return self.conv(window.transpose(1, 2)).transpose(1, 2)
        return _shift_channels_causal(window, fold)


class PKS4Module(nn.Module):
    """The single inserted module: tokens (B, T, 1 + N, C) -> (B, T, 1 + N, C) (Eq. 1-7)."""

    def __init__(self, dim: int, cfg: PKS4Config) -> None:
        super().__init__()
        self.skip_from, self.causal = cfg.skip_from, cfg.causal
        self.kpe = KinematicPriorEncoder(dim, cfg) if (cfg.use_var or cfg.use_corr) else None
        self.ks4 = KS4(dim, cfg) if cfg.use_ks4 else None
        self.cls_route = ClsTemporalRoute(dim, cfg.cls_route, cfg.causal)

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int], cache: dict[str, Tensor] | None = None) -> Tensor:
        """``cache``: a causal stream's state, updated in place (:meth:`PKS4Model.step`); None for a whole clip."""
        b, t, n1, c = tokens.shape
        if n1 - 1 != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"PKS4 module got {n1 - 1} patch tokens for a {grid_hw[0]}x{grid_hw[1]} grid")
        if cache is not None and not self.causal:
            raise ValueError("PKS4 module: a stream cache needs a causal module (causal=True), whose frames read "
                             "no later frames")
        z_cls, z_p = tokens[:, :, 0], tokens[:, :, 1:]  # Eq. 1
        z_hat = self.kpe(z_p, grid_hw, cache) if self.kpe is not None else z_p  # Eq. 2
        if self.ks4 is None:
            z_new = z_hat  # KPE alone (ablation): its output is the module's output
        else:
            seq = z_hat.transpose(1, 2).reshape(b * (n1 - 1), t, c)  # Eq. 3: 'b t n c -> (b n) t c'
            update = self.ks4(seq, cache).view(b, n1 - 1, t, c).transpose(1, 2)  # Eq. 4, reassembled
            z_new = (z_p if self.skip_from == "pre_kpe" else z_hat) + update  # Eq. 5 / 25
        return torch.cat([self.cls_route(z_cls, cache).unsqueeze(2), z_new], dim=2)  # Eq. 6-7


# ---- the model -----------------------------------------------------------------------------------------------
@dataclass
class PKS4StreamState:
    """What a causal PKS4 keeps between the frames of a stream (:meth:`PKS4Model.step`), updated in place.

    ``cache`` holds, per stream: the KPE operators' last K input frames ("corr", "var"), the CLS route's last two
    CLS tokens ("cls"), the scanner's convolution window and SSM state ("conv", "ssm"), and the running sum of
    frame features ("pool", mean pooling). None of it grows with the stream's length once K frames are in.
    """

    batch: int
    frames: int = 0  # frames seen so far
    frame_hw: tuple[int, int] | None = None  # set by the first frame: a stream keeps its frame size
    cache: dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensor storage the state holds (what a stream keeps between frames)."""
        return sum(t.untyped_storage().nbytes() for t in self.cache.values())


class PKS4Model(ClipVideoHooks, nn.Module):
    """CLIP ViT + one PKS4 module + temporal pooling + linear head. Input (B, T, 3, H, W).

    Built with random weights; ``pks4.weights.create_model(name, pretrained=...)`` builds the tower from a
    CLIP checkpoint first and then attaches the module and head. A causal model (``config.causal``) also runs
    frame by frame: :meth:`init_stream_state` and :meth:`step`, equal to :meth:`forward_running` on the clip.
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
        return self._frame_features(x, geometry, None)

    def _frame_features(self, x: Tensor, geometry: TokenGeometry | None, cache: dict[str, Tensor] | None) -> Tensor:
        b, t = x.shape[:2]
        grid_hw = self.backbone.grid_size(x.shape[-2], x.shape[-1], geometry)
        tokens = self.backbone.embed(x.flatten(0, 1), geometry)  # (B*T, 1+N, C)
        if self.module is None:
            tokens = self.backbone.forward_blocks(tokens)
        else:
            tokens = self.backbone.forward_blocks(tokens, 0, self.config.insert_layer)
            tokens = self.module(tokens.view(b, t, *tokens.shape[1:]), grid_hw, cache).flatten(0, 1)
            tokens = self.backbone.forward_blocks(tokens, self.config.insert_layer)
        v = self.backbone.forward_head(self.backbone.forward_head_tokens(tokens))
        return v.view(b, t, -1)

    def forward_features(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Pooled clip feature (B, D): temporal average of the frame features (Eq. 8), or the last frame's
        feature (``temporal_pool="last"``)."""
        v = self.frame_features(x, geometry=geometry)
        return v[:, -1] if self.config.temporal_pool == "last" else v.mean(dim=1)

    # ---- causal streaming --------------------------------------------------------------------------------------
    def _require_causal(self, what: str) -> None:
        if not self.config.causal:
            raise ValueError(f"{self.model_name}.{what} needs a causal model (config causal=True): in this one the "
                             "output at frame t also reads later frames")

    def forward_running(self, x: Tensor, *, geometry: TokenGeometry | None = None) -> Tensor:
        """Clips (B, T, 3, H, W) -> the logits after every frame (B, T, K): entry t is the prediction from frames
        0..t, what :meth:`step` gives at frame t, computed for the whole clip in one pass (causal models only)."""
        self._require_causal("forward_running")
        v = self.frame_features(x, geometry=geometry)
        if self.config.temporal_pool == "mean":  # Eq. 8 over the frames so far
            seen = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype).view(1, -1, 1)
            v = v.cumsum(dim=1) / seen
        return self.forward_head(v)

    def init_stream_state(self, batch: int = 1) -> PKS4StreamState:
        """An empty state for ``batch`` streams run together through :meth:`step` (causal models only)."""
        self._require_causal("init_stream_state")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"init_stream_state: batch={batch!r}; expected an int >= 1")
        return PKS4StreamState(batch=batch)

    @torch.no_grad()
    def step(self, frame: Tensor, state: PKS4StreamState, *, geometry: TokenGeometry | None = None
             ) -> tuple[Tensor, PKS4StreamState]:
        """The next frame of each stream (B, 3, H, W) -> (logits from all frames so far (B, K), the state).

        Equal to ``forward_running`` on the frames seen so far (and to ``forward`` on them when pooling is
        "mean"), with memory that does not grow with the stream: see :class:`PKS4StreamState`. The state is
        updated in place and returned. Call it on a model in eval mode, as any inference.
        """
        self._require_causal("step")
        if frame.dim() != 4 or frame.shape[:2] != (state.batch, 3):
            raise ValueError(f"{self.model_name}.step expects one frame per stream ({state.batch}, 3, H, W), "
                             f"got {tuple(frame.shape)}")
        if state.frame_hw is None:
            state.frame_hw = tuple(frame.shape[-2:])
        elif tuple(frame.shape[-2:]) != state.frame_hw:
            raise ValueError(f"{self.model_name}.step: frame size {tuple(frame.shape[-2:])} differs from the "
                             f"stream's {state.frame_hw}")
        v = self._frame_features(frame.unsqueeze(1), geometry, state.cache)[:, 0]  # (B, D)
        state.frames += 1
        if self.config.temporal_pool == "mean":  # a running mean: Eq. 8 over the frames so far
            total = v if "pool" not in state.cache else state.cache["pool"] + v
            state.cache["pool"] = total
            v = total / state.frames
        return self.forward_head(v), state
