"""pks4 export: the command on runs and Hub folders, checked on random and real clips in a process without pks4;
the portable scan against the reference; scan plans a tracer can follow; bad input. Every family in every
format: tests/test_export_families.py."""
import json

import pytest
import torch

from export_fixtures import FRAMES, SIZE, random_clips, trained_like
from inference_fixtures import data, run, val_videos  # noqa: F401 (fixtures)
from pks4.cli import main
from pks4.data.datasets import DataConfig
from pks4.data.synth import CLASSES
from pks4.engine.export import FORMATS, METADATA_KEY, ExportError, ExportOptions, export_model, export_run, run_exported
from pks4.engine.pretrained import InferenceSpec, save_pretrained
from pks4.models.videomamba import SCAN_ORDERS, _plan, scan_orders
from pks4.ssm.mixer import MambaMixer
from pks4.ssm.scan import selective_scan


# ---- the portable scan against the reference ---------------------------------------------------------------
def scan_inputs(batch=2, dim=5, length=33, state=4):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length), A=-torch.rand(dim, state, generator=gen),
                B=r(batch, state, length), C=r(batch, state, length), D=r(dim), z=r(batch, dim, length),
                delta_bias=r(dim))


@pytest.mark.parametrize("optional", [True, False])
def test_portable_scan_matches_the_reference_with_gradients(optional):
    x = {k: v.requires_grad_() for k, v in scan_inputs().items()}
    if not optional:
        x.update(D=None, z=None, delta_bias=None)
    grads = {}
    for backend in ("portable", "ref"):
        out, last = selective_scan(**x, return_last_state=True, backend=backend)
        inputs = [v for v in x.values() if v is not None]
        grads[backend] = (out, last, torch.autograd.grad((out * out.detach().cos()).sum() + last.sum(), inputs))
    (out, last, g), (rout, rlast, rg) = grads["portable"], grads["ref"]
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, rlast, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_portable_scan_is_one_loop_under_export_and_trace():
    """torch.export keeps one `scan` node per direction, torch.jit.trace one TorchScript loop; neither holds a
    pks4 operator, and both run like the eager mixer at another batch size."""
    mixer = MambaMixer(8, d_state=4, expand=1, bidirectional=True, scan_backend="portable").eval()
    u, u3 = torch.randn(2, 6, 8), torch.randn(3, 6, 8)
    with torch.no_grad():
        ep = torch.export.export(mixer, (u,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        traced = torch.jit.trace(mixer, (u,), check_trace=False)
        expected = mixer(u3)
        torch.testing.assert_close(ep.module()(u3), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced(u3), expected, rtol=1e-5, atol=1e-6)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.higher_order.scan) == 2 and not [t for t in targets if "pks4" in str(t)]
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert kinds.count("prim::Loop") == 2 and not [k for k in kinds if k.startswith("pks4::")]


# ---- VideoMamba's scan plans under tracing -----------------------------------------------------------------
@pytest.mark.parametrize("scan", SCAN_ORDERS)
def test_scan_plans_equal_their_tensor_construction(scan):
    """Plans are now worked out on Python ints: the same index tensors as the tensor construction gave."""
    for forward, backward in scan_orders(scan, 2, 3):
        plan, length = _plan(forward, backward, torch.device("cpu")), len(forward)
        restore = torch.empty_like(forward)
        restore[forward] = torch.arange(length)
        relative = restore[backward]
        identity = torch.equal(forward, torch.arange(length))
        flip = torch.equal(relative, torch.arange(length - 1, -1, -1))
        for got, want in ((plan.forward, None if identity else forward),
                          (plan.restore, None if identity else restore), (plan.backward, None if flip else relative)):
            assert (got is None and want is None) or (got.dtype == torch.long and torch.equal(got, want))


@pytest.mark.parametrize("scan", ["spatial_first", "spatiotemporal_v2", "spatial_reversal"])
def test_videomamba_exports_with_the_scan_op_and_stays_bitwise(scan):
    """torch.export traces VideoMamba (it used to stop at torch.equal on traced permutations): one custom-op node
    per scan, the same logits bit for bit, and the eager model untouched by the export."""
    model = trained_like("videomamba_li_micro", scan=scan, depth=1, embed_dim=16)
    x = torch.randn(2, FRAMES, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        ep = torch.export.export(model, (x,))
        assert torch.equal(ep.module()(x), before) and torch.equal(model(x), before)
    scans = [n for n in ep.graph.nodes if str(n.target) == "pks4.selective_scan.default"]
    assert len(scans) == 2 * (2 if scan == "spatiotemporal_v2" else 1)


# ---- pks4 export on a run, a checkpoint or a Hub folder ----------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub folder of a tiny Li VideoMamba with trained-like weights, 4-frame clips of 32 px, two test views."""
    spec = InferenceSpec(classes=list(CLASSES), views="4x2x1",
                         data=DataConfig(num_frames=FRAMES, size=SIZE, short_side=SIZE))
    return save_pretrained(trained_like("videomamba_li_micro"), spec, tmp_path_factory.mktemp("hub") / "vm")


def read_metadata(path, fmt: str) -> dict:
    if fmt == "onnx":
        import onnx

        return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])
    files = {METADATA_KEY: ""}
    if fmt == "torchscript":
        torch.jit.load(str(path), _extra_files=files)
    else:
        torch.export.load(str(path), extra_files=files)
    return json.loads(files[METADATA_KEY])


def test_cli_exports_a_run_to_onnx_checked_on_random_and_real_clips(run, data, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out, video = tmp_path / "model.onnx", val_videos(data)[3]
    assert main(["export", str(run), str(out), "--format", "onnx", "--check-video", video, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["needs"] == "onnxruntime + numpy"
    assert report["input_shape"] == ["batch", 8, 3, 32, 32] and report["scan_loops"] == 1
    assert [c["shape"][0] for c in report["checks"]] == [1, 3, 2]  # random batches 1 and 3, the video's 2 views
    assert report["checks"][2]["clips"].startswith(f"video {video.rsplit('/', 1)[-1]}")
    meta = read_metadata(out, "onnx")
    assert meta["id2label"]["0"] == CLASSES[0] and meta["input"]["shape"] == ["batch", 8, 3, 32, 32]


def test_torchscript_export_of_a_hub_folder_carries_its_config(hub, tmp_path):
    fmt, out = "torchscript", tmp_path / "model.pt"
    report = export_run(hub, out, ExportOptions(format=fmt))
    assert report.passed and report.max_abs_diff <= 1e-4 and report.scan_loops == 4
    assert report.input_shape == ["batch", FRAMES, 3, SIZE, SIZE] and len(report.checks) == 3
    assert report.checks[-1].clips == "video builtin_clip.mp4, 2 views"
    meta = read_metadata(out, fmt)
    assert meta["architecture"] == "videomamba_li_micro" and meta["image_mean"] and meta["output"]["name"] == "logits"


def test_exported_program_can_keep_the_scan_op_and_then_needs_pks4(hub, tmp_path):
    out = tmp_path / "op.pt2"
    report = export_run(hub, out, ExportOptions(format="exported-program", scan="op", batch=2))
    assert report.passed and report.needs == "torch + pks4 (the scan is its custom op)" and report.scan_loops == 4
    assert report.input_shape == [2, FRAMES, 3, SIZE, SIZE] and {c.shape[0] for c in report.checks} == {2}
    assert read_metadata(out, "exported-program")["input"]["shape"] == [2, FRAMES, 3, SIZE, SIZE]
    with pytest.raises(RuntimeError, match="did not run in a fresh process without pks4"):
        run_exported(out, "exported-program", random_clips(2), blocked=("pks4",))


# ---- bad input ----------------------------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pks4: error: "), err
    return err


def test_an_existing_destination_is_kept_unless_overwrite_and_the_tolerance_sets_the_exit(hub, tmp_path, capsys):
    out = tmp_path / "model.pt"
    out.write_text("keep me")
    assert main(["export", str(hub), str(out), "--format", "torchscript"]) == 2
    assert f"{out}: exists; pass --overwrite" in one_error_line(capsys) and out.read_text() == "keep me"
    assert main(["export", str(hub), str(tmp_path), "--format", "torchscript"]) == 2
    assert "is a folder; give the file to write" in one_error_line(capsys)
    # replaced with --overwrite; the scripted scan sums in another order than the native kernel (not bitwise),
    # so a tolerance of 1e-12 fails the check: exit code 1, with the report
    assert main(["export", str(hub), str(out), "--format", "torchscript", "--overwrite", "--tolerance", "1e-12"]) == 1
    captured = capsys.readouterr()
    assert "EXCEEDS the tolerance 1e-12" in captured.out and "more than --tolerance 1e-12" in captured.err
    assert torch.jit.load(str(out)) is not None


def test_a_run_that_does_not_load_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 2
    assert "missing: no such checkpoint file or run directory" in one_error_line(capsys)
    assert main(["export", str(tmp_path), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 2
    assert "not a checkpoint" in one_error_line(capsys)


def test_bad_options_are_one_line(hub, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", str(hub), out, "--format", "onnx", "--scan", "op"]) == 2
    assert "onnx format cannot hold the custom op pks4::selective_scan" in one_error_line(capsys)
    assert main(["export", str(hub), out, "--format", "onnx", "--check-video", str(tmp_path / "none.mp4")]) == 2
    assert "none.mp4: --check-video video not found" in one_error_line(capsys)
    for argv, option in ((["--batch", "0"], "--batch"), (["--format", "tflite"], "--format"),
                         (["--tolerance", "0"], "--tolerance")):
        assert main(["export", str(hub), out, "--format", "onnx", *argv]) == 2
        assert f"export {option}" in one_error_line(capsys)
    for bad in (dict(format="tflite"), dict(scan="cuda"), dict(batch=0), dict(tolerance=0.0),
                dict(format="torchscript", scan="op")):
        with pytest.raises(ExportError):
            ExportOptions(**bad)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_format_that_cannot_hold_an_operator_names_it(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    model = trained_like("videomamba_li_micro", depth=1)
    with pytest.raises(ExportError, match=f"the {fmt} format cannot hold this model: .*pks4::selective_scan"):
        export_model(model, tmp_path / "m", fmt, frames=FRAMES, size=SIZE, scan="op")


def test_onnx_without_the_export_extra_says_what_to_install(hub, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match=r"missing: onnxscript\); install it with pip install 'pks4\[export\]'"):
        export_run(hub, tmp_path / "m.onnx", ExportOptions(format="onnx"))


def test_an_operator_the_onnx_exporter_cannot_translate_is_named():
    """Past the graph's own check, the exporter's failure on an operator is turned into the same message."""
    pytest.importorskip("onnxscript")
    from pks4.engine.export import _onnx_program

    mixer, u = MambaMixer(8, d_state=4, expand=1).eval(), torch.randn(2, 6, 8)
    with torch.no_grad():
        ep = torch.export.export(mixer, (u,))  # the scan as the custom op
    with pytest.raises(ExportError, match="no translation for the operator.s. pks4::selective_scan"):
        _onnx_program(ep, u, dynamic=False)
