"""What each selective-scan path keeps for its backward pass, at the sizes the models run, as a multiple of the
bytes of its inputs (the issue's bound: at most 4x).

Counted exactly and without arithmetic on the meta device: ``torch.ops.pks4.selective_scan`` has a shape-only
implementation whose kept states have each path's real shape, and ``saved_tensors_hooks`` sees every tensor
autograd keeps (each storage once). Inputs as the mixer passes them under bf16 autocast: u, delta, z, B, C in
bfloat16, A, D, delta_bias in float32; d_state 16. The reference (``ref``, plain autograd over a per-step loop)
shows what a path that stores per-step states keeps.

    .venv/bin/python benchmarks/scan_saved.py      # a few seconds; writes benchmarks/scan_saved.md
"""
from __future__ import annotations

from pathlib import Path

import torch

from pks4.ssm.scan import selective_scan_ref

CASES = {"VideoMamba-S, one layer and direction": (32, 768, 1569), "VideoMamba-M, 16 frames": (32, 1152, 3137),
         "PKS4-B/16, T = 8": (1568, 1536, 8), "PKS4-B/16, T = 32": (1568, 1536, 32)}
PATHS = ("triton", "native", "loop", "ref")


def meta_inputs(batch: int, dim: int, L: int, N: int = 16) -> dict[str, torch.Tensor]:
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()

    return {"u": t(batch, dim, L), "delta": t(batch, dim, L), "A": t(dim, N, dtype=torch.float32),
            "B": t(batch, N, L), "C": t(batch, N, L), "D": t(dim, dtype=torch.float32), "z": t(batch, dim, L),
            "delta_bias": t(dim, dtype=torch.float32)}


def saved_bytes(x: dict[str, torch.Tensor], path: str) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if path == "ref":
            out = selective_scan_ref(**x)
        else:  # the op itself: the public function would resolve a path for the meta device
            out = torch.ops.pks4.selective_scan(*x.values(), True, False, True, path)[0]
    del out
    return sum(seen.values())


def main() -> None:
    lines = ["# What the selective scan keeps for its backward pass", "", __doc__.split("\n\n    .venv")[0], "",
             "Command: `.venv/bin/python benchmarks/scan_saved.py`", "",
             "| case | batch x d_inner x L | inputs GiB | " + " | ".join(f"{p} (x inputs)" for p in PATHS) + " |",
             "|" + "---|" * (3 + len(PATHS))]
    for name, case in CASES.items():
        x = meta_inputs(*case)
        inputs = sum(t.numel() * t.element_size() for t in x.values())
        ratios = " | ".join(f"{saved_bytes(x, p) / inputs:.2f}" for p in PATHS)
        lines.append(f"| {name} | {' x '.join(map(str, case))} | {inputs / 2**30:.2f} | {ratios} |")
    text = "\n".join(lines) + "\n"
    Path(__file__).with_name("scan_saved.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
