"""The paper's workflow in miniature: a tiny CLIP image tower pretrained on single frames, then PKS4 fine-tuned on it.

1. **Tower.** A CLIP vision tower (32 px, patch 8, width 64, 3 blocks, 64-dim heads as in every CLIP tower) learns
   to name the scene of single frames: which kind and which pair of classes a frame comes from (an appearance
   label: the two classes of a pair show the same frames, so no frame says which of them it is). The frames come
   from clips of every kind drawn with a seed the benchmarks do not use. The tower is saved in the OpenAI CLIP
   layout (``visual.*`` keys), the format ``--set model.overrides.pretrained=...`` reads.
2. **Fine-tuning** with the paper's recipe (``src/pks4/configs/tiny_finetune.yaml``: module at 2/3 depth,
   zero-initialised residual projections, LR scaled by batch / 256 with layer-wise decay, 5 epochs), for every
   rung of the Table 5 ladder (frame-average baseline / + KS4 / + var / + corr) on every kind, over training seeds.
3. **The same model from random weights** (the fine-tuning recipe without the tower), for the same 5 epochs.

The per-epoch accuracy is compared with the from-scratch recipe's 15 epochs, read from the results of
``benchmarks/synth_family.py`` (``--family``), which must use the same data (``--out`` shared).

    .venv/bin/python benchmarks/pretrained_workflow.py --out /tmp/family --md benchmarks/pretrained_workflow.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pks4.data.synth import KINDS, render_pair_clip
from pks4.data.transforms import CLIP_MEAN, CLIP_STD
from pks4.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_family import Job, add_common_args, kind_data, mean_sd, run_all  # noqa: E402  (a sibling script)

TOWER = CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=1, output_dim=64)
TOWER_SPLIT = 2  # generate_synth uses 0 (train) and 1 (val) in the seed of every clip
LADDER = [
    ("Baseline (frame average)", "vit_tiny_avgpool", []),
    ("+ KS4", "pks4_vit_tiny", ["model.overrides.use_var=false", "model.overrides.use_corr=false"]),
    ("+ KS4 + KPE(var)", "pks4_vit_tiny", ["model.overrides.use_corr=false"]),
    ("+ KS4 + KPE(var + corr)", "pks4_vit_tiny", []),
]


# ---- 1. the tower ------------------------------------------------------------------------------------------
def scene_frames(clips_per_pair: int, seed: int, frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Every frame of ``clips_per_pair`` clips per (kind, pair), resized to the tower's input: uint8 images
    (N, 3, S, S) and the scene label (N,) of each; clips alternate between the pair's two classes."""
    images, labels, names = [], [], []
    for kind in KINDS.values():
        for pair, (name, _, _) in enumerate(kind.pairs):
            for k in range(clips_per_pair):
                label = 2 * pair + k % 2
                rng = np.random.default_rng([seed, TOWER_SPLIT, len(names), k])
                clip = torch.from_numpy(render_pair_clip(kind, label, rng, frames, size)).permute(0, 3, 1, 2)
                small = F.interpolate(clip.float(), size=TOWER.image_size, mode="bilinear", antialias=True)
                images.append(small.round().clamp(0, 255).to(torch.uint8))
                labels.append(torch.full((frames,), len(names)))
            names.append(f"{kind.name}/{name}")
    return torch.cat(images), torch.cat(labels), names


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (CLIP_MEAN, CLIP_STD))
    return (images.float() - mean) / std


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2 px shifts (edge padding) and horizontal flips: a scene's name survives both."""
    n, _, s, _ = images.shape
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    out = padded[..., dy:dy + s, dx:dx + s]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def train_tower(train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                num_classes: int, epochs: int, seed: int) -> tuple[CLIPVisionTransformer, list[float]]:
    """Tower + linear head on its image embedding, AdamW with a cosine LR; returns the tower and the held-out
    top-1 after each epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tower = CLIPVisionTransformer(TOWER)
    head = torch.nn.Linear(TOWER.output_dim, num_classes)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    images, labels = train
    steps = epochs * (len(labels) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    curve = []
    for _ in range(epochs):
        tower.train()
        order = torch.randperm(len(labels), generator=gen)
        for i in range(len(labels) // 128):
            idx = order[i * 128:(i + 1) * 128]
            logits = head(tower(_normalise(_augment(images[idx].float(), gen))))
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        curve.append(_top1(tower, head, held_out))
        print(f"tower epoch {len(curve)}: held-out frame top-1 {curve[-1]:.1f}", flush=True)
    return tower, curve


@torch.no_grad()
def _top1(tower: CLIPVisionTransformer, head: torch.nn.Linear, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    tower.eval()
    images, labels = data
    preds = torch.cat([head(tower(_normalise(images[i:i + 512].float()))).argmax(-1)
                       for i in range(0, len(labels), 512)])
    return 100.0 * (preds == labels).float().mean().item()


def save_openai_layout(tower: CLIPVisionTransformer, path: Path) -> Path:
    """The tower's weights under OpenAI CLIP's vision keys (``visual.conv1.weight``, ...), as a torch state dict."""
    torch.save({f"visual.{k}": v.detach().clone() for k, v in tower.state_dict().items()}, path)
    return path


# ---- 2-3. fine-tuning and the same model from random weights ------------------------------------------------------
def workflow_jobs(args: argparse.Namespace, out: Path, tower: Path) -> list[Job]:
    jobs = []
    for kind in args.kinds:
        data = kind_data(args, out, kind)
        lists = ["--train-list", str(data.train), "--val-list", str(data.val), "--labels", str(data.labels)]
        runs = [(f"tower/{i}", model, [f"model.overrides.pretrained={tower}", *sets])
                for i, (_, model, sets) in enumerate(LADDER)]
        runs.append(("random", "pks4_vit_tiny", []))
        for seed in args.seeds:
            for start, model, sets in runs:
                jobs.append(Job(f"{kind}/{start}/seed{seed}", out / "finetune" / kind / start / f"seed{seed}",
                                [args.recipe, *lists, "--model", model, "--seed", str(seed),
                                 *[x for s in [*sets, *args.set] for x in ("--set", s)]],
                                dict(kind=kind, start=start, seed=seed)))
    return jobs


def _curve(results: list[dict]) -> list[float]:
    """Mean over seeds of the per-epoch validation top-1."""
    return [statistics.mean(c) for c in zip(*(r["curve"] for r in results))]


def _curve_cell(results: list[dict], epochs: int) -> str:
    """Mean over seeds of the first ``epochs`` per-epoch top-1, and the number of seeds."""
    if not results:
        return "not run"
    return " / ".join(f"{v:.1f}" for v in _curve(results)[:epochs]) + f" (n={len(results)})"


def epoch_table(results: list[dict], family: list[dict], kinds: list[str], epochs: int = 5) -> list[str]:
    lines = [f"| kind | from scratch (recipe), 15 epochs: final | from scratch, epochs 1-{epochs} | fine-tuned from "
             f"the tower, epochs 1-{epochs} | same model from random weights, epochs 1-{epochs} | first fine-tuned "
             "epoch at the from-scratch final |", "|---|---|---|---|---|---|"]
    for kind in kinds:
        scratch = [r for r in family if r["kind"] == kind and r["model"] == "pks4_vit_tiny"]
        tuned = [r for r in results if r["kind"] == kind and r["start"] == f"tower/{len(LADDER) - 1}"]
        rand = [r for r in results if r["kind"] == kind and r["start"] == "random"]
        if not (scratch and tuned):
            continue
        final = statistics.mean(r["top1"] for r in scratch)
        reach = next((i + 1 for i, v in enumerate(_curve(tuned)) if v >= final), None)
        lines.append(f"| `{kind}` | {mean_sd([r['top1'] for r in scratch])} (n={len(scratch)}) | "
                     f"{_curve_cell(scratch, epochs)} | {_curve_cell(tuned, epochs)} | {_curve_cell(rand, epochs)} | "
                     f"{reach if reach else f'not within {epochs}'} |")
    return lines


def ladder_table(results: list[dict], kinds: list[str]) -> list[str]:
    lines = ["| kind | " + " | ".join(name for name, _, _ in LADDER) + " |", "|---|" + "---|" * len(LADDER)]
    for kind in kinds:
        runs = [[r["top1"] for r in results if r["kind"] == kind and r["start"] == f"tower/{i}"]
                for i in range(len(LADDER))]
        if any(runs):
            lines.append(f"| `{kind}` | " + " | ".join(f"{mean_sd(v)} (n={len(v)})" for v in runs) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/synth_family", help="the folder benchmarks/synth_family.py used")
    p.add_argument("--recipe", default="tiny_finetune", help="a YAML file or a packaged recipe's name")
    p.add_argument("--tower-clips", type=int, default=48, help="clips per (kind, pair) for the tower's frames")
    p.add_argument("--tower-epochs", type=int, default=8)
    add_common_args(p)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    tower_path, tower_note = build_tower(args, out)
    results = run_all(workflow_jobs(args, out, tower_path), args.jobs, args.done_only)
    (out / "workflow.json").write_text(json.dumps(results, indent=1))
    family = json.loads((out / "family.json").read_text())
    lines = [tower_note, ""] + epoch_table(results, family, args.kinds) + [""] + ladder_table(results, args.kinds)
    cpu = {s: statistics.mean(r["cpu_s"] for r in results if r["start"] == s) for s in {r["start"] for r in results}}
    lines += ["", "Mean CPU s per run: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items())),
              f"Machine: {platform.machine()}, {os.cpu_count()} cores shared, torch threads 1 per run.",
              "Command: `python benchmarks/pretrained_workflow.py " + " ".join(sys.argv[1:]) + "`"]
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")


def build_tower(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    """Pretrain and save the tower once (``out/tower.pt``); returns its path and a line describing it."""
    path, note = out / "tower.pt", out / "tower.json"
    if not (path.is_file() and note.is_file()):
        start = time.process_time()
        train = scene_frames(args.tower_clips, args.data_seed + 1, args.frames, args.size)
        held_out = scene_frames(4, args.data_seed + 2, args.frames, args.size)
        tower, curve = train_tower(train[:2], held_out[:2], len(train[2]), args.tower_epochs, seed=0)
        save_openai_layout(tower, path)
        note.write_text(json.dumps(dict(curve=curve, frames=len(train[1]), scenes=len(train[2]),
                                        cpu_s=round(time.process_time() - start, 1)), indent=1))
    info = json.loads(note.read_text())
    return path, (f"Tower: {info['frames']} frames of {info['scenes']} scenes, {len(info['curve'])} epochs, "
                  f"held-out frame top-1 {info['curve'][-1]:.1f}% ({info['cpu_s']:.0f} CPU s, including rendering).")


if __name__ == "__main__":
    main()
