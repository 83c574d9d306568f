"""The GPU-path benchmarks stay usable: benchmarks/gpu.py's smoke mode runs every section at tiny sizes on this
machine (without CUDA its real mode refuses); the shipped VideoMamba recipes still fit one 80 GB GPU by the
measurements committed in benchmarks/recipe_memory.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    done = run_script("--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["errors"] == [] and res["skipped"] == []
    assert res["checks"] and all(c["passed"] for c in res["checks"])
    assert {r["backend"] for r in res["scan"]} >= {"triton", "loop"}
    assert [m["model"] for m in res["models"]] == ["pks4_vit_tiny", "videomamba_li_micro"]
    assert res["configs"]
    text = (tmp_path / "gpu.md").read_text()
    assert "## Selective scan" in text and "## Training step" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda():
    done = run_script()
    assert done.returncode == 2 and "none is available here" in done.stderr


def test_every_videomamba_recipe_fits_by_the_committed_measurements():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import recipe_memory as rm
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = [json.loads(x) for x in (BENCHMARKS / "recipe_memory.jsonl").read_text().splitlines() if x.strip()]
    paths = rm.recipes()
    assert len(paths) >= 16
    for path in paths:
        setting = rm.recipe_setting(path)
        est = rm.estimate(setting, rows)
        gib = est["checkpointed_gib"] if setting["grad_checkpointing"] else est["plain_gib"]
        assert gib <= rm.LIMIT_GIB, f"{path.name}: {gib:.1f} GiB at batch {setting['batch']}"
        assert "Memory on one GPU" in path.read_text(), f"{path.name} has no memory note"
