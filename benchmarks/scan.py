"""Selective-scan speed and memory on the CPU, against the exp floor, in the two regimes pks4 meets.

(a) PKS4: 1568 sequences (8 frames x 196 patches of a ViT-B/16 clip), d_inner 1536, L = 8 / 16 / 32.
(b) VideoMamba: batch 2, d_inner 768, L = 1569 / 3137 (8 / 16 frames x 196 patches + CLS).

The floor is one exp per (row, channel, step, state): ``torch.exp`` over a float32 tensor of that many elements
(into a preallocated output), timed in alternation with the native path so that both see the same machine load.
fwd+bwd is one forward and one ``torch.autograd.grad`` with respect to every input; the upstream gradient is
allocated once, outside the timed region.
The reference (which stores every step's state for autograd) and the lean loop (per-step PyTorch ops, 64-step
segments replayed in its backward) are slow, so they run on a cut-down problem (fewer sequences in (a), a shorter
L in (b)) and their time is scaled linearly to the full size; the table says so. The GPU paths are measured by
benchmarks/gpu.py.
Peak extra memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its
resident set before the call, with glibc told to return large blocks to the system at once (mallopt), divided
by the bytes of the inputs. Run: ``.venv/bin/python benchmarks/scan.py`` (``--quick`` for a smoke run;
``--max-load 2.5`` first waits, up to 10 minutes, for the 1-minute load average to drop below 2.5).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pks4.ssm.scan import available_backends, selective_scan

D_STATE = 16


@dataclass
class Case:
    regime: str
    batch: int
    dim: int
    L: int


def make_inputs(batch: int, dim: int, L: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, dim, L, generator=g), 0.5 * torch.randn(batch, dim, L, generator=g),
          -torch.rand(dim, D_STATE, generator=g) - 0.1, torch.randn(batch, D_STATE, L, generator=g),
          torch.randn(batch, D_STATE, L, generator=g), torch.randn(dim, generator=g),
          torch.randn(batch, dim, L, generator=g), 0.3 * torch.randn(dim, generator=g)]
    return [x.requires_grad_(grad) for x in xs]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed at 1 MiB: freed tensors leave the resident set
        return libc
    except OSError:
        return None


LIBC = _libc()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_extra_mib(fn) -> float:
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def timed_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def best_ms(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()  # first-use compilation, allocator
    return min(timed_ms(fn) for _ in range(repeats))


def exp_floor_fn(case: Case, max_batch: int):
    """torch.exp over batch * d_inner * L * d_state elements (at most max_batch sequences; scale to return)."""
    batch = min(case.batch, max_batch)
    x = -torch.rand(batch * case.dim * case.L * D_STATE)
    y = torch.empty_like(x)
    return (lambda: torch.exp(x, out=y)), case.batch / batch


def path_fns(backend: str, case: Case, batch: int, L: int):
    xs = make_inputs(batch, case.dim, L, grad=True)
    grad_out = torch.ones(batch, case.dim, L)

    def fwd():
        with torch.no_grad():
            selective_scan(*xs, backend=backend)

    def fwd_bwd():
        out = selective_scan(*xs, backend=backend)
        torch.autograd.grad(out, xs, grad_out)

    in_mib = sum(x.numel() * x.element_size() for x in xs) / 2**20
    return fwd, fwd_bwd, in_mib


@dataclass
class Row:
    case: Case
    path: str
    note: str
    fwd_ms: float
    fwd_bwd_ms: float
    mem_fwd: float  # peak extra memory / input bytes
    mem_fwd_bwd: float


def measure(backend: str, case: Case, cut: tuple[int, int] | None, repeats: int) -> Row:
    """Time one path; ``cut`` = (batch, L) of a smaller run whose time is scaled to the full case."""
    batch, L = cut or (case.batch, case.L)
    scale = case.batch * case.L / (batch * L)
    fwd, fwd_bwd, in_mib = path_fns(backend, case, batch, L)
    fwd()  # warm-up: the first call of the scan's custom op imports torch's tracing machinery (~100 MB)
    mem_f = peak_extra_mib(fwd) / in_mib
    t_f = best_ms(fwd, repeats, warm_up=False) * scale
    mem_fb = peak_extra_mib(fwd_bwd) / in_mib
    t_fb = best_ms(fwd_bwd, repeats, warm_up=False) * scale
    note = "" if cut is None else f"run at batch {batch}, L {L}; time x{scale:g}"
    return Row(case, backend, note, t_f, t_fb, mem_f, mem_fb)


def measure_native_and_floor(case: Case, repeats: int) -> tuple[float, Row]:
    """The native path and the exp floor timed in turns (floor, fwd, fwd+bwd) x repeats; best of each."""
    floor_fn, floor_scale = exp_floor_fn(case, max_batch=196)
    fwd, fwd_bwd, in_mib = path_fns("native", case, case.batch, case.L)
    mem_f, mem_fb = peak_extra_mib(fwd) / in_mib, peak_extra_mib(fwd_bwd) / in_mib  # also the warm-ups
    floor_fn()
    times = [(timed_ms(floor_fn) * floor_scale, timed_ms(fwd), timed_ms(fwd_bwd)) for _ in range(repeats)]
    floor, t_f, t_fb = (min(col) for col in zip(*times))
    return floor, Row(case, "native", "", t_f, t_fb, mem_f, mem_fb)


def plan(quick: bool) -> list[Case]:
    if quick:
        return [Case("PKS4", 98, 1536, 16), Case("VideoMamba", 2, 768, 393)]
    return [Case("PKS4", 1568, 1536, L) for L in (8, 16, 32)] + \
           [Case("VideoMamba", 2, 768, L) for L in (1569, 3137)]


def cut_for(case: Case, quick: bool) -> tuple[int, int]:
    """The cut-down problem for the slow paths: 8 sequences in (a), 98 steps in (b)."""
    if case.regime == "PKS4":
        return (min(case.batch, 8), case.L)
    return (case.batch, min(case.L, 49 if quick else 98))


def run_case(case: Case, backends: list[str], quick: bool) -> tuple[float, list[Row]]:
    floor, rows = None, []
    for backend in backends:
        if backend == "native":
            floor, row = measure_native_and_floor(case, 3 if quick else 5)
            rows.append(row)
        else:
            rows.append(measure(backend, case, cut_for(case, quick), 1))
        print(f"  {case.regime} L={case.L} {backend}: fwd {rows[-1].fwd_ms:.0f} ms, "
              f"fwd+bwd {rows[-1].fwd_bwd_ms:.0f} ms", flush=True)
    if floor is None:
        floor_fn, scale = exp_floor_fn(case, max_batch=196)
        floor = best_ms(floor_fn, 3) * scale
    return floor, rows


def table(results: list[tuple[float, list[Row]]]) -> str:
    head = ("| regime | L | path | exp floor ms | fwd ms | fwd / floor | fwd speed-up vs ref | fwd+bwd ms "
            "| fwd+bwd / floor | fwd+bwd speed-up vs ref | peak extra mem fwd / fwd+bwd (x inputs) | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for floor, rows in results:
        ref = next((r for r in rows if r.path == "ref"), None)
        for r in rows:
            c = r.case
            sf = f"{ref.fwd_ms / r.fwd_ms:.1f}x" if ref else "-"
            sfb = f"{ref.fwd_bwd_ms / r.fwd_bwd_ms:.1f}x" if ref else "-"
            lines.append(f"| {c.regime} (batch {c.batch}, d_inner {c.dim}) | {c.L} | {r.path} | {floor:.0f} "
                         f"| {r.fwd_ms:.0f} | {r.fwd_ms / floor:.2f} | {sf} | {r.fwd_bwd_ms:.0f} "
                         f"| {r.fwd_bwd_ms / floor:.2f} | {sfb} | {r.mem_fwd:.2f} / {r.mem_fwd_bwd:.2f} "
                         f"| {r.note} |")
    return "\n".join(lines)


def verdict(results: list[tuple[float, list[Row]]]) -> str:
    """The issue's targets for the native path, case by case: within 3x of the floor, 20x faster than ref."""
    misses = []
    for floor, rows in results:
        ref = next((r for r in rows if r.path == "ref"), None)
        for r in (r for r in rows if r.path == "native"):
            where = f"{r.case.regime} L={r.case.L}"
            for what, ms, ref_ms in (("fwd", r.fwd_ms, ref and ref.fwd_ms), ("fwd+bwd", r.fwd_bwd_ms,
                                                                          ref and ref.fwd_bwd_ms)):
                if ms > 3 * floor:
                    misses.append(f"{where} {what} is {ms / floor:.2f}x the floor ({ms / (3 * floor):.2f}x the target)")
                if ref_ms and ref_ms < 20 * ms:
                    misses.append(f"{where} {what} is only {ref_ms / ms:.1f}x faster than ref")
    if not misses:
        return "Targets (native within 3x of the floor and at least 20x faster than ref, fwd and fwd+bwd): all met."
    return "Targets missed: " + "; ".join(misses) + "."


def load_average() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "unknown"


def wait_for_quiet(max_load: float, patience_s: float = 600.0) -> None:
    """Wait (at most patience_s) for the 1-minute load average to fall below max_load."""
    start = time.perf_counter()
    while Path("/proc/loadavg").exists() and time.perf_counter() - start < patience_s:
        if float(load_average().split()[0]) < max_load:
            return
        time.sleep(10)
    print(f"load average still {load_average()} after {patience_s:.0f} s; measuring anyway", flush=True)


def machine(load_at_start: str) -> str:
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"load average (1, 5, 15 min) at the start {load_at_start}, at the end {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run of every path")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("scan.md"))
    ap.add_argument("--max-load", type=float, default=None, help="first wait for a 1-minute load below this")
    args = ap.parse_args()
    if args.max_load is not None:
        wait_for_quiet(args.max_load)
    load_at_start = load_average()
    backends = ["ref", "loop", "native"]
    backends = [b for b in backends if b in available_backends()]
    start = time.perf_counter()
    results = [run_case(case, backends, args.quick) for case in plan(args.quick)]
    text = table(results) + "\n\n" + verdict(results)
    print(text)
    cmd = ".venv/bin/python benchmarks/scan.py" + (" --quick" if args.quick else "")
    cmd += f" --max-load {args.max_load:g}" if args.max_load is not None else ""
    doc = (f"# Selective scan on the CPU\n\n{__doc__.split(chr(10), 1)[1].strip()}\n\n"
           f"Machine: {machine(load_at_start)}.\nCommand: `{cmd}` ({time.perf_counter() - start:.0f} s). "
           f"Times are wall clock, the best of the repeats (1 for ref/loop, 5 for native and the floor)."
           f"\n\n{text}\n")
    if not args.quick:
        args.out.write_text(doc)
    print(f"Command: {cmd}; wrote {args.out}" if not args.quick else f"Command: {cmd} (smoke run, nothing written)")


if __name__ == "__main__":
    main()
