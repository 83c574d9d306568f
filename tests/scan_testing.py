"""Inputs and comparisons shared by the selective-scan tests."""
import torch

from pks4.ssm.scan import selective_scan

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


def transposed(inputs):
    """The same values laid out as the mixer passes them: u, delta, z, B, C as transposed (batch, L, .) views."""
    def view(t):
        if t is None or t.dim() != 3:
            return None if t is None else t.detach().clone().requires_grad_()
        return t.detach().transpose(1, 2).contiguous().requires_grad_().transpose(1, 2)  # a non-leaf view
    return {k: view(v) for k, v in inputs.items()}

