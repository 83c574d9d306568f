"""The Triton selective scan and state step against the reference: on CUDA tensors where there is a GPU, else
on CPU tensors under Triton's interpreter (tests/conftest.py switches it on before Triton is imported).

The interpreter's tuple scan visits tile elements one by one in Python (about 0.5 ms each), so every case is
tiny, and tiles default to 4 channels x 4 steps here; short chunks and checkpoint intervals exercise the
multi-chunk, multi-checkpoint paths that long sequences take. Two cases run the shipped configuration.
"""
import pytest
import torch

from pks4.ssm import scan_triton
from pks4.ssm.scan import selective_scan, selective_state_update, selective_state_update_ref
from scan_testing import NAMES, assert_matches, assert_rel, detached, make_inputs, run, transposed

DEVICE = "cpu" if scan_triton.interpreting() else "cuda"
pytestmark = pytest.mark.skipif(not scan_triton.is_installed() or (DEVICE == "cuda" and not torch.cuda.is_available()),
                                reason="needs triton, and a CUDA device or TRITON_INTERPRET=1 set before Python starts")
SHIPPED = (scan_triton._TILE_ELEMS, scan_triton._MAX_CHUNK, scan_triton._CKPT_STEPS)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    configure(monkeypatch, 16 * 4 * 4, 4, 8)


def on_device(inputs):
    return {k: None if v is None else v.detach().to(DEVICE).requires_grad_() for k, v in inputs.items()}


def configure(monkeypatch, tile_elems, chunk, ckpt_steps):
    monkeypatch.setattr(scan_triton, "_TILE_ELEMS", tile_elems)
    monkeypatch.setattr(scan_triton, "_MAX_CHUNK", chunk)
    monkeypatch.setattr(scan_triton, "_CKPT_STEPS", ckpt_steps)


CASES = [  # (batch, dim, L, N, D, z, bias, softplus, (tile elements, chunk, checkpoint steps))
    (1, 3, 7, 16, True, True, True, True, SHIPPED),       # shorter than a chunk
    (1, 5, 1, 16, False, False, False, True, SHIPPED),    # L = 1, no optional input
    (1, 7, 11, 3, True, False, True, False, (16, 2, 4)),  # d_inner, d_state, L odd: 2 blocks, 6 chunks, 3 groups
    (1, 4, 10, 4, False, True, False, True, (64, 4, 8)),  # L not a multiple of the chunk or of the interval
    (2, 3, 6, 4, True, True, False, False, (64, 2, 2)),   # two sequences, one chunk per checkpoint
]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(monkeypatch, case):
    batch, dim, L, N, D, z, bias, softplus, config = case
    configure(monkeypatch, *config)
    x = make_inputs(batch, dim, L, N, D=D, z=z, bias=bias)
    assert_matches(run(on_device(x), "triton", softplus, last=True), run(x, "ref", softplus, last=True))


def test_transposed_inputs_are_read_in_place(monkeypatch):
    """The mixer's transposed views go to the kernel as they are (no copies), with the same results."""
    x = make_inputs(1, 5, 9, 4)
    xt = transposed(on_device(x))
    assert not xt["u"].is_contiguous() and not xt["B"].is_contiguous()
    launched = []
    load = scan_triton._kernels
    monkeypatch.setattr(scan_triton, "_kernels", lambda: _Spy(load(), launched))
    got = run(xt, "triton", last=True)
    u_arg, _, _, B_arg = launched[0][:4]
    assert u_arg.data_ptr() == xt["u"].data_ptr() and u_arg.stride() == xt["u"].stride()
    assert B_arg.data_ptr() == xt["B"].data_ptr() and B_arg.stride() == xt["B"].stride()
    assert len(launched) == 2  # forward and backward kernels, nothing else
    assert_matches(got, run(x, "ref", last=True))


class _Spy:
    """The kernels module, with each launch kernel[grid](*args) recording its positional arguments."""

    def __init__(self, module, launched):
        self.module, self.launched = module, launched

    def __getattr__(self, name):
        kernel, launched = getattr(self.module, name), self.launched

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append(args)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()


def test_strided_per_channel_vectors():
    """D and delta_bias as every-other-element views."""
    x = make_inputs(1, 3, 6, 4)
    on = on_device(x)
    for k in ("D", "delta_bias"):
        on[k] = torch.stack([on[k].detach(), torch.full_like(on[k], 7.0)], -1).requires_grad_()[:, 0]
    assert on["D"].stride() == (2,)
    assert_matches(run(on, "triton"), run(x, "ref"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_a_float32_state(monkeypatch, dtype):
    x = make_inputs(1, 3, 9, 4, dtype=dtype)
    (out, last), grads = run(on_device(x), "triton", last=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert all(grads[k].dtype == dtype for k in grads)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    (rout, rlast), rgrads = run(x32, "ref", last=True)
    assert_rel(out.float().cpu(), rout, 1e-2, "out")  # only the final rounding to the half type differs
    assert_rel(last.cpu(), rlast, 1e-5, "last_state")
    for k in rgrads:
        assert_rel(grads[k].float().cpu(), rgrads[k], 1e-2, f"d{k}")


def test_gradient_through_the_last_state_only():
    x = make_inputs(1, 3, 10, 4, D=False, z=False, bias=False)
    present = [k for k in NAMES if x[k] is not None]

    def grads(backend):
        x_on = on_device(x) if backend == "triton" else x
        _, last = selective_scan(**x_on, return_last_state=True, backend=backend)
        grads = torch.autograd.grad(last.square().sum(), [x_on[k] for k in present], allow_unused=True)
        return [torch.zeros_like(x[k]) if g is None else g.cpu() for k, g in zip(present, grads)]  # C: unused

    for name, got, ref in zip(present, grads("triton"), grads("ref")):
        assert_rel(got, ref, 1e-5, f"d{name}")


def test_huge_steps_underflow_like_reference():
    """exp(delta A) underflows to 0 on half the channels: the backward's a_t h_{t-1} = h_t - b_t cancels there."""
    x = make_inputs(1, 4, 9, 4)
    with torch.no_grad():
        x["delta"][:, ::2] += 150.0
    assert_matches(run(on_device(x), "triton", last=True), run(x, "ref", last=True))


def test_long_memory_across_shipped_checkpoints_against_float64(monkeypatch):
    """300 small steps (decay close to 1, so errors would accumulate) over two 256-step checkpoint intervals of
    the shipped configuration, float32 kernel against the float64 reference."""
    configure(monkeypatch, *SHIPPED)
    monkeypatch.setattr(scan_triton, "_TILE_ELEMS", 16 * 4 * 32)  # one channel per program: a small tile here
    x64 = make_inputs(1, 2, 300, 4, dtype=torch.float64)
    with torch.no_grad():
        x64["delta"].sub_(4.0)  # softplus(delta - 4) ~ 0.02
    x32 = {k: v.detach().float().to(DEVICE).requires_grad_() for k, v in x64.items()}
    assert_matches(run(x32, "triton", last=True), run(x64, "ref", last=True))


def test_bitwise_deterministic():
    x = on_device(make_inputs(2, 5, 10, 4))
    (a,), ga = run(x, "triton")
    (b,), gb = run(x, "triton")
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_no_grad_forward_keeps_nothing():
    x = detached(make_inputs(1, 3, 20, 4))
    with torch.no_grad():
        out = selective_scan(**detached(on_device(x)), backend="triton")
    assert_rel(out.cpu(), selective_scan(**x, backend="ref"), 1e-5, "out")


@pytest.mark.parametrize("optional", [True, False])
def test_state_update_matches_reference(optional):
    g = torch.Generator().manual_seed(0)
    batch, dim, N = 3, 37, 16  # one step: no scan, so the interpreter is fast here
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = r(batch, dim, N)
    xz = r(batch, 2 * dim)  # x and z as the two halves of one projection: strided views, as in the mixer
    args = dict(x=xz[:, :dim], dt=r(batch, dim), A=-torch.rand(dim, N, generator=g), B=r(batch, N), C=r(batch, N),
                D=r(dim) if optional else None, z=xz[:, dim:] if optional else None,
                dt_bias=r(dim) if optional else None, dt_softplus=optional)
    on = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if optional:
        on["z"] = xz.to(DEVICE)[:, dim:]  # keep the strided view on the device too
    ref_state, dev_state = state.clone(), state.to(DEVICE)
    y = selective_state_update(dev_state, **on, backend="triton")
    y_ref = selective_state_update_ref(ref_state, **args)
    assert_rel(y.cpu(), y_ref, 1e-5, "y")
    assert_rel(dev_state.cpu(), ref_state, 1e-5, "state")
