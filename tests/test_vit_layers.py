"""ViT block pieces against PyTorch's own modules and the formulas of Eqs. (10)-(11)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pks4.layers.vit import Attention, DropPath, LayerNorm, Mlp, QuickGELU, ResidualAttentionBlock


def test_quick_gelu_values():
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    expected = torch.tensor([-2.0 / (1 + torch.e ** 3.404), 0.0, 1.0 / (1 + torch.e ** -1.702),
                             3.0 / (1 + torch.e ** -5.106)])
    torch.testing.assert_close(QuickGELU()(x), expected)


def test_layernorm_runs_in_fp32_and_keeps_dtype():
    ln = LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = (torch.randn(3, 5, 64) * 50 + 200).bfloat16()
    y = ln(x)
    assert y.dtype == torch.bfloat16
    ref = F.layer_norm(x.float(), (64,), ln.weight, ln.bias, 1e-5).bfloat16()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_attention_matches_nn_multiheadattention_with_same_state_dict():
    dim, heads = 32, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    attn = Attention(dim, heads)
    attn.load_state_dict(mha.state_dict(), strict=True)  # identical parameter names and shapes
    x = torch.randn(2, 7, dim)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_probs_reproduce_forward():
    attn = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    probs = attn.attention_probs(x)
    assert probs.shape == (2, 2, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    _, _, v = attn._qkv(x)
    y = (probs @ v).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(attn.out_proj(y), attn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act, fn", [("quick_gelu", lambda h: h * torch.sigmoid(1.702 * h)),
                                     ("gelu", F.gelu)])
def test_mlp_act_option(act, fn):
    mlp = Mlp(8, 32, act=act)
    x = torch.randn(4, 8)
    ref = mlp.c_proj(fn(mlp.c_fc(x)))
    torch.testing.assert_close(mlp(x), ref)
    assert set(mlp.state_dict()) == {"c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"}


def test_residual_block_is_eqs_10_11():
    blk = ResidualAttentionBlock(32, 4, mlp_ratio=2.0)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 6, 32)
    half = x + blk.attn(blk.ln_1(x))
    ref = half + blk.mlp(blk.ln_2(half))
    torch.testing.assert_close(blk(x), ref)
    assert {k.split(".")[0] for k in blk.state_dict()} == {"ln_1", "attn", "ln_2", "mlp"}
    assert blk.mlp.c_fc.out_features == 64


def test_residual_block_gradients_reach_all_parameters():
    blk = ResidualAttentionBlock(16, 2)
    blk(torch.randn(2, 3, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(1000, 3, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    per_sample = y.flatten(1)
    # each sample is dropped whole or scaled by 1/keep, about half of each
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample.std(dim=1) == 0).all()
    assert 400 < (per_sample[:, 0] == 0).sum() < 600
    with pytest.raises(ValueError):
        DropPath(1.0)
