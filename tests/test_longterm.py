"""Long-term benchmarks (Li et al. §4.3): Breakfast, COIN and LVU parsed from small files written in their
published layouts, and the regression head and loss of LVU's like / view tasks."""
import json
import math

import pytest
import torch

from pks4.data.datasets import DatasetError
from pks4.data.longterm import BREAKFAST_ACTIVITIES, LVU_TASKS, read_breakfast, read_coin, read_lvu
from pks4.engine.regression import TargetScale, attach_regression_head, mean_squared_error, regression_loss
from pks4.models.registry import create_model


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


# ---- Breakfast -------------------------------------------------------------------------------------------
def test_breakfast_split_file(tmp_path):
    _touch(tmp_path, "P03/cam01/P03_cereals.avi", "P03/webcam02/P03_tea.avi", "P16/stereo/P16_juice_ch1.avi")
    (tmp_path / "test.split1.bundle").write_text(
        "#bundle\nP03_cam01_P03_cereals.txt\nP03_webcam02_P03_tea.txt\n\nP16_stereo01_P16_juice.txt\n")
    ann = read_breakfast(tmp_path / "test.split1.bundle", tmp_path)
    assert [s.label for s in ann.samples] == [0, 9, 3] and ann.classes == list(BREAKFAST_ACTIVITIES)
    assert ann.samples[2].path == str(tmp_path / "P16/stereo/P16_juice_ch1.avi")
    assert ann.where == ["line 2", "line 3", "line 5"] and len(ann.classes) == 10


def test_breakfast_bad_lines_and_missing_videos(tmp_path):
    (tmp_path / "split.bundle").write_text("P03_cam01_P03_cereals\nP03_cam01_P03_lasagne\n")
    with pytest.raises(DatasetError, match=r"(?s)split.bundle: 1 problem.*line 2: 'P03_cam01_P03_lasagne'"):
        read_breakfast(tmp_path / "split.bundle", tmp_path)
    (tmp_path / "split.bundle").write_text("P03_cam01_P03_cereals\n")
    with pytest.raises(DatasetError, match=r"(?s)1 of 1 listed videos are missing.*line 1: .*P03_cereals.avi"):
        read_breakfast(tmp_path / "split.bundle", tmp_path)
    assert read_breakfast(tmp_path / "split.bundle", tmp_path, check_files=False).samples[0].label == 0


# ---- COIN ------------------------------------------------------------------------------------------------
COIN = {"database": {
    "-0og5BMHZ2E": {"recipe_type": 2, "class": "ChangeGuitarStrings", "subset": "training", "start": 3.0,
                    "end": 200.0, "annotation": [{"id": "1", "segment": [3.0, 20.0], "label": "remove the string"}]},
    "0A0GvuDH8yQ": {"recipe_type": 0, "class": "AssembleBed", "subset": "testing", "annotation": []},
    "1a2b3c4d5e6": {"recipe_type": 2, "class": "ChangeGuitarStrings", "subset": "testing", "annotation": []}}}


def test_coin_json_subsets_and_task_labels(tmp_path):
    _touch(tmp_path, "-0og5BMHZ2E.mp4", "0/0A0GvuDH8yQ.mp4", "2/1a2b3c4d5e6.webm")
    (tmp_path / "COIN.json").write_text(json.dumps(COIN))
    train = read_coin(tmp_path / "COIN.json", tmp_path)
    assert [s.label for s in train.samples] == [2] and train.classes == ["AssembleBed", "task_1", "ChangeGuitarStrings"]
    test = read_coin(tmp_path / "COIN.json", tmp_path, "testing")
    assert [s.path for s in test.samples] == [str(tmp_path / "0/0A0GvuDH8yQ.mp4"), str(tmp_path / "2/1a2b3c4d5e6.webm")]


def test_coin_bad_input(tmp_path):
    (tmp_path / "COIN.json").write_text(json.dumps({"videos": []}))
    with pytest.raises(DatasetError, match="database"):
        read_coin(tmp_path / "COIN.json", tmp_path)
    (tmp_path / "COIN.json").write_text(json.dumps(COIN))
    with pytest.raises(DatasetError, match=r"no video in subset 'validation'; the file has \['testing', 'training'\]"):
        read_coin(tmp_path / "COIN.json", tmp_path, "validation", check_files=False)
    broken = {"database": {**COIN["database"], "x": {"recipe_type": "two", "subset": "training"}}}
    (tmp_path / "COIN.json").write_text(json.dumps(broken))
    with pytest.raises(DatasetError, match="video x: needs an integer 'recipe_type'"):
        read_coin(tmp_path / "COIN.json", tmp_path, check_files=False)


# ---- LVU -------------------------------------------------------------------------------------------------
def _lvu(tmp_path, task, text):
    path = tmp_path / "lvu_1.0" / task / "train.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lvu_classification_task(tmp_path):
    _touch(tmp_path, "videos/3Wbe7TIyvf4.mp4", "videos/zzHm5Y1mHqs.mp4")
    path = _lvu(tmp_path, "director", "director_id director youtube_id imdb_id\n"
                                      "3 Quentin Tarantino 3Wbe7TIyvf4 tt0110912\n"
                                      "0 Ridley_Scott zzHm5Y1mHqs tt0083658\n")
    ann = read_lvu(path, tmp_path / "videos")
    assert ann.task == "classification" and [s.label for s in ann.samples] == [3, 0]
    assert ann.classes == ["Ridley_Scott", "1", "2", "Quentin_Tarantino"]
    assert ann.samples[0].path == str(tmp_path / "videos" / "3Wbe7TIyvf4.mp4") and ann.where == ["line 2", "line 3"]
    assert len(LVU_TASKS) == 9


def test_lvu_regression_targets(tmp_path):
    _touch(tmp_path, "a1.mp4", "b2.mp4")
    like = read_lvu(_lvu(tmp_path, "like_ratio", "like dislike youtube_id imdb_id\n90 10 a1 tt1\n30 10 b2 tt2\n"),
                    tmp_path)
    assert like.task == "regression" and like.classes == []
    assert [s.label for s in like.samples] == pytest.approx([9.0, 7.5])  # 10 * likes / (likes + dislikes)
    view = read_lvu(_lvu(tmp_path, "view_count", "view_count youtube_id imdb_id\n1000 a1 tt1\n"), tmp_path)
    assert view.samples[0].label == pytest.approx(math.log(1000))


def test_lvu_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="LVU task 'likes'"):
        read_lvu(_lvu(tmp_path, "likes", "1 2 a b\n"), tmp_path)
    bad = _lvu(tmp_path, "like_ratio", "header\n0 0 a1 tt1\n5 a1\n")
    with pytest.raises(DatasetError,
                       match=r"(?s)line 2: likes 0 and dislikes 0 give no ratio.*line 3: expected at least 4"):
        read_lvu(bad, tmp_path, check_files=False)
    bad = _lvu(tmp_path, "genre", "genre_id genre youtube_id imdb_id\nx Drama a1 tt1\n-1 Drama a1 tt1\n")
    with pytest.raises(DatasetError, match=r"(?s)line 2: invalid literal.*line 3: negative label -1"):
        read_lvu(bad, tmp_path, check_files=False)
    with pytest.raises(DatasetError, match="annotation file not found"):
        read_lvu(tmp_path / "lvu_1.0" / "genre" / "val.csv", tmp_path)


# ---- regression head and loss ------------------------------------------------------------------------------
def test_regression_loss_and_error_by_hand():
    pred = torch.tensor([[0.5], [-1.0]])
    target = torch.tensor([13.0, 9.0])
    scale = TargetScale(mean=11.0, std=2.0)  # standardised targets: 1.0, -1.0
    assert float(regression_loss(pred, target, scale)) == pytest.approx(((0.5 - 1.0) ** 2 + 0.0) / 2)
    # in the target's own units the predictions are 12 and 9: errors 1 and 0
    assert mean_squared_error(pred, target, scale) == pytest.approx(0.5)
    assert float(regression_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))) == pytest.approx(2.0)


def test_target_scale_fit():
    s = TargetScale.fit([1.0, 3.0])
    assert (s.mean, s.std) == (2.0, 1.0)
    assert TargetScale.fit([5.0, 5.0]).std == 1.0
    with pytest.raises(ValueError, match="positive"):
        TargetScale(0.0, 0.0)
    with pytest.raises(ValueError, match="no targets"):
        TargetScale.fit([])


def test_regression_head_starts_at_the_mean_and_learns():
    model = attach_regression_head(create_model("videomamba_li_micro", embed_dim=32, depth=2, image_size=32,
                                                num_frames=4))
    clip = torch.randn(3, 4, 3, 32, 32)
    out = model(clip)
    assert out.shape == (3, 1) and torch.equal(out, torch.zeros(3, 1))  # zero head: the training mean
    loss = regression_loss(out, torch.tensor([10.0, 11.0, 12.0]), TargetScale(11.0, 1.0))
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"predictions \(B,\) or \(B, 1\)"):
        regression_loss(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(TypeError, match="no linear `head`"):
        attach_regression_head(torch.nn.Linear(2, 2))
