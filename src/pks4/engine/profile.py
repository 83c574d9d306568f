"""Measuring a model: parameters, FLOPs, latency, peak memory and total training compute (`pks4 profile`).

FLOPs follow the papers' convention: ONE multiply-add = ONE FLOP (PyTorch's counter reports 2 per multiply-add;
everything here is halved back). Matmuls and convolutions are counted by ``torch.utils.flop_counter``; the
operations it cannot see are counted analytically, per call, from the shapes:

* **attention** (``F.scaled_dot_product_attention``, fused on every device): B*h*Lq*Lk*(E + Ev) multiply-adds
  (Q K^T and the weighted sum of V; softmax not counted). Intercepted at the function level, so the count is
  the same whatever kernel the device would pick (on the meta device SDPA decomposes into bmm, on CPU it is a
  fused flash kernel the counter has no formula for). CLIP ViT-B/16 at 224: 17.56 G per frame with attention,
  16.85 G without.
* **the selective scan** (:func:`pks4.ssm.scan.selective_scan`, a C++ kernel on CPU): per channel, step and
  state element 4 multiplies (delta*A, B*(delta*u), decay*h + inject, C*h accumulated), per channel and step
  1 (delta*u) + 1 for the D skip + 1 for the silu(z) gate: batch*d_inner*L*(4*d_state + 3) multiply-adds.
  exp/softplus/silu themselves are not counted, as no activation is.
* **the PKS4 correlation volume** (:func:`pks4.models.pks4.correlation_scores`, Eq. 15): K * w^2 * C
  multiply-adds per token, the operator's own cost. The implementation may spend more (the fast path computes
  all N x N similarities with one matmul and gathers the windows: N / w^2 = 2.4x for 14x14 patches and 9x9),
  so while counting, the operator's call (which torch function modes see, by its design) is answered by a
  stand-in and its internals are not counted.

Two switches reproduce the published tables (see ``benchmarks/README.md`` for the numbers):

* ``count_attention=False``: PKS4's own GFLOPs (Tables 1-3) match a count WITHOUT attention (PKS4-L/14 at
  16 frames: 1283 G without vs 1334 G with; paper 1285.8).
* ``count_mamba_inner=False``: VideoMamba's published GFLOPs (9/34/101 for Ti/S/M at 8x224) count only the
  Mamba in/out projections: the depthwise conv, x_proj, dt_proj and the scan run inside mamba_ssm's fused
  kernel, which their tracing counter cannot see. With everything counted the same models cost ~20% more.

Training compute: total = multiplier * forward FLOPs per clip * clips per epoch * epochs, with multiplier 6
(PKS4 Table 2's figures follow from this; in real FLOPs = 2 per multiply-add this is the usual
"forward + backward = 3 x forward").
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, \
    sdpa_flop_count

from pks4.data.sampling import ViewSpec, parse_views

__all__ = [
    "FlopConvention", "FlopReport", "count_flops", "profile_model", "training_compute", "attention_macs",
    "scan_macs", "correlation_macs", "register_cpu_attention_formulas", "format_profile",
    "build_model", "native_size", "PeakMemory", "time_call", "train_step_fn", "saved_activation_bytes",
    "TRAINING_FLOP_MULTIPLIER",
]

TRAINING_FLOP_MULTIPLIER = 6.0  # PKS4 Table 2: "6 x forward FLOPs per training clip"


@dataclass(frozen=True)
class FlopConvention:
    """What a FLOP count includes (one multiply-add = one FLOP in every case)."""

    count_attention: bool = True  # False reproduces PKS4's published GFLOPs
    count_mamba_inner: bool = True  # False reproduces VideoMamba's (conv1d, x_proj, dt_proj, scan left out)


@dataclass
class FlopReport:
    """Multiply-adds of one forward pass, in total, per top-level module and per operation."""

    total: int
    per_module: dict[str, int]
    per_op: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.total / 1e9


# ---- analytic formulas (multiply-adds) ---------------------------------------------------------------------
def attention_macs(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """Q K^T plus P V for q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev); leading dims are batch and heads."""
    lead = 1
    for s in q_shape[:-2]:
        lead *= s
    return lead * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def scan_macs(batch: int, d_inner: int, length: int, d_state: int, with_d: bool = True, with_z: bool = True) -> int:
    """Selective scan (Mamba-1 Eq. 2a-2b): 4 multiplies per state element and step, 1-3 per channel and step."""
    return batch * d_inner * length * (4 * d_state + 1 + int(with_d) + int(with_z))


def correlation_macs(tokens: int, num_offsets: int, window: int, channels: int) -> int:
    """PKS4 Eq. 15: each token is dotted with K * w^2 neighbours of C channels."""
    return tokens * num_offsets * window**2 * channels


def register_cpu_attention_formulas() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention ops (missing in PyTorch's registry), for any user."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ---- counting ------------------------------------------------------------------------------------------------
def _add(counter: FlopCounterMode, key: str, macs: int) -> None:
    """Book analytic multiply-adds on every module currently running, in the counter's unit (2 per MAC)."""
    for parent in set(counter.mod_tracker.parents):
        counter.flop_counts[parent][key] += 2 * macs


class _AttentionCounter(TorchFunctionMode):
    """Counts SDPA calls from their shapes and returns a zero output of the right shape (values are not
    needed to count FLOPs, and skipping the kernel keeps meta-device counting fast)."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            _add(self.counter, "attention", attention_macs(q.shape, k.shape, v.shape))
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


def _scan_standin(counter: FlopCounterMode) -> Callable:
    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       return_last_state=False, backend="auto"):
        batch, dim, length = u.shape
        _add(counter, "selective_scan", scan_macs(batch, dim, length, A.shape[1], D is not None, z is not None))
        out = torch.zeros_like(u)
        return (out, u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)) if return_last_state else out

    return selective_scan


class _CorrelationCounter(TorchFunctionMode):
    """Counts each call of the PKS4 correlation operator from its shapes and returns zero scores of the right
    shape: :func:`pks4.models.pks4.correlation_scores` takes part in torch's function-override protocol, so
    the operator is seen here as one call, whichever path (``correlation`` config switch) would compute it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from pks4.models.pks4 import correlation_scores

        kwargs = kwargs or {}
        if func is correlation_scores:
            f, offsets, window = args[0], args[1], args[2]
            b, t, h, w, c = f.shape
            _add(self.counter, "correlation", correlation_macs(b * t * h * w, len(offsets), window, c))
            return f.new_zeros(b, t, h, w, len(offsets) * window**2)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _swap_functions(replacements: dict[Callable, Callable]) -> Iterator[None]:
    """Replace module-level functions wherever a pks4 module imported them, for the duration of a count."""
    by_id = {id(old): new for old, new in replacements.items()}  # identity: module attributes may be unhashable
    swapped = []
    for module in [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "pks4" and m is not None]:
        for attr, value in list(vars(module).items()):
            if id(value) in by_id:
                swapped.append((module, attr, value))
                setattr(module, attr, by_id[id(value)])
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}


def _run_counted(model: nn.Module, x: torch.Tensor, on_meta: bool) -> FlopCounterMode:
    from pks4.ssm.scan import selective_scan

    counter = FlopCounterMode(display=False)
    swaps = {selective_scan: _scan_standin(counter)}
    with _swap_functions(swaps), counter, _AttentionCounter(counter), _CorrelationCounter(counter), \
            torch.no_grad():
        if on_meta:
            torch.func.functional_call(model, _meta_state(model), (x.to("meta"),), strict=False)
        else:
            model(x)
    return counter


def count_flops(model: nn.Module, frames: int, size: int, batch: int = 1,
                convention: FlopConvention = FlopConvention()) -> FlopReport:
    """Multiply-adds of one forward pass of ``model`` on a (batch, frames, 3, size, size) clip.

    Runs on the meta device (shapes only, no arithmetic: ViT-L/14 at 16 frames counts in a few seconds);
    falls back to a real forward pass on the model's device if the model does something meta cannot.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(batch, frames, 3, size, size, device="meta")
    try:
        try:
            counter = _run_counted(model, x, on_meta=True)
        except (NotImplementedError, RuntimeError) as err:
            if device.type == "meta":
                raise RuntimeError(f"cannot count FLOPs of {type(model).__name__} on the meta device: {err}") from err
            counter = _run_counted(model, torch.zeros(x.shape, device=device), on_meta=False)
    finally:
        model.train(was_training)
    return _report(model, counter, convention)


def _module_total(counts: dict[str, dict[Any, int]], fqn: str, op: str | None = None) -> int:
    row = counts.get(fqn, {})
    return row.get(op, 0) if op is not None else sum(row.values())


def _per_child(counts: dict[str, dict[Any, int]], root: str, children: list[str], op: str | None = None
               ) -> dict[str, int]:
    """Totals per top-level child. A child whose methods are called (not its forward) is never entered by the
    counter's module tracker, so it is summed over its outermost entered descendants (each op is booked on
    every entered ancestor: summing nested entries would count it twice)."""
    out = {}
    for child in children:
        prefix = f"{root}.{child}"
        keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
        outer = [k for k in keys if not any(k.startswith(o + ".") for o in keys)]
        out[child] = sum(_module_total(counts, k, op) for k in outer)
    return out


def _mamba_inner(model: nn.Module, counts: dict[str, dict[Any, int]], root: str) -> dict[str, int]:
    """Per top-level child: what mamba_ssm's fused kernel hides (mixer minus its in_proj and out_proj)."""
    from pks4.ssm.mixer import MambaMixer

    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MambaMixer):
            fqn = f"{root}.{name}"
            inner = (_module_total(counts, fqn) - _module_total(counts, f"{fqn}.in_proj")
                     - _module_total(counts, f"{fqn}.out_proj"))
            out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + inner
    return out


def _report(model: nn.Module, counter: FlopCounterMode, convention: FlopConvention) -> FlopReport:
    """Halve the counter's numbers (papers: 1 multiply-add = 1 FLOP) and apply the convention."""
    counts = counter.get_flop_counts()
    root = type(model).__name__
    children = [name for name, _ in model.named_children()]
    per_op = {k if isinstance(k, str) else str(k).split(".")[-1]: v for k, v in counts.get("Global", {}).items()}
    per_module = _per_child(counts, root, children)
    left_out = {name: 0 for name in children}  # what the convention does not count, per top-level child
    if not convention.count_attention:
        for name, n in _per_child(counts, root, children, "attention").items():
            left_out[name] += n
        per_op.pop("attention", None)
    if not convention.count_mamba_inner:
        inner = _mamba_inner(model, counts, root)
        for name, n in inner.items():
            left_out[name] += n
        if inner:
            per_op["mamba_inner_left_out"] = -sum(inner.values())
    per_module = {name: (n - left_out[name]) // 2 for name, n in per_module.items()}
    total = (_module_total(counts, "Global") - sum(left_out.values())) // 2
    per_module["(other)"] = total - sum(per_module.values())  # ops run directly in the root's own methods
    return FlopReport(total=total, per_module=per_module, per_op={k: v // 2 for k, v in per_op.items()})


# ---- building models for measurement ------------------------------------------------------------------------
def _config_fields(cfg: Any) -> set[str]:
    """Field names of a model config and of its nested dataclass configs (what create_model accepts)."""
    names = {f.name for f in fields(cfg)}
    for f in fields(cfg):
        sub = getattr(cfg, f.name)
        if is_dataclass(sub):
            names |= {g.name for g in fields(sub)}
    return names


def build_model(name: str, frames: int | None = None, size: int | None = None, num_classes: int | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Registry model with the overrides its config understands; ``device="meta"`` allocates nothing (falls
    back to CPU for a model whose constructor needs real values)."""
    from pks4.models.registry import create_model, get_spec

    spec = get_spec(name)
    known = _config_fields(spec.config_cls(**spec.defaults))
    wanted = {"num_frames": frames, "image_size": size, "img_size": size, "num_classes": num_classes}
    overrides = {k: v for k, v in wanted.items() if v is not None and k in known}
    try:
        with torch.device(device):
            return create_model(name, **overrides)
    except (NotImplementedError, RuntimeError):
        if torch.device(device).type != "meta":
            raise
        return create_model(name, **overrides)


def native_size(model: nn.Module, default: int = 224) -> int:
    """The input resolution a model was configured for (its config's image_size, or that of its backbone)."""
    cfg = getattr(model, "config", None)
    for holder in (cfg, getattr(cfg, "backbone", None)):
        for key in ("image_size", "img_size"):
            if holder is not None and isinstance(getattr(holder, key, None), int):
                return getattr(holder, key)
    return default


# ---- time and memory ----------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA max allocated on a GPU, sampled process RSS on CPU
    (a thread reads /proc/self/statm every millisecond; allocations freed between two samples are missed)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = (peak - self._base) / 2**20


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` untimed ones."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def train_step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One optimisation step (forward, cross-entropy, backward, AdamW). lr = 0 so the weights stay as given;
    the optimizer state is still allocated, as in real training."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0) if params else None
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step() -> None:
        loss = F.cross_entropy(model(x), labels)
        if params:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training forward (model + cross-entropy): every tensor
    an op saves, counted once per storage, parameters left out.

    This is the activation memory the PKS4 paper's section 4.3.1 argues about, measured exactly and on any
    device: it does not include the weights, their gradients and optimizer state (computable from the parameter
    counts) or short-lived workspace. It is linear in the batch size, so a measurement at a small batch scales to
    the paper's batch (benchmarks/train_memory.py checks the linearity).
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    try:
        # the graph holds every packed tensor until `loss` dies, so no storage is freed and reused meanwhile
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), labels)
        del loss
    finally:
        model.train(was_training)
    return sum(saved.values())


# ---- the profile --------------------------------------------------------------------------------------------
def _params(model: nn.Module) -> dict[str, Any]:
    per_module = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        per_module["(own)"] = own
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params_per_module": per_module}


def _measure(model: nn.Module, x: torch.Tensor, train: bool, warmup: int, repeats: int) -> dict[str, float]:
    """Peak memory of the first call (cold: activations, gradients, optimizer state), then timed repeats."""
    was_training = model.training
    model.train(train)
    fn = train_step_fn(model, x) if train else (lambda: model(x))
    ctx = contextlib.nullcontext() if train else torch.no_grad()
    try:
        with ctx:
            with PeakMemory(x.device) as mem:
                fn()
            times = time_call(fn, x.device, max(warmup - 1, 0), repeats)
    finally:
        model.train(was_training)
    latency = statistics.median(times)
    return {"latency_ms": latency, "throughput": x.shape[0] / latency * 1e3, "peak_mem_mb": mem.peak_mb}


def profile_model(model: nn.Module, frames: int | None = None, size: int | None = None, batch: int = 1,
                  views: ViewSpec | str | None = None, train: bool = False, repeats: int = 5, warmup: int = 1,
                  convention: FlopConvention = FlopConvention(), timing: bool = True) -> dict[str, Any]:
    """Parameters, FLOPs, latency, throughput and peak memory of ``model`` on (batch, frames, 3, size, size).

    Keys (stable): ``params, trainable_params, params_per_module, gflops_per_view, gflops_total`` (x clips x
    crops), ``gflops_per_module``, ``latency_ms`` (median of ``repeats`` forward passes after ``warmup``),
    ``throughput`` (clips/s), ``peak_mem_mb`` (inference), and with ``train`` ``train_latency_ms,
    train_throughput, train_peak_mem_mb`` (one forward + backward + AdamW step) and ``train_activation_mb``
    (what autograd saves for the backward, see :func:`saved_activation_bytes`). Timing keys are None with
    ``timing=False`` or on the meta device.
    """
    if isinstance(views, str):
        views = parse_views(views)
    frames = frames or (views.frames if views else getattr(getattr(model, "config", None), "num_frames", 8))
    views = ViewSpec(frames, views.clips, views.crops) if views else ViewSpec(frames)
    size = size or native_size(model)
    flops = count_flops(model, frames, size, 1, convention)
    out: dict[str, Any] = {"model": getattr(model, "model_name", type(model).__name__), "frames": frames,
                           "size": size, "batch": batch, "views": f"{views.frames}x{views.clips}x{views.crops}",
                           **_params(model), "gflops_per_view": flops.total / 1e9,
                           "gflops_total": flops.total * views.clips * views.crops / 1e9,
                           "gflops_per_module": {k: v / 1e9 for k, v in flops.per_module.items()},
                           "flop_convention": {f.name: getattr(convention, f.name) for f in fields(convention)}}
    keys = ["latency_ms", "throughput", "peak_mem_mb"]
    out.update(dict.fromkeys(keys + ["train_" + k for k in keys] + ["train_activation_mb"] if train else keys))
    device = next(model.parameters()).device
    if timing and device.type != "meta":
        x = torch.randn(batch, frames, 3, size, size, device=device)
        out.update(_measure(model, x, False, warmup, repeats))
        if train:
            out.update({"train_" + k: v for k, v in _measure(model, x, True, warmup, repeats).items()})
            out["train_activation_mb"] = saved_activation_bytes(model, x) / 2**20
    return out


def training_compute(model_name: str, frames: int, epochs: float, dataset_size: int, size: int = 224,
                     multiplier: float = TRAINING_FLOP_MULTIPLIER, visible_fraction: float = 1.0,
                     convention: FlopConvention = FlopConvention()) -> float:
    """Total training compute in EFLOPs: multiplier x forward FLOPs per clip x dataset_size x epochs.

    ``visible_fraction`` scales the forward cost for masked pretraining, where the student sees only the
    unmasked tokens (0.2 for UMT-style 80% masking; the teacher's forward is not included, as in PKS4 Table 2).
    """
    model = build_model(model_name, frames=frames, size=size, device="meta")
    per_clip = count_flops(model, frames, size, 1, convention).total * visible_fraction
    return multiplier * per_clip * dataset_size * epochs / 1e18


# ---- the report as text --------------------------------------------------------------------------------------
def format_profile(r: dict[str, Any]) -> str:
    """A :func:`profile_model` report as the text ``pks4 profile`` prints."""
    lines = [f"{r['model']}  frames {r['frames']}  size {r['size']}  views {r['views']}  batch {r['batch']}",
             f"params            {r['params'] / 1e6:.2f}M ({r['trainable_params'] / 1e6:.2f}M trainable)",
             f"GFLOPs per view   {r['gflops_per_view']:.2f}   total ({r['views']}) {r['gflops_total']:.2f}"]
    for name, g in r["gflops_per_module"].items():
        lines.append(f"  {name:<16}{g:9.2f} GFLOPs  {r['params_per_module'].get(name, 0) / 1e6:8.2f}M params")
    for prefix, label in (("", "inference"), ("train_", "train step")):
        if r.get(prefix + "latency_ms") is not None:
            lines.append(f"{label:<18}{r[prefix + 'latency_ms']:.1f} ms  {r[prefix + 'throughput']:.2f} clips/s  "
                         f"peak memory +{r[prefix + 'peak_mem_mb']:.0f} MiB")
    if r.get("train_activation_mb") is not None:
        lines.append(f"{'saved activations':<18}{r['train_activation_mb']:.0f} MiB (kept for the backward pass)")
    return "\n".join(lines)
