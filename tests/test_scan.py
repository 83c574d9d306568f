"""Selective scan: the reference against a closed form, every fast path against the reference (outputs and all
gradients), the recurrent step against the scan, dtype handling, backend selection and the fallback."""
import pytest
import torch

from pks4.ssm import scan, scan_native, scan_triton
from pks4.ssm.scan import available_backends, selective_scan, selective_scan_ref, selective_state_update
from scan_testing import NAMES, assert_matches, assert_rel, detached, make_inputs, run

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
    monkeypatch.setattr(scan_native, "_SEGMENT", 4)
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
    assert scan.resolve_backend("auto", torch.device("cpu")) == "ref"
    assert scan.resolve_backend("loop", torch.device("cpu")) == "loop"  # an explicit choice wins
    torch.testing.assert_close(selective_scan(**x), selective_scan_ref(**x))


def test_missing_compiler_falls_back_once(monkeypatch, tmp_path):
    """Without a toolchain the scan still runs (torch loop), with a single warning."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PKS4_CACHE_DIR", str(tmp_path))
    scan_native.native_lib.cache_clear()
    try:
        x = detached(make_inputs())
        with pytest.warns(RuntimeWarning, match="native CPU selective scan is unavailable"):
            out = selective_scan(**x)
        assert "native" not in available_backends()
        torch.testing.assert_close(out, selective_scan_ref(**x))
    finally:
        scan_native.native_lib.cache_clear()


# ---- what each path keeps for its backward ----------------------------------------------------------------
def saved_bytes(inputs, backend):
    """Bytes autograd keeps for the backward of one scan, each storage counted once."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(**inputs, backend=backend)
    del out
    return sum(saved.values())


def input_bytes(inputs):
    return sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["native", "loop", "triton"])
def test_saved_for_backward_is_at_most_4x_the_inputs(backend, dtype):
    """300 steps: several checkpoint intervals of every path; the reference keeps every step's states."""
    if backend not in available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    x = make_inputs(1, 2, 300, 8, dtype=dtype)
    ratio = saved_bytes(x, backend) / input_bytes(x)
    assert 1.0 <= ratio <= 4.0, f"{backend} keeps {ratio:.2f}x its inputs"


def test_saved_bytes_measure_catches_per_step_states():
    """The measure of the test above on the reference, which stores per-step states: above the 4x bound, and
    more so the larger d_state is against the inputs' channels (8.2x here)."""
    x = make_inputs(1, 8, 300, 16)
    assert saved_bytes(x, "ref") / input_bytes(x) > 6


def test_loop_backward_replays_segments():
    """L = 150: three 64-step segments of the loop's backward, each started from a kept state."""
    x = make_inputs(2, 3, 150, 5)
    assert_matches(run(x, "loop", last=True), run(x, "ref", last=True))


# ---- choosing a path ----------------------------------------------------------------------------------------
@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(scan, "_ANNOUNCED", set())
    monkeypatch.delenv("PKS4_SCAN_BACKEND", raising=False)


def fake_cuda_packages(monkeypatch, mamba: bool, triton: bool):
    fn = (lambda *a, **k: None) if mamba else "mamba_ssm is not importable (ModuleNotFoundError)"
    monkeypatch.setattr(scan, "_mamba_ssm_scan_fn", lambda: fn)
    monkeypatch.setattr(scan, "_triton_installed", lambda: triton)


@pytest.mark.parametrize("mamba,triton,expected", [(True, True, "mamba_ssm"), (True, False, "mamba_ssm"),
                                                   (False, True, "triton"), (False, False, "loop")])
def test_auto_on_cuda_prefers_mamba_ssm_then_triton(monkeypatch, fresh_announcements, mamba, triton, expected):
    fake_cuda_packages(monkeypatch, mamba, triton)
    if expected == "loop":
        with pytest.warns(RuntimeWarning, match=r"pks4\[gpu\]"):
            assert scan.resolve_backend("auto", "cuda", torch.bfloat16) == "loop"
    else:
        assert scan.resolve_backend("auto", "cuda", torch.bfloat16) == expected


def test_auto_on_cuda_sends_float64_to_the_loop(monkeypatch, fresh_announcements):
    fake_cuda_packages(monkeypatch, mamba=True, triton=True)
    with pytest.warns(RuntimeWarning, match="take float32, bfloat16 and float16 inputs, not torch.float64"):
        assert scan.resolve_backend("auto", "cuda", torch.float64) == "loop"


def test_auto_says_once_which_path_and_why(monkeypatch, fresh_announcements, caplog):
    fake_cuda_packages(monkeypatch, mamba=False, triton=True)
    with caplog.at_level("INFO", logger="pks4.ssm.scan"):
        for _ in range(3):
            scan.resolve_backend("auto", torch.device("cuda", 0))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "'triton'" in said[0] and "mamba_ssm is not importable" in said[0]


def test_auto_on_cpu_and_other_devices(fresh_announcements):
    assert scan.resolve_backend("auto", "cpu") == ("native" if "native" in available_backends() else "loop")
    assert scan.resolve_backend("auto", "meta") == "loop"


def test_a_backend_asked_for_by_name_says_what_it_needs(monkeypatch, fresh_announcements):
    x = detached(make_inputs())
    with pytest.raises(ValueError, match="unknown backend 'compile'"):
        selective_scan(**x, backend="compile")
    with pytest.raises(ValueError, match="backend 'native' runs on CPU tensors, got device cuda"):
        scan.resolve_backend("native", "cuda")
    fake_cuda_packages(monkeypatch, mamba=False, triton=True)
    monkeypatch.setattr(scan_triton, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before starting Python"):
        selective_scan(**x, backend="triton")
    with pytest.raises(ValueError, match=r"'triton' takes float32, bfloat16 or float16 inputs, got torch.float64"):
        scan.resolve_backend("triton", "cuda", torch.float64)
    with pytest.raises(RuntimeError, match="backend 'mamba_ssm' needs the mamba_ssm package"):
        scan.resolve_backend("mamba_ssm", "cuda")
    fake_cuda_packages(monkeypatch, mamba=True, triton=False)
    with pytest.raises(RuntimeError, match=r"needs the triton package: pip install 'pks4\[gpu\]'"):
        scan.resolve_backend("triton", "cuda")
    with pytest.raises(ValueError, match="backend 'mamba_ssm' runs on CUDA tensors, got device cpu"):
        scan.resolve_backend("mamba_ssm", "cpu")


def test_inputs_on_two_devices_are_refused():
    x = detached(make_inputs())
    x["A"] = x["A"].to("meta")
    with pytest.raises(ValueError, match="A is on meta but u is on cpu"):
        selective_scan(**x)


# ---- the custom op ------------------------------------------------------------------------------------------
def opcheck_args(backend):
    x = make_inputs(1, 3, 5, 4)
    return (*(x[k] for k in NAMES), True, True, True, backend)


@pytest.mark.parametrize("backend", ["loop", "native", "triton"])
def test_custom_op_passes_opcheck(backend):
    """Schema, shape-only implementation and autograd registration agree with the real kernels."""
    if backend not in available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    torch.library.opcheck(torch.ops.pks4.selective_scan.default, opcheck_args(backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.slow
def test_custom_op_traces_under_aot_autograd():
    """opcheck's full set, AOT-autograd tracing (what torch.compile does with the op) included; about 30 s, most
    of it the first use of the tracing machinery."""
    for backend in [b for b in ("native", "triton", "loop") if b in available_backends()]:
        torch.library.opcheck(torch.ops.pks4.selective_scan.default, opcheck_args(backend))


def test_meta_tensors_give_shapes_without_running_a_kernel():
    x = {k: v.detach().to("meta").requires_grad_() for k, v in make_inputs(2, 3, 600, 4).items()}
    out, last = selective_scan(**x, return_last_state=True)
    assert out.shape == (2, 3, 600) and last.shape == (2, 3, 4) and out.device.type == "meta"
    out.sum().backward()
    assert x["B"].grad.shape == (2, 4, 600)


@pytest.mark.parametrize("backend", ["native", "loop", "triton"])
def test_export_captures_the_scan_as_one_node(backend):
    """A bidirectional mixer exports with one pks4.selective_scan node per direction and runs like eager."""
    from pks4.ssm.mixer import MambaMixer

    if backend not in available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    mixer = MambaMixer(8, d_state=4, expand=1, bidirectional=True, scan_backend=backend).eval()
    u = torch.randn(1, 6, 8)
    exported = torch.export.export(mixer, (u,))
    scans = [n for n in exported.graph.nodes if n.op == "call_function" and "selective_scan" in str(n.target)]
    assert len(scans) == 2 and all(str(n.target) == "pks4.selective_scan.default" for n in scans)
    torch.testing.assert_close(exported.module()(u), mixer(u), rtol=1e-5, atol=1e-5)


# ---- CUDA (skipped on machines without one) -----------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "triton", "mamba_ssm", "loop"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_paths_match_reference(backend, case):
    if backend != "auto" and backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable here")
    batch, dim, L, N, D, z, bias, softplus = case
    x = make_inputs(batch, dim, L, N, D=D, z=z, bias=bias)
    xc = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in x.items()}
    assert_matches(run(xc, backend, softplus, last=True), run(x, "ref", softplus, last=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_long_sequence_bf16_against_float64():
    """VideoMamba-like length (several checkpoint intervals) in bfloat16 against the float64 reference."""
    x64 = make_inputs(2, 64, 1100, 16, dtype=torch.float64)
    xb = {k: v.detach().cuda().to(torch.bfloat16).requires_grad_() for k, v in x64.items()}
    x64r = {k: v.detach().to(torch.bfloat16).double().requires_grad_() for k, v in x64.items()}
    (out, last), grads = run(xb, "triton", last=True)
    (rout, rlast), rgrads = run(x64r, "ref", last=True)
    assert_rel(out.double().cpu(), rout, 1e-2, "out")
    assert_rel(last.double().cpu(), rlast, 1e-4, "last_state")
    for k in rgrads:
        assert_rel(grads[k].double().cpu(), rgrads[k], 2e-2, f"d{k}")
