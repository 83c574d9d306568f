"""Do the video-text pieces learn? A tiny video-text model on the captioned built-in benchmark, on the CPU.

The built-in temporal benchmark (``pks4 data synth``, the demo's 64 px clips read at 32 px and 8 frames) with
its captions (``pks4 data captions``: three paraphrases per clip naming the object's colour, time-reversed
classes worded differently). Two visual encoders are trained the same way, from scratch, with a tiny BERT
(width 64: 2 text layers + 1 fusion layer) and the task object of :mod:`pks4.engine.video_text_task`:

* ``videomamba_li_micro`` (d 64, 4 blocks, 8x8 patches): a masked phase (random 50% / 80% masking -- no CLIP
  teacher is available here, so no UTA and no attention-guided masks), then the unmasked tuning phase;
* ``vit_tiny_avgpool`` (the demo's frame-average baseline): unmasked throughout (it cannot run a subset of
  tokens), the same steps.

Both then get zero-shot text-to-video retrieval on the held-out clips (every caption against every clip:
R@1/5/10, median rank) and the reversed-pair caption test: for every held-out clip and paraphrase, is the
clip's own caption scored above the same sentence with the direction reversed ("... from left to right" vs
"... from right to left")? A frame-average encoder sees the same frame set either way, so it sits at ~50%.

The training loop is the few lines of :func:`train` below, not a library loop: AdamW, linear warm-up then
cosine decay, a fixed seed.

Run: ``.venv/bin/python benchmarks/video_text_synth.py --out runs/video_text --md benchmarks/video_text_synth.md``
(``--steps 50`` for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pks4.data.captions import CaptionDataset, read_captions
from pks4.data.datasets import DataConfig
from pks4.data.synth import CLASSES, generate_synth
from pks4.data.synth_captions import COLOUR_NAMES, class_captions, write_synth_captions
from pks4.engine.video_text_task import VideoTextTask, VideoTextTaskConfig, build_video_text_task
from pks4.models.text import TextConfig, build_vocab
from pks4.models.video_text import LossWeights, VideoTextConfig

_TINY_VIT = dict(image_size=32, patch_size=8, width=64, heads=2, layers=3, output_dim=64, num_frames=8)
ENCODERS = {
    "videomamba_li_micro": dict(embed_dim=64, depth=4, patch_size=8, image_size=32, num_frames=8),
    "vit_tiny_avgpool": _TINY_VIT,  # the frame average: blind to the order of the frames
    # the demo's PKS4 preset (src/pks4/configs/demo.yaml)
    "pks4_vit_tiny": dict(_TINY_VIT, insert_layer=1, zero_init_residual=False, corr_window=3, corr_context=3,
                          var_ratio=1.0),
}
BASELINE = "vit_tiny_avgpool"


def prepare(out: Path, train_per_class: int, seed: int) -> tuple[Path, Path]:
    """The benchmark with captions and a word vocabulary: (benchmark folder, text folder)."""
    root = out / "synth"
    generate_synth(root, seed=seed, num_train_per_class=train_per_class, num_val_per_class=12, num_frames=16, size=64)
    files = write_synth_captions(root)
    texts = [c for f in files.values() for e in json.loads(f.read_text()) for c in e["caption"]]
    build_vocab(texts, root / "text")
    return root, root / "text"


def make_task(name: str, text: Path, masked: bool, video_mask_ratio: float) -> VideoTextTask:
    cfg = VideoTextTaskConfig(
        visual=name, visual_overrides=ENCODERS[name], use_teacher=False,
        text=TextConfig(path=str(text), width=64, depth=3, fusion_layer=2, heads=2, max_len=16, dropout=0.0),
        model=VideoTextConfig(embed_dim=64, masked=masked, video_mask_ratio=video_mask_ratio,
                              weights=LossWeights(uta=0.0)))
    return build_video_text_task(cfg, log=lambda msg: print(f"[{name}] {msg}", flush=True))


def _data_config() -> DataConfig:
    # flip off: a mirrored clip would contradict "left" / "right"; the demo's mild crops
    return DataConfig(num_frames=8, size=32, short_side=32, flip="off", scale=(0.6, 1.0), cache_decoded=True)


def _caption_groups(captions: Any) -> torch.Tensor:
    """Per video, the id of its caption list: clips of one class and colour get the very same captions."""
    lists: dict[int, list[str]] = {}
    for text, v in zip(captions.captions, captions.caption_video):
        lists.setdefault(v, []).append(text)
    ids: dict[tuple[str, ...], int] = {}
    return torch.tensor([ids.setdefault(tuple(lists[v]), len(ids)) for v in range(len(captions.videos))])


def train(task: VideoTextTask, root: Path, steps: int, unmasked_steps: int, batch_size: int, lr: float,
          seed: int, name: str, group_identical: bool = True) -> dict[str, Any]:
    """AdamW + warm-up/cosine for ``steps`` steps; the last ``unmasked_steps`` are the unmasked tuning phase.

    ``group_identical``: clips whose captions are identical (same class and colour) count as one video for the
    losses -- positives of each other in the contrastive loss and never each other's matching negatives --
    since no caption can tell them apart."""
    torch.manual_seed(seed)
    captions = read_captions(root / "captions_train.json", "captions")
    group = _caption_groups(captions) if group_identical else None
    loader = DataLoader(CaptionDataset(captions, _data_config(), train=True), batch_size=batch_size, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(task.model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    task.model.train()
    wall, cpu, step, log = time.perf_counter(), time.process_time(), 0, []
    while step < steps:
        for batch in loader:
            if step == steps - unmasked_steps and task.model.cfg.masked:
                task.set_masked(False)
                print(f"[{name}] step {step}: unmasked tuning phase", flush=True)
            if group is not None:
                batch["video_index"] = group[batch["video_index"]]
            out = task.loss(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                row = {k: round(float(v.detach()), 4) for k, v in out.items()} | {"step": step}
                log.append(row)
                print(f"[{name}] {row}", flush=True)
            if step == steps:
                break
    return {"train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1),
            "steps": steps, "log": log}


@torch.no_grad()
def reversed_pair_test(task: VideoTextTask, root: Path) -> dict[str, float]:
    """Share of (held-out clip, paraphrase) whose own caption outscores its time-reversed twin."""
    captions = read_captions(root / "captions_val.json", "captions")
    dataset = CaptionDataset(captions, _data_config(), train=False, per="video")
    task.model.eval()
    wins: dict[str, list[float]] = {}
    clips_won: dict[str, list[float]] = {}
    for v, path in enumerate(captions.videos):
        own = [c for c, i in zip(captions.captions, captions.caption_video) if i == v]
        label = CLASSES.index(Path(path).parent.name)
        colour = next(c for _, c in COLOUR_NAMES if class_captions(CLASSES[label], c) == own)
        twin = class_captions(CLASSES[label ^ 1], colour)  # classes 2k and 2k+1 are each other's reverse
        tokens = task.tokenizer(own + twin, task.max_len)
        hidden = task.model.text(tokens.input_ids, tokens.attention_mask)
        visual = task.model.encode_visual(dataset[v]["video"][None])
        sim = (task.model.embed_text(hidden) @ task.model.embed_visual(visual).t())[:, 0]
        kv = task.model.visual_to_text(visual.tokens).expand(len(hidden), -1, -1)
        match = task.model.match_logits(hidden, tokens.attention_mask, kv)[:, 1]  # the matching head's "match" logit
        for key, score in (("sim", sim), ("match", match)):
            won = (score[:len(own)] > score[len(own):]).float()
            wins.setdefault(key, []).extend(won.tolist())
            clips_won.setdefault(key, []).append(float(won.mean() > 0.5))
    out = {}
    for key, suffix in (("sim", ""), ("match", "_matching_head")):
        out[f"reversed_pair_captions{suffix}"] = 100 * sum(wins[key]) / len(wins[key])
        out[f"reversed_pair_clips{suffix}"] = 100 * sum(clips_won[key]) / len(clips_won[key])
    return out


def evaluate(task: VideoTextTask, root: Path) -> dict[str, float]:
    captions = read_captions(root / "captions_val.json", "captions")
    loader = DataLoader(CaptionDataset(captions, _data_config(), train=False, per="video"), batch_size=32)
    metrics = task.evaluate(loader)
    return {k: round(v, 2) for k, v in (metrics | reversed_pair_test(task, root)).items()}


def write_markdown(path: Path, report: dict[str, Any], argv: list[str]) -> None:
    rows = ["| encoder | t2v R@1 | R@5 | R@10 | MdR | v2t R@1 | R@5 | R@10 | MdR | reversed pair, similarity "
            "(captions / clips) | reversed pair, matching head | train CPU s | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        m = r["metrics"]
        rows.append(f"| {name} | {m['t2v_r1']:.1f} | {m['t2v_r5']:.1f} | {m['t2v_r10']:.1f} | {m['t2v_mdr']:.1f} | "
                    f"{m['v2t_r1']:.1f} | {m['v2t_r5']:.1f} | {m['v2t_r10']:.1f} | {m['v2t_mdr']:.1f} | "
                    f"{m['reversed_pair_captions']:.1f} / {m['reversed_pair_clips']:.1f} | "
                    f"{m['reversed_pair_captions_matching_head']:.1f} / {m['reversed_pair_clips_matching_head']:.1f} | "
                    f"{r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} |")
    base = report["models"].get(BASELINE, {}).get("metrics", {}).get("t2v_r1")
    ratios = "; ".join(f"{k} {r['metrics']['t2v_r1'] / base:.2f}" for k, r in report["models"].items()
                       if base and k != BASELINE)
    text = (f"# Video-text pieces on the captioned built-in benchmark\n\nCommand: `.venv/bin/python "
            f"benchmarks/video_text_synth.py {' '.join(argv)}`\n\nMachine: {report['machine']}; torch threads "
            f"{report['threads']}; load average at start {report['load']:.1f}.\n\n{len(CLASSES)} classes, "
            f"{report['train_videos']} training clips (3 captions each), 120 held-out clips (360 captions); chance "
            f"t2v R@1 = {100 / 120:.2f}%. {report['steps']} steps of batch {report['batch_size']}, lr {report['lr']}"
            f"; VideoMamba: masked (random, {report['video_mask_ratio']:.0%} of each frame hidden) for "
            f"{report['steps'] - report['unmasked_steps']} steps, unmasked for the last {report['unmasked_steps']}."
            "\n\n" + "\n".join(rows) +
            f"\n\nt2v R@1 relative to the frame average: {ratios or 'n/a'}.\n")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/video_text")
    p.add_argument("--md", help="write the result table here")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--unmasked-steps", type=int, default=300, help="the last steps run the unmasked phase "
                   "(VideoMamba; the other encoders are unmasked throughout)")
    p.add_argument("--video-mask-ratio", type=float, default=0.8, help="masked phase: hidden share of each frame")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-group", action="store_true", help="count clips with identical captions as different videos")
    p.add_argument("--encoders", nargs="+", default=["videomamba_li_micro", BASELINE], choices=list(ENCODERS))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("PKS4_THREADS", "1")))
    out = Path(args.out)
    root, text = prepare(out, args.train_per_class, args.seed)
    report: dict[str, Any] = {"steps": args.steps, "unmasked_steps": args.unmasked_steps, "batch_size": args.batch_size,
                              "video_mask_ratio": args.video_mask_ratio, "group_identical": not args.no_group,
                              "lr": args.lr, "train_videos": args.train_per_class * len(CLASSES),
                              "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                         f"Python {sys.version.split()[0]}",
                              "models": {}}
    for name in args.encoders:
        masked = name.startswith("videomamba") and args.unmasked_steps < args.steps
        task = make_task(name, text, masked, args.video_mask_ratio)
        row = train(task, root, args.steps, args.unmasked_steps, args.batch_size, args.lr, args.seed, name,
                    group_identical=not args.no_group)
        row["metrics"] = evaluate(task, root)
        print(f"[{name}] {row['metrics']}", flush=True)
        report["models"][name] = row
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if args.md:
        write_markdown(Path(args.md), report, list(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
