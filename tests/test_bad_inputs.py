"""The bad-input corpus: every input is generated here, fed to the real ``pks4`` command line (in-process
``main``), and must end as documented: exit code 2 (1 for ``data check``) with one line naming the file or key
and the problem, or a documented recovery (exit 0). benchmarks/reliability.md tabulates the outcomes."""
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import bad_videos as bv
from run_fixtures import a_run

import numpy as np
import pytest
import torch

from pks4.cli import main
from pks4.data.synth import generate_synth, write_video
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import config_to_dict, load_config
from pks4.models.registry import create_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synth(tmp_path_factory.mktemp("synth"), seed=4, num_train_per_class=1, num_val_per_class=1,
                          num_frames=6, size=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint of an (untrained) tiny model, as `pks4 train --out` would leave it."""
    run = tmp_path_factory.mktemp("run")
    model = create_model("pks4_vit_tiny", num_classes=10, image_size=32, num_frames=4)
    cfg = load_config(None, ["data.num_frames=4", "data.size=32", "data.short_side=32", "eval.views=4x1x1"])
    meta = {"model_name": model.model_name, "model_config": dataclasses.asdict(model.config),
            "classes": [str(i) for i in range(10)], "config": config_to_dict(cfg)}
    ckpt.save_checkpoint(run / "checkpoints" / "step-00000001", model, {"global_step": 1}, meta)
    return run


def _frames(t=6, h=32, w=32, seed=0):
    # smooth content: noise at 4K costs the encoder seconds for nothing
    base = np.random.default_rng(seed).integers(0, 255, (t, 4, 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(base, -(-h // 4), 1), -(-w // 4), 2)[:, :h, :w])


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(_frames(1)[0]).save(path)
    return path


class _Evil:
    """Unpickling this would create a marker folder: the payload of a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_pt(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save({"model": {"head.weight": torch.zeros(2)}, "x": _Evil(str(tmp / "pwned"))}, path)
    return path


def _train(data, tmp, *extra, epochs=1):
    return ["train", "--model", "pks4_vit_tiny", "--train-list", str(data.train), "--data-root", str(data.root),
            "--labels", str(data.labels), "--frames", "4", "--size", "32", "--epochs", str(epochs),
            "--batch-size", "4", "--workers", "0", "--out", str(tmp / "run"), "--set", "data.short_side=32",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.stop_after_steps=1",
            *extra]


def _list(tmp: Path, text: str, name="list.txt") -> Path:
    (tmp / name).write_text(text, encoding="utf-8")
    return tmp / name


def _good(data) -> Path:
    return data.root / "train" / "moving_right" / "moving_right_000.mp4"


def _truncated(tmp, data) -> Path:
    raw = _good(data).read_bytes()
    (tmp / "truncated.mp4").write_bytes(raw[: len(raw) // 2])
    return tmp / "truncated.mp4"


@dataclass
class Case:
    name: str
    make: Callable  # (tmp, data, run_dir) -> argv
    code: int  # expected exit code
    words: tuple  # must all appear in the output (stderr + stdout)
    outcome: str  # what the user sees, for benchmarks/reliability.md
    warns: str = ""  # a warning the run must give (its text must contain this)


def _check(path_fn):
    return lambda tmp, data, run: ["data", "check", str(path_fn(tmp, data))]


def _predict(path_fn):
    return lambda tmp, data, run: ["predict", str(path_fn(tmp, data)), "--checkpoint", str(run), "--json",
                                   "--topk", "2"]


def _yaml(text):
    def make(tmp, data, run):
        (tmp / "cfg.yaml").write_text(text)
        return _train(data, tmp) + [] if False else ["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]
    return make


CASES = [
    Case("truncated mp4 (data check)", _check(lambda t, d: _list(t, f"{_truncated(t, d)} 0\n")), 1,
         ("truncated.mp4", "unreadable"), "listed as unreadable, NOT OK"),
    Case("truncated mp4 (predict)", _predict(_truncated), 2, ("truncated.mp4", "truncated"),
         "error names the file: no video stream, truncated"),
    Case("zero-byte file", _predict(lambda t, d: (t / "empty.mp4").write_bytes(b"") and None or t / "empty.mp4"),
         2, ("empty.mp4", "0 bytes"), "error: file is empty (0 bytes)"),
    Case("non-video file (text named .mp4)",
         _predict(lambda t, d: (t / "notes.mp4").write_text("just some text\n") and t / "notes.mp4"), 2,
         ("notes.mp4", "not a readable video"), "error: not a readable video"),
    Case("image file passed as a video", _predict(lambda t, d: _png(t / "frame.png")), 2,
         ("frame.png", "still image"), "error: is a still image, not a video"),
    Case("1-frame video", _predict(lambda t, d: write_video(t / "one.mp4", _frames(1), 8)), 0, ("one.mp4",),
         "recovery: the frame is repeated to fill the clip"),
    Case("huge resolution (1080x1920, far above the model's 32)",
         _predict(lambda t, d: write_video(t / "huge.mp4", _frames(1, 1080, 1920), 8)), 0, ("huge.mp4",),
         "recovery: resized to the model's size"),
    Case("grayscale video (ffv1, gray)",
         _predict(lambda t, d: write_video(t / "gray.mkv", _frames()[..., 0], 8, codec="ffv1")), 0, ("gray.mkv",),
         "recovery: converted to RGB"),
    Case("rotated video (display matrix 90 deg)",
         _predict(lambda t, d: write_video(t / "rot.mp4", _frames(6, 32, 48), 8, rotation=90)), 0, ("rot.mp4",),
         "recovery: rotation applied, then resized"),
    Case("variable frame rate",
         _predict(lambda t, d: write_video(t / "vfr.mp4", _frames(), 8,
                                           timestamps=[0, 0.05, 0.3, 0.35, 0.9, 1.0])), 0, ("vfr.mp4",),
         "recovery: frames sampled by time"),
    Case("unicode and spaces in paths",
         _check(lambda t, d: _list(t, f"{write_video(t / 'dossier é 空' / 'vidéo 1.mp4', _frames(), 8)} 0\n",
                                   "liste é.txt")), 0, ("1 videos", "OK"), "works: paths may hold any character"),
    Case("missing file", _check(lambda t, d: _list(t, "nowhere/ghost.mp4 0\n")), 1, ("ghost.mp4", "missing"),
         "listed as missing, NOT OK"),
    Case("missing file (train)", lambda t, d, r: _train(d, t, "--set",
                                                        f"data.train={_list(t, 'nowhere/ghost.mp4 0')}"), 2,
         ("ghost.mp4", "missing"), "error names the list, the line and the file"),
    Case("label out of range", lambda t, d, r: _train(d, t, "--set", f"data.train={_list(t, f'{_good(d)} 12')}"),
         2, ("line 1", "label 12 out of range for 10 classes"), "error names the list and line"),
    Case("negative label", lambda t, d, r: _train(d, t, "--set", f"data.train={_list(t, f'{_good(d)} -1')}"), 2,
         ("line 1", "negative label -1"), "error names the list and line"),
    Case("non-integer label", lambda t, d, r: _train(d, t, "--set", f"data.train={_list(t, f'{_good(d)} 1.5')}"),
         2, ("line 1", "'1.5' is not an integer"), "error names the list and line"),
    Case("duplicate entries", _check(lambda t, d: _list(t, f"{_good(d)} 0\n{_good(d)} 0\n")), 0,
         ("2 videos", "1 duplicate ", "line 2"), "kept (oversampling is legitimate), but reported by data check"),
    Case("empty list", lambda t, d, r: _train(d, t, "--set", f"data.train={_list(t, '')}"), 2,
         ("list.txt", "no samples"), "error: no samples found (empty list)"),
    Case("CSV with the wrong delimiter", _check(lambda t, d: _list(t, f"{_good(d)};0\n")), 1,
         ("line 1", "wrong delimiter"), "error hints at the ';' delimiter"),
    Case("YAML: unknown key", _yaml("train:\n  epoch: 3\n"), 2, ("cfg.yaml", "train.epoch", "valid keys"),
         "error names the key and lists the valid ones"),
    Case("YAML: wrong type", _yaml("train:\n  epochs: ten\n"), 2, ("cfg.yaml", "train.epochs", "expected int"),
         "error names the key and the expected type"),
    Case("YAML: not valid YAML", _yaml("train: [epochs: 3\n"), 2, ("cfg.yaml", "not valid YAML"),
         "error names the file"),
    Case("YAML: a list at the top", _yaml("- train\n- eval\n"), 2, ("cfg.yaml", "mapping"), "error names the file"),
    Case("YAML: impossible value (batch 0)", _yaml("train:\n  batch_size: 0\n"), 2,
         ("train.batch_size=0", ">= 1"), "error names the key and the allowed range"),
    Case("--set without '='", lambda t, d, r: ["train", "--set", "train.epochs"], 2, ("KEY=VALUE",),
         "error shows the expected form"),
    Case("resolution the model cannot take (30, patch 8)", lambda t, d, r: _train(d, t, "--size", "30"), 2,
         ("pks4_vit_tiny", "30"), "error names the model and the size"),
    Case("frame count the model cannot take (0)", lambda t, d, r: _train(d, t, "--frames", "0"), 2,
         ("data.num_frames=0", ">= 1"), "error names the key"),
    Case("weights file as --resume", lambda t, d, r: _train(d, t, "--resume", str(_evil_pt(t))), 2,
         ("evil.pt", "not a checkpoint directory", "model.init_from"), "error says what --resume takes"),
    Case("malicious pickle as a checkpoint's state.pt", lambda t, d, r: _train(d, t, "--resume", str(_evil_ckpt(t, r))),
         2, ("state.pt", "refused"), "refused; its code never runs"),
    Case("malicious pickle as model.init_from",
         lambda t, d, r: _train(d, t, "--set", f"model.init_from={_evil_pt(t)}"), 2, ("evil.pt", "refused"),
         "refused; its code never runs"),
    Case("malicious pickle as eval --checkpoint",
         lambda t, d, r: ["eval", "--checkpoint", str(_evil_pt(t)), "--workers", "0"], 2, ("evil.pt",),
         "refused: only safetensors are read as checkpoints"),
    Case("truncated checkpoint as --resume", lambda t, d, r: _train(d, t, "--resume", str(_cut_ckpt(t, r))), 2,
         ("model.safetensors", "truncated"), "error names the file"),
]


def _evil_ckpt(tmp: Path, run: Path) -> Path:
    import shutil

    dst = tmp / "evil-ckpt"
    shutil.copytree(run / "checkpoints" / "step-00000001", dst)
    torch.save({"global_step": 1, "x": _Evil(str(tmp / "pwned"))}, dst / ckpt.STATE_FILE)
    return dst


def _cut_ckpt(tmp: Path, run: Path) -> Path:
    import shutil

    dst = tmp / "cut-ckpt"
    shutil.copytree(run / "checkpoints" / "step-00000001", dst)
    weights = dst / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:500])
    return dst


# ------------------------------------------------------------------ videos that are not what they claim


def _vp9(tmp, name, seconds):
    return bv.webm_with_header_duration(tmp / name, bv.ramp(24), 24, seconds)


def _fifo(tmp: Path, name: str) -> Path:
    os.mkfifo(tmp / name)
    return tmp / name


def _loop(tmp: Path, name: str) -> Path:
    (tmp / name).symlink_to(tmp / name)
    return tmp / name


def _jpeg_named_mp4(tmp: Path) -> Path:
    from PIL import Image

    Image.fromarray(_frames(1)[0]).save(tmp / "photo.mp4", format="JPEG")
    return tmp / "photo.mp4"


VIDEO_CASES = [
    Case("webm header claims 0.05 s for 24 frames (predict)", _predict(lambda t, d: _vp9(t, "short.webm", 0.05)), 0,
         ("short.webm",), "recovery: the 24 frames are counted and sampled, with a warning", warns="holds 24 frames"),
    Case("webm header claims 3600 s for 24 frames (data check)",
         _check(lambda t, d: _list(t, f"{_vp9(t, 'long.webm', 3600.0)} 0\n")), 0,
         ("long.webm", "header disagrees", "86400 frame(s)", "OK"), "listed as read from the frames that exist, OK"),
    Case("frames stamped with the wrong time base (predict)",
         _predict(lambda t, d: bv.mkv_with_wrong_time_base(t / "ms.mkv", bv.ramp(24), 24)), 0, ("ms.mkv",),
         "recovery: sampled from the 24 frames that exist, with a warning", warns="holds 24 frames"),
    Case("mp4 index outliving its data (data check)",
         _check(lambda t, d: _list(t, f"{bv.truncated_faststart_mp4(t / 'cut.mp4')} 0\n")), 0,
         ("cut.mp4", "header disagrees", "48 frame(s)"), "listed; read from the frames that exist"),
    Case("raw H.264 stream, no container (predict)",
         _predict(lambda t, d: bv.raw_stream(t / "camera.h264", bv.ramp(20), 10)), 0, ("camera.h264",),
         "recovery: frames counted and decoded from the start (no index to seek in)"),
    Case("raw MPEG-2 stream, no container (data check)",
         _check(lambda t, d: _list(t, f"{bv.raw_stream(t / 'tape.m2v', bv.ramp(20), 10, *['mpeg2video'] * 2)} 0\n")),
         0, ("1 videos", "frames: min 20", "OK"), "works: 20 frames counted"),
    Case("mp3 with a cover picture (predict)",
         _predict(lambda t, d: bv.audio_with_cover(t / "song.mp3", "libmp3lame")), 2, ("song.mp3", "cover picture"),
         "error: an audio file with a cover picture, not a video"),
    Case("m4a with a cover picture (data check)",
         _check(lambda t, d: _list(t, f"{bv.audio_with_cover(t / 'song.m4a', 'aac', 'mp4')} 0\n")), 1,
         ("song.m4a", "unreadable", "cover picture"), "listed as unreadable: an audio file, NOT OK"),
    Case("flac with a cover picture (predict)", _predict(lambda t, d: bv.audio_with_cover(t / "song.flac", "flac")),
         2, ("song.flac", "an audio file, not a video"), "error: an audio file with a cover picture, not a video"),
    Case("frame size changes mid-stream, VP9 webm (predict)",
         _predict(lambda t, d: bv.size_change(t / "switch.webm", bv.ramp(12), bv.ramp(24, 64, 96)[12:], 12,
                                              "libvpx-vp9")), 0, ("switch.webm",),
         "recovery: later frames resized to the first frame's size, with a warning", warns="frame size changes"),
    Case("frame size changes mid-stream, H.264 in MPEG-TS (predict)",
         _predict(lambda t, d: bv.size_change(t / "switch.ts", bv.ramp(12), bv.ramp(24, 64, 96)[12:], 12, "libx264",
                                              "mpegts")), 0, ("switch.ts",),
         "recovery: later frames resized to the first frame's size, with a warning", warns="frame size changes"),
    Case("JPEG photo named .mp4 (predict)", _predict(lambda t, d: _jpeg_named_mp4(t)), 2, ("photo.mp4", "still image"),
         "error: is a still image, not a video"),
    Case("FIFO given as a video (predict)", _predict(lambda t, d: _fifo(t, "stream.mp4")), 2,
         ("stream.mp4", "FIFO"), "error: a FIFO, not a regular file (reading it would block)"),
    Case("symlink loop given as a video (predict)", _predict(lambda t, d: _loop(t, "loop.mp4")), 2,
         ("loop.mp4", "symbolic links"), "error: a symlink loop"),
    Case("file name too long (predict)", _predict(lambda t, d: t / ("v" * 300 + ".mp4")), 2,
         ("file name too long",), "error: file name too long"),
    Case("/dev/null given as a video (predict)", _predict(lambda t, d: Path("/dev/null")), 2,
         ("/dev/null", "device"), "error: a device, not a regular file"),
]


# ------------------------------------------------------------------------------------------ YAML files


def _bomb() -> str:
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nmodel:\n  overrides:\n    payload: *l8\n"


def _config_at(path_fn):
    return lambda tmp, data, run: ["train", str(path_fn(tmp)), "--out", str(tmp / "run")]


def _binary_config(tmp: Path) -> Path:
    (tmp / "cfg.yaml").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    return tmp / "cfg.yaml"


YAML_CASES = [
    Case("YAML: duplicate key in a section", _yaml("train:\n  epochs: 2\n  batch_size: 4\n  epochs: 3\n"), 2,
         ("cfg.yaml, line 4", "duplicate key 'epochs' (first at line 2)"),
         "error names the file, the line and the key"),
    Case("YAML: duplicate section", _yaml("train: {epochs: 1}\noptim: {lr: 0.1}\ntrain: {epochs: 2}\n"), 2,
         ("cfg.yaml, line 3", "duplicate key 'train'"), "error names the file, the line and the key"),
    Case("YAML: alias bomb (9^9 values)", _yaml(_bomb()), 2, ("cfg.yaml", "alias bomb"),
         "refused after parsing, before anything expands it"),
    Case("YAML: an alias inside its own value", _yaml("model:\n  overrides: &a {self: *a}\n"), 2,
         ("cfg.yaml, line 2", "refers to the value that contains it"), "error names the line"),
    Case("YAML: tab indentation", _yaml("train:\n\tepochs: 2\n"), 2, ("cfg.yaml, line 2", "not valid YAML"),
         "error names the line and the column"),
    Case("config is a FIFO", _config_at(lambda t: _fifo(t, "cfg.yaml")), 2, ("cfg.yaml", "FIFO"),
         "error: not a regular file (reading it would block)"),
    Case("config is a folder", _config_at(lambda t: t), 2, ("is a directory",), "error names the folder"),
    Case("config is a binary file", _config_at(_binary_config), 2, ("cfg.yaml", "not UTF-8"),
         "error: not a text file"),
    Case("config path is a symlink loop", _config_at(lambda t: _loop(t, "cfg.yaml")), 2,
         ("cfg.yaml", "symbolic links"), "error: a symlink loop"),
    Case("config file name too long", _config_at(lambda t: t / ("c" * 300 + ".yaml")), 2,
         ("file name too long",), "error: file name too long"),
]


# --------------------------------------------------------------------------------- values out of range


def _set(item, *flags):
    return lambda tmp, data, run: _train(data, tmp, *flags, *(("--set", item) if item else ()))


RANGE_CASES = [
    Case("lr 0 (--lr 0)", _set(None, "--lr", "0"), 2, ("optim.lr=0.0", "expected a number > 0"),
         "error names the key and the range"),
    Case("lr NaN", _set("optim.lr=.nan"), 2, ("optim.lr=nan", "> 0"), "error names the key and the range"),
    Case("label smoothing 1", _set("train.label_smoothing=1"), 2, ("train.label_smoothing=1.0", "[0, 1)"),
         "error names the key and the range"),
    Case("crop scale reversed", _set("data.scale=[0.9, 0.1]"), 2, ("data.scale=[0.9, 0.1]", "0 < min <= max <= 1"),
         "error names the key and the range"),
    Case("views with 0 clips", _set("eval.views=8x0x3"), 2, ("eval.views='8x0x3'", "each >= 1"),
         "error names the key and the form"),
    Case("eval batch 0", _set("eval.batch_size=0"), 2, ("eval.batch_size=0", ">= 1"), "error names the key"),
    Case("--device gpu", _set(None, "--device", "gpu"), 2, ("train.device='gpu'", "auto, cpu, cuda or cuda:N"),
         "error names the key and the accepted values"),
    Case("flex tubelet 0 (was a ZeroDivisionError)", _set("flex.tubelet=0"), 2, ("flex.tubelet=0", ">= 1"),
         "error names the key, before the section is built"),
    Case("AdamW beta 1.0", _set("optim.betas=[0.9, 1.0]"), 2, ("optim.betas=[0.9, 1.0]", "[0, 1)"),
         "error names the key and the range"),
    Case("random erasing 2", _set("data.random_erasing=2"), 2, ("data.random_erasing=2.0", "[0, 1]"),
         "error names the key and the range"),
    Case("frame template without a number", _set("data.frame_template=frame.jpg"), 2,
         ("data.frame_template='frame.jpg'", "one integer field"), "error names the key and shows the form"),
    Case("0 classes", _set("model.num_classes=0"), 2, ("model.num_classes=0", ">= 1"), "error names the key"),
    Case("gradient clipping at 0", _set("optim.clip_grad=0"), 2, ("optim.clip_grad=0.0", "> 0"),
         "error names the key (null turns clipping off)"),
    Case("mix probability 1.5", _set("train.mix_prob=1.5"), 2, ("train.mix_prob=1.5", "[0, 1]"),
         "error names the key and the range"),
    Case("-1 workers", _set(None, "--workers", "-1"), 2, ("train.num_workers=-1", ">= 0"), "error names the key"),
    Case("image smaller than a patch (size 4, patch 8)", _set(None, "--size", "4"), 2,
         ("pks4_vit_tiny", "image_size 4", "patch_size 8"), "error names the model, the size and the patch"),
]


# ------------------------------------------------------------------------ paths that are not what they seem


def _binary_list(tmp: Path, data=None) -> Path:
    (tmp / "list.txt").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(128, 256)))  # a webm header, then binary
    return tmp / "list.txt"


PATH_CASES = [
    Case("--out names a file", lambda t, d, r: _train(d, t, "--out", str(d.train)), 2, ("train.txt",),
         "error names the file; nothing is written"),
    Case("--out inside a file", lambda t, d, r: _train(d, t, "--out", str(d.train / "run")), 2,
         ("train.txt/run", "not a directory"), "error names the path"),
    Case("a FIFO as eval --checkpoint",
         lambda t, d, r: ["eval", "--checkpoint", str(_fifo(t, "ckpt")), "--workers", "0"], 2,
         ("ckpt", "not a checkpoint"), "error: not a checkpoint (never read, so never blocks)"),
    Case("binary file as a list (data check)", _check(_binary_list), 1, ("list.txt", "not a UTF-8 text file"),
         "listed as an annotation error, NOT OK"),
]


# JSON fields of the wrong type in the SSV2 annotations and a labels.json (were an AttributeError / TypeError).
def _ssv2_wrong_type(tmp: Path, data) -> list[str]:
    (tmp / "labels.json").write_text(json.dumps({"moving left": "0"}))
    (tmp / "train.json").write_text(json.dumps([{"id": 1, "template": 5}]))  # a number where text belongs
    return ["data", "check", str(tmp / "train.json"), "--root", str(tmp)]


def _labels_wrong_type(tmp: Path, data) -> list[str]:
    (tmp / "labels.json").write_text(json.dumps({"moving left": [0]}))
    return _train(data, tmp, "--labels", str(tmp / "labels.json"))


MODEL_RANGE_CASES = [
    Case("patch size 0 (model.overrides)", _set("model.overrides.patch_size=0"), 2, ("patch_size",),
         "one line naming the key"),
    Case("VideoMamba tubelet 0 (model.overrides)",
         lambda t, d, r: _train(d, t, "--model", "videomamba_li_micro", "--set", "model.overrides.tubelet=0"), 2,
         ("tubelet",), "one line naming the key"),
    Case("tower with 0 heads (model.overrides)", _set("model.overrides.heads=0"), 2, ("heads",),
         "one line naming the key"),
]

JSON_CASES = [
    Case("SSV2 json: template of the wrong type (data check)", lambda t, d, r: _ssv2_wrong_type(t, d), 1,
         ("train.json", "entry 0", "'template' a string", "template 5"), "an annotation error naming the entry"),
    Case("labels.json: an id of the wrong type (train)", lambda t, d, r: _labels_wrong_type(t, d), 2,
         ("labels.json", "class 'moving left': id [0] is not an integer"), "one line naming the file and the class"),
]

# ------------------------------------------------------------------- runs never lost, destinations checked


def _file(tmp: Path, name: str = "results.csv") -> Path:
    (tmp / name).write_text("a,b\n")
    return tmp / name


def _no_such_gpu() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


RUN_CASES = [
    Case("train into a folder holding a run", lambda t, d, r: (a_run(t / "run"), _train(d, t))[1], 2,
         ("already holds a run", "checkpoints/", "--resume auto", "--overwrite", "nothing is deleted"),
         "refused before any work, the old run left as it is"),
    Case("train --overwrite over a run", lambda t, d, r: (a_run(t / "run"), _train(d, t, "--overwrite"))[1], 0,
         ("moved aside to", "run.old-"), "the old run is moved to OUT.old-<date>-<time>, a new one starts"),
    Case("pretrain into a folder holding a run", lambda t, d, r: ["pretrain", "--out", str(a_run(t / "run"))], 2,
         ("already holds a run", "--resume auto", "--overwrite"), "refused before the teacher or any data is read"),
    Case("train --resume auto --overwrite", lambda t, d, r: _train(d, t, "--resume", "auto", "--overwrite"), 2,
         ("give only one",), "refused: the two flags contradict"),
    Case("eval --out naming a file", lambda t, d, r: ["eval", "--checkpoint", str(r), "--data", str(d.val),
                                                      "--out", str(_file(t)), "--workers", "0"], 2,
         ("results.csv: is a file, not a folder", "--out"), "refused before the checkpoint is read"),
    Case("predict --window --out naming a file",
         lambda t, d, r: ["predict", str(_good(d)), "--checkpoint", str(r), "--window", "4", "--out", str(_file(t))],
         2, ("results.csv: is a file", "timeline folder"), "refused before any video is read"),
    Case("embed --out naming a folder", lambda t, d, r: ["embed", "--checkpoint", str(r), "--data", str(d.val),
                                                         "--out", str(t)], 2,
         ("is a folder", "features file"), "refused before the checkpoint is read"),
    Case("export-pretrained OUT naming a file", lambda t, d, r: ["export-pretrained", str(r), str(_file(t))], 2,
         ("results.csv: is a file, not a folder", "model folder"), "refused before the model is read"),
    Case("data synth OUT naming a file", lambda t, d, r: ["data", "synth", str(_file(t)), "--train-per-class", "1"],
         2, ("results.csv: is a file, not a folder", "OUT_DIR"), "refused before any video is written"),
    Case("demo --out naming a file", lambda t, d, r: ["demo", "--out", str(_file(t))], 2,
         ("results.csv: is a file, not a folder",), "refused before any video is written"),
    Case("demo into a folder holding a demo",
         lambda t, d, r: ((t / "demo" / "pks4").mkdir(parents=True), (t / "demo" / "pks4" / "x").write_text(""),
                          ["demo", "--out", str(t / "demo")])[-1], 2,
         ("already holds a run", "pks4/", "--resume", "--overwrite"), "refused; --resume continues it"),
]


# ------------------------------------------------------------------------- options checked where parsed


def _predict_good(*flags):
    return lambda t, d, r: ["predict", str(_good(d)), "--checkpoint", str(r), *flags]


def _protocol(name, *flags):
    return lambda t, d, r: [name, "--checkpoint", str(r), "--data", str(d.val), "--train-data", str(d.train),
                            *flags]


OPTION_CASES = [
    Case("predict --topk 0", _predict_good("--topk", "0"), 2, ("predict --topk 0: expected an integer >= 1",),
         "error names the command, the option and the range"),
    Case("predict --topk above the class count", _predict_good("--topk", "50"), 0,
         ("--topk 50 is more than the model's 10 classes",), "recovery: all classes shown, with a note"),
    Case("predict --batch-size 0", _predict_good("--batch-size", "0"), 2, ("predict --batch-size 0", ">= 1"),
         "error names the option"),
    Case("predict --frames 0", _predict_good("--frames", "0"), 2, ("predict --frames 0", ">= 1"),
         "error names the option"),
    Case("predict --size below the patch (4, patch 8)", _predict_good("--size", "4"), 2,
         ("patch size 8", "frame size 4"), "error names the patch and the size, before any video is read"),
    Case("predict --fps -1 (timeline)", _predict_good("--window", "4", "--fps", "-1"), 2,
         ("predict --fps -1: expected a number > 0",), "error names the option"),
    Case("predict --device with no such GPU", lambda t, d, r: _predict_good("--device", _no_such_gpu())(t, d, r), 2,
         ("predict --device", "CUDA device"), "error says the machine has no such device"),
    Case("predict --device gpu", _predict_good("--device", "gpu"), 2, ("'gpu' is not a device", "cpu, cuda"),
         "error lists the accepted devices"),
    Case("predict at a size whose activations do not fit (8192 px)", _predict_good("--size", "8192"), 2,
         ("predict:", "8192 px", "GiB", "is free on cpu", "pks4 profile"),
         "refused before any video is read, with the profiler's estimate and the free memory"),
    Case("train --workers 100000 (was: the process killed for memory)", lambda t, d, r: _train(d, t, "--workers",
                                                                                            "100000"), 0,
         ("stopped at step 1",), "recovery: as many workers as batches (at most 4 per CPU), with a note",
         warns="100000 DataLoader workers asked for"),
    Case("train.batch_size 10**20, more than the clips", lambda t, d, r: _train(d, t, "--batch-size", str(10**20)),
         0, ("train.batch_size=100000000000000000000 is more than the 10 training clips",),
         "trains on all clips per step, with a note about the scaled learning rate"),
    Case("eval --batch-size 10**9 over 10 clips", lambda t, d, r: ["eval", "--checkpoint", str(r), "--data",
                                                                    str(d.val), "--batch-size", str(10**9),
                                                                    "--workers", "0", "--json"], 0,
         ('"samples": 10',), "runs: a batch holds at most the list's 10 clips, so the memory check counts those"),
    Case("linear-probe --batch-size 10**9", _protocol("linear-probe", "--steps", "2", "--batch-size", str(10**9),
                                                      "--workers", "0"), 0, ("linear probe top-1",),
         "runs: the memory check counts the clips a batch can hold"),
    Case("eval --views 8x0x3", lambda t, d, r: ["eval", "--checkpoint", str(r), "--views", "8x0x3"], 2,
         ("eval --views", "8x0x3"), "error names the option"),
    Case("eval --workers -1", lambda t, d, r: ["eval", "--checkpoint", str(r), "--workers", "-1"], 2,
         ("eval --workers -1: expected an integer >= 0",), "error names the option"),
    Case("eval --grid with 0 frames", lambda t, d, r: ["eval", "--checkpoint", str(r), "--grid", "frames=0",
                                                       "size=32"], 2, ("--grid 'frames=0'", ">= 1"),
         "error names the grid value"),
    Case("profile --batch 0 (was SIGFPE)", lambda t, d, r: ["profile", "pks4_vit_tiny", "--batch", "0"], 2,
         ("profile --batch 0: expected an integer >= 1",), "refused at parse time; the process never crashes"),
    Case("profile --repeats 0", lambda t, d, r: ["profile", "pks4_vit_tiny", "--repeats", "0"], 2,
         ("profile --repeats 0",), "error names the option"),
    Case("profile --visible-fraction 1.5", lambda t, d, r: ["profile", "pks4_vit_tiny", "--training-compute",
                                                            "--visible-fraction", "1.5"], 2,
         ("--visible-fraction 1.5", "> 0 and <= 1"), "error names the option and the range (0, 1]"),
    Case("profile at a size that does not fit", lambda t, d, r: ["profile", "pks4_vit_tiny", "--size", "8192"], 2,
         ("profile:", "GiB", "is free on cpu"), "refused before the timed forward allocates"),
    Case("serve --port 70000", lambda t, d, r: ["serve", str(r), "--port", "70000"], 2,
         ("serve --port 70000", "from 1 to 65535"), "error names the option and the range"),
    Case("linear-probe --steps 0", _protocol("linear-probe", "--steps", "0"), 2, ("linear-probe --steps 0",),
         "error names the option"),
    Case("embed --batch-size 0", _protocol("embed", "--out", "f.npz", "--batch-size", "0"), 2,
         ("embed --batch-size 0",), "error names the option"),
    Case("data check --format unknown", lambda t, d, r: ["data", "check", str(d.val), "--format", "csv"], 2,
         ("data check --format", "invalid choice", "rawframes"), "error lists the formats"),
]


# ----------------------------------------------------------------------------------------- labels and lists


def _folder_with_hidden(tmp: Path, data) -> Path:
    import shutil

    root = tmp / "videos"
    for name in ("left", "right", ".ipynb_checkpoints", "left/.ipynb_checkpoints"):
        (root / name).mkdir(parents=True, exist_ok=True)
    shutil.copy(_good(data), root / "left" / "a.mp4")
    shutil.copy(_good(data), root / "right" / "b.mp4")
    shutil.copy(_good(data), root / ".ipynb_checkpoints" / "c.mp4")
    shutil.copy(_good(data), root / "left" / ".ipynb_checkpoints" / "a-checkpoint.mp4")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "left" / "._a.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    return root


def _copy_as(tmp: Path, data, name: str) -> Path:
    import shutil

    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(_good(data), tmp / name))


LIST_CASES = [
    Case("label 2**32 without a class-names file",
         lambda t, d, r: _train(d, t, "--labels", "", "--set", f"data.train={_list(t, f'{_good(d)} 4294967296')}"),
         2, ("list.txt", "line 1: label 4294967296 is too large to be a class index", "a typo?"),
         "error names the list and line; nothing is sized by the label"),
    Case("label beyond --num-classes", lambda t, d, r: _train(d, t, "--labels", "", "--num-classes", "10", "--set",
                                                              f"data.train={_list(t, f'{_good(d)} 12')}"), 2,
         ("list.txt", "line 1: label 12 out of range for 10 classes"), "error names the list and line"),
    Case("eval labels beyond the checkpoint's classes",
         lambda t, d, r: ["eval", "--checkpoint", str(r), "--data", str(_list(t, f"{_good(d)} 10\n")),
                          "--workers", "0"], 2, ("list.txt", "line 1: label 10 out of range for 10 classes"),
         "error names the list and line, before any video is read"),
    Case("hidden folders and files are not classes or clips", _check(_folder_with_hidden), 0,
         ("2 videos, 2 classes", "OK"), "dot-names skipped: .ipynb_checkpoints, .DS_Store, ._clip.mp4"),
    Case("auto-detected format says what it chose and why", _check(lambda t, d: _list(t, f"{_good(d)} 0\n")), 0,
         ("format: read as 'list'", "no other format matched"), "the choice and the reason are printed"),
    Case("a list whose lines also read as raw frames", _check(lambda t, d: _list(t, "clip 16 0\nclip2 16 1\n")), 1,
         ("read as 'list'", "data.format=rawframes"), "read as a list; says how to choose raw frames"),
    Case("--format rawframes chosen explicitly", lambda t, d, r: ["data", "check", str(_list(t, "clip 16 0\n")),
                                                                  "--format", "rawframes"], 1,
         ("(rawframes)", "missing"), "read as raw-frame folders as asked (the folder is missing)"),
    Case("a path with a comma in a space-separated list",
         _check(lambda t, d: _list(t, f"{_copy_as(t, d, 'take 1, left/clip.mp4')} 0\n")), 0,
         ("1 videos", "OK"), "works: the comma belongs to the path"),
    Case("a path with spaces in a comma-separated list",
         _check(lambda t, d: _list(t, f"{_copy_as(t, d, 'my clips/a b.mp4')},0\n")), 0, ("1 videos", "OK"),
         "works: the spaces belong to the path"),
    Case("a FIFO as the training list", lambda t, d, r: _train(d, t, "--set", f"data.train={_fifo(t, 'train.txt')}"),
         2, ("train.txt: is a FIFO (named pipe)", "annotation file"),
         "error says what it is (was: annotation file not found)"),
    Case("a folder as --labels", lambda t, d, r: _train(d, t, "--labels", str(t)), 2,
         ("is a directory", "class-names file"), "error names the path and what it is"),
    Case("SSV2 json: an id that is a list (data check)",
         lambda t, d, r: ((t / "labels.json").write_text(json.dumps({"moving left": "0"})),
                          (t / "train.json").write_text(json.dumps([{"id": [1], "template": "moving left"}])),
                          ["data", "check", str(t / "train.json"), "--root", str(t)])[-1], 1,
         ("entry 0", "'id' must be a string or an integer"), "an annotation error naming the entry"),
]


# ------------------------------------------------------------------------------------- many files at once


def _predict_many(paths_fn, *flags):
    return lambda t, d, r: ["predict", *map(str, paths_fn(t, d)), "--checkpoint", str(r), *flags]


def _val_with(t: Path, d, bad: Path) -> Path:
    good = sorted((d.root / "val").rglob("*.mp4"))[:3]
    return _list(t, "".join(f"{p} {i}\n" for i, p in enumerate(good)) + f"{bad} 3\n", "val_bad.txt")


MANY_CASES = [
    Case("predict over three files, one truncated",
         _predict_many(lambda t, d: [_good(d), _truncated(t, d), _copy_as(t, d, "other.mp4")]), 2,
         ("moving_right_000.mp4: ", "other.mp4: ", "cannot read", "truncated.mp4",
          "1 of 3 videos could not be read"), "the good ones' predictions printed, the bad one listed, exit 2"),
    Case("predict --json over two files, one missing",
         _predict_many(lambda t, d: [t / "gone.mp4", _good(d)], "--json"), 2,
         ('"path": ', '"error": ', "gone.mp4", "1 of 2 videos"), "one JSON object per file, the failed one with "
         "its error, exit 2"),
    Case("predict --window over two files, one not a video",
         _predict_many(lambda t, d: [_good(d), (t / "notes.mp4").write_text("x") and t / "notes.mp4"],
                       "--window", "4"), 2, ("windows of 4 frames", "notes.mp4", "1 of 2 videos"),
         "the good timeline printed, the bad file listed, exit 2"),
    Case("embed --skip-bad-videos with a truncated clip",
         lambda t, d, r: ["embed", "--checkpoint", str(r), "--data", str(_val_with(t, d, _truncated(t, d))),
                          "--out", str(t / "emb.npz"), "--skip-bad-videos"], 2,
         ("features: ", "emb.npz", "cannot read", "truncated.mp4", "1 of 4 videos"),
         "features written for the good clips, the bad one listed, exit 2"),
    Case("retrieval --skip-bad-videos with a missing clip",
         lambda t, d, r: ["retrieval", "--checkpoint", str(r), "--data", str(_val_with(t, d, t / "gone.mp4")),
                          "--train-data", str(d.train), "--data-root", str(d.root), "--skip-bad-videos"], 2,
         ("retrieval top-1", "gone.mp4", "missing"), "result printed, the missing clip listed, exit 2"),
    Case("embed without --skip-bad-videos stops at a bad clip",
         lambda t, d, r: ["embed", "--checkpoint", str(r), "--data", str(_val_with(t, d, _truncated(t, d))),
                          "--out", str(t / "emb.npz")], 2, ("truncated.mp4", "--skip-bad-videos"),
         "one line naming the file and the way out"),
]

# ----------------------------------------------------------------------------------------- pks4 stream


def _stream(source_fn, *flags):
    return lambda t, d, r: ["stream", str(source_fn(t, d)), "--checkpoint", str(r), *flags]


def _causal_run(tmp: Path) -> Path:
    """The corpus's tiny run, made causal (so it can stream)."""
    model = create_model("pks4_vit_tiny", num_classes=10, image_size=32, num_frames=4, causal=True)
    cfg = load_config(None, ["data.num_frames=4", "data.size=32", "data.short_side=32"])
    meta = {"model_name": model.model_name, "model_config": dataclasses.asdict(model.config),
            "classes": [str(i) for i in range(10)], "config": config_to_dict(cfg)}
    ckpt.save_checkpoint(tmp / "causal" / "checkpoints" / "step-00000001", model, {"global_step": 1}, meta)
    return tmp / "causal"


def _stream_causal(*flags):
    return lambda t, d, r: ["stream", str(_good(d)), "--checkpoint", str(_causal_run(t)), "--max-frames", "2",
                            *flags]


STREAM_CASES = [
    Case("stream --topk 0", _stream(lambda t, d: _good(d), "--topk", "0"), 2,
         ("stream --topk 0: expected an integer >= 1",), "error names the command and the option"),
    Case("stream --frame-step 0", _stream(lambda t, d: _good(d), "--frame-step", "0"), 2,
         ("stream --frame-step 0: expected an integer >= 1",), "error names the option, before the source opens"),
    Case("stream --device gpu", _stream(lambda t, d: _good(d), "--device", "gpu"), 2,
         ("stream --device", "'gpu' is not a device"), "error lists the accepted devices"),
    Case("stream a model that is not causal", _stream(lambda t, d: _good(d)), 2,
         ("is not causal", "model.overrides.causal=true"), "error says how to train a model that streams"),
    Case("stream from a camera that is not there", _stream(lambda t, d: "/dev/video99"), 2,
         ("/dev/video99", "no such camera device"), "error names the device, before the model loads"),
    Case("stream --topk above the class count", _stream_causal("--topk", "50"), 0,
         ("--topk 50 is more than the model's 10 classes", "frame 2"), "recovery: all classes shown, with a note"),
    Case("stream --size below the patch (4, patch 8)", _stream_causal("--size", "4"), 2,
         ("patch size 8", "frame size 4"), "error names the patch and the size, before the first frame is run"),
    Case("stream at a size whose activations do not fit (65536 px)", _stream_causal("--size", "65536"), 2,
         ("stream:", "65536 px", "GiB", "is free on cpu"), "refused before the first frame is run, with the estimate"),
    Case("stream a text file named .mp4", _stream(lambda t, d: (t / "notes.mp4").write_text("x") and t / "notes.mp4"),
         2, ("notes.mp4",), "error names the file, before the model loads"),
]

CASES += VIDEO_CASES + YAML_CASES + RANGE_CASES + PATH_CASES + MODEL_RANGE_CASES + JSON_CASES + RUN_CASES \
    + OPTION_CASES + LIST_CASES + MANY_CASES + STREAM_CASES


# Known gaps, kept visible until fixed (strict: a fix makes them fail until removed from here).
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c.name]))
                                  if c.name in XFAIL else c for c in CASES], ids=[c.name for c in CASES])
def test_bad_input(case, data, run_dir, tmp_path, capsys, recwarn):
    argv = case.make(tmp_path, data, run_dir)
    code = main(argv)
    out = capsys.readouterr()
    text = (out.err + out.out).replace(str(tmp_path), "<tmp>")  # the folder name repeats the case name
    assert code == case.code, text
    for word in case.words:
        assert word in text, text
    if case.warns:
        assert any(case.warns in str(w.message) for w in recwarn), [str(w.message) for w in recwarn]
    assert "Traceback" not in text and "internal error" not in text, text  # whatever the outcome
    if code == 2:  # one clear line (after the results of the files that could be read)
        assert text.count("pks4: error:") == 1, text
        assert out.err.rfind("pks4: error:") > out.err.rfind("pks4: cannot read"), out.err
    assert not (tmp_path / "pwned").exists()


def test_corpus_size():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
