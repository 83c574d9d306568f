"""The one Mamba mixer of the project: uni- or bidirectional, with a recurrent ``step()``.

Used by PKS4's temporal scanner (KS4, PKS4 Eq. 19-25) and by both VideoMamba models. The data path follows
Mamba-1 (Gu & Dao, 2024)::

    x, z   = in_proj(u).chunk(2)                  # content and gate streams          (PKS4 Eq. 19)
    x      = silu(causal_depthwise_conv1d(x))     # local mixing along the sequence   (PKS4 Eq. 20)
    dt,B,C = x_proj(x).split(dt_rank, d_state, d_state)                             # (PKS4 Eq. 21)
    delta  = softplus(dt_proj(dt))                # dt_proj's bias is b_delta         (PKS4 Eq. 22)
    y      = selective_scan(x, delta, A=-exp(A_log), B, C, D)                       # (PKS4 Eq. 23-24)
    out    = out_proj(y * silu(z))                # gated read-out                    (PKS4 Eq. 25)

Bidirectional mode is the "v2" layout of Vision Mamba / VideoMamba (Li et al.): ``in_proj`` and ``out_proj``
are shared, the backward direction has its own ``conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b``, and the two
directions' outputs are summed (not averaged) before ``out_proj``. Parameter names equal the official VideoMamba
checkpoints so they load 1:1. The backward direction scans the sequence in any order given by a permutation
(``backward_perm``); the default is the global flip. Other scan orders (Park et al.'s spatial or temporal
reversal, Li et al.'s alternatives) are just other permutations, computed by the model that knows the layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import selective_scan, selective_state_update


def _dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> Tensor:
    """Inverse softplus of dt ~ LogUniform[dt_min, dt_max], so that softplus(bias) starts inside that range."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class MambaMixer(nn.Module):
    """Selective-SSM token mixer over sequences ``(batch, length, d_model)``.

    Args:
        d_model: token width.
        d_state: SSM state size per channel (16 in every paper here).
        d_conv: causal depthwise convolution width (4).
        expand: ``d_inner = expand * d_model`` (2).
        dt_rank: rank of the step-size projection; ``"auto"`` = ceil(d_model / 16) as in Mamba.
        dt_min, dt_max: range of the initial step sizes; long memories need small dt.
        dt_init_floor: lower clamp of the initial dt, so the inverse softplus stays finite.
        bias: bias in in_proj / out_proj (Mamba and VideoMamba: none).
        conv_bias: bias in the depthwise conv (Mamba: yes).
        bidirectional: add the backward direction ("v2": shared projections, outputs summed).
        scan_backend: passed to :func:`pks4.ssm.scan.selective_scan` and to the recurrent step
            (``"auto"`` picks the fastest available).

    ``dt_proj`` (weight and bias) carries Mamba's own initialisation, which sets the range of the initial step
    sizes; a model that re-initialises its Linear layers should leave ``dt_proj``/``dt_proj_b`` alone unless it
    means to change that (VideoMamba's ``init="official"`` does, on purpose).

    Under autocast the scan receives the conv and projection outputs in the autocast dtype as they are (no
    float32 copies); it keeps its state in float32 itself.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        bidirectional: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional, self.conv_bias = bidirectional, conv_bias
        self.scan_backend = scan_backend
        self._dt_init = (dt_min, dt_max, dt_init_floor)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self._make_direction("")
        if bidirectional:
            self._make_direction("_b")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _make_direction(self, suffix: str) -> None:
        """Create conv1d{s}, x_proj{s}, dt_proj{s}, A{s}_log, D{s} with Mamba's initialisation."""
        d_inner, d_state = self.d_inner, self.d_state
        conv = nn.Conv1d(d_inner, d_inner, self.d_conv, groups=d_inner, padding=self.d_conv - 1,
                         bias=self.conv_bias)
        x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        # dt_proj weight ~ U[-r^-0.5, r^-0.5] keeps the low-rank dt path at unit scale at init.
        nn.init.uniform_(dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        with torch.no_grad():
            dt_proj.bias.copy_(_dt_bias_init(d_inner, *self._dt_init))
        # S4D-real initialisation: A[:, n] = -(n + 1), stored as log so A stays negative (stable decay).
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", x_proj)
        setattr(self, f"dt_proj{suffix}", dt_proj)
        a_name = "A_log" if suffix == "" else "A_b_log"
        setattr(self, a_name, nn.Parameter(a_log))
        setattr(self, f"D{suffix}", nn.Parameter(torch.ones(d_inner)))
        getattr(self, a_name)._no_weight_decay = True
        getattr(self, f"D{suffix}")._no_weight_decay = True

    def _params(self, suffix: str) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, Tensor, Tensor]:
        a_name = "A_log" if suffix == "" else "A_b_log"
        return (getattr(self, f"conv1d{suffix}"), getattr(self, f"x_proj{suffix}"),
                getattr(self, f"dt_proj{suffix}"), getattr(self, a_name), getattr(self, f"D{suffix}"))

    def _scan_direction(self, x: Tensor, z: Tensor, suffix: str) -> Tensor:
        """One direction of the mixer on already projected streams. x, z: (B, d_inner, L) -> (B, d_inner, L)."""
        conv, x_proj, dt_proj, a_log, d_skip = self._params(suffix)
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])  # causal: drop the look-ahead outputs of the padded conv
        dt, b, c = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias goes in as delta_bias
        return selective_scan(
            x, delta, -torch.exp(a_log.float()), b.transpose(1, 2), c.transpose(1, 2), d_skip.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend,
        )

    def forward(self, u: Tensor, backward_perm: Tensor | None = None) -> Tensor:
        """Mix a batch of sequences.

        Args:
            u: (batch, length, d_model).
            backward_perm: (length,) order in which the backward direction visits the positions (only for
                bidirectional mixers); ``None`` = reversed sequence.
        Returns:
            (batch, length, d_model).
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer expects (batch, length, {self.d_model}), got {tuple(u.shape)}")
        xz = self.in_proj(u).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._scan_direction(x, z, "")
        if self.bidirectional:
            if backward_perm is None:
                y = y + self._scan_direction(x.flip(-1), z.flip(-1), "_b").flip(-1)
            else:
                inverse = torch.empty_like(backward_perm)
                inverse[backward_perm] = torch.arange(len(backward_perm), device=backward_perm.device)
                y_b = self._scan_direction(x[..., backward_perm], z[..., backward_perm], "_b")
                y = y + y_b[..., inverse]
        return self.out_proj(y.transpose(1, 2))

    # ---- recurrent inference -------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero states for :meth:`step`: conv window (B, d_inner, d_conv) and SSM state (B, d_inner, d_state)."""
        device = device or self.in_proj.weight.device
        conv_state = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype or torch.float32)
        ssm_state = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    @torch.no_grad()
    def step(self, u_t: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """Advance one token: u_t (batch, d_model) -> (batch, d_model); the two states are updated in place.

        Equal to the full forward on the sequence seen so far (unidirectional mixers only: the backward
        direction needs the future, so a bidirectional mixer has no recurrent form).
        """
        if self.bidirectional:
            raise RuntimeError("step() needs a unidirectional mixer: the backward scan depends on future tokens")
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (B, d_inner) each
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[..., -1] = x
        x = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()
        y = selective_state_update(
            ssm_state, x, dt, -torch.exp(self.A_log.float()), b, c, self.D.float(), z=z,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True, backend=self.scan_backend,
        )
        return self.out_proj(y.to(u_t.dtype))
