"""PKS4 (§3): equations of the KPE, the parallel scanner, the CLS route, parameter counts, bad input."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pks4.models.pks4 import (
    ClsTemporalRoute,
    CorrelationOperator,
    GridConv,
    PKS4Module,
    gather_neighbours,
    local_correlation,
    temporal_offsets,
)
from pks4.models.registry import count_parameters, create_model, model_from_config

M = 1e6


# ---- numbers the paper states (Table 5, Table 3), random init --------------------------------------------------
@pytest.mark.parametrize(
    "overrides, paper_millions",
    [
        (dict(use_module=False), 86.34),  # Baseline
        (dict(use_var=False, use_corr=False), 90.11),  # + KS4
        (dict(use_corr=False), 90.86),  # + KS4 + KPE(var)
        ({}, 91.70),  # + KS4 + KPE(var + corr)
    ],
)
def test_table5_parameter_ladder(overrides, paper_millions):
    model = create_model("pks4_vit_b16", num_classes=174, **overrides)
    assert abs(count_parameters(model) / M - paper_millions) / paper_millions < 0.01


def test_l14_parameter_count():
    model = create_model("pks4_vit_l14", num_classes=174)
    assert abs(count_parameters(model) / M - 312.8) / 312.8 < 0.01


# ---- KPE equations ----------------------------------------------------------------------------------------------
def test_temporal_offsets():
    assert temporal_offsets(4) == [-2, -1, 1, 2]
    assert temporal_offsets(2) == [-1, 1]
    assert temporal_offsets(6) == [-3, -2, -1, 1, 2, 3]
    assert temporal_offsets(0) == [0]


def test_gather_neighbours_padding():
    f = torch.arange(4.0).view(1, 4, 1)
    rep = gather_neighbours(f, [-1, 2], "replicate")[0, :, :, 0]
    assert rep.tolist() == [[0, 2], [0, 3], [1, 3], [2, 3]]
    zero = gather_neighbours(f + 1, [-1, 2], "zero")[0, :, :, 0]
    assert zero.tolist() == [[0, 3], [1, 4], [2, 0], [3, 0]]


@pytest.mark.parametrize("pad", ["replicate", "zero"])
def test_local_correlation_matches_eq15(pad):
    torch.manual_seed(0)
    b, t, h, w, c, window = 1, 3, 4, 5, 6, 3
    f = F.normalize(torch.randn(b, t, h, w, c), dim=-1)
    offsets = [-1, 1]
    s = local_correlation(f, offsets, window, pad).view(b, t, h, w, len(offsets), window, window)
    r = window // 2
    for ti in range(t):
        for k, tau in enumerate(offsets):
            tt = ti + tau
            inside_t = 0 <= tt < t
            tt = min(max(tt, 0), t - 1)
            for y in range(h):
                for x in range(w):
                    for du in range(window):
                        for dv in range(window):
                            yy, xx = y + du - r, x + dv - r
                            expect = 0.0
                            if 0 <= yy < h and 0 <= xx < w and (inside_t or pad == "replicate"):
                                expect = float(f[0, ti, y, x] @ f[0, tt, yy, xx])
                            assert abs(float(s[0, ti, y, x, k, du, dv]) - expect) < 1e-5


def test_correlation_detects_motion():
    # a single bright patch moving one cell right per frame: the strongest tau=+1 match is at delta=(0, +1)
    f = torch.zeros(1, 3, 5, 5, 4)
    f[..., 1] = 1.0  # background points another way than the object
    for t in range(3):
        f[0, t, 2, 1 + t] = torch.tensor([1.0, 0, 0, 0])
    s = local_correlation(F.normalize(f, dim=-1), [1], 3, "replicate").view(1, 3, 5, 5, 3, 3)
    assert s[0, 0, 2, 1].flatten().argmax().item() == 1 * 3 + 2  # du=0 -> index 1, dv=+1 -> index 2


def test_grid_conv_is_a_sum_over_neighbouring_positions():
    conv = GridConv(5, 3, 3).double()
    x = torch.randn(2, 2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    expect = torch.zeros(2, 2, 4, 3, 3, dtype=torch.float64)
    for yy in range(4):
        for xx in range(3):
            expect[:, :, yy, xx] = conv.bias
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= yy + dy < 4 and 0 <= xx + dx < 3:  # outside the grid: nothing (zero padding)
                        expect[:, :, yy, xx] += x[:, :, yy + dy, xx + dx] @ conv.weight[:, :, dy + 1, dx + 1].T
    torch.testing.assert_close(y, expect)
    assert torch.autograd.gradcheck(conv, (x,))


def test_corr_context_reads_the_neighbours_scores():
    # Per-position psi_corr sees only its own window, so it is blind to what the neighbours' scores say; the
    # k x k variant's output changes when only a neighbour's scores change, and its parameters say so.
    torch.manual_seed(0)
    per_pos = CorrelationOperator(8, [1], 3, "replicate", context=1)
    ctx = CorrelationOperator(8, [1], 3, "replicate", context=3)
    assert isinstance(per_pos.psi[0], torch.nn.Linear) and isinstance(ctx.psi[0], GridConv)
    assert ctx.psi[0].weight.shape == (8, 9, 3, 3)
    f = torch.randn(1, 2, 4, 4, 8)
    g = f.clone()
    g[0, 1, 0, 0] = torch.randn(8)  # only frame 1 at (0, 0) changes: the scores of positions within 1 of it change
    for op, reads_neighbours in ((per_pos, False), (ctx, True)):
        a, b = op(f)[0, 0], op(g)[0, 0]
        # (2, 1): its own 3x3 window ends at row 1, so only a layer reading (1, 0) or (1, 1)'s scores changes
        assert (not torch.allclose(a[2, 1], b[2, 1])) is reads_neighbours
        torch.testing.assert_close(a[3, 3], b[3, 3])  # beyond both the window and the context


def test_variation_is_eq17():
    module = PKS4Module(128, _tiny_cfg(use_corr=False))
    var = module.kpe.var
    f = torch.randn(1, 4, 2, 2, 128)
    with torch.no_grad():
        diffs = torch.stack([gather_neighbours(f, [tau], "replicate")[:, :, 0] - f for tau in var.offsets], -2)
        expected = var.psi(diffs.flatten(-2))
        torch.testing.assert_close(var(f), expected)


# ---- the module -------------------------------------------------------------------------------------------------
def _tiny_cfg(**kw):
    return dataclasses.replace(create_model("pks4_vit_tiny").config, **kw)


def test_stable_init_leaves_patch_tokens_unchanged():
    module = PKS4Module(128, _tiny_cfg(cls_route="none"))
    tokens = torch.randn(2, 4, 1 + 16, 128)
    torch.testing.assert_close(module(tokens, (4, 4)), tokens)


def test_scanner_is_causal_and_parallel_over_patches():
    torch.manual_seed(0)
    module = PKS4Module(128, _tiny_cfg(use_var=False, use_corr=False, zero_init_residual=False))
    tokens = torch.randn(1, 6, 1 + 9, 128)
    out = module(tokens, (3, 3))
    later = tokens.clone()
    later[:, 4:] += torch.randn_like(later[:, 4:])  # change frames 4, 5 only
    out2 = module(later, (3, 3))
    torch.testing.assert_close(out[:, :3, 1:], out2[:, :3, 1:])  # past frames' patches unaffected
    # one shared scanner per patch: permuting patches permutes the output the same way
    perm = torch.randperm(9) + 1
    out_perm = module(tokens[:, :, torch.cat([torch.tensor([0]), perm])], (3, 3))
    torch.testing.assert_close(out_perm[:, :, 1:], out[:, :, perm], rtol=1e-5, atol=1e-5)


def test_cls_routes():
    z = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 16).contiguous()
    t1d = ClsTemporalRoute(16, "t1d")(z)[0]
    assert t1d[:, 0].tolist() == [1, 2, 3, 0]  # 1/8 of the channels read the next frame
    assert t1d[:, 2].tolist() == [0, 0, 1, 2]  # 1/8 read the previous frame
    assert t1d[:, 5].tolist() == [0, 1, 2, 3]  # the rest unchanged
    tsm = ClsTemporalRoute(16, "tsm")(z)[0]
    torch.testing.assert_close(tsm, t1d)  # TSM = TokenT1D's initial state, frozen
    ts = ClsTemporalRoute(16, "tokenshift")(z)[0]
    assert ts[:, 3].tolist() == [1, 2, 3, 0] and ts[:, 8].tolist() == [0, 1, 2, 3]
    assert ClsTemporalRoute(16, "none")(z).equal(z)
    assert sum(p.numel() for p in ClsTemporalRoute(16, "t1d").parameters()) == 48


def test_model_forward_backward_every_parameter_gets_gradient():
    torch.manual_seed(0)
    model = create_model("pks4_vit_tiny", num_classes=4, zero_init_residual=False)
    x = torch.randn(2, 4, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("kw", [dict(context_frames=0), dict(context_frames=6), dict(bidirectional=True),
                                dict(cls_route="tsm"), dict(insert_layer=0), dict(insert_layer=4),
                                dict(use_ks4=False), dict(skip_from="post_kpe"), dict(temporal_pad="zero"),
                                dict(corr_context=3)])
def test_ablation_switches_run(kw):
    model = create_model("pks4_vit_tiny", num_classes=3, **kw)
    assert model(torch.randn(1, 3, 3, 64, 64)).shape == (1, 3)


def test_any_frame_count_and_resolution():
    model = create_model("pks4_vit_tiny", num_classes=3)
    assert model(torch.randn(1, 1, 3, 64, 64)).shape == (1, 3)  # a single frame
    assert model(torch.randn(1, 5, 3, 48, 80)).shape == (1, 3)  # other resolution: pos-embed interpolation


def test_forward_features_and_head_split():
    model = create_model("pks4_vit_tiny", num_classes=3).eval()
    x = torch.randn(2, 2, 3, 64, 64)
    feat = model.forward_features(x)
    assert feat.shape == (2, 128)
    torch.testing.assert_close(model.forward_head(feat), model(x))


def test_bad_inputs():
    model = create_model("pks4_vit_tiny", num_classes=3)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 2, 3, 60, 64))
    with pytest.raises(ValueError, match="patch tokens"):
        PKS4Module(128, _tiny_cfg())(torch.randn(1, 2, 10, 128), (4, 4))
    with pytest.raises(ValueError, match="context_frames"):
        create_model("pks4_vit_tiny", context_frames=3)
    with pytest.raises(ValueError, match="insert_layer"):
        create_model("pks4_vit_tiny", insert_layer=9)
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="corr_context must be an odd kernel size"):
            create_model("pks4_vit_tiny", corr_context=bad)


def test_registry_overrides_and_rebuild_from_saved_config():
    model = create_model("pks4_vit_tiny", num_classes=7, image_size=32, context_frames=2)
    assert model.config.backbone.image_size == 32 and model.config.context_frames == 2
    rebuilt = model_from_config("pks4_vit_tiny", dataclasses.asdict(model.config))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="unknown option 'nonsense'"):
        create_model("pks4_vit_tiny", nonsense=1)
    with pytest.raises(KeyError, match="registered models"):
        create_model("no_such_model")


def test_engine_hooks():
    model = create_model("pks4_vit_tiny")
    assert model.layer_id("backbone.conv1.weight") == 0
    assert model.layer_id("backbone.transformer.resblocks.2.attn.in_proj_weight") == 3
    assert model.layer_id("module.ks4.mixer.in_proj.weight") == model.num_layers + 1
    assert model.layer_id("head.weight") == model.num_layers + 1
    assert model.is_new_parameter("module.kpe.phi.1.weight") and not model.is_new_parameter("backbone.proj")
    nwd = model.no_weight_decay()
    assert {"module.ks4.mixer.A_log", "module.ks4.mixer.D", "backbone.positional_embedding"} <= nwd


@pytest.mark.parametrize("pad", ["replicate", "zero"])
def test_fast_correlation_matches_reference_with_gradients(pad):
    from pks4.models.pks4 import local_correlation_ref

    torch.manual_seed(0)
    f = F.normalize(torch.randn(2, 4, 5, 3, 8, dtype=torch.float64), dim=-1).requires_grad_()
    fast = local_correlation(f, [-2, -1, 1, 2], 3, pad)
    ref = local_correlation_ref(f, [-2, -1, 1, 2], 3, pad)
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(ref)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), f)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), f)
    torch.testing.assert_close(g_fast, g_ref)
    assert torch.autograd.gradcheck(lambda x: local_correlation(x, [-1, 1], 3, pad), (f[:1, :3, :3, :2, :3],))


def test_correlation_switch_selects_the_path_and_keeps_the_model():
    from pks4.models.pks4 import PKS4Config, correlation_scores

    torch.manual_seed(0)
    fast = create_model("pks4_vit_tiny", num_classes=3).eval()
    assert fast.config.correlation == "fast"
    ref = model_from_config("pks4_vit_tiny", dataclasses.asdict(fast.config) | {"correlation": "reference"}).eval()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():  # phi starts at zero: perturb it so the correlation reaches the output
        for m in (fast, ref):
            m.module.kpe.phi[1].weight.copy_(0.1 * torch.ones_like(m.module.kpe.phi[1].weight))
    x = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), fast(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="correlation 'approx'"):
        PKS4Config(correlation="approx")
    with pytest.raises(ValueError, match="correlation 'approx'"):
        correlation_scores(torch.randn(1, 2, 3, 3, 4), [1], 3, "replicate", "approx")
