"""benchmarks/gpu.py stays runnable: its smoke mode runs every section at tiny sizes on this machine, and without
CUDA its real mode refuses with a message instead of measuring the CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


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
