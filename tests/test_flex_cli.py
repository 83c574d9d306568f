"""StretchySnake through `pks4` on tiny real mp4 files: flexible training (static tokens) and its exact resume,
then one checkpoint evaluated at any (T, H) and patch size, over the frames x size grid, by retrieval, linear
probe and embedding, all through the one inference path."""
import csv
import json

import numpy as np
import pytest
import torch

from pks4.cli import main
from pks4.data.datasets import build_dataset, load_video_views
from pks4.data.sampling import ViewSpec
from pks4.data.synth import generate_synth
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import load_config
from pks4.data.flex_sampler import FlexBatchSampler, data_config_at, resolve_flex_config
from pks4.engine.train import build_trainer, soft_cross_entropy, soft_targets
from pks4.layers.geometry import TokenGeometry

# A 2-block pks4_vit_tiny of width 32 at 32 px with 8 px patches: a 4 x 4 token grid. Static tokens then trains
# at 32 px (patch 8) and 48 px (patch 12), 2 or 4 frames; batches of 4 clips at (4, 32) and 8 at 2 frames.
TINY = ["model.overrides.width=32", "model.overrides.heads=1", "model.overrides.layers=2",
        "model.overrides.insert_layer=1", "model.overrides.output_dim=32", "model.overrides.corr_window=3"]
FLEX = ["flex.mode=static_tokens", "flex.frames=[2, 4]", "flex.sizes=[32, 48]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 10 classes x 2 training clips (20) and 1 validation clip (10), 8 frames at 48 px
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=5, num_train_per_class=2, num_val_per_class=1,
                          num_frames=8, size=48)


def _argv(data, out, *extra):
    sets = [*TINY, *FLEX, "data.short_side=32", "train.deterministic=true", "train.save_every_steps=1",
            "train.progress=false", "train.tensorboard=false", "train.log_every=1", "eval.views=4x1x1",
            "optim.lr=0.01", "optim.scale_lr=false", "optim.warmup_epochs=0.5"]
    return ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--val-list", str(data.val),
            "--data-root", str(data.root), "--labels", str(data.labels), "--frames", "4", "--size", "32",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flex") / "run"
    assert main(_argv(data, out)) == 0
    return out


def _last(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _latest_weights(run) -> tuple[dict, dict]:
    path = ckpt.find_latest(run, log=lambda m: None)
    return ckpt.read_weights(path / ckpt.WEIGHTS_FILE)[0], ckpt.verify_checkpoint(path)


# ---- training ---------------------------------------------------------------------------------------------------
def test_flexible_training_follows_the_planned_batches(run):
    model, cfg, _ = ckpt.load_model_from_checkpoint(run)
    assert cfg.flex.mode == "static_tokens" and cfg.flex.sizes == (32, 48)  # saved inside the checkpoint
    flex = resolve_flex_config(cfg.flex, model, base_frames=cfg.data.num_frames)
    sampler = FlexBatchSampler(20, 4, flex, seed=cfg.train.seed)
    plan = sampler.plan()
    shapes = {shape for shape, _ in plan}
    assert len(shapes) > 1 and {s.grid for s in shapes} == {4}  # several (T, H, p), one token grid
    assert all(s.patch == s.size // 4 for s in shapes)
    _, state = _latest_weights(run)
    # one optimizer step per planned batch, and the LR schedule spans exactly the planned steps
    assert state["global_step"] == len(plan) == state["scheduler"]["total_steps"]


def test_training_step_embeds_with_the_batch_patch(data, tmp_path):
    """The loss of one training step is the model's loss under the batch's flexed patch, not the plain one."""
    cfg = load_config(None, [f"data.root={data.root}", f"data.train={data.train}", f"data.labels={data.labels}",
                             "data.num_frames=4", "data.size=32", "data.short_side=32", "model.name=pks4_vit_tiny",
                             "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
                             f"out={tmp_path / 'run'}", *TINY, *FLEX, "flex.sizes=[48]"])
    trainer = build_trainer(cfg, log=lambda m: None)
    batch = next(b for b in trainer._stream(0, trainer.plan.batches(0)) if b.video is not None)
    shape = batch.shape
    assert shape.size == 48 and shape.patch == 12 and batch.video.shape[1:] == (shape.frames, 3, 48, 48)
    model = trainer.task.model
    targets = soft_targets(batch.label, len(trainer.task.classes), cfg.train.label_smoothing)
    with torch.no_grad():
        geometry = TokenGeometry(patch=shape.patch, grid=shape.grid, kernel_resize=cfg.flex.kernel_resize)
        want = soft_cross_entropy(model(batch.video, geometry=geometry), targets)
        plain = soft_cross_entropy(model(batch.video), targets)  # patch 8: a 6 x 6 grid
    got = trainer._forward_backward(batch, sync=True, scale=1.0)["loss"]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    assert model.backbone.conv1.weight.grad.abs().sum() > 0  # the stored kernel trains through the resize
    assert "forward" not in vars(model)  # nothing is left set on the model after the step


def test_flexible_run_stopped_mid_epoch_resumes_bitwise(data, run, tmp_path, capsys):
    reference, ref_state = _latest_weights(run)
    other = tmp_path / "stopped"
    assert main(_argv(data, other, "--set", "train.stop_after_steps=2")) == 0
    assert "stopped: 2 steps" in capsys.readouterr().out
    assert main(_argv(data, other, "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    weights, state = _latest_weights(other)
    assert state["global_step"] == ref_state["global_step"] > 2
    assert [k for k in reference if not torch.equal(reference[k], weights[k])] == []


@pytest.mark.filterwarnings("ignore:skipping unreadable video")
def test_unreadable_video_in_flexible_training_fails_clearly_or_is_skipped(data, tmp_path, capsys):
    good = (data.root / "train" / "moving_left" / "moving_left_000.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 3])  # exists, so it fails only when decoded
    train_list = tmp_path / "train.txt"
    train_list.write_text(data.train.read_text() + f"{tmp_path / 'cut.mp4'} 4\n")
    argv = _argv(data, tmp_path / "run", "--set", f"data.train={train_list}", "--set", "train.save_every_steps=100")
    capsys.readouterr()
    assert main(argv) == 2  # without the flag: one clear line naming the file
    assert "cut.mp4" in capsys.readouterr().err
    assert main(argv + ["--skip-bad-videos", "--out", str(tmp_path / "run2")]) == 0
    assert "1 unreadable video(s) skipped" in capsys.readouterr().out
    assert "cut.mp4: " in (tmp_path / "run2" / "skipped_videos.txt").read_text()  # the file and why


# ---- evaluation at any shape ------------------------------------------------------------------------------------
def _confusion(path) -> list[list[int]]:
    with open(path) as fh:
        return [[int(v) for v in row[1:]] for row in list(csv.reader(fh))[1:]]


def test_eval_at_any_frames_size_and_patch_from_one_checkpoint(run, tmp_path, capsys):
    common = ["eval", "--checkpoint", str(run), "--json", "--workers", "0", "--frames", "2", "--size", "48"]
    assert main([*common, "--patch-policy", "static_tokens", "--out", str(tmp_path / "st")]) == 0
    report = _last(capsys)
    assert report["views"] == "2x1x1" and report["size"] == 48 and report["patch_policy"] == "static_tokens"
    assert report["samples"] == 10 and 0 <= report["top1"] <= report["top5"] <= 100
    assert main([*common, "--patch-policy", "12", "--out", str(tmp_path / "p12")]) == 0  # = static tokens at 48
    assert _last(capsys)["top1"] == report["top1"]
    got = _confusion(tmp_path / "st" / "confusion_matrix.csv")
    assert got == _confusion(tmp_path / "p12" / "confusion_matrix.csv")
    # Reference: the val clips loaded at 2 frames x 48 px, the model with 12 px patches on a 4 x 4 grid.
    model, cfg, classes = ckpt.load_model_from_checkpoint(run)
    dataset = build_dataset(data_config_at(cfg.data, 2, 48), "val", train=False, views=ViewSpec(2))
    want = [[0] * len(classes) for _ in classes]
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            want[item.label][int(model(item.video, geometry=TokenGeometry(patch=12, grid=4)).argmax())] += 1
    assert got == want
    assert main(["eval", "--checkpoint", str(run), "--patch-policy", "bogus", "--workers", "0"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_predict_scores_at_any_shape_match_the_flexed_model(data, run, capsys):
    videos = sorted(str(p) for p in (data.root / "val").rglob("*.mp4"))[:3]
    scores = {}
    for policy in ("static_tokens", "native"):
        assert main(["predict", *videos, "--checkpoint", str(run), "--frames", "2", "--size", "48", "--topk", "10",
                     "--patch-policy", policy, "--json", "--device", "cpu"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        scores[policy] = [{t["index"]: t["score"] for t in line["topk"]} for line in lines]
    model, cfg, _ = ckpt.load_model_from_checkpoint(run)
    for path, got in zip(videos, scores["static_tokens"]):
        clip = load_video_views(path, 2, 48, ViewSpec(4), data_config_at(cfg.data, 2, 48))  # (1, 2, 3, 48, 48)
        with torch.no_grad():
            probs = model(clip, geometry=TokenGeometry(patch=12, grid=4)).softmax(-1)[0]
        assert got == pytest.approx({k: float(probs[k]) for k in range(len(probs))}, abs=2e-6)
    assert scores["native"] != scores["static_tokens"]  # 8 px patches on a 6 x 6 grid: another model input


def test_eval_grid_matches_single_evaluations(run, tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["eval", "--checkpoint", str(run), "--grid", "frames=4,8", "size=32,48", "--patch-policy",
                 "static_tokens", "--out", str(out), "--json", "--workers", "0"]) == 0
    report = _last(capsys)
    cells = {(r["frames"], r["size"]): r["top1"] for r in report["grid"]}
    assert set(cells) == {(4, 32), (4, 48), (8, 32), (8, 48)} and all(0 <= v <= 100 for v in cells.values())
    table = (out / "grid.md").read_text()
    assert (out / "grid.png").stat().st_size > 1000
    assert "| 4 frames | **" in table and "| 8 frames | **" not in table  # cells trained at are in bold
    assert len((out / "grid.csv").read_text().splitlines()) == 5
    for t, s in [(4, 32), (8, 48)]:  # one inference path: the grid cell is the plain evaluation at (T, H)
        assert main(["eval", "--checkpoint", str(run), "--frames", str(t), "--size", str(s), "--patch-policy",
                     "static_tokens", "--json", "--workers", "0"]) == 0
        assert _last(capsys)["top1"] == pytest.approx(cells[(t, s)])


def test_retrieval_linear_probe_and_embed_on_the_checkpoint(run, tmp_path, capsys):
    common = ["--checkpoint", str(run), "--json", "--device", "cpu", "--batch-size", "10"]
    assert main(["retrieval", *common, "--frames", "2", "--size", "48"]) == 0
    res = _last(capsys)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["frames"] == 2 and res["size"] == 48
    assert main(["linear-probe", *common, "--steps", "50"]) == 0
    probe = _last(capsys)
    assert probe["train_top1"] >= 90.0 and 0 <= probe["top1"] <= 100  # 20 clips, 32-d features: separable
    assert main(["embed", *common, "--out", str(tmp_path / "emb.npz"), "--split", "train", "--patch-policy",
                 "static_tokens", "--size", "48"]) == 0
    paths = _last(capsys)
    saved = np.load(paths["features"])
    assert saved["features"].shape == (20, 32) and np.isfinite(saved["features"]).all()
    assert sorted(saved["labels"].tolist()) == sorted(list(range(10)) * 2)
    assert (tmp_path / "emb_pca.png").stat().st_size > 1000
