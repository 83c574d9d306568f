"""The ``loop`` fallback of the selective scan against the reference, forward and forward+backward, in CPU time.

The loop keeps one state per 64 steps and recomputes each segment's states in its backward (what it keeps is
1.0-1.2x its inputs, against the reference's ~36x: ``scan_saved.md``); this measures what that costs. One torch
thread, ``time.process_time`` (CPU time of this process, so other jobs on a shared machine do not count), best
of 5 after a warm-up, the two paths alternating. fp32 inputs with every optional argument, d_state 16; the
upstream gradient of forward+backward is all ones, gradients taken for every input.

    .venv/bin/python benchmarks/scan_loop.py       # under a minute; writes benchmarks/scan_loop.md
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pks4.ssm.scan import selective_scan

CASES = {"PKS4, cut to 8 sequences": (8, 1536, 16), "VideoMamba, cut to 98 steps": (2, 768, 98)}
PATHS = ("ref", "loop")


def inputs(batch: int, dim: int, L: int, N: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = [r(batch, dim, L), 0.5 * r(batch, dim, L), -torch.rand(dim, N, generator=g) - 0.2, r(batch, N, L),
          r(batch, N, L), r(dim), r(batch, dim, L), 0.3 * r(dim)]
    return [x.requires_grad_() for x in xs]


def cpu_ms(fn) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def measure(case: tuple[int, int, int], repeats: int = 5) -> dict[str, tuple[float, float]]:
    xs = inputs(*case)

    def fwd(path):
        with torch.no_grad():
            selective_scan(*xs, backend=path)

    def fwd_bwd(path):
        out = selective_scan(*xs, backend=path)
        torch.autograd.grad(out, xs, torch.ones_like(out))

    for path in PATHS:
        fwd_bwd(path)
    times = {p: ([], []) for p in PATHS}
    for _ in range(repeats):
        for path in PATHS:
            times[path][0].append(cpu_ms(lambda: fwd(path)))
            times[path][1].append(cpu_ms(lambda: fwd_bwd(path)))
    return {p: (min(f), min(fb)) for p, (f, fb) in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    lines = ["# The loop fallback against the reference, CPU time", "", __doc__.split("\n\n    .venv")[0], "",
             "Command: `.venv/bin/python benchmarks/scan_loop.py`", "",
             "| case | batch x d_inner x L | ref fwd ms | loop fwd ms | ref fwd+bwd ms | loop fwd+bwd ms | "
             "loop / ref, fwd | loop / ref, fwd+bwd |", "|" + "---|" * 8]
    for name, case in CASES.items():
        t = measure(case)
        (rf, rfb), (lf, lfb) = t["ref"], t["loop"]
        lines.append(f"| {name} | {' x '.join(map(str, case))} | {rf:.0f} | {lf:.0f} | {rfb:.0f} | {lfb:.0f} "
                     f"| {lf / rf:.2f} | {lfb / rfb:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(__file__).with_name("scan_loop.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
