"""pks4 export: every model family in every format within 1e-4 of PyTorch, run in a fresh process that cannot
import pks4 (nor torch, for ONNX). Apart from tests/test_export.py so the two spread over the test workers."""
import pytest

from export_fixtures import FAMILIES, FRAMES, SIZE, random_clips, trained_like
from pks4.engine.export import FORMATS, blocked_modules, compare, export_model, run_exported_files


# ---- every family, every format ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(FORMATS))
def exported(request, tmp_path_factory):
    """All families exported in one format, then run in ONE fresh process that cannot import pks4 (nor torch,
    for ONNX)."""
    fmt = request.param
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    folder, clips = tmp_path_factory.mktemp(fmt), random_clips(1, 3)
    models, graphs, files = {}, {}, []
    for name in FAMILIES:
        models[name] = trained_like(name)
        path = folder / f"{name}{FORMATS[fmt]}"
        graphs[name] = export_model(models[name], path, fmt, frames=FRAMES, size=SIZE)
        files.append((path, fmt, clips))
    logits = dict(zip(FAMILIES, run_exported_files(files, blocked_modules(fmt))))
    return models, clips, logits, graphs


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_within_1e4_and_runs_without_pks4(exported, name):
    models, clips, logits, graphs = exported
    checks = compare(models[name], clips, logits[name])
    assert [c.shape[0] for c in checks] == [1, 3]  # the batch dimension is dynamic
    assert all(c.max_abs_diff <= 1e-4 and c.same_top1 for c in checks), checks
    assert graphs[name][1] == FAMILIES[name][2]  # one loop per scan direction, time never unrolled
