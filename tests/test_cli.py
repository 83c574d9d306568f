"""`pks4` end to end on tiny real mp4 files: train (Ctrl-C, resume) -> eval --json -> predict --json, and tools."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pks4.cli import main
from pks4.data.synth import generate_synth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=2, num_train_per_class=2, num_val_per_class=1,
                          num_frames=8, size=32)


def _train_args(data, out, epochs):
    return ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--val-list", str(data.val),
            "--data-root", str(data.root), "--labels", str(data.labels), "--num-classes", "10", "--frames", "4",
            "--size", "32", "--epochs", str(epochs), "--batch-size", "4", "--out", str(out), "--workers", "0",
            "--set", "data.short_side=32", "--set", "train.log_every=1", "--set", "train.progress=false",
            "--set", "train.tensorboard=false", "--set", "eval.views=4x1x3", "--set", "eval.batch_size=10",
            "--set", "train.save_every=1"]


def test_train_interrupt_resume_eval_predict(data, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pks4.cli", *_train_args(data, run, 50)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "interrupted at step" in out and "received SIGINT" in out
    # the signal lands wherever the run has got to (5 steps an epoch): resume into the epoch after that step
    step = int(re.search(r"interrupted at step (\d+)", out).group(1))
    epochs = step // 5 + 1
    assert main(_train_args(data, run, epochs) + ["--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and f"finished: {5 * epochs} steps" in printed

    assert main(["eval", "--checkpoint", str(run), "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report) >= {"top1", "top5", "mean_class", "views"} and report["views"] == "4x1x3"
    assert report["samples"] == 10 and 0 <= report["top1"] <= report["top5"] <= 100

    videos = sorted(str(p) for p in (data.root / "val").rglob("*.mp4"))[:2]
    assert main(["predict", *videos, "--checkpoint", str(run), "--topk", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["path"] for x in lines] == videos
    classes = data.labels.read_text().split()
    for item in lines:
        assert len(item["topk"]) == 3 and {t["label"] for t in item["topk"]} <= set(classes)
        scores = [t["score"] for t in item["topk"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6


def test_data_check_and_models(data, tmp_path, capsys):
    assert main(["data", "check", str(data.val)]) == 0
    assert "10 videos" in capsys.readouterr().out
    broken = tmp_path / "list.txt"
    (tmp_path / "zero.mp4").write_bytes(b"")
    broken.write_text("zero.mp4 0\n")
    assert main(["data", "check", str(broken)]) != 0
    assert "zero.mp4" in capsys.readouterr().out
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "pks4_vit_tiny" in table and "pks4_vit_b16" in table and "91.6" in table


def test_data_synth_sizes(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["data", "synth", str(out), "--train-per-class", "1", "--val-per-class", "3", "--frames", "4", "--size", "32"]
    assert main(argv) == 0
    assert len((out / "train.txt").read_text().split("\n")) - 1 == 10
    val = (out / "val.txt").read_text().split()
    assert len(val) == 2 * 30 and val[-2].endswith("_002.mp4")
    from pks4.data.video import probe_video

    info = probe_video(str(out / val[0]))
    assert (info.num_frames, info.height, info.width) == (4, 32, 32)


@pytest.mark.parametrize("argv, words", [
    (["data", "synth", "out", "--val-per-class", "-1"], ["--val-per-class -1", "at least 0"]),
    (["data", "synth", "out", "--size", "4"], ["--size 4", "at least 16"]),
    (["train", "--set", "train.epoch=1"], ["train.epoch", "valid keys"]),
    (["eval", "--checkpoint", "/nonexistent/run"], ["/nonexistent/run", "no such"]),
    (["predict", "missing.mp4", "--checkpoint", "/nonexistent"], ["/nonexistent"]),
])
def test_bad_input_is_one_clear_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pks4: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_recipes_lists_the_packaged_recipes_and_prints_one(capsys):
    from pathlib import Path

    import pks4

    files = sorted((Path(pks4.__file__).parent / "configs").glob("*.yaml"))
    assert main(["recipes"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()
            and not line.startswith("`")}
    assert set(rows) == {f.stem for f in files}
    assert rows["pks4_b16_ssv2_8f"] == "train" and rows["videomamba_middle_pretrain_k400"] == "pretrain"
    assert rows["demo"] == "demo"
    assert main(["recipes", "pks4_b16_ssv2_8f"]) == 0
    assert capsys.readouterr().out == (files[0].parent / "pks4_b16_ssv2_8f.yaml").read_text()
    assert main(["recipes", "pks4_b99"]) == 2
    err = capsys.readouterr().err
    assert "pks4_b99" in err and "pks4 recipes" in err and "Traceback" not in err


def test_every_packaged_recipe_loads_by_name(tmp_path):
    from pks4.cli.training import packaged_recipes, recipe_path
    from pks4.engine.config import load_config
    from pks4.engine.pretrain import load_pretrain_config

    folder = tmp_path / "pks4_b16_ssv2_8f"  # something at that path: it is what the user means (and wrong)
    folder.mkdir()
    assert recipe_path(str(folder)) == folder and recipe_path("pks4_b16_ssv2_8f").is_file()
    for name, (command, description) in packaged_recipes().items():
        assert description, f"{name}.yaml has no first comment line to describe it"
        if command == "train":
            assert load_config(recipe_path(name)).model.name
        elif command == "pretrain" and "task: video-text" in recipe_path(name).read_text():
            from pks4.engine.video_text_task import load_video_text_config

            assert load_video_text_config(recipe_path(name)).train_files()
        elif command == "pretrain":
            assert load_pretrain_config(recipe_path(f"{name}.yaml")).teacher


def test_help_names_only_commands_that_exist(capsys):
    import re

    from pks4.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    named = {}
    for command in sorted(commands - {"data"}):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
        named[command] = set(re.findall(r"`pks4 ([a-z-]+)", text))
        assert named[command] <= commands, f"`pks4 {command} --help` names {named[command] - commands}"
    assert "recipes" in named["train"] and "recipes" in named["pretrain"]


def test_python_dash_m_pks4_is_the_same_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pks4", "recipes"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "pks4", "predict", "x.mp4", "--topk", "0"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--topk" in bad.stderr and "Traceback" not in bad.stderr
