"""``pks4 export``: a trained model as one ONNX, TorchScript or ExportedProgram file, checked against PyTorch.

The file maps clips ``(batch, frames, 3, size, size)`` (float32, normalised as the run's ``image_mean`` /
``image_std`` say; frames and size fixed per export, from the run's test views and frame size) to logits
``(batch, num_labels)``. The batch dimension is dynamic in all three formats unless a fixed batch is asked for.
Each file carries the Hub ``config.json`` (labels, frames, size, normalisation) plus the input and output
names, under the key ``pks4.json`` (ONNX ``metadata_props``, the archive's extra files otherwise).

What a file needs to load and run:

=================== ==================================== ==========================================
format              written by                           runs with
=================== ==================================== ==========================================
``onnx``            ``torch.onnx.export`` (dynamo)       onnxruntime + numpy (no torch, no pks4)
``torchscript``     ``torch.jit.trace``                  torch
``exported-program`` ``torch.export.export`` (.pt2)      torch (``scan="op"``: torch + pks4)
=================== ==================================== ==========================================

**The scan.** By default every Mamba mixer of the exported copy runs the ``portable`` backend of
:mod:`pks4.ssm.scan_portable`: the recurrence as ONE loop construct of the format (torch's ``scan`` operator in
the ExportedProgram, an ONNX ``Scan``, a TorchScript loop), so no format needs pks4 and none unrolls time
(VideoMamba-Ti at 8 x 224: 1,586 top-level ONNX nodes, 48 of them ``Scan``, in ``benchmarks/export_big.md``;
unrolled, its 48 scans of L = 1569 steps would be 75,312 copies of the step). A custom-op translation would have
served ONNX only; this path serves all three with one definition of the step. ``scan="op"`` keeps the registered
custom op ``pks4::selective_scan`` instead (an ExportedProgram that runs the native kernel, and loads only where
pks4 is imported); the ONNX and TorchScript formats cannot hold that op and say so.

torch 2.13 marks ``torch.jit.trace`` / ``torch.jit.script`` deprecated; TorchScript is still written because
runtimes without Python (LibTorch) load it, and the check shows that the archive works.

**The check.** The file is loaded in a fresh Python process in which importing pks4 fails (and, for ONNX,
importing torch too), run on seeded random clips (two batch sizes when the batch is dynamic) and on real clips
decoded from a video through the run's own test preprocessing (a built-in benchmark clip when no video is
given), and compared with the PyTorch model in this process: the report gives the max abs difference of the
logits per input and whether the top-1 class agrees.
"""
from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from pks4.errors import UserError

__all__ = ["FORMATS", "SCAN_FORMS", "METADATA_KEY", "ExportError", "ExportOptions", "ClipCheck", "ExportReport",
           "export_copy", "export_model", "check_clips", "run_exported", "run_exported_files", "blocked_modules",
           "compare", "export_run"]

FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
SCAN_FORMS = ("portable", "op")
METADATA_KEY = "pks4.json"
INPUT_NAME, OUTPUT_NAME = "clips", "logits"
_EXAMPLE_BATCH = 2  # traced with 2: torch.export specialises a size-1 dimension to the constant 1
_RANDOM_BATCHES = (1, 3)  # neither is the traced batch, so a baked-in batch size cannot pass the check
# What the checking process may not import, per format (and scan form): the file must run without them.
_BLOCKED = {("onnx", "portable"): ("pks4", "torch"), ("torchscript", "portable"): ("pks4",),
            ("exported-program", "portable"): ("pks4",), ("exported-program", "op"): ()}
_NEEDS = {"onnx": "onnxruntime + numpy", "torchscript": "torch", "exported-program": "torch"}


class ExportError(UserError):
    """A format that cannot hold the model, a destination that is in the way, a bad export option."""


@dataclass
class ExportOptions:
    """How ``pks4 export`` writes and checks one file."""

    format: str = "onnx"  # one of FORMATS
    scan: str = "portable"  # "portable": the scan as a loop of plain operators; "op": the pks4 custom op
    batch: int | None = None  # None: dynamic batch dimension; N: every input has batch N
    check: bool = True  # load the file in a fresh process without pks4 and compare it with PyTorch
    check_video: str | None = None  # real clips for the check; None: a built-in benchmark clip
    tolerance: float = 1e-4  # max abs logit difference the check accepts (fp32)
    overwrite: bool = False  # replace an existing file at the destination
    seed: int = 0  # of the random check clips

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.scan not in SCAN_FORMS:
            raise ExportError(f"--scan {self.scan!r}: expected one of {', '.join(SCAN_FORMS)}")
        if self.scan == "op" and self.format != "exported-program":
            raise ExportError(f"--scan op: the {self.format} format cannot hold the custom op "
                              "pks4::selective_scan (only an ExportedProgram can, and it then loads only with pks4 "
                              "imported); use --scan portable")
        if self.batch is not None and (isinstance(self.batch, bool) or self.batch < 1):
            raise ExportError(f"--batch {self.batch!r}: expected 'dynamic' or an int >= 1")
        if not self.tolerance > 0:
            raise ExportError(f"--tolerance {self.tolerance!r}: expected a number > 0")


@dataclass
class ClipCheck:
    """One input of the check: what was fed, its shape, the max abs logit difference, top-1 agreement."""

    clips: str
    shape: tuple[int, ...]
    max_abs_diff: float
    same_top1: bool


@dataclass
class ExportReport:
    """What ``pks4 export`` wrote and what the check measured."""

    path: str
    format: str
    scan: str
    input_shape: list[int | str]  # "batch" where the dimension is dynamic
    needs: str  # what loading and running the file needs
    graph_nodes: int  # top-level nodes of the written graph
    scan_loops: int  # loop nodes in it (one per scan direction; a time loop is never unrolled)
    seconds: float  # export time, without the check
    tolerance: float
    checks: list[ClipCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return all(c.max_abs_diff <= self.tolerance for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "passed": self.passed}

    def summary(self) -> str:
        shape = " x ".join(str(d) for d in self.input_shape)
        lines = [f"wrote {self.path} ({self.format}, input {shape}, {self.graph_nodes} graph nodes, "
                 f"{self.scan_loops} scan loops, {self.seconds:.1f} s); runs with {self.needs}"]
        for c in self.checks:
            lines.append(f"  {c.clips:<40} {tuple(c.shape)}  max abs diff {c.max_abs_diff:.3g}  "
                         f"top-1 {'same' if c.same_top1 else 'DIFFERENT'}")
        if self.checks:
            verdict = "within" if self.passed else "EXCEEDS"
            lines.append(f"max abs diff {self.max_abs_diff:.3g} {verdict} the tolerance {self.tolerance:g}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the model


class _Classifier(nn.Module):
    """The exported function: clips -> logits, one positional tensor (names the ONNX input and output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, clips: Tensor) -> Tensor:
        return self.model(clips)


def export_copy(model: nn.Module, scan: str = "portable") -> nn.Module:
    """A float32 eval copy of ``model`` whose Mamba mixers run the scan as ``scan`` says ("portable": the
    loop exporters keep, see :mod:`pks4.ssm.scan_portable`; "op": the custom op, as trained)."""
    from pks4.ssm.mixer import MambaMixer

    out = copy.deepcopy(model).float().eval()
    if scan == "portable":
        for module in out.modules():
            if isinstance(module, MambaMixer):
                module.scan_backend = "portable"
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """Tracing warnings and the ONNX exporter's progress lines say nothing the check does not measure."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _exported_program(module: nn.Module, example: Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=shapes)


def _foreign_ops(names: list[str], fmt: str) -> None:
    """Refuse operators registered by a library at run time (``namespace::name``), which the format cannot hold."""
    foreign = sorted(set(names))
    if foreign:
        hint = "; export with --scan portable" if any(n.startswith("pks4::") for n in foreign) else ""
        raise ExportError(f"the {fmt} format cannot hold this model: it has no translation for the operator(s) "
                          f"{', '.join(foreign)}{hint}")


def _onnx_program(ep: torch.export.ExportedProgram, example: Tensor, dynamic: bool) -> Any:
    """``torch.onnx.export`` of ``ep``; an operator without an ONNX translation is named in an ExportError."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        return torch.onnx.export(ep, (example,), dynamo=True, dynamic_shapes=shapes, input_names=[INPUT_NAME],
                                 output_names=[OUTPUT_NAME], verbose=False)
    except torch.onnx.OnnxExporterError as exc:
        missing = sorted(set(re.findall(r"No ONNX function found for <OpOverload\(op='([^']+)'", str(exc))))
        if not missing:
            raise
        _foreign_ops([op.replace(".", "::", 1) for op in missing], "onnx")
        raise


def _program_ops(ep: torch.export.ExportedProgram) -> tuple[int, int, list[str]]:
    """(nodes, scan loops, operators outside torch's own namespaces) of an ExportedProgram."""
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    loops = sum(1 for n in calls if n.target is torch.ops.higher_order.scan)
    foreign = [f"{n.target.namespace}::{n.target._opname}" for n in calls
               if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in ("aten", "prims")]
    return len(ep.graph.nodes), loops, foreign


def _write_onnx(module: nn.Module, example: Tensor, dynamic: bool, path: Path, meta: str) -> tuple[int, int]:
    ep = _exported_program(module, example, dynamic)
    _, _, foreign = _program_ops(ep)
    _foreign_ops(foreign, "onnx")
    program = _onnx_program(ep, example, dynamic)
    program.model.metadata_props[METADATA_KEY] = meta
    program.save(str(path), external_data=False)  # one file; ONNX protobuf caps it at 2 GB
    nodes = list(program.model.graph)
    return len(nodes), sum(1 for n in nodes if n.op_type == "Scan")


def _write_torchscript(module: nn.Module, example: Tensor, path: Path, meta: str) -> tuple[int, int]:
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    nodes = list(traced.inlined_graph.nodes())
    _foreign_ops([n.kind() for n in nodes if n.kind().split("::")[0] not in ("aten", "prim")], "torchscript")
    torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: meta})
    return len(nodes), sum(1 for n in nodes if n.kind() == "prim::Loop")


def _write_program(module: nn.Module, example: Tensor, dynamic: bool, path: Path, meta: str) -> tuple[int, int]:
    ep = _exported_program(module, example, dynamic)
    nodes, loops, foreign = _program_ops(ep)
    torch.export.save(ep, str(path), extra_files={METADATA_KEY: meta})
    return nodes, loops + sum(1 for op in foreign if op == "pks4::selective_scan")


def export_model(model: nn.Module, path: str | Path, fmt: str, *, frames: int, size: int, scan: str = "portable",
                 batch: int | None = None, metadata: dict[str, Any] | None = None) -> tuple[int, int]:
    """Write ``model`` (clips (B, frames, 3, size, size) -> logits) to ``path`` as ``fmt``; returns the graph's
    (top-level nodes, scan loops). ``batch`` None makes the batch dimension dynamic. ``path`` is written as it
    is (no check of what is there): :func:`export_run` writes atomically and refuses an existing file."""
    module = _Classifier(export_copy(model, scan))
    example = torch.zeros(batch or _EXAMPLE_BATCH, frames, 3, size, size)
    meta = json.dumps({**(metadata or {}), "input": {"name": INPUT_NAME, "shape": _shape(batch, frames, size),
                                                     "dtype": "float32"},
                       "output": {"name": OUTPUT_NAME, "shape": [batch or "batch", "num_labels"]}})
    with _quiet():
        if fmt == "onnx":
            return _write_onnx(module, example, batch is None, Path(path), meta)
        if fmt == "torchscript":
            return _write_torchscript(module, example, Path(path), meta)
        if fmt == "exported-program":
            return _write_program(module, example, batch is None, Path(path), meta)
    raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _shape(batch: int | None, frames: int, size: int) -> list[int | str]:
    return [batch or "batch", frames, 3, size, size]


# ------------------------------------------------------------------------------------------------ the check


def builtin_clip(folder: Path, frames: int) -> Path:
    """One clip of the built-in benchmark ("rotating clockwise", seeded) written as an mp4 into ``folder``."""
    from pks4.data.synth import CLASSES, ENCODER_OPTIONS, PAIRS, render_clip, sample_params, write_video

    label, size, length = CLASSES.index("rotating_clockwise"), 64, max(16, frames)
    params = sample_params(np.random.default_rng([0, label]), PAIRS[label // 2][0], length, size)
    return write_video(folder / "builtin_clip.mp4", render_clip(label, params, length, size), 8.0, crf=None,
                       options=ENCODER_OPTIONS)


def check_clips(spec: Any, *, frames: int, size: int, batch: int | None, video: str | Path,
                seed: int = 0) -> dict[str, Tensor]:
    """Inputs of the check: seeded random clips, and the test views of ``video`` made as inference makes them
    (:func:`pks4.data.datasets.load_video_views` with the run's sampling, crops and normalisation)."""
    from pks4.data.datasets import load_video_views
    from pks4.data.sampling import parse_views

    gen = torch.Generator().manual_seed(seed)
    clips = {f"random, batch {b}": torch.randn(b, frames, 3, size, size, generator=gen)
             for b in ((batch,) if batch else _RANDOM_BATCHES)}
    views = load_video_views(video, frames, size, parse_views(spec.views), spec.data)  # (V, T, 3, S, S)
    if batch:  # a fixed batch takes exactly that many views, repeating them if the run has fewer
        views = views.repeat((batch + len(views) - 1) // len(views), 1, 1, 1, 1)[:batch]
    clips[f"video {Path(video).name}, {len(views)} views"] = views
    return clips


# Runs exported files in a fresh interpreter where the modules named in argv[2] cannot be imported. argv[1] is a
# JSON list of jobs: [format, model file, inputs .npz, outputs .npz].
_RUNNER = r"""
import importlib.abc, json, sys
jobs, blocked = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the file must run without it)")
        return None

sys.meta_path.insert(0, Blocked())
import numpy as np

def load(fmt, path):
    if fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import torch
    if fmt == "torchscript":
        module = torch.jit.load(path)
    else:
        if "pks4" not in blocked:
            import pks4.ssm.scan  # registers pks4::selective_scan, which the program calls
        module = torch.export.load(path).module()
    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run

for fmt, path, inputs_path, outputs_path in jobs:
    model, inputs = load(fmt, path), np.load(inputs_path)
    np.savez(outputs_path, **{key: model(inputs[key]) for key in inputs.files})
"""


def run_exported_files(files: list[tuple[str | Path, str, dict[str, Tensor]]], blocked: tuple[str, ...] = ("pks4",)
                       ) -> list[dict[str, np.ndarray]]:
    """Logits of exported files (path, format, named inputs) for each of their inputs, computed in ONE fresh
    Python process in which the modules ``blocked`` cannot be imported (the files must load and run without)."""
    with tempfile.TemporaryDirectory(prefix="pks4-export-check-") as tmp:
        jobs, keys = [], []
        for i, (path, fmt, clips) in enumerate(files):
            names = {f"input{j}": name for j, name in enumerate(clips)}
            inputs, outputs = Path(tmp) / f"inputs{i}.npz", Path(tmp) / f"outputs{i}.npz"
            np.savez(inputs, **{k: clips[name].numpy() for k, name in names.items()})
            jobs.append([fmt, str(Path(path).resolve()), str(inputs), str(outputs)])
            keys.append(names)
        argv = [sys.executable, "-c", _RUNNER, json.dumps(jobs), json.dumps(list(blocked))]
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            where = ", ".join(str(path) for path, _, _ in files)
            raise RuntimeError(f"{where}: the exported file(s) did not run in a fresh process without "
                               f"{', '.join(blocked) or 'restrictions'}:\n{done.stderr[-3000:]}")
        results = []
        for (_, _, _, outputs), names in zip(jobs, keys):
            with np.load(outputs) as result:
                results.append({name: result[k] for k, name in names.items()})
        return results


def run_exported(path: str | Path, fmt: str, clips: dict[str, Tensor], blocked: tuple[str, ...] = ("pks4",)
                 ) -> dict[str, np.ndarray]:
    """:func:`run_exported_files` for one file."""
    return run_exported_files([(path, fmt, clips)], blocked)[0]


def blocked_modules(fmt: str, scan: str = "portable") -> tuple[str, ...]:
    """What a file of ``fmt`` (with the scan as ``scan``) must run without: pks4, and torch for ONNX."""
    return _BLOCKED[(fmt, scan)]


def compare(model: nn.Module, clips: dict[str, Tensor], logits: dict[str, np.ndarray]) -> list[ClipCheck]:
    """The exported logits against ``model``'s (float32, eval, no grad) for each input."""
    model = model.float().eval()
    checks = []
    with torch.no_grad():
        for name, x in clips.items():
            ref, got = model(x), torch.from_numpy(np.asarray(logits[name]))
            if got.shape != ref.shape:
                raise RuntimeError(f"exported file gave logits {tuple(got.shape)} for {name}, PyTorch "
                                   f"{tuple(ref.shape)}")
            checks.append(ClipCheck(name, tuple(x.shape), float((got - ref).abs().max()),
                                    bool(torch.equal(got.argmax(-1), ref.argmax(-1)))))
    return checks


# ------------------------------------------------------------------------------------------------ one run


def _destination(out: str | Path, overwrite: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path}: exists; pass --overwrite to replace it")
    return path


def _require_onnx(check: bool) -> None:
    import importlib.util

    missing = [m for m in ("onnxscript", "onnx", *(("onnxruntime",) if check else ()))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format onnx needs the export extra (missing: {', '.join(missing)}); install it with "
                          "pip install 'pks4[export]'")


def export_run(source: str | Path, out: str | Path, options: ExportOptions) -> ExportReport:
    """Export the model of a run directory, checkpoint or Hub folder (``source``) to the file ``out`` and, with
    ``options.check``, compare the file with PyTorch (see the module docstring)."""
    from pks4.data.sampling import parse_views
    from pks4.engine.checkpoint import atomic_output
    from pks4.engine.pretrained import load_for_inference, pretrained_config
    from pks4.errors import require_regular_file

    path = _destination(out, options.overwrite)
    if options.format == "onnx":
        _require_onnx(options.check)
    if options.check and options.check_video:
        require_regular_file(options.check_video, "--check-video video")
    model, spec = load_for_inference(source, map_location="cpu")
    frames, size, fmt = parse_views(spec.views).frames, spec.data.size, options.format
    start = time.perf_counter()
    with atomic_output(path, what=f"{fmt} file", error=ExportError) as tmp:
        nodes, loops = export_model(model, tmp, fmt, frames=frames, size=size, scan=options.scan,
                                    batch=options.batch, metadata=pretrained_config(model, spec))
    needs = _NEEDS[fmt] + (" + pks4 (the scan is its custom op)" if options.scan == "op" else "")
    report = ExportReport(str(path), fmt, options.scan, _shape(options.batch, frames, size), needs, nodes, loops,
                          time.perf_counter() - start, options.tolerance)
    if options.check:
        with tempfile.TemporaryDirectory(prefix="pks4-export-clip-") as tmp:
            video = options.check_video or builtin_clip(Path(tmp), frames)
            clips = check_clips(spec, frames=frames, size=size, batch=options.batch, video=video, seed=options.seed)
        logits = run_exported(path, fmt, clips, blocked_modules(fmt, options.scan))
        report.checks = compare(model, clips, logits)
    return report
