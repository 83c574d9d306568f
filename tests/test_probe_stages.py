"""benchmarks/probe_stages.py: each stage's features are what the model computes there; the CLI on real files."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pks4.data.items import Item
from pks4.models.registry import create_model

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_stages.py"
_spec = importlib.util.spec_from_file_location("probe_stages", _PATH)
probe_stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_stages)


def _tiny():
    torch.manual_seed(0)
    return create_model("pks4_vit_tiny", num_classes=3, width=32, heads=1, layers=3, insert_layer=1, output_dim=16,
                        corr_window=3, image_size=32, num_frames=4, zero_init_residual=False).eval()


def test_stage_features_match_the_model_computed_piece_by_piece():
    model = _tiny()
    views = torch.randn(3, 2, 4, 3, 32, 32)  # 3 clips x 2 views, views averaged like evaluation does
    items = [Item(views[i], i, i) for i in range(3)]
    feats, labels = probe_stages.stage_features(model, items, batch_size=2)
    assert labels.tolist() == [0, 1, 2]

    bb, mod = model.backbone, model.module
    with torch.no_grad():
        x = views.flatten(0, 1)  # (6, T, 3, H, W)
        b, t = x.shape[:2]
        tok = bb.forward_blocks(bb.embed(x.flatten(0, 1)), 0, 1).view(b, t, 17, -1)
        pre = tok[:, :, 1:]
        kpe = mod.kpe(pre, (4, 4)) - pre
        seq = (pre + kpe).transpose(1, 2).reshape(b * 16, t, -1)  # one trajectory per patch (Eq. 3)
        ks4 = mod.ks4(seq).view(b, 16, t, -1).transpose(1, 2)
        clip = model.forward_features(x)
    want = {"pre": pre, "kpe": kpe, "ks4": ks4}
    for name, z in want.items():
        z = z.mean(1).view(3, 2, 16, -1).mean(1)  # time, then views
        torch.testing.assert_close(feats[f"{name}/aware"], z.flatten(1), msg=name)
        torch.testing.assert_close(feats[f"{name}/blind"], z.mean(1), msg=name)
    torch.testing.assert_close(feats["clip/blind"], clip.view(3, 2, -1).mean(1))
    assert feats["final/aware"].shape == (3, 16 * 32) and "clip/aware" not in feats


def test_probe_command_on_a_checkpoint_and_real_videos(tmp_path, capsys):
    from pks4.data.synth import CLASSES, generate_synth
    from pks4.engine import checkpoint as ckpt
    from pks4.engine.config import config_to_dict, load_config

    splits = generate_synth(tmp_path / "synth", num_train_per_class=3, num_val_per_class=1, num_frames=4, size=32)
    more = generate_synth(tmp_path / "more", num_train_per_class=0, num_val_per_class=2, num_frames=4, size=32)
    cfg = load_config(None, [f"data.root={splits.root}", f"data.train={splits.train}", f"data.val={splits.val}",
                             "data.num_frames=4", "data.size=32", "data.short_side=32", "eval.views=4x1x1"])
    model = _tiny()
    meta = {"model_name": "pks4_vit_tiny", "model_config": dataclasses.asdict(model.config), "classes": list(CLASSES),
            "config": config_to_dict(cfg)}
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001", model, {"step": 1}, meta)

    report = probe_stages.main(["--checkpoint", str(path), "--classes", "rotating_clockwise,7", "--json",
                                "--val-list", str(more.val)])
    assert json.loads(capsys.readouterr().out) == report
    assert report["clips"] == {"train": 6, "val": 4} and report["classes"] == ["rotating_clockwise", "7"]
    keys = {f"{s}/{r}" for s in probe_stages.STAGES for r in ("blind", "aware")} - {"clip/aware"}
    assert set(report["probes"]) == keys
    assert all(0 <= v["val"] <= 100 and 0 <= v["train"] <= 100 for v in report["probes"].values())

    probe_stages.main(["--checkpoint", str(path), "--classes", "moving_left,moving_right", "--holdout", "0.5"])
    table = capsys.readouterr().out
    assert "3 training / 3 validation clips" in table and "| kpe |" in table

    for argv, words in ((["--classes", "rotating_clockwise"], "two or more"),
                        (["--classes", "spinning,moving_left"], "two or more"),
                        (["--classes", "0,10"], "two or more"), (["--classes", "3,3"], "different"),
                        (["--classes", "0,1", "--holdout", "1.5"], "fraction"),
                        (["--classes", "0,1", "--holdout", "0.5", "--val-list", str(more.val)], "give one")):
        with pytest.raises(SystemExit, match=words):
            probe_stages.main(["--checkpoint", str(path), *argv])
