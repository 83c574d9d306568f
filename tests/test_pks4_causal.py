"""Causal PKS4 (live video): frame t reads frames <= t only, and the step-wise forward equals the full clip's."""
import dataclasses

import pytest
import torch

from pks4.models.base import geometry_for
from pks4.models.pks4 import (
    ClsTemporalRoute,
    PKS4Config,
    PKS4Module,
    gather_neighbours,
    temporal_neighbours,
    temporal_offsets,
)
from pks4.models.registry import count_parameters, create_model


def _causal_model(**kw):
    """A tiny causal PKS4 whose every part acts: residual projections, CLS kernel and head at random values."""
    torch.manual_seed(0)
    model = create_model("pks4_vit_tiny", num_classes=5, zero_init_residual=False, causal=True, **kw).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # logits of order 1-10, so an absolute 1e-5 is a strict bound
        if model.module is not None and model.module.cls_route.conv is not None:
            model.module.cls_route.conv.weight.normal_(std=0.5)
    return model


# ---- what "causal" means for each part ---------------------------------------------------------------------------
def test_causal_offsets_read_only_the_past():
    assert temporal_offsets(4, "past") == [-4, -3, -2, -1]
    assert temporal_offsets(4, "past_half") == [-2, -1]
    assert temporal_offsets(6, "past_half") == [-3, -2, -1]
    assert temporal_offsets(0, "past") == [0] and temporal_offsets(0, "past_half") == [0]
    assert temporal_offsets(4) == [-2, -1, 1, 2]  # the non-causal default is untouched
    with pytest.raises(ValueError, match="offset mode 'future'"):
        temporal_offsets(4, "future")


def test_config_switches_and_refusals():
    assert PKS4Config(causal=True).offset_mode == "past"
    assert PKS4Config(causal=True, causal_offsets="past_half").offset_mode == "past_half"
    assert PKS4Config(causal_offsets="past_half").offset_mode == "symmetric"  # only read when causal
    with pytest.raises(ValueError, match="causal=True needs bidirectional=False"):
        PKS4Config(causal=True, bidirectional=True)
    with pytest.raises(ValueError, match="causal_offsets 'all'"):
        PKS4Config(causal_offsets="all")
    with pytest.raises(ValueError, match="temporal_pool 'max'"):
        PKS4Config(temporal_pool="max")


def test_past_keeps_the_parameter_count_and_past_half_halves_the_kpe_inputs():
    plain = create_model("pks4_vit_tiny")
    past = create_model("pks4_vit_tiny", causal=True)
    half = create_model("pks4_vit_tiny", causal=True, causal_offsets="past_half")
    assert {k: v.shape for k, v in past.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert past.module.kpe.var.psi.in_features == 4 * 128 and half.module.kpe.var.psi.in_features == 2 * 128
    assert count_parameters(half) < count_parameters(past)


def test_causal_cls_routes_read_t_minus_2_and_t_minus_1():
    z = torch.arange(1.0, 5.0).view(1, 4, 1).expand(1, 4, 16).contiguous()  # frame t holds t + 1
    t1d = ClsTemporalRoute(16, "t1d", causal=True)(z)[0]
    assert t1d[:, 0].tolist() == [0, 0, 1, 2]  # the group that read t+1 reads t-2 (zeros before the clip)
    assert t1d[:, 2].tolist() == [0, 1, 2, 3]  # the group that read t-1 still does
    assert t1d[:, 5].tolist() == [1, 2, 3, 4]  # the rest unchanged
    torch.testing.assert_close(ClsTemporalRoute(16, "tsm", causal=True)(z)[0], t1d)
    ts = ClsTemporalRoute(16, "tokenshift", causal=True)(z)[0]
    assert ts[:, 3].tolist() == [0, 0, 1, 2] and ts[:, 7].tolist() == [0, 1, 2, 3] and ts[:, 8].tolist() == [1, 2, 3, 4]
    assert sum(p.numel() for p in ClsTemporalRoute(16, "t1d", causal=True).parameters()) == 48


@pytest.mark.parametrize("pad", ["replicate", "zero"])
def test_a_streams_window_gives_the_clips_neighbours(pad):
    f = torch.randn(2, 9, 3, 5)
    offsets = [-4, -3, -2, -1]
    whole = gather_neighbours(f, offsets, pad)
    for t in range(9):  # frame t with the (at most 4) frames before it
        past = f[:, max(0, t - 4):t] if t else None
        torch.testing.assert_close(temporal_neighbours(f[:, t:t + 1], offsets, pad, past)[:, 0], whole[:, t])


@pytest.mark.parametrize("kind", ["t1d", "tsm", "tokenshift", "none"])
def test_every_part_of_the_module_is_causal(kind):
    torch.manual_seed(0)
    cfg = dataclasses.replace(create_model("pks4_vit_tiny").config, zero_init_residual=False, cls_route=kind,
                              causal=True)
    module = PKS4Module(128, cfg)
    tokens = torch.randn(2, 7, 1 + 16, 128)
    later = tokens.clone()
    later[:, 4:] += torch.randn_like(later[:, 4:])  # change frames 4-6 only
    out, out2 = module(tokens, (4, 4)), module(later, (4, 4))
    torch.testing.assert_close(out[:, :4], out2[:, :4], rtol=0, atol=0)  # CLS and patches of frames 0-3
    assert not torch.allclose(out[:, 4:, 1:], out2[:, 4:, 1:])
    noncausal = PKS4Module(128, dataclasses.replace(cfg, causal=False))
    noncausal.load_state_dict(module.state_dict())
    a, b = noncausal(tokens, (4, 4)), noncausal(later, (4, 4))
    assert not torch.allclose(a[:, 3, 1:], b[:, 3, 1:])  # the symmetric KPE reads frames 4 and 5 from frame 3


def test_module_in_chunks_equals_the_whole_clip():
    torch.manual_seed(0)
    cfg = dataclasses.replace(create_model("pks4_vit_tiny").config, zero_init_residual=False, causal=True)
    module = PKS4Module(128, cfg).eval()
    tokens = torch.randn(2, 8, 1 + 16, 128)
    cache = {}
    with torch.no_grad():
        whole = module(tokens, (4, 4))
        chunks = [module(tokens[:, s:s + 3], (4, 4), cache) for s in range(0, 8, 3)]  # 3 + 3 + 2 frames
    torch.testing.assert_close(torch.cat(chunks, 1), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a stream cache needs a causal module"):
        PKS4Module(128, dataclasses.replace(cfg, causal=False))(tokens[:, :1], (4, 4), {})


# ---- the step-wise forward equals the full-clip forward -----------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 4, 9])
@pytest.mark.parametrize("kw", [dict(), dict(cls_route="none"), dict(temporal_pad="zero", cls_route="tsm"),
                                dict(causal_offsets="past_half", cls_route="tokenshift", corr_context=3),
                                dict(context_frames=0), dict(use_module=False)])
def test_step_equals_the_full_clip_forward_at_every_frame(kw, frames):
    model = _causal_model(**kw)
    x = torch.randn(3, frames, 3, 64, 64)
    state = model.init_stream_state(3)
    with torch.no_grad():
        running = model.forward_running(x)
        for t in range(frames):
            logits, state = model.step(x[:, t], state)
            full = model(x[:, :t + 1])
            assert full.abs().max() > 1  # a strict bound, not one met by near-zero logits
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits, running[:, t], rtol=1e-5, atol=1e-5)
    assert state.frames == frames


def test_last_frame_pooling_and_another_geometry():
    model = _causal_model(temporal_pool="last")
    x = torch.randn(2, 5, 3, 48, 48)
    geometry = geometry_for(model, 5, 48, "static_tokens")  # the trained 8x8 token grid from 48 px frames
    state = model.init_stream_state(2)
    with torch.no_grad():
        for t in range(5):
            logits, state = model.step(x[:, t], state, geometry=geometry)
            torch.testing.assert_close(logits, model(x[:, :t + 1], geometry=geometry), rtol=1e-5, atol=1e-5)
    assert "pool" not in state.cache  # the newest frame's feature needs no running sum


def test_stream_state_does_not_grow():
    model = _causal_model()
    state = model.init_stream_state(1)
    sizes = []
    with torch.no_grad():
        for _ in range(12):
            model.step(torch.randn(1, 3, 32, 32), state)
            sizes.append(state.nbytes())
    assert sizes[0] < sizes[4]  # the first frames fill the KPE's window of 4 past frames ...
    assert len(set(sizes[4:])) == 1  # ... then nothing grows
    assert {k: tuple(v.shape) for k, v in state.cache.items()} == {
        "corr": (1, 4, 4, 4, 128), "var": (1, 4, 4, 4, 128), "cls": (1, 2, 128), "conv": (16, 256, 4),
        "ssm": (16, 256, 16), "pool": (1, 128)}


def test_causal_model_trains():
    model = create_model("pks4_vit_tiny", num_classes=4, zero_init_residual=False, causal=True)
    model(torch.randn(2, 3, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_stream_input():
    plain = create_model("pks4_vit_tiny")
    for call in (lambda: plain.init_stream_state(1), lambda: plain.forward_running(torch.randn(1, 2, 3, 64, 64))):
        with pytest.raises(ValueError, match="needs a causal model"):
            call()
    model = _causal_model()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="init_stream_state: batch"):
            model.init_stream_state(bad)
    state = model.init_stream_state(2)
    with pytest.raises(ValueError, match=r"one frame per stream \(2, 3, H, W\), got \(1, 3, 64, 64\)"):
        model.step(torch.randn(1, 3, 64, 64), state)
    with pytest.raises(ValueError, match="one frame per stream"):
        model.step(torch.randn(2, 1, 3, 64, 64), state)
    model.step(torch.randn(2, 3, 64, 64), state)
    with pytest.raises(ValueError, match=r"frame size \(32, 32\) differs from the stream's \(64, 64\)"):
        model.step(torch.randn(2, 3, 32, 32), state)
