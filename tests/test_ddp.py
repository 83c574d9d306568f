"""Two CPU processes under torchrun (gloo): DDP training, sharded data, evaluation gathered across ranks."""
import json
import os
import subprocess
import sys

import pytest

from pks4.data.synth import generate_synth
from pks4.engine.checkpoint import verify_checkpoint
from pks4.engine.infer import evaluate_checkpoint


def test_two_process_gloo_train_and_gathered_eval(tmp_path):
    data = generate_synth(tmp_path / "data", seed=3, num_train_per_class=2, num_val_per_class=1, num_frames=4,
                          size=32)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pks4.cli", "train", "--model", "pks4_vit_tiny", "--train-list", str(data.train),
           "--val-list", str(data.val), "--data-root", str(data.root), "--labels", str(data.labels),
           "--frames", "4", "--size", "32", "--epochs", "1", "--batch-size", "4", "--out", str(run),
           "--workers", "0", "--device", "cpu", "--set", "data.short_side=32", "--set", "train.progress=false",
           "--set", "train.tensorboard=false", "--set", "eval.batch_size=3", "--set", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = verify_checkpoint(run / "checkpoints" / "best")
    assert state["world_size"] == 2 and state["global_step"] == 2  # 20 clips / 2 ranks / batch 4 (drop last)
    assert len(state["rng"]) == 2  # one RNG state per rank
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert val["samples"] == 10  # 5 + 5 shards gathered (3-clip batches pad nothing away)
    single = evaluate_checkpoint(run, views="4x1x1", num_workers=0, device="cpu")
    assert single["samples"] == 10
    assert single["top1"] == pytest.approx(val["top1"]) and single["top5"] == pytest.approx(val["top5"])
