"""The video-text task in the one training loop (`pks4 pretrain --task video-text`): the masked then unmasked phases as
a schedule the checkpoint keeps, a bitwise resume, batches that never mix caption files, the frozen teacher, the
checkpoint read back for retrieval, and the contrastive loss of two processes against one."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from _text_fixtures import tiny_text_folder
from pks4.data.synth import generate_synth
from pks4.data.synth_captions import write_synth_captions
from pks4.engine import checkpoint as ckpt
from pks4.engine.runtime import DistInfo, TrainingError
from pks4.engine.video_text_task import (SourcePlan, build_video_text_trainer, load_video_text,
                                         load_video_text_config)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vt")
    generate_synth(root / "synth", seed=1, num_train_per_class=1, num_val_per_class=1, num_frames=8, size=32)
    write_synth_captions(root / "synth")
    return root / "synth", tiny_text_folder(root / "text")


def _sets(data, out, **extra):
    synth, text = data
    sets = {"text.path": text, "text.width": 32, "text.depth": 3, "text.fusion_layer": 2, "text.heads": 2,
            "text.max_len": 16, "text.dropout": 0.0, "model.name": "videomamba_li_micro",
            "model.overrides": "{embed_dim: 32, depth: 2}", "data.num_frames": 4, "data.size": 32,
            "data.short_side": 32, "data.flip": "off", "data.format": "captions",
            "data.train": synth / "captions_train.json", "data.val": synth / "captions_val.json",
            "video_text.embed_dim": 16, "use_teacher": "false", "video_text.weights.uta": 0, "train.epochs": 2,
            "train.batch_size": 6, "train.num_workers": 0, "train.progress": "false", "train.tensorboard": "false",
            "train.device": "cpu", "train.log_every": 1, "optim.lr": 1e-3, "optim.scale_lr": "false",
            "optim.warmup_epochs": 0, "out": out, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def _trainer(data, out, resume=None, log=None, **extra):
    messages = [] if log is None else log
    loop = build_video_text_trainer(load_video_text_config(None, _sets(data, out, **extra)), resume=resume,
                                    log=messages.append)
    return loop, messages


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_masked_then_unmasked_phase_with_retrieval_after_each_epoch(data, tmp_path):
    loop, messages = _trainer(data, tmp_path / "run")
    result = loop.fit()
    assert result.global_step == 10  # 30 captions / batch 6, two epochs
    assert [m for m in messages if "phase" in m] == ["epoch 1: masked phase",
                                                    "epoch 2: unmasked tuning phase (every token)"]
    train = _rows(tmp_path / "run", "train")
    assert all({"vtc", "vtm", "mlm"} <= set(r) and "uta" not in r for r in train)
    val = _rows(tmp_path / "run", "val")
    assert len(val) == 2 and all(r["videos"] == 10 and r["texts"] == 30 and 0 <= r["t2v_r1"] <= 100 for r in val)
    assert result.best_score == max(r["r_mean"] for r in val)
    assert ckpt.read_state(result.checkpoint)["unmasked_from_epoch"] == 1
    model, tokenizer, cfg = load_video_text(result.checkpoint)  # no text folder needed: the vocabulary is inside
    trained = loop.task.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert tokenizer.words == loop.task.tokenizer.words and cfg.text.max_len == 16 and not model.training


def test_resume_mid_phase_is_bitwise_and_keeps_the_checkpoints_schedule(data, tmp_path):
    straight, _ = _trainer(data, tmp_path / "a", **{"train.save_every_steps": 1})
    straight.fit()
    _trainer(data, tmp_path / "b", **{"train.save_every_steps": 1, "train.stop_after_steps": 3})[0].fit()
    torch.manual_seed(99)  # the RNG before resuming must not matter: masks, negatives and MLM words are restored
    resumed, messages = _trainer(data, tmp_path / "b", resume="auto", **{"train.save_every_steps": 1})
    assert (resumed.epoch, resumed.batch_in_epoch) == (0, 3)
    resumed.fit()
    for name, value in straight.task.model.state_dict().items():
        assert torch.equal(value, resumed.task.model.state_dict()[name]), name
    # a resumed run keeps its own schedule, whatever the config now says
    again, messages = _trainer(data, tmp_path / "b", resume="auto", **{"train.epochs": 3})  # would unmask at 3
    assert again.task.unmasked_from == 1 and any("the checkpoint's schedule is kept" in m for m in messages)


def test_a_frozen_teacher_guides_the_masked_phase_and_stays_out_of_the_checkpoint(data, tmp_path):
    loop, _ = _trainer(data, tmp_path / "run", use_teacher="true", **{
        "teacher.arch": "tiny", "video_text.weights.uta": 1.0, "train.epochs": 1, "unmasked_epochs": 0})
    teacher = {k: v.clone() for k, v in loop.task.teacher.state_dict().items()}
    result = loop.fit()
    assert all("uta" in r for r in _rows(tmp_path / "run", "train"))
    assert all(torch.equal(v, loop.task.teacher.state_dict()[k]) for k, v in teacher.items())
    weights, meta = ckpt.read_weights(result.checkpoint / ckpt.WEIGHTS_FILE)
    assert not any(k.startswith("teacher") for k in weights) and any(k.startswith("decoder.") for k in weights)
    assert meta["teacher_dim"] == loop.task.model.decoder.proj.out_features


def test_alignment_without_a_teacher_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="weights.uta > 0 aligns to a CLIP teacher"):
        _trainer(data, tmp_path / "run", **{"video_text.weights.uta": 1.0})


def test_long_captions_are_cut_with_one_note(data, tmp_path):
    loop, messages = _trainer(data, tmp_path / "run", **{"text.max_len": 5, "train.stop_after_steps": 2,
                                                         "data.val": ""})
    loop.fit()
    assert sum("are cut" in m for m in messages) == 1


def test_source_plan_never_mixes_files_and_is_the_same_on_every_rank():
    spans = [(0, 20), (20, 9)]
    plans = [SourcePlan(spans, DistInfo(rank=r, world_size=2), 3, seed=5) for r in (0, 1)]
    for epoch in (0, 1):
        batches = [p.batches(epoch) for p in plans]
        assert len(batches[0]) == len(batches[1]) == plans[0].length(epoch) == 3 + 1  # 10 // 3 + 5 // 3 per rank
        for a, b in zip(*batches):  # both ranks step through the same file at once
            assert (a[0] >= 20) == (b[0] >= 20)
            assert len({i >= 20 for i in a}) == 1 and len(a) == 3
        seen = [i for rank in batches for b in rank for i in b]
        assert len(seen) == len(set(seen))
    assert plans[0].batches(0) == SourcePlan(spans, DistInfo(rank=0, world_size=2), 3, seed=5).batches(0)
    assert plans[0].batches(0) != plans[0].batches(1)
    with pytest.raises(TrainingError, match="caption file 2 of captions.train has fewer pairs"):
        SourcePlan([(0, 20), (20, 3)], DistInfo(rank=0, world_size=2), 3, seed=0)


def test_images_and_videos_train_in_one_run(data, tmp_path):
    from PIL import Image

    images = tmp_path / "cc3m"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i:09d}.jpg")
    (images / "cc3m.tsv").write_text("".join(f"a red object moves from left to right\thttp://x/{i}.jpg\n"
                                             for i in range(6)))
    synth = data[0]
    files = (f"[{{path: {synth / 'captions_train.json'}, format: captions}}, "
             f"{{path: {images / 'cc3m.tsv'}, format: cc3m}}]")
    shapes = []
    loop, _ = _trainer(data, tmp_path / "run", **{"captions.train": files, "train.epochs": 1})
    forward = loop.task.model.encode_visual
    loop.task.model.encode_visual = lambda clip, keep=None: shapes.append(clip.shape[1]) or forward(clip, keep)
    assert loop.fit().global_step == 6  # 5 video batches + 1 image batch
    assert sorted(shapes) == [1] + [4] * 5 + [4]  # + the evaluation's one batch of 10 clips


def test_two_processes_contrast_every_pair_with_gradients(tmp_path):
    """Two gloo processes with 3 pairs each: loss and gradients of the gathered contrastive objective equal
    those of one process holding all 6 pairs (the DDP average of the per-process gradients)."""
    script = tmp_path / "vtc_ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(0)
    video, text, temp, ids = _ddp_inputs()
    from pks4.models.video_text import contrastive_loss

    loss = contrastive_loss(video, text, temp, ids)
    loss.backward()
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)
    for r in (0, 1):  # each process's rows: the sum over processes of d(loss_p)/d(rows), halved by the DDP average
        rows = slice(3 * r, 3 * r + 3)
        torch.testing.assert_close(out[r]["video_grad"] / 2, video.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[r]["text_grad"] / 2, text.grad[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((out[0]["temp_grad"] + out[1]["temp_grad"]) / 2, temp.grad, rtol=1e-5, atol=1e-6)


def _ddp_inputs():
    video = torch.randn(6, 8, requires_grad=True)
    text = torch.randn(6, 8, requires_grad=True)
    temp = torch.tensor(0.2, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0, 4, 5])  # pairs 0 and 3 (in different processes) show the same video
    return video, text, temp, ids


_DDP_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
from pks4.models.video_text import contrastive_loss
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
video = torch.randn(6, 8)
text = torch.randn(6, 8)
ids = torch.tensor([0, 1, 2, 0, 4, 5])
rows = slice(3 * rank, 3 * rank + 3)
v = video[rows].clone().requires_grad_(True)
t = text[rows].clone().requires_grad_(True)
temp = torch.tensor(0.2, requires_grad=True)
loss = contrastive_loss(v, t, temp, ids[rows], gather=True)
loss.backward()
torch.save({"loss": float(loss.detach()), "video_grad": v.grad, "text_grad": t.grad, "temp_grad": temp.grad},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
'''


# ---- the command line ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A video-text run trained by `pks4 pretrain --task video-text` (one epoch)."""
    from pks4.cli import main

    out = tmp_path_factory.mktemp("cli") / "run"
    sets = [s for s in _sets(data, out, **{"train.epochs": 1}) if not s.startswith("out=")]
    assert main(["pretrain", "--task", "video-text", "--out", str(out), *[x for s in sets for x in ("--set", s)]]) == 0
    return out


def test_text_retrieval_on_the_runs_captions_and_on_a_given_file(run, data, capsys):
    from pks4.cli import main

    capsys.readouterr()
    assert main(["text-retrieval", "--checkpoint", str(run), "--json", "--rerank", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["videos"] == 10 and report["texts"] == 30 and report["rerank_k"] == 3
    assert {"t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "v2t_mdr", "rerank_t2v_r1", "r_mean"} <= set(report)
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"][-1]
    assert report["t2v_r1"] == val["t2v_r1"] and report["v2t_mdr"] == val["v2t_mdr"]  # one path, one answer
    synth = data[0]
    assert main(["text-retrieval", "--checkpoint", str(run), "--captions", str(synth / "captions_train.json"),
                 "--format", "captions"]) == 0
    out = capsys.readouterr().out
    assert "captions_train.json (captions): 30 captions, 10 videos" in out and "text-to-video" in out


@pytest.mark.parametrize("args, message", [
    (["--rerank", "-1"], "--rerank -1: expected an integer >= 0"),
    (["--format", "msrvtt"], "--format names the layout of --captions FILE"),
    (["--captions", "nowhere.json"], "nowhere.json: annotation file not found"),
    (["--captions", "x.json", "--format", "vatex"], "format='vatex'; expected a caption format"),
])
def test_text_retrieval_bad_input(run, args, message, capsys):
    from pks4.cli import main

    assert main(["text-retrieval", "--checkpoint", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_classifier_commands_name_a_video_text_checkpoint(run, capsys):
    from pks4.cli import main

    assert main(["eval", "--checkpoint", str(run), "--workers", "0"]) == 2
    assert "a video-text checkpoint" in capsys.readouterr().err


def test_a_recipes_task_key_picks_the_video_text_task(data, tmp_path, capsys):
    from pks4.cli import main
    from pks4.engine.config import format_config

    recipe = tmp_path / "vt.yaml"  # a whole resolved config, as a run prints it: its `task:` key says what it is
    cfg = load_video_text_config(None, _sets(data, tmp_path / "run", **{"train.stop_after_steps": 1, "data.val": ""}))
    recipe.write_text(format_config(cfg))
    assert main(["pretrain", str(recipe)]) == 0
    assert "video-text model" in capsys.readouterr().out
    assert main(["pretrain", str(recipe), "--set", "task=captioning"]) == 2
    assert "task 'captioning'" in capsys.readouterr().err


def test_bad_input_to_video_text_training_is_one_line_naming_the_file(data, tmp_path, capsys):
    from pks4.cli import main

    empty = tmp_path / "no_vocab"
    empty.mkdir()
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"video": "gone.mp4", "caption": "a red dial"}]))
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps([{"video": "gone.mp4", "caption": "  "}]))
    cases = [({"text.path": empty}, "no vocab.txt in the text folder"),
             ({"data.train": missing}, "1 of 1 media named by the captions are not on disk"),
             ({"data.train": blank}, "entry 0: empty caption"),
             ({"data.format": "list"}, "data.train is read with data.format='list', which is not a caption format")]
    for extra, message in cases:
        sets = _sets(data, tmp_path / "run", **extra)
        assert main(["pretrain", "--task", "video-text", *[x for s in sets for x in ("--set", s)]]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_activation_checkpointing_reaches_the_masked_visual_path(data, tmp_path):
    from pks4.data.items import collate

    loops = [_trainer(data, tmp_path / name, **{"data.val": "", "train.grad_checkpointing": flag})[0]
             for name, flag in (("a", "false"), ("b", "true"))]
    assert [loop.task.model.visual.grad_checkpointing for loop in loops] == [False, True]
    grads = []
    for loop in loops:
        task = loop.task
        task.start_epoch(0)  # the masked phase: the visible tokens through re-run blocks
        torch.manual_seed(0)  # the same crops, masks, negatives and masked words in both
        inputs = task.inputs(collate([task.train_set[i] for i in range(6)]))
        sum(task.loss(inputs).values()).backward()
        grads.append({n: p.grad for n, p in task.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("visual.layers.") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)
