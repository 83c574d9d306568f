"""Selective scan: the reference against a closed form, every fast path against the reference (outputs and all
gradients), the recurrent step against the scan, dtype handling, backend selection and the fallback."""
import os

import pytest
import torch

from pks4.ssm import scan
from pks4.ssm.scan import available_backends, selective_scan, selective_scan_ref, selective_state_update

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def detached(inputs):
    return {k: None if v is None else v.detach() for k, v in inputs.items()}


def make_inputs(batch=2, dim=3, L=6, N=4, dtype=torch.float32, D=True, z=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = {"u": r(batch, dim, L), "delta": 0.5 * r(batch, dim, L), "A": -torch.rand(dim, N, generator=g,
         dtype=torch.float64) - 0.2, "B": r(batch, N, L), "C": r(batch, N, L),
         "D": r(dim) if D else None, "z": r(batch, dim, L) if z else None, "delta_bias": 0.3 * r(dim) if bias else None}
    return {k: None if v is None else v.to(dtype).requires_grad_() for k, v in t.items()}


def run(inputs, backend, softplus=True, last=False, seed=1):
    """Outputs and the gradients of a random projection of them, for every input."""
    res = selective_scan(**inputs, delta_softplus=softplus, return_last_state=last, backend=backend)
    outs = res if last else (res,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in present])
    return [o.detach() for o in outs], dict(zip(present, grads))


def assert_rel(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() + 1e-12
    assert err <= tol * scale, f"{what}: max error {err:.3g} exceeds {tol} x max |ref| {scale:.3g}"


def assert_matches(got, ref, tol=1e-5):
    """Two ``run`` results (outputs, gradients): a fast path's against the reference's, within ``tol``."""
    (outs, grads), (routs, rgrads) = got, ref
    for name, o, r in zip(("out", "last_state"), outs, routs):
        assert_rel(o.cpu(), r, tol, name)
    assert grads.keys() == rgrads.keys()
    for k in rgrads:
        assert_rel(grads[k].cpu(), rgrads[k], tol, f"d{k}")


def fast_backends():
    return [b for b in ("native", "loop") if b in available_backends()]


def test_reference_matches_closed_form():
    """y_t = sum_{s<=t} C_t . exp(A * sum_{k=s+1..t} dt_k) dt_s B_s u_s + D u_t: eq. 2a unrolled."""
    x = detached(make_inputs(batch=2, dim=3, L=5, N=4, dtype=torch.float64, z=False))
    dt = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
    cum = torch.cumsum(dt, -1)                                             # (b, d, L)
    span = cum[..., :, None] - cum[..., None, :]                           # sum over (s, t]: [t, s]
    decay = torch.exp(span[..., None] * x["A"][None, :, None, None, :])    # (b, d, t, s, N)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))[..., None]
    terms = decay * (dt * x["u"])[:, :, None, :, None] * x["B"].transpose(1, 2)[:, None, None]
    h = torch.where(mask, terms, 0.0).sum(3)                               # (b, d, t, N)
    y = (h * x["C"].transpose(1, 2)[:, None]).sum(-1) + x["D"][:, None] * x["u"]
    torch.testing.assert_close(selective_scan_ref(**x), y, rtol=1e-12, atol=1e-12)


CASES = [  # (batch, dim, L, N, D, z, bias, softplus)
    (2, 3, 7, 16, True, True, True, True),
    (1, 5, 1, 16, False, False, False, True),
    (3, 2, 33, 4, True, False, True, False),
    (2, 4, 70, 16, False, True, False, False),
    (1, 3, 5, 3, True, True, False, True),       # odd d_state: the generic (not N=16) kernel
    (2, 19, 13, 16, True, True, True, True),     # 3 blocks of 8 channels, the last one padded
]


@pytest.mark.parametrize("backend", ["native", "loop"])
@pytest.mark.parametrize("case", CASES)
def test_fast_paths_match_reference(backend, case):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    batch, dim, L, N, D, z, bias, softplus = case
    x = make_inputs(batch, dim, L, N, D=D, z=z, bias=bias)
    assert_matches(run(x, backend, softplus, last=True), run(x, "ref", softplus, last=True))


@pytest.mark.parametrize("batch,dim,threads", [(3, 5, 4), (2, 20, 3), (20, 8, 2), (40, 9, 3), (2, 1, 5)])
def test_native_threads_split_batches(batch, dim, threads):
    """Work units (runs of 8-channel blocks) that split a batch, or span several, must still sum dB and dC
    exactly once."""
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    x = make_inputs(batch, dim, L=9, N=16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run(x, "native")
    finally:
        torch.set_num_threads(before)
    assert_matches(got, run(x, "ref"))


@pytest.mark.parametrize("N", [16, 5])
def test_native_segments_and_checkpoints(monkeypatch, N):
    """Short segments force the forward's checkpoints and the segment-by-segment backward (L=23: 6 segments)."""
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    monkeypatch.setattr(scan, "_SEGMENT", 4)
    x = make_inputs(2, 11, 23, N)
    got = run(x, "native", last=True)
    assert_matches(got, run(x, "ref", last=True))
    (out, _), _ = got
    with torch.no_grad():  # no checkpoints kept without autograd; same numbers
        torch.testing.assert_close(selective_scan(**detached(x), backend="native"), out, rtol=0, atol=0)


def test_native_huge_steps_underflow_like_reference():
    """Steps so large that exp(dt * A) underflows (arguments down to about -200): the kernel's clamped exp path."""
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    x = make_inputs(2, 10, 12, 16)
    with torch.no_grad():
        x["delta"][:, ::2] += 150.0
    assert_matches(run(x, "native", last=True), run(x, "ref", last=True))


def test_native_long_sequence_against_float64():
    """Float32 kernel over 700 steps (several default segments, small steps: long memory, so errors of the
    inlined exp would accumulate) against the float64 reference."""
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    x64 = make_inputs(1, 9, 700, 16, dtype=torch.float64)
    with torch.no_grad():
        x64["delta"].sub_(4.0)  # softplus(delta - 4) ~ 0.02: decays close to 1
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    assert_matches(run(x32, "native", last=True), run(x64, "ref", last=True))


def test_native_bitwise_same_for_any_thread_count():
    """Partial sums are folded in a fixed order, whatever the number of threads and their timing."""
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    x = make_inputs(6, 21, 30, 16)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            results.append(run(x, "native"))
    finally:
        torch.set_num_threads(before)
    (a,), ga = results[0]
    for (b,), gb in results[1:]:
        assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_native_gradcheck_float64():
    if "native" not in available_backends():
        pytest.skip("native backend unavailable here")
    x = make_inputs(batch=2, dim=2, L=4, N=3, dtype=torch.float64)
    fn = lambda *a: selective_scan(*a, return_last_state=True, backend="native")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in NAMES))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["native", "loop", "ref"])
def test_half_inputs_use_float32_state(dtype, backend):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    x = make_inputs(2, 3, 40, 16, dtype=dtype)
    (out, last), grads = run(x, backend, last=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert all(grads[k].dtype == dtype for k in grads)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    (rout, rlast), _ = run(x32, "ref", last=True)
    assert_rel(out.float(), rout, 1e-2, "out")   # only the final rounding to the half type differs
    assert_rel(last, rlast, 1e-5, "last_state")


def test_state_update_matches_scan_step_by_step():
    x = detached(make_inputs(2, 3, 8, 5))
    out, last = selective_scan(**x, return_last_state=True)
    state = torch.zeros(2, 3, 5)
    for t in range(8):
        y = selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                   x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"])
        assert_rel(y, out[..., t], 1e-5, f"step {t}")
    assert_rel(state, last, 1e-5, "state")


def test_shape_errors_name_the_tensor():
    x = detached(make_inputs(2, 3, 4, 5))
    x["B"] = x["B"][:, :, :3]
    with pytest.raises(ValueError, match=r"B must have shape \(2, 5, 4\)"):
        selective_scan(**x)
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(**make_inputs(), backend="nope")


def test_environment_variable_picks_backend(monkeypatch):
    x = detached(make_inputs())
    monkeypatch.setenv("PKS4_SCAN_BACKEND", "ref")
    assert scan._resolve_backend("auto", torch.device("cpu")) == "ref"
    assert scan._resolve_backend("loop", torch.device("cpu")) == "loop"  # an explicit choice wins
    torch.testing.assert_close(selective_scan(**x), selective_scan_ref(**x))


def test_missing_compiler_falls_back_once(monkeypatch, tmp_path):
    """Without a toolchain the scan still runs (torch loop), with a single warning."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PKS4_CACHE_DIR", str(tmp_path))
    scan._native_lib.cache_clear()
    try:
        x = detached(make_inputs())
        with pytest.warns(RuntimeWarning, match="native CPU selective scan is unavailable"):
            out = selective_scan(**x)
        assert "native" not in available_backends()
        torch.testing.assert_close(out, selective_scan_ref(**x))
    finally:
        scan._native_lib.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_path_matches_reference():
    x = {k: v.detach().cuda().requires_grad_() for k, v in make_inputs(2, 3, 20, 16).items()}
    xc = {k: v.detach().cpu().requires_grad_() for k, v in x.items()}
    assert_matches(run(x, "auto"), run(xc, "ref"))


@pytest.mark.skipif(os.environ.get("PKS4_TEST_COMPILE") != "1", reason="torch.compile takes minutes; opt in")
def test_compiled_loop_matches_reference():
    x = make_inputs(2, 3, 20, 16)
    assert_matches(run(x, "compile"), run(x, "ref"))
