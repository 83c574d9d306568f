"""`pks4 demo` end to end at a toy size: data generation, both trainings (the parallel option), report files."""
import json

from pks4.cli import main


def test_demo_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    code = main(["demo", "--out", "demo",  # relative, as `make demo` passes it
                 "--set", "synth.num_train_per_class=2", "--set", "synth.num_val_per_class=1",
                 "--set", "synth.num_frames=8", "--set", "synth.size=32",
                 "--set", "run.train.epochs=1", "--set", "run.train.progress=false", "--set", "parallel=true"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"pks4", "baseline", "seconds", "views"}
    for key in ("pks4", "baseline"):
        assert 0.0 <= report[key]["top1"] <= 100.0
        assert report[key]["samples"] == 10  # one validation clip per class
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 0
    assert report["pks4"]["model"] == "pks4_vit_tiny" and report["baseline"]["model"] == "vit_tiny_avgpool"

    # the saved config names the generated data absolutely: evaluating from another folder finds the same clips
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "pks4"), "--views", report["views"], "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["top1"] == report["pks4"]["top1"]


def test_video_text_demo_reports_retrieval_and_the_reversed_pair_test(tmp_path, capsys):
    out = tmp_path / "vt"
    code = main(["demo", "--task", "video-text", "--out", str(out), "--set", "events.num_train=12",
                 "--set", "events.num_frames=8", "--set", "events.size=32", "--set", "run.train.epochs=1",
                 "--set", "run.train.batch_size=6", "--set", "run.unmasked_epochs=1", "--set", "run.data.num_frames=4",
                 "--set", "temporal_model.overrides={embed_dim: 16, depth: 2, patch_size: 8}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("temporal", "baseline"):
        r = report[key]
        assert r["train_steps"] == 6  # 12 clips x 3 captions / batch 6
        assert 0.0 <= r["t2v_r1"] <= r["t2v_r5"] <= r["t2v_r10"] <= 100.0 and r["videos"] == 120
        assert 0.0 <= r["reversed_pair"] <= 100.0 and r["train_cpu_s"] > 0
    assert report["temporal"]["model"] == "videomamba_li_micro" and report["baseline"]["model"] == "vit_tiny_avgpool"
    printed = capsys.readouterr().out
    assert "| temporal | videomamba_li_micro |" in printed and (out / "report.md").read_text() in printed
