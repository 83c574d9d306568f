"""`pks4 eval --frame-order` (Park et al. Table 1) through the one inference path, for any model."""
import csv
import json

import pytest
import torch

from pks4.cli import main
from pks4.data.datasets import build_dataset
from pks4.data.frame_order import FRAME_ORDERS, perturb_frame_order
from pks4.data.sampling import parse_views
from pks4.data.synth import generate_synth
from pks4.engine.checkpoint import load_model_from_checkpoint
from pks4.engine.infer import run_views
from pks4.models.registry import create_model


@pytest.mark.parametrize("order", FRAME_ORDERS)
def test_run_views_reorders_frames_before_the_model(order):
    # 8 frames: with 4, "pairwise" ([0, 1] kept, the one other pair "reversed") is the identity
    views = torch.randn(2, 2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, V, T, 3, H, W)
    mamba = create_model("videomamba_li_micro", image_size=32, num_frames=8).eval()
    got = run_views(mamba, views, frame_order=order)
    want = mamba(perturb_frame_order(views.flatten(0, 1), order)).view(2, 2, -1)
    torch.testing.assert_close(got, want)
    plain = run_views(mamba, views)
    assert torch.equal(got, plain) == (order == "sequential")  # the SSM reads the order
    average = create_model("vit_tiny_avgpool", image_size=32, num_frames=8, num_classes=10).eval()
    torch.testing.assert_close(run_views(average, views, frame_order=order), run_views(average, views))


def _confusion(path):
    with open(path) as fh:
        return [row[1:] for row in csv.reader(fh)][1:]


def test_eval_frame_order_cli_on_a_trained_checkpoint(tmp_path, capsys):
    data = generate_synth(tmp_path / "synth", seed=4, num_train_per_class=1, num_val_per_class=1, num_frames=8,
                          size=32)
    run = tmp_path / "run"
    assert main(["train", "--model", "videomamba_li_micro", "--train-list", str(data.train), "--val-list",
                 str(data.val), "--data-root", str(data.root), "--labels", str(data.labels), "--frames", "8",
                 "--size", "32", "--epochs", "1", "--batch-size", "5", "--workers", "0", "--out", str(run),
                 "--set", "data.short_side=32", "--set", "train.progress=false", "--set", "train.tensorboard=false",
                 "--set", "eval.views=8x1x1"]) == 0
    capsys.readouterr()
    model, cfg, classes = load_model_from_checkpoint(run)
    dataset = build_dataset(cfg.data, "val", train=False, views=parse_views("8x1x1"))
    clips = torch.stack([dataset[i].video for i in range(len(dataset))])  # (N, V, T, 3, H, W)
    labels = [dataset[i].label for i in range(len(dataset))]
    for order in FRAME_ORDERS:
        out = tmp_path / order
        assert main(["eval", "--checkpoint", str(run), "--frame-order", order, "--out", str(out), "--json",
                     "--workers", "0"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["frame_order"] == order and report["samples"] == len(labels)
        # Reference: the order applied by hand, then the model, one clip at a time.
        with torch.no_grad():
            preds = [int(model(perturb_frame_order(c, order)).argmax()) for c in clips]
        want = [[0] * len(classes) for _ in classes]
        for y, p in zip(labels, preds):
            want[y][p] += 1
        assert [[int(v) for v in row] for row in _confusion(out / "confusion_matrix.csv")] == want
        assert report["top1"] == pytest.approx(100.0 * sum(y == p for y, p in zip(labels, preds)) / len(labels))
    assert main(["eval", "--checkpoint", str(run), "--frame-order", "reversed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reversed" in err[0] and "interleaved" in err[0]
