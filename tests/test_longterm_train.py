"""The long-term benchmarks through `pks4 train` (Li et al. §4.3): Breakfast, COIN and LVU read from small files the
test writes in each published layout (``data.format: breakfast | coin | lvu``), LVU's like ratio as a regression
(``train.loss: mse``, one-output head, MSE as the metric), and the packaged 32- and 64-frame recipes."""
import json

import numpy as np
import pytest
import torch

from pks4.cli import main
from pks4.data.synth import write_video
from pks4.engine import checkpoint as ckpt

FRAMES = 4  # frames per clip of the tiny runs; the videos hold 8


def _video(path, seed):
    frames = np.random.default_rng(seed).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    write_video(path, frames, fps=4)


def _train(tmp_path, out, *sets):
    common = ["--model", "videomamba_li_micro", "--frames", str(FRAMES), "--size", "32", "--epochs", "1",
              "--batch-size", "2", "--workers", "0", "--device", "cpu", "--out", str(out),
              "--set", "model.overrides={embed_dim: 32, depth: 2}", "--set", "data.short_side=32",
              "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "optim.scale_lr=false",
              "--set", "optim.warmup_epochs=0", "--set", "eval.batch_size=2"]
    return main(["train", *common, *[x for s in sets for x in ("--set", s)]])


def _val_rows(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]


def test_breakfast_split_files(tmp_path):
    names = ["P03_cam01_P03_cereals", "P03_webcam02_P03_tea", "P04_cam01_P04_cereals", "P16_stereo01_P16_juice"]
    for k, name in enumerate(names):
        person, camera, _, activity = name.split("_")
        folder, stem = (f"{person}/stereo", f"{person}_{activity}_ch1") if camera.startswith("stereo") else \
            (f"{person}/{camera}", f"{person}_{activity}")
        _video(tmp_path / "bf" / folder / f"{stem}.avi", k)
    (tmp_path / "bf" / "train.split1.bundle").write_text("#bundle\n" + "".join(f"{n}.txt\n" for n in names[:3]))
    (tmp_path / "bf" / "test.split1.bundle").write_text("#bundle\n" + f"{names[3]}.txt\n{names[0]}.txt\n")
    assert _train(tmp_path, tmp_path / "run", "data.format=breakfast", f"data.root={tmp_path / 'bf'}",
                  "data.train=train.split1.bundle", "data.val=test.split1.bundle") == 0
    state = ckpt.read_state(tmp_path / "run" / "checkpoints" / "best")
    assert len(state["classes"]) == 10 and state["classes"][0] == "cereals"  # the ten activities, fixed order
    assert _val_rows(tmp_path / "run")[-1]["samples"] == 2


def test_coin_json_with_its_two_subsets(tmp_path):
    database = {f"vid{k}": {"recipe_type": k % 3, "class": f"Task{k % 3}", "subset": "training" if k < 4 else
                            "testing", "annotation": []} for k in range(6)}
    (tmp_path / "coin").mkdir()
    (tmp_path / "coin" / "COIN.json").write_text(json.dumps({"database": database}))
    for k in range(6):
        _video(tmp_path / "coin" / str(k % 3) / f"vid{k}.mp4", k)  # <recipe_type>/<id>.mp4, the download layout
    assert _train(tmp_path, tmp_path / "run", "data.format=coin", f"data.root={tmp_path / 'coin'}",
                  "data.train=COIN.json#training", "data.val=COIN.json#testing") == 0
    assert _val_rows(tmp_path / "run")[-1]["samples"] == 2
    assert main(["train", "--set", "data.format=coin", "--set", f"data.train={tmp_path / 'coin' / 'COIN.json'}",
                 "--out", str(tmp_path / "bad")]) == 2  # no subset named: one line, no traceback


def _lvu(tmp_path, task, header, rows):
    folder = tmp_path / "lvu_1.0" / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", rows[:4]), ("val", rows[4:])):
        (folder / f"{split}.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    for k, row in enumerate(rows):
        _video(tmp_path / "videos" / f"{row.split()[-2]}.mp4", k)
    return folder


def test_lvu_classification_task(tmp_path):
    rows = [f"{k % 2} {('Drama', 'Comedy')[k % 2]} yt{k} tt{k}" for k in range(6)]
    folder = _lvu(tmp_path, "genre", "genre_id genre youtube_id imdb_id", rows)
    assert _train(tmp_path, tmp_path / "run", "data.format=lvu", f"data.root={tmp_path / 'videos'}",
                  f"data.train={folder / 'train.csv'}", f"data.val={folder / 'val.csv'}") == 0
    assert 0 <= _val_rows(tmp_path / "run")[-1]["top1"] <= 100


def test_lvu_like_ratio_trains_as_a_regression_scored_by_mse(tmp_path, capsys):
    rows = [f"{10 * (k + 1)} {5 * (6 - k)} yt{k} tt{k}" for k in range(6)]
    folder = _lvu(tmp_path, "like_ratio", "like dislike youtube_id imdb_id", rows)
    sets = ["data.format=lvu", f"data.root={tmp_path / 'videos'}", f"data.train={folder / 'train.csv'}",
            f"data.val={folder / 'val.csv'}"]
    assert _train(tmp_path, tmp_path / "ce", *sets) == 2  # class labels expected: the message says what to set
    assert "set train.loss=mse" in capsys.readouterr().err
    assert _train(tmp_path, tmp_path / "run", *sets, "train.loss=mse") == 0
    val = _val_rows(tmp_path / "run")[-1]
    targets = [10 * 10 * (k + 1) / (10 * (k + 1) + 5 * (6 - k)) for k in range(6)]
    weights, meta = ckpt.read_weights(tmp_path / "run" / "checkpoints" / "best" / ckpt.WEIGHTS_FILE)
    assert meta["task"] == "regression" and meta["classes"] == ["like_ratio"] and weights["head.weight"].shape[0] == 1
    scale = meta["target_scale"]
    assert scale["mean"] == pytest.approx(np.mean(targets[:4])) and scale["std"] == pytest.approx(np.std(targets[:4]))
    assert val["samples"] == 2 and val["mse"] >= 0 and val["neg_mse"] == -val["mse"]
    # the error of a model that predicts the training mean, computed by hand, bounds a one-epoch run loosely
    assert val["mse"] < 4 * np.mean([(t - scale["mean"]) ** 2 for t in targets[4:]]) + 1.0
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--workers", "0"]) == 2
    assert "a regression checkpoint" in capsys.readouterr().err
    genre = _lvu(tmp_path, "genre", "genre_id genre youtube_id imdb_id", [f"0 Drama yt{k} tt{k}" for k in range(6)])
    assert _train(tmp_path, tmp_path / "mse", "data.format=lvu", f"data.root={tmp_path / 'videos'}",
                  f"data.train={genre / 'train.csv'}", "train.loss=mse") == 2
    assert "train.loss=mse regresses one number per clip" in capsys.readouterr().err


@pytest.mark.parametrize("name, frames, views", [
    ("videomamba_small_breakfast_f32", 32, "32x4x3"), ("videomamba_small_breakfast_f64", 64, "64x4x3"),
    ("videomamba_small_coin_f32", 32, "32x10x3"), ("videomamba_small_coin_f64", 64, "64x10x3"),
    ("videomamba_tiny_lvu_f32", 32, "32x4x3"), ("videomamba_tiny_lvu_like_f32", 32, "32x4x3")])
def test_long_term_recipes(name, frames, views):
    from pks4.cli.training import recipe_path
    from pks4.engine.config import load_config

    cfg = load_config(recipe_path(name))
    assert cfg.data.num_frames == frames and cfg.eval.views == views and cfg.data.format in ("breakfast", "coin", "lvu")
    assert cfg.train.loss == ("mse" if "like" in name else "ce")


def test_regression_outputs_average_the_views_and_gather_in_index_order():
    from pks4.data.items import Batch
    from pks4.engine.regression import regression_outputs

    class Mean(torch.nn.Module):  # the mean pixel of each view
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, geometry=None):
            return self.w * x.flatten(1).mean(1, keepdim=True)

    views = torch.stack([torch.full((2, 1, 3, 2, 2), float(v)) for v in (1, 3, 5)])  # (3 clips, 2 views, ...)
    views[:, 1] += 1  # second view one higher: the mean over views is v + 0.5
    batches = [Batch(views[2:], torch.zeros(1), torch.tensor([2]), extra={"target": torch.tensor([9.0])}),
               Batch(views[:2], torch.zeros(2), torch.tensor([0, 1]), extra={"target": torch.tensor([7.0, 8.0])})]
    pred, target = regression_outputs(Mean(), batches)
    assert pred.tolist() == [1.5, 3.5, 5.5] and target.tolist() == [7.0, 8.0, 9.0]
