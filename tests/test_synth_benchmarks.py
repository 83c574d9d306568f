"""benchmarks/synth_family.py: one real run through `pks4 train RECIPE` from flags alone, read back into the tables."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pks4.cli.training import recipe_path
from pks4.data.synth import generate_synth
from pks4.recipes import FROM_SCRATCH_RECIPE

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("synth_family", _DIR / "synth_family.py")
family = importlib.util.module_from_spec(_spec)
sys.modules["synth_family"] = family
_spec.loader.exec_module(family)


@pytest.mark.slow
def test_one_family_run_is_read_back_and_not_repeated(tmp_path):
    data = generate_synth(tmp_path / "data", kind="dynamics", num_train_per_class=1, num_val_per_class=1,
                          num_frames=8, size=32)
    job = family.Job("dynamics/vit_tiny_avgpool/seed0", tmp_path / "run",
                     [str(recipe_path(FROM_SCRATCH_RECIPE)), "--train-list", str(data.train), "--val-list",
                      str(data.val), "--labels", str(data.labels), "--model", "vit_tiny_avgpool", "--seed", "0",
                      "--epochs", "2"], dict(kind="dynamics", model="vit_tiny_avgpool", seed=0))
    result = family.run_job(job)
    assert len(result["curve"]) == 2 and result["top1"] == result["curve"][-1] and result["cpu_s"] > 0
    assert set(result["per_class"]) == set(data.labels.read_text().split())
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert family.run_job(job) == result  # a finished run is read back, not trained again
    rows = family.family_table([result], ["dynamics"], ["vit_tiny_avgpool"])
    assert rows[2].startswith("| `dynamics` | 8 | ") and f"({result['top1']:.1f})" in rows[2]


def test_mean_and_spread_say_what_they_are():
    assert family.mean_sd([90.0, 95.0, 100.0]) == "95.0 ± 5.0"
    assert family.mean_sd([97.5]) == "97.5 ± 0.0"
