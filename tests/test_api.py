"""pks4.VideoClassifier: Hub-layout save/load (bitwise), one answer path with `pks4 predict`, inputs, bad folders."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pks4
from inference_fixtures import clf, data, run, val_videos  # noqa: F401 (fixtures)
from pks4.cli import main
from pks4.data.items import Batch
from pks4.data.synth import write_video
from pks4.data.video import read_frames
from pks4.engine.checkpoint import CheckpointError
from pks4.engine.infer import evaluate, progress_bar, resolve_amp
from pks4.engine.pretrained import CARD_FILE, CONFIG_FILE, model_card

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def hub(clf, tmp_path_factory):
    return clf.save_pretrained(tmp_path_factory.mktemp("hub") / "model")


def test_save_then_load_gives_bitwise_identical_logits(clf, hub, data):
    assert sorted(p.name for p in hub.iterdir()) == sorted([CONFIG_FILE, "model.safetensors", CARD_FILE])
    again = pks4.VideoClassifier.from_pretrained(hub, device="cpu")
    clips = torch.stack([clf.preprocess(v)[0] for v in val_videos(data)[:4]])  # (4, T, 3, H, W)
    with torch.no_grad():
        assert torch.equal(again.model(clips), clf.model(clips))
    assert again.classes == clf.classes and again.views == clf.views and again.spec.data.size == 32
    videos = val_videos(data)[:3]
    assert again(videos) == clf(videos)
    config = json.loads((hub / CONFIG_FILE).read_text())
    assert config["architecture"] == "pks4_vit_tiny" and config["num_frames"] == 8 and config["views"] == "8x2x1"
    assert config["id2label"]["0"] == clf.classes[0] and config["label2id"][clf.classes[9]] == 9
    resaved = again.save_pretrained(hub.parent / "resaved")  # the card and config survive a round trip
    for name in (CONFIG_FILE, CARD_FILE):
        assert (resaved / name).read_text() == (hub / name).read_text()


def test_hub_folder_reads_with_the_standard_library_and_safetensors_alone(clf, hub):
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pks4", "torch"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import array, struct
        raw = open({str(hub / 'model.safetensors')!r}, "rb").read()  # the layout, read by hand: header, then data
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + size])
        begin, end = header["head.weight"]["data_offsets"]
        head = array.array("f", raw[8 + size + begin:8 + size + end])
        stdlib = {{"dtypes": sorted({{v["dtype"] for k, v in header.items() if k != "__metadata__"}}),
                   "head_sum": sum(head), "metadata": header.get("__metadata__")}}
        from safetensors.numpy import load_file
        config = json.load(open({str(hub / CONFIG_FILE)!r}))
        weights = load_file({str(hub / 'model.safetensors')!r})
        print(json.dumps({{"labels": [config["id2label"][str(i)] for i in range(config["num_labels"])], **stdlib,
                           "arch": config["architecture"], "frames": config["num_frames"],
                           "sums": {{k: float(v.astype("float64").sum()) for k, v in weights.items()}},
                           "shapes": {{k: list(v.shape) for k, v in weights.items()}},
                           "pks4_loaded": "pks4" in sys.modules, "torch_loaded": "torch" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert not got["pks4_loaded"] and not got["torch_loaded"]
    assert got["labels"] == clf.classes and got["arch"] == "pks4_vit_tiny" and got["frames"] == 8
    assert got["dtypes"] == ["F32"] and got["metadata"] == {"format": "pt"}
    assert got["head_sum"] == pytest.approx(clf.model.head.weight.double().sum().item(), rel=1e-9, abs=1e-9)
    state = clf.model.state_dict()
    assert set(got["shapes"]) == set(state)
    for key, tensor in state.items():
        assert got["shapes"][key] == list(tensor.shape)
        assert got["sums"][key] == pytest.approx(tensor.double().sum().item(), rel=1e-12, abs=1e-12)


def test_classifier_and_predict_command_give_the_same_answers(run, hub, clf, data, capsys):
    videos = val_videos(data)[:5]
    for source in (run, hub):
        assert main(["predict", *videos, "--checkpoint", str(source), "--topk", "3", "--json", "--device", "cpu"]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert printed == clf(videos, topk=3)
    assert printed[0]["label"] == printed[0]["topk"][0]["label"] and printed[0]["path"] == videos[0]


def test_paths_frames_and_clips_go_through_the_same_path(clf, data):
    video = val_videos(data)[0]
    frames = read_frames(video, range(16))  # every frame of the 16-frame file, uint8 (L, H, W, 3)
    by_path = clf(video)
    assert by_path["path"] == video
    assert clf(frames) == {k: v for k, v in by_path.items() if k != "path"}
    assert torch.equal(clf.scores(frames.numpy()), clf.scores(video))
    views = clf.preprocess(video)  # (V, T, 3, H, W)
    assert views.shape == (2, 8, 3, 32, 32)
    assert torch.equal(clf.scores(views[None]), clf.scores(video))
    assert [t["index"] for t in clf(views[0])["topk"]] == clf.scores(views[0][None])[0].topk(5).indices.tolist()


def test_embed_is_the_view_mean_of_forward_features(clf, data):
    videos = val_videos(data)[:3]
    feats = clf.embed(videos)
    assert feats.shape == (3, 32)
    with torch.no_grad():
        ref = torch.stack([clf.model.forward_features(clf.preprocess(v)).mean(0) for v in videos])
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(clf.embed(videos[0]), clf.embed(videos[:1]))


def test_batch_size_workers_and_views_are_arguments(run, data):
    videos = val_videos(data)[:5]
    base = pks4.VideoClassifier.from_pretrained(run, device="cpu", batch_size=2)
    workers = pks4.VideoClassifier.from_pretrained(run, device="cpu", batch_size=2, num_workers=2)
    assert torch.equal(workers.scores(videos), base.scores(videos))  # decoding in other processes changes nothing
    one = pks4.VideoClassifier.from_pretrained(run, device="cpu", batch_size=1)
    torch.testing.assert_close(one.scores(videos), base.scores(videos), rtol=1e-5, atol=1e-6)
    single_view = base.scores(videos, views="8x1x1")
    assert single_view.shape == (5, 10) and not torch.equal(single_view, base.scores(videos))
    torch.testing.assert_close(single_view.sum(1), torch.ones(5))


def test_dtype_autocast(run, data):
    assert resolve_amp("auto", "cpu") is None and resolve_amp("fp32", "cuda") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16 and resolve_amp("fp16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="amp 'half'.*auto, fp32, bf16, fp16"):
        resolve_amp("half", "cpu")
    videos = val_videos(data)[:3]
    fp32 = pks4.VideoClassifier.from_pretrained(run, device="cpu", dtype="fp32")
    bf16 = pks4.VideoClassifier.from_pretrained(run, device="cpu", dtype="bf16")
    assert bf16.amp_dtype is torch.bfloat16
    torch.testing.assert_close(bf16.scores(videos), fp32.scores(videos), rtol=0, atol=2e-2)
    assert bf16.scores(videos).dtype == torch.float32


def test_model_card_reports_the_runs_measured_accuracy(hub):
    card = (hub / CARD_FILE).read_text()
    assert "pipeline_tag: video-classification" in card and "10 classes: moving_right, moving_left" in card
    assert "Validation top-1 60.00% (top-5 100.00%) at epoch 2, on 10 clips" in card  # the best metrics.jsonl row
    assert "last evaluation 50.00%" in card and "8x2x1" in card
    assert card == model_card(json.loads((hub / CONFIG_FILE).read_text()))


def test_export_pretrained_command(run, data, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export-pretrained", str(run), str(out)]) == 0
    assert "config.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, "model.safetensors", CARD_FILE])
    weights_only = out / "model.safetensors"  # the weights file of a Hub folder finds its config.json
    assert pks4.VideoClassifier.from_pretrained(weights_only)(val_videos(data)[0])["topk"]


def test_readme_python_example_runs_verbatim(run, data, tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("### A trained model from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    os.symlink(run, tmp_path / "runs" / "demo" / "pks4")
    videos = val_videos(data)
    for name, video in (("clip.mp4", videos[0]), ("a.mp4", videos[1])):
        (tmp_path / name).write_bytes(Path(video).read_bytes())
    write_video(tmp_path / "b.webm", read_frames(videos[2], range(16)).numpy(), 8.0, codec="libvpx")
    exec(compile(code, "README.md", "exec"), {})
    assert sorted(p.name for p in (tmp_path / "my-model").iterdir()) == sorted([CONFIG_FILE, "model.safetensors",
                                                                               CARD_FILE])


def test_progress_bar_only_on_a_terminal(monkeypatch, clf, data):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    assert progress_bar(3, "x").disable  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress_bar(3, "x").disable and progress_bar(3, "x", enabled=False).disable
    monkeypatch.setenv("PKS4_NO_PROGRESS", "1")
    assert progress_bar(3, "x").disable
    views = torch.stack([clf.preprocess(v) for v in val_videos(data)[:2]])
    batches = [Batch(views, torch.tensor([0, 1]), torch.tensor([0, 1]))]
    assert torch.equal(evaluate(clf.model, batches, progress=True).probs, evaluate(clf.model, batches).probs)


# ---------------------------------------------------------------------------------------------------- bad input


def _folder(hub: Path, tmp_path: Path, edit=None, drop_config: bool = False) -> Path:
    out = tmp_path / "bad"
    out.mkdir()
    (out / "model.safetensors").write_bytes((hub / "model.safetensors").read_bytes())
    if not drop_config:
        config = json.loads((hub / CONFIG_FILE).read_text())
        text = edit(config) if edit else json.dumps(config)
        (out / CONFIG_FILE).write_text(text if isinstance(text, str) else json.dumps(text))
    return out


def _set(key, value):
    def edit(config):
        target, *path = key.split(".")
        node = config
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
        return config
    return edit


@pytest.mark.parametrize("edit, words", [
    (None, ["config.json", "missing", "save_pretrained"]),  # no config.json at all
    (lambda c: "{not json", ["config.json", "not valid JSON", "line 1"]),
    (lambda c: [1, 2], ["config.json", "JSON object"]),
    (lambda c: {k: v for k, v in c.items() if k not in ("architecture", "views")}, ["architecture, views"]),
    (_set("id2label", {"0": "a", "1": "b"}), ["config.json", "2 labels", "num_classes is 10"]),
    (_set("id2label", {str(i + 1): str(i) for i in range(10)}), ["id2label", "keys must be"]),
    (_set("label2id", {"x": 0}), ["label2id", "inverse"]),
    (_set("num_labels", 7), ["num_labels", "7"]),
    (_set("architecture", "no_such_model"), ["config.json", "architecture", "no_such_model"]),
    (_set("model_config.backbone.width", 48), ["model.safetensors", "do not fit", "config.json"]),
    (_set("model_config.no_such_field", 1), ["config.json", "model_config", "pks4_vit_tiny"]),
    (_set("format_version", 99), ["format_version 99", "newer"]),
])
def test_bad_pretrained_folder_names_the_file_and_key(hub, tmp_path, edit, words):
    folder = _folder(hub, tmp_path, edit, drop_config=edit is None)
    with pytest.raises(CheckpointError) as info:
        pks4.VideoClassifier.from_pretrained(folder)
    for word in words:
        assert word in str(info.value)


def test_bad_inputs_are_clear_errors(clf, data, tmp_path, capsys):
    from pks4.data.video import DataError

    with pytest.raises(TypeError, match="video path"):
        clf(123)
    with pytest.raises(TypeError, match="empty"):
        clf([])
    with pytest.raises(TypeError, match="got dict"):
        clf([{"path": "a.mp4"}])
    with pytest.raises(ValueError, match=r"uint8 frames.*float32 \(4, 5\)"):
        clf(torch.zeros(4, 5))
    with pytest.raises(DataError, match="missing.mp4: file not found"):
        clf(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="topk 0"):
        pks4.VideoClassifier(clf.model, clf.spec, topk=0)
    with pytest.raises(ValueError, match="topk 0"):
        clf(str(tmp_path / "missing.mp4"), topk=0)
    with pytest.raises(ValueError, match="cannot parse views"):
        clf(str(tmp_path / "missing.mp4"), views="eight")
    in_workers = pks4.VideoClassifier(clf.model, clf.spec, num_workers=2)  # a worker's error keeps its message
    with pytest.raises(DataError, match=r"^\S*missing.mp4: file not found$"):
        in_workers([val_videos(data)[0], str(tmp_path / "missing.mp4")])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        pks4.VideoClassifier.from_pretrained(tmp_path / "nowhere")
    assert main(["export-pretrained", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
