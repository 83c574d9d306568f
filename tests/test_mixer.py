"""The Mamba mixer: parameter layout, initialisation, equations against a plain re-derivation, step()."""
import math

import pytest
import torch
import torch.nn.functional as F

from pks4.ssm import mixer as mixer_module
from pks4.ssm import scan_triton
from pks4.ssm.mixer import MambaMixer
from pks4.ssm.scan import available_backends, selective_scan_ref

OFFICIAL_BIMAMBA_KEYS = {  # VideoMamba (Li et al.) mixer keys, as in the released checkpoints
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
    "A_log", "D", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
    "A_b_log", "D_b", "out_proj.weight",
}


def test_parameter_names_match_official_layout():
    m = MambaMixer(32, bidirectional=True)
    assert set(m.state_dict()) == OFFICIAL_BIMAMBA_KEYS
    d_inner, r = 64, math.ceil(32 / 16)
    assert m.in_proj.weight.shape == (2 * d_inner, 32)
    assert m.conv1d.weight.shape == (d_inner, 1, 4)
    assert m.x_proj.weight.shape == (r + 32, d_inner)
    assert m.A_b_log.shape == (d_inner, 16)


def test_standard_block_size_is_3_77M():
    # a standard Mamba block at d_model 768, expand 2, d_state 16 (PKS4 Table 5: +KS4 = 3.77M)
    m = MambaMixer(768)
    assert sum(p.numel() for p in m.parameters()) == 3_770_880


def test_initialisation():
    torch.manual_seed(0)
    m = MambaMixer(64, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))


def _plain_mixer(m: MambaMixer, u: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """Mamba-1 written out step by step, independent of the mixer's vectorised code (no out_proj)."""
    a_name = "A_log" if suffix == "" else "A_b_log"
    conv, xp, dtp = getattr(m, "conv1d" + suffix), getattr(m, "x_proj" + suffix), getattr(m, "dt_proj" + suffix)
    A, D = -torch.exp(getattr(m, a_name)), getattr(m, "D" + suffix)
    x, z = m.in_proj(u).chunk(2, dim=-1)  # (B, L, E)
    k = conv.weight.shape[-1]
    xpad = F.pad(x, (0, 0, k - 1, 0))  # causal: only the past
    xc = torch.stack([(xpad[:, t : t + k] * conv.weight[:, 0].t()).sum(1) for t in range(x.shape[1])], 1)
    xc = F.silu(xc if conv.bias is None else xc + conv.bias)
    dt, B, C = torch.split(xp(xc), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dtp(dt))
    h = torch.zeros(u.shape[0], m.d_inner, m.d_state)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * xc[:, t])
    return torch.stack(ys, 1) * F.silu(z)


def test_forward_matches_plain_derivation():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8)
    u = torch.randn(2, 7, 16)
    expected = m.out_proj(_plain_mixer(m, u))
    torch.testing.assert_close(m(u), expected, rtol=1e-5, atol=1e-5)


def test_bidirectional_is_forward_plus_flipped_backward():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8, bidirectional=True)
    u = torch.randn(2, 6, 16)
    expected = m.out_proj(_plain_mixer(m, u) + _plain_mixer(m, u.flip(1), "_b").flip(1))
    torch.testing.assert_close(m(u), expected, rtol=1e-5, atol=1e-5)
    flip = torch.arange(5, -1, -1)
    torch.testing.assert_close(m(u, backward_perm=flip), m(u))


def test_backward_permutation():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, bidirectional=True)
    u = torch.randn(1, 6, 16)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])  # e.g. frames visited in another order
    y_b = _plain_mixer(m, u[:, perm], "_b")
    unperm = torch.empty_like(y_b)
    unperm[:, perm] = y_b
    expected = m.out_proj(_plain_mixer(m, u) + unperm)
    torch.testing.assert_close(m(u, backward_perm=perm), expected, rtol=1e-5, atol=1e-5)


def test_step_matches_full_scan():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8)
    u = torch.randn(3, 9, 16)
    full = m(u)
    conv_state, ssm_state = m.allocate_inference_cache(3)
    steps = torch.stack([m.step(u[:, t], conv_state, ssm_state) for t in range(9)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)


def test_step_refuses_bidirectional():
    m = MambaMixer(8, bidirectional=True)
    with pytest.raises(RuntimeError, match="unidirectional"):
        m.step(torch.randn(1, 8), *m.allocate_inference_cache(1))


def test_fast_and_reference_backends_agree_with_gradients():
    torch.manual_seed(0)
    u = torch.randn(2, 12, 16, requires_grad=True)
    fast, ref = MambaMixer(16, bidirectional=True), MambaMixer(16, bidirectional=True, scan_backend="ref")
    ref.load_state_dict(fast.state_dict())
    y_fast, y_ref = fast(u), ref(u)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(y_fast.square().sum(), [u, *fast.parameters()])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [u, *ref.parameters()])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = MambaMixer(4, d_state=2, expand=1, scan_backend="ref").double()
    u = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (u,))


def test_reference_scan_is_the_oracle_for_mixer_shapes():
    # the mixer calls the scan with Mamba-1 shapes: u (B, E, L), B/C (B, N, L)
    u, delta = torch.randn(2, 8, 5), torch.rand(2, 8, 5)
    A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    assert selective_scan_ref(u, delta, A, B, C).shape == (2, 8, 5)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(batch, length, 16\)"):
        MambaMixer(16)(torch.randn(2, 5, 8))


def test_conv_bias_switch_is_honoured():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8, conv_bias=False)
    assert m.conv1d.bias is None and "conv1d.bias" not in m.state_dict()
    u = torch.randn(2, 7, 16)
    torch.testing.assert_close(m(u), m.out_proj(_plain_mixer(m, u)), rtol=1e-5, atol=1e-5)
    conv_state, ssm_state = m.allocate_inference_cache(2)
    steps = torch.stack([m.step(u[:, t], conv_state, ssm_state) for t in range(7)], 1)
    torch.testing.assert_close(steps, m(u), rtol=1e-5, atol=1e-5)


def test_autocast_hands_the_scan_its_inputs_without_float32_copies(monkeypatch):
    """Under bf16 autocast the scan gets the bf16 conv/projection outputs (no upcast copies); only the small
    per-channel parameters A, D and the dt bias are float32."""
    seen = []
    real = mixer_module.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kwargs):
        seen.append({"u": u.dtype, "delta": delta.dtype, "B": B.dtype, "C": C.dtype, "z": z.dtype, "A": A.dtype})
        return real(u, delta, A, B, C, D, z, delta_bias, **kwargs)

    monkeypatch.setattr(mixer_module, "selective_scan", spy)
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8, bidirectional=True)
    u = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(u)
    assert len(seen) == 2
    for dtypes in seen:
        assert all(dtypes[k] == torch.bfloat16 for k in ("u", "delta", "B", "C", "z")), dtypes
        assert dtypes["A"] == torch.float32
    torch.testing.assert_close(y.float(), m(u), rtol=0.05, atol=0.05)


def test_step_goes_through_the_state_update_of_the_mixer_backend(monkeypatch):
    calls = []
    real = mixer_module.selective_state_update
    monkeypatch.setattr(mixer_module, "selective_state_update",
                        lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    m = MambaMixer(8, d_state=4, scan_backend="loop")
    m.step(torch.randn(1, 8), *m.allocate_inference_cache(1))
    assert calls == ["loop"]


@pytest.mark.skipif(not scan_triton.is_installed() or "triton" not in available_backends(),
                    reason="needs triton, and a CUDA device or Triton's interpreter")
def test_step_with_the_triton_kernel_matches_full_scan():
    """step() on the Triton state update (interpreted on CPU here) equals the Triton scan over the sequence."""
    torch.manual_seed(0)
    m = MambaMixer(8, d_state=4, expand=1, scan_backend="triton")
    u = torch.randn(2, 5, 8)
    full = m(u)
    conv_state, ssm_state = m.allocate_inference_cache(2)
    steps = torch.stack([m.step(u[:, t], conv_state, ssm_state) for t in range(5)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
