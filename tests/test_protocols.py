"""Evaluation protocols (pks4.engine.protocols): retrieval, linear probe, embeddings, the frames x size grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from pks4.cli import build_parser, main
from pks4.data.items import Item
from pks4.engine.protocols import (GridResult, classify, embed, eval_grid, extract_features, linear_probe, parse_grid,
                                   project_2d, retrieval_topk, write_grid)
from pks4.models.registry import create_model


# ---- retrieval ---------------------------------------------------------------------------------------------------
def test_retrieval_top1_golden():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    gallery_labels = torch.tensor([0, 1, 2, 3])
    queries = torch.tensor([
        [10.0, 0.5],  # nearest by cosine: [1, 0] -> 0, correct (scale must not matter)
        [0.1, 3.0],  # -> [0, 1] -> 1, correct
        [0.6, 0.8],  # -> [0.7, 0.7] (cos 0.99) -> 3, but the label is 1: wrong at k=1, right at k=2
        [-2.0, -0.1],  # -> [-1, 0] -> 2, correct
    ])
    labels = torch.tensor([0, 1, 1, 2])
    acc = retrieval_topk(queries, labels, gallery, gallery_labels, ks=(1, 2))
    assert acc == {1: 75.0, 2: 100.0}


def test_retrieval_rejects_mismatched_dims():
    with pytest.raises(ValueError, match=r"\(Nq, D\)"):
        retrieval_topk(torch.zeros(2, 3), torch.zeros(2), torch.zeros(4, 5), torch.zeros(4))


# ---- linear probe ------------------------------------------------------------------------------------------------
def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]]) * 3 + 100  # offset: needs
    y = torch.arange(n) % 3                                                                    # standardising
    return centres[y] + torch.randn(n, 5, generator=g), y


@pytest.mark.parametrize("optimizer", ["lbfgs", "adamw"])
def test_linear_probe_learns_a_separable_set(optimizer):
    xt, yt = _blobs(90, 0)
    xv, yv = _blobs(60, 1)
    res = linear_probe(xt, yt, xv, yv, steps=200, optimizer=optimizer)
    assert res.train_top1 == 100.0 and res.top1 == 100.0
    assert res.losses[-1] < res.losses[0] / 2
    assert res.weight.shape == (3, 5)


def test_linear_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    xt, xv = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    yt, yv = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    assert linear_probe(xt, yt, xv, yv, steps=50).top1 < 40.0


# ---- models over a tiny dataset -------------------------------------------------------------------------------
class _Moving(Dataset):
    """A bright square moving right (label 0) or left (label 1): clips at any (frames, size)."""

    def __init__(self, n: int = 8, frames: int = 4, size: int = 32) -> None:
        self.n, self.frames, self.size = n, frames, size

    def with_shape(self, frames: int, size: int) -> "_Moving":
        return _Moving(self.n, frames, size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        t, s = self.frames, self.size
        video = torch.zeros(t, 3, s, s)
        for k in range(t):
            x = int((k if i % 2 == 0 else t - 1 - k) * (s - s // 4) / max(t - 1, 1))
            video[k, :, s // 3: s // 3 + s // 4, x: x + s // 4] = 1.0
        return Item(video, i % 2, i)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("pks4_vit_tiny", width=32, heads=1, layers=2, insert_layer=1, output_dim=32,
                        corr_window=3, num_classes=2).eval()


def test_extract_features_at_any_shape(tiny_model):
    f, y, idx = extract_features(tiny_model, _Moving(6), frames=2, size=48, batch_size=4)
    assert f.shape == (6, 32) and y.tolist() == [0, 1] * 3 and idx.tolist() == list(range(6))
    f2, _, _ = extract_features(tiny_model, _Moving(6), frames=4, size=24, policy="static_tokens", batch_size=4)
    assert f2.shape == (6, 32) and not torch.allclose(f, f2)


def test_grid_runs_one_checkpoint_over_frames_and_sizes(tiny_model, tmp_path):
    res = eval_grid(tiny_model, _Moving(4), [2, 4], [16, 32, 40], batch_size=4, seen=[(4, 32)])
    assert res.values.shape == (2, 3) and np.isfinite(res.values).all()
    assert set(np.unique(res.values)) <= {0.0, 25.0, 50.0, 75.0, 100.0}
    direct = classify(tiny_model, _Moving(4), frames=4, size=40, batch_size=2)["top1"]
    assert res.values[1, 2] == direct
    ret = eval_grid(tiny_model, _Moving(4), [2], [32], metric="retrieval", gallery=_Moving(6), batch_size=4)
    assert ret.values.shape == (1, 1)
    paths = write_grid(res, tmp_path, "grid")
    assert paths["png"].stat().st_size > 1000
    assert paths["csv"].read_text().splitlines()[0] == "frames,size,top1,policy"
    assert "| 4 frames |" in paths["md"].read_text() and "**" in paths["md"].read_text()


def test_grid_result_spread_and_markdown():
    res = GridResult([8, 16], [96, 224], np.array([[50.0, 60.0], [55.0, 52.5]]), seen=[(16, 224)])
    assert res.spread == 10.0
    md = res.to_markdown()
    assert "| 16 frames | 55.0 | **52.5** | 53.8 |" in md


def test_parse_grid():
    assert parse_grid(["frames=8,16,32,64", "size=96,112,128"]) == ([8, 16, 32, 64], [96, 112, 128])
    with pytest.raises(ValueError, match="both"):
        parse_grid(["frames=8"])
    with pytest.raises(ValueError, match="integers"):
        parse_grid(["frames=8,x", "size=96"])


# ---- embeddings ------------------------------------------------------------------------------------------------
def test_embed_writes_features_and_maps(tiny_model, tmp_path):
    paths = embed(tiny_model, _Moving(8), tmp_path / "emb.npz", frames=4, size=32, classes=["right", "left"],
                  batch_size=4, methods=["pca"])
    data = np.load(paths["features"])
    assert data["features"].shape == (8, 32) and data["labels"].tolist() == [0, 1] * 4
    assert paths["pca"].name == "emb_pca.png" and paths["pca"].stat().st_size > 1000
    st = embed(tiny_model, _Moving(4), tmp_path / "emb.safetensors", frames=2, size=16, batch_size=4, methods=[])
    from safetensors.torch import load_file

    assert load_file(str(st["features"]))["features"].shape == (4, 32)


def test_pca_projection_golden():
    x = torch.tensor([[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    xy = project_2d(x, "pca")
    assert np.allclose(np.abs(xy[:, 0]), [2, 2, 0, 0]) and np.allclose(np.abs(xy[:, 1]), [0, 0, 1, 1])


def test_cli_parsers_accept_the_documented_commands():
    p = build_parser()
    args = p.parse_args(["eval", "--checkpoint", "c", "--grid", "frames=8,16,32,64", "size=96,112,128,192,224,288,384"])
    assert parse_grid(args.grid) == ([8, 16, 32, 64], [96, 112, 128, 192, 224, 288, 384])
    args = p.parse_args(["linear-probe", "--checkpoint", "run", "--patch-policy", "static_tokens"])
    assert args.steps == 300 and args.patch_policy == "static_tokens"
    assert p.parse_args(["embed", "--checkpoint", "c", "--out", "e.npz"]).split == "val"
    assert p.parse_args(["retrieval", "--checkpoint", "c", "--frames", "16"]).frames == 16


# ---- command line on a real checkpoint and real video files -------------------------------------------------------
def test_protocol_commands_on_a_checkpoint(tmp_path, capsys):
    import dataclasses
    import json

    from pks4.data.synth import CLASSES, generate_synth
    from pks4.engine import checkpoint as ckpt
    from pks4.engine.config import config_to_dict, load_config

    splits = generate_synth(tmp_path / "synth", num_train_per_class=1, num_val_per_class=1, num_frames=4, size=32)
    cfg = load_config(None, [f"data.root={splits.root}", f"data.train={splits.train}", f"data.val={splits.val}",
                             "data.num_frames=2", "data.size=32", "data.short_side=32", "model.name=pks4_vit_tiny"])
    model = create_model("pks4_vit_tiny", width=32, heads=1, layers=2, insert_layer=1, output_dim=32, corr_window=3,
                         image_size=32, num_frames=2)
    meta = {"model_name": "pks4_vit_tiny", "model_config": dataclasses.asdict(model.config), "classes": list(CLASSES),
            "config": config_to_dict(cfg)}
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001", model, {"step": 1}, meta)

    common = ["--checkpoint", str(path), "--device", "cpu", "--json", "--batch-size", "5"]
    assert main(["retrieval", *common]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"top1", "top5"}
    assert main(["linear-probe", *common, "--steps", "5", "--size", "48"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 48
    assert main(["embed", *common, "--out", str(tmp_path / "e.npz"), "--patch-policy", "static_tokens"]) == 0
    assert (tmp_path / "e_pca.png").is_file() and np.load(tmp_path / "e.npz")["features"].shape == (10, 32)
    capsys.readouterr()
    assert main(["eval", *common, "--workers", "0", "--grid", "frames=2,4", "size=16,32", "--out",
                 str(tmp_path / "grid")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["grid"]) == 4 and (tmp_path / "grid" / "grid.png").is_file()
