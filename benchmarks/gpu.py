"""The GPU compute path, measured on one CUDA device in one run of under 8 minutes.

1. Correctness on the device: the scan backends against the reference (float32: every output and gradient within
   1e-5 of the largest reference value; bfloat16 inputs over 1100 steps against float64).
2. The selective scan, forward and forward+backward, in the two regimes pks4 meets, with bfloat16 inputs laid out
   as the mixer passes them (transposed views) and float32 A, D, delta_bias: PKS4 (1568 sequences = 8 frames x
   196 patches, d_inner 1536, L = T = 8 / 16 / 32) and VideoMamba (batch 8, d_inner 768, L = 1569 / 3137), for
   ``triton`` against ``loop`` (and ``mamba_ssm`` where it is importable). Peak memory: torch.cuda
   max_memory_allocated above the level before the call, over the inputs' bytes.
3. One training step (forward, cross-entropy, backward, AdamW; bf16 autocast) of PKS4-B/16 (batch 32 x 8 x 224)
   and VideoMamba-S (batch 32 x 8 x 224): time, max_memory_allocated, clips/s; then inference clips/s.
4. Launch configurations of the Triton kernels (tile size, steps per chunk, warps; chunk 1 = a sequential walk
   over time) on VideoMamba L = 1569 and PKS4 T = 16, forward+backward.

Sections run in that order and each is skipped once the time budget (``--budget-s``) is spent. Results go to
``benchmarks/gpu.md`` and ``benchmarks/gpu.json`` (``--out`` for another folder). Without CUDA the script refuses;
``--smoke`` runs every section at tiny sizes on whatever device there is (on a CPU the Triton kernels need
``TRITON_INTERPRET=1``, which the script sets for itself before Triton is imported), so that a CPU test keeps it
working.

    .venv/bin/python benchmarks/gpu.py            # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _early_interpreter_switch() -> None:
    """--smoke without CUDA: Triton's interpreter must be on before anything imports Triton."""
    if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


_early_interpreter_switch()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pks4.ssm import scan_triton  # noqa: E402
from pks4.ssm.scan import available_backends, resolve_backend, selective_scan  # noqa: E402



@dataclass
class Plan:
    """Sizes of one run: the real ones, or the smoke run's."""

    pks4_cases: list[tuple[int, int, int]]        # (batch, d_inner, L)
    videomamba_cases: list[tuple[int, int, int]]
    checks: list[tuple[int, int, int, int, str]]  # (batch, d_inner, L, d_state, dtype)
    models: list[tuple[str, dict, int, int, int]]  # (registry name, overrides, batch, frames, native size)
    sweep_cases: list[tuple[int, int, int]]
    sweep_configs: list[tuple[int, int, int]]     # (tile elements, max chunk, warps)
    d_state: int = 16
    repeats: int = 10
    loop_repeats: int = 3


def full_plan() -> Plan:
    return Plan(pks4_cases=[(1568, 1536, t) for t in (8, 16, 32)],
                videomamba_cases=[(8, 768, 1569), (8, 768, 3137)],
                checks=[(4, 96, 40, 16, "float32"), (3, 37, 300, 5, "float32"), (2, 64, 1100, 16, "bfloat16")],
                models=[("pks4_vit_b16", {"num_classes": 174}, 32, 8, 224),
                        ("videomamba_small", {"num_classes": 400}, 32, 8, 224)],
                sweep_cases=[(8, 768, 1569), (1568, 1536, 16)],
                sweep_configs=[(4096, 32, 8), (4096, 32, 4), (2048, 32, 4), (8192, 32, 8), (4096, 16, 4),
                               (8192, 64, 8), (1024, 1, 4)])


def smoke_plan() -> Plan:
    return Plan(pks4_cases=[(2, 4, 4)], videomamba_cases=[(1, 2, 9)], checks=[(1, 3, 5, 4, "float32")],
                models=[("pks4_vit_tiny", {}, 1, 2, 64), ("videomamba_li_micro", {"depth": 1}, 1, 2, 64)],
                sweep_cases=[(1, 2, 9)], sweep_configs=[(16, 2, 4)], d_state=4, repeats=1, loop_repeats=1)


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# ---- device helpers -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one untimed warm-up (which also compiles kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """max_memory_allocated above the level before the call (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def attempt(what: str, fn, errors: list):
    """Run one measurement; an exception is recorded (and printed), not raised, so one failure leaves the rest."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - every failure is reported in the results
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        errors.append({"what": what, "error": f"{type(err).__name__}: {err}"[:500]})
        print(f"  {what}: FAILED {errors[-1]['error']}", flush=True)
        traceback.print_exc(limit=3)
        return None


# ---- the scan -----------------------------------------------------------------------------------------------
def scan_inputs(batch: int, dim: int, L: int, N: int, device: torch.device, dtype: torch.dtype,
                grad: bool) -> tuple[dict, list]:
    """Inputs in the mixer's layouts (u contiguous; delta, z, B, C transposed views of (batch, L, .) tensors)
    and the leaf tensors their gradients reach."""
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, device=device)).to(dtype)  # noqa: E731
    leaves = {"u": r(batch, dim, L), "delta": r(batch, L, dim, scale=0.5), "xz": r(batch, L, 2 * dim),
              "BC": r(batch, L, 2 * N), "A": -torch.rand(dim, N, generator=g, device=device) - 0.2,
              "D": torch.randn(dim, generator=g, device=device),
              "delta_bias": torch.randn(dim, generator=g, device=device) - 2.0}
    for t in leaves.values():
        t.requires_grad_(grad)
    x = {"u": leaves["u"], "delta": leaves["delta"].transpose(1, 2), "A": leaves["A"],
         "B": leaves["BC"][..., :N].transpose(1, 2), "C": leaves["BC"][..., N:].transpose(1, 2), "D": leaves["D"],
         "z": leaves["xz"][..., dim:].transpose(1, 2), "delta_bias": leaves["delta_bias"]}
    return x, list(leaves.values())


def scan_fns(x: dict, leaves: list, backend: str):
    def fwd():
        with torch.no_grad():
            selective_scan(**x, backend=backend)

    def fwd_bwd():
        out = selective_scan(**x, backend=backend)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return fwd, fwd_bwd


def measure_scan(regime: str, case: tuple[int, int, int], backend: str, device: torch.device, plan: Plan) -> dict:
    batch, dim, L = case
    x, leaves = scan_inputs(batch, dim, L, plan.d_state, device, torch.bfloat16, grad=True)
    in_mib = sum(t.numel() * t.element_size() for t in leaves) / 2**20
    fwd, fwd_bwd = scan_fns(x, leaves, backend)
    repeats = plan.loop_repeats if backend == "loop" else plan.repeats
    row = {"regime": regime, "batch": batch, "d_inner": dim, "L": L, "backend": backend, "input_mib": in_mib,
           "fwd_ms": best_ms(fwd, device, repeats), "fwd_bwd_ms": best_ms(fwd_bwd, device, repeats)}
    peak = peak_mib(fwd_bwd, device)
    row["fwd_bwd_peak_x_inputs"] = None if peak is None else peak / in_mib
    print(f"  scan {regime} L={L} {backend}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms",
          flush=True)
    return row


def rel_errors(got: list, ref: list) -> list[float]:
    return [((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-30)).item()
            for a, b in zip(got, ref)]


def check_backend(case: tuple[int, int, int, int, str], backend: str, device: torch.device) -> dict:
    """Max relative error of out, last state and the 8 gradients against the reference (float64 for bf16)."""
    batch, dim, L, N, dtype_name = case
    dtype = getattr(torch, dtype_name)
    x, _ = scan_inputs(batch, dim, L, N, device, dtype, grad=False)
    x = {k: v.detach().contiguous() for k, v in x.items()}
    ref_dtype = torch.float64 if dtype == torch.bfloat16 else dtype

    def outputs_and_grads(inputs, name):
        inputs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        out, last = selective_scan(**inputs, return_last_state=True, backend=name)
        g = torch.Generator(device=device).manual_seed(1)
        w = torch.randn(out.shape, generator=g, device=device, dtype=torch.float64)
        loss = (out.double() * w).sum() + last.double().square().sum()
        return [out, last, *torch.autograd.grad(loss, list(inputs.values()))]

    got = outputs_and_grads(x, backend)
    ref = outputs_and_grads({k: v.to(ref_dtype) for k, v in x.items()}, "ref")
    errors = rel_errors(got, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    row = {"case": list(case), "backend": backend, "max_rel_error": max(errors), "tolerance": tol,
           "errors": dict(zip(["out", "last", *x], errors)), "passed": max(errors) <= tol}
    print(f"  check {case} {backend}: max rel error {row['max_rel_error']:.2e} "
          f"({'ok' if row['passed'] else 'FAIL'})", flush=True)
    return row


# ---- whole models ---------------------------------------------------------------------------------------------
def build(name: str, overrides: dict, device: torch.device):
    from pks4.models.registry import create_model

    return create_model(name, **overrides).to(device)


def train_step(model, x: torch.Tensor, autocast: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_model(spec: tuple, device: torch.device, plan: Plan) -> dict:
    """Training step (bf16 autocast): time, peak memory, clips/s; then inference clips/s. With activation
    checkpointing only if the plain step runs out of memory."""
    name, overrides, batch, frames, size = spec
    torch.manual_seed(0)
    model = build(name, overrides, device).train()
    x = torch.randn(batch, frames, 3, size, size, device=device)
    row = {"model": name, "batch": batch, "frames": frames, "size": size, "autocast": "bf16",
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "grad_checkpointing": False,
           "scan_backend": resolve_backend("auto", device, torch.bfloat16)}
    step = train_step(model, x, autocast=True)
    try:
        row["train_peak_mib"] = peak_mib(step, device)  # also the warm-up: compiles the kernels
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        model.set_grad_checkpointing(True)
        row["grad_checkpointing"] = True
        step = train_step(model, x, autocast=True)
        row["train_peak_mib"] = peak_mib(step, device)
    row["train_step_ms"] = best_ms(step, device, max(1, plan.repeats // 3))
    row["train_clips_per_s"] = batch / row["train_step_ms"] * 1e3
    model.eval()

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    row["infer_ms"] = best_ms(infer, device, max(1, plan.repeats // 3))
    row["infer_clips_per_s"] = batch / row["infer_ms"] * 1e3
    print(f"  {name}: train step {row['train_step_ms']:.0f} ms, peak {row['train_peak_mib']} MiB, "
          f"inference {row['infer_clips_per_s']:.1f} clips/s", flush=True)
    return row


# ---- launch configurations of the Triton kernels --------------------------------------------------------------
def measure_config(case: tuple[int, int, int], config: tuple[int, int, int], device: torch.device,
                   plan: Plan) -> dict:
    saved = (scan_triton._TILE_ELEMS, scan_triton._MAX_CHUNK, scan_triton._NUM_WARPS)
    scan_triton._TILE_ELEMS, scan_triton._MAX_CHUNK, scan_triton._NUM_WARPS = config
    try:
        batch, dim, L = case
        x, leaves = scan_inputs(batch, dim, L, plan.d_state, device, torch.bfloat16, grad=True)
        fwd, fwd_bwd = scan_fns(x, leaves, "triton")
        row = {"batch": batch, "d_inner": dim, "L": L, "tile_elems": config[0], "max_chunk": config[1],
               "num_warps": config[2], "fwd_ms": best_ms(fwd, device, plan.repeats),
               "fwd_bwd_ms": best_ms(fwd_bwd, device, plan.repeats)}
    finally:
        scan_triton._TILE_ELEMS, scan_triton._MAX_CHUNK, scan_triton._NUM_WARPS = saved
    print(f"  config {config} on {case}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms", flush=True)
    return row


# ---- the run --------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "mamba_ssm": version("mamba_ssm"), "python": platform.python_version(),
            "triton_interpreter": scan_triton.interpreting()}


def run_all(plan: Plan, device: torch.device, budget: Budget) -> dict:
    res = {"environment": environment(device), "checks": [], "scan": [], "models": [], "configs": [],
           "errors": [], "skipped": []}
    backends = ["triton"] + (["mamba_ssm"] if "mamba_ssm" in available_backends(device) else []) + ["loop"]
    jobs = [("checks", f"check {case} {b}", lambda case=case, b=b: check_backend(case, b, device))
            for case in plan.checks for b in backends]
    jobs += [("scan", f"scan {regime} {case} {b}", lambda regime=regime, case=case, b=b: measure_scan(
        regime, case, b, device, plan))
             for regime, cases in (("PKS4", plan.pks4_cases), ("VideoMamba", plan.videomamba_cases))
             for case in cases for b in backends]
    jobs += [("models", f"model {spec[0]}", lambda spec=spec: measure_model(spec, device, plan))
             for spec in plan.models]
    jobs += [("configs", f"config {cfg} {case}", lambda case=case, cfg=cfg: measure_config(case, cfg, device, plan))
             for case in plan.sweep_cases for cfg in plan.sweep_configs]
    for section, what, job in jobs:
        if budget.left() < 30:
            res["skipped"].append(what)
            continue
        row = attempt(what, job, res["errors"])
        if row is not None:
            res[section].append(row)
    res["elapsed_s"] = budget.seconds - budget.left()
    return res


def _speedups(scan_rows: list[dict]) -> list[str]:
    by = {(r["regime"], r["L"], r["backend"]): r for r in scan_rows}
    lines = ["| regime | batch x d_inner | L | backend | fwd ms | fwd+bwd ms | loop / this, fwd | loop / this, "
             "fwd+bwd | this / mamba_ssm, fwd+bwd | peak fwd+bwd (x inputs) |", "|" + "---|" * 10]
    for r in scan_rows:
        loop, mamba = by.get((r["regime"], r["L"], "loop")), by.get((r["regime"], r["L"], "mamba_ssm"))
        ratio = lambda a, b, k: f"{a[k] / b[k]:.1f}x" if a and b else "-"  # noqa: E731
        peak = r["fwd_bwd_peak_x_inputs"]
        lines.append(f"| {r['regime']} | {r['batch']} x {r['d_inner']} | {r['L']} | {r['backend']} | {r['fwd_ms']:.2f} "
                     f"| {r['fwd_bwd_ms']:.2f} | {ratio(loop, r, 'fwd_ms')} | {ratio(loop, r, 'fwd_bwd_ms')} "
                     f"| {ratio(r, mamba, 'fwd_bwd_ms')} | {'-' if peak is None else f'{peak:.2f}'} |")
    return lines


def _targets(res: dict) -> list[str]:
    """The issue's targets, each with the measured value (or why it could not be judged)."""
    by = {(r["regime"], r["L"], r["backend"]): r for r in res["scan"]}
    out = []
    tri, loop, mamba = (by.get(("VideoMamba", 1569, b)) for b in ("triton", "loop", "mamba_ssm"))
    if tri and loop:
        s = loop["fwd_bwd_ms"] / tri["fwd_bwd_ms"]
        out.append(f"- triton >= 50x faster than loop, VideoMamba L = 1569 fwd+bwd: {s:.1f}x "
                   f"({'met' if s >= 50 else 'NOT met'})")
    if tri and mamba:
        s = tri["fwd_bwd_ms"] / mamba["fwd_bwd_ms"]
        out.append(f"- triton within 3x of mamba_ssm there: {s:.2f}x ({'met' if s <= 3 else 'NOT met'})")
    pks4 = next((m for m in res["models"] if m["model"] == "pks4_vit_b16"), None)
    if pks4 and pks4["train_peak_mib"] is not None:
        gib = pks4["train_peak_mib"] / 1024
        out.append(f"- PKS4-B/16 batch 32 x 8 x 224 bf16 training-step peak under 24 GiB: {gib:.1f} GiB "
                   f"({'met' if gib < 24 else 'NOT met'}; PKS4 Table 1: 21.8 GB)")
    return out or ["- not judged: the cases they need were not measured in this run"]


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]


def write_report(res: dict, out: Path, command: str) -> None:
    env = res["environment"]
    doc = __doc__.split("\n\n    .venv")[0]
    lines = ["# GPU compute path", "", doc.split("\n", 1)[1].strip(), "",
             f"Command: `{command}` ({res['elapsed_s']:.0f} s). Device: {env['device']}; torch {env['torch']} "
             f"(CUDA {env['cuda']}), triton {env['triton']}, mamba_ssm {env['mamba_ssm'] or 'not installed'}"
             f"{', Triton interpreter (smoke run: the times mean nothing)' if env['triton_interpreter'] else ''}.",
             "", "## Targets", "", *_targets(res), "", "## Correctness on the device", "",
             *_table([{**r, "case": tuple(r["case"])} for r in res["checks"]],
                     ["case", "backend", "max_rel_error", "tolerance", "passed"]),
             "", "## Selective scan (bf16 inputs, float32 state), best of repeats", "", *_speedups(res["scan"]),
             "", "## Training step and inference (bf16 autocast)", "",
             *_table(res["models"], ["model", "batch", "frames", "size", "params_m", "scan_backend",
                                     "grad_checkpointing", "train_step_ms", "train_peak_mib", "train_clips_per_s",
                                     "infer_clips_per_s"]),
             "", "## Triton launch configurations (fwd+bwd)", "",
             *_table(res["configs"], ["batch", "d_inner", "L", "tile_elems", "max_chunk", "num_warps", "fwd_ms",
                                      "fwd_bwd_ms"]), ""]
    if res["errors"]:
        lines += ["## Failures", "", *[f"- {e['what']}: {e['error']}" for e in res["errors"]], ""]
    if res["skipped"]:
        lines += ["## Skipped (time budget spent)", "", *[f"- {s}" for s in res["skipped"]], ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text("\n".join(lines))
    (out / "gpu.json").write_text(json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (a CPU test runs this)")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu.md and gpu.json (default: benchmarks/; "
                    "a smoke run needs one)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new measurements after this long")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.smoke and args.out is None:
        ap.error("--smoke needs --out (it must not overwrite the measured benchmarks/gpu.md)")
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("benchmarks/gpu.py measures a CUDA GPU and none is available here (torch.cuda.is_available() is "
              "False); nothing was measured. Use --smoke --out DIR for a tiny run on this machine.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    res = run_all(smoke_plan() if args.smoke else full_plan(), device, Budget(args.budget_s))
    command = "python benchmarks/gpu.py" + (" --smoke" if args.smoke else "")
    write_report(res, args.out or HERE, command)
    print(f"wrote {(args.out or HERE) / 'gpu.md'} and gpu.json ({res['elapsed_s']:.0f} s, "
          f"{len(res['errors'])} failures, {len(res['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
