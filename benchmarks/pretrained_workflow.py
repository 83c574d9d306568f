"""The paper's workflow in miniature: a tiny CLIP image tower pretrained on single frames, then PKS4 fine-tuned on it.

1. **Tower.** A CLIP vision tower (32 px, patch 8, width 64, 3 blocks, 64-dim heads as in every CLIP tower) learns
   from single images what a CLIP tower brings to a video model: what an image shows and where. ``shapes`` (the
   default): images of one object among distractors over the family's backgrounds, drawn by the family's painter,
   labelled with the object's shape, place (8 x 8 grid), size, pointing direction and opacity. ``scene``: frames of
   clips of every kind labelled with their scene (which kind and which pair of classes a frame comes from; the two
   classes of a pair show the same frames, so no frame says which of them it is). Either set is drawn with seeds
   the benchmarks do not use. The tower is saved in the OpenAI CLIP layout (``visual.*`` keys), the format
   ``--set model.overrides.pretrained=...`` reads.
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
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pks4.data.synth import KINDS, generate_synth, render_pair_clip
from pks4.data.synth_scene import JITTER, SHAPES, muted_background, paint, random_colour, random_texture, \
    view_grid
from pks4.data.transforms import CLIP_MEAN, CLIP_STD
from pks4.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_family import Job, add_common_args, kind_data, mean_sd, pks4_command, run_all  # noqa: E402  (sibling)

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


# What a shapes image names about its one foreground object, and how many classes each attribute has: the shape
# (the family's six and the dial), its centre's column and row on an 8 x 8 grid, its size (4 bins of radius), the
# direction its marker points (8 bins of 45 degrees) and its opacity (3 bins).
SHAPE_ATTRIBUTES = {"shape": len(SHAPES) + 1, "column": 8, "row": 8, "size": 4, "angle": 8, "opacity": 3}


def shape_images(count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``count`` single images of one object among distractors, over the family's two kinds of background (muted
    blobs, busy waves), drawn at ``size`` px with the family's painter and resized to the tower's input; uint8
    images (N, 3, S, S) and their attribute labels (N, len(SHAPE_ATTRIBUTES)) in the order of
    :data:`SHAPE_ATTRIBUTES`.

    Why these labels: a CLIP tower brings what an image shows and where. Naming the object, its place on an
    8 x 8 grid (2 x 2 cells per 8 px patch at 32 px), its size, the way it points and how opaque it is asks
    the tower for the same, in the frame-level quantities whose changes make the family's classes (translation,
    scale, rotation, fading). Every label is read off one image: the tower never sees two frames of a clip.
    """
    rng = np.random.default_rng([seed, TOWER_SPLIT, 7])
    s, n = size / 64.0, size + 2 * JITTER
    xs, ys = view_grid(n, (-JITTER, -JITTER))
    images, labels = [], []
    for _ in range(count):
        if rng.uniform() < 0.5:
            canvas = muted_background(int(rng.integers(2**31)), n)
        else:
            canvas = random_texture(rng, s, contrast=float(rng.uniform(10, 35)))(xs, ys)
        for _ in range(int(rng.integers(0, 4))):
            paint(canvas, xs, ys, SHAPES[int(rng.integers(len(SHAPES)))], random_colour(rng, (0.2, 0.6), (0.4, 0.8)),
                  float(rng.uniform(2.5, 5)) * s, float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        shape = int(rng.integers(len(SHAPES) + 1))
        radius = float(rng.uniform(4, 20))
        cx, cy = (float(rng.uniform(radius * 0.5, 64 - radius * 0.5)) * s for _ in range(2))
        angle, alpha = float(rng.uniform(0, 360)), float(rng.uniform(0.25, 1.0))
        colour = random_colour(rng)
        marker = tuple(int(c * 0.2) for c in random_colour(rng))
        paint(canvas, xs, ys, (SHAPES + ("dial",))[shape], colour, radius * s, cx, cy, angle, alpha, marker)
        images.append(np.clip(np.rint(canvas[JITTER:JITTER + size, JITTER:JITTER + size]), 0, 255))
        labels.append([shape, min(int(cx / size * 8), 7), min(int(cy / size * 8), 7), min(int((radius - 4) / 4), 3),
                       int((angle + 22.5) % 360 // 45), min(int((alpha - 0.25) / 0.25), 2)])
    clip = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    small = F.interpolate(clip, size=TOWER.image_size, mode="bilinear", antialias=True)
    return small.round().clamp(0, 255).to(torch.uint8), torch.tensor(labels), list(SHAPE_ATTRIBUTES)


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
                classes: list[int], epochs: int, seed: int, augment: bool = True,
                lr: float = 2e-3) -> tuple[CLIPVisionTransformer, list[float]]:
    """Tower + one linear head per label column on its image embedding (``classes[k]`` classes for column k of the
    labels, (N,) or (N, K)), the sum of their cross-entropies, AdamW with a one-cycle LR; returns the tower and the
    held-out top-1 after each epoch (the mean over the label columns).

    ``augment`` shifts and flips the images (for labels that survive both: the scene's name); attribute labels
    (where, which way) do not, and their images are never repeated often enough to need it."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tower = CLIPVisionTransformer(TOWER)
    head = torch.nn.Linear(TOWER.output_dim, sum(classes))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    images, labels = train[0], train[1].view(len(train[1]), -1)
    steps = epochs * (len(labels) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    curve = []
    for _ in range(epochs):
        tower.train()
        order = torch.randperm(len(labels), generator=gen)
        for i in range(len(labels) // 128):
            idx = order[i * 128:(i + 1) * 128]
            batch = images[idx].float()
            logits = head(tower(_normalise(_augment(batch, gen) if augment else batch))).split(classes, dim=-1)
            loss = sum(F.cross_entropy(z, labels[idx, k], label_smoothing=0.1) for k, z in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        curve.append(_top1(tower, head, held_out, classes))
        print(f"tower epoch {len(curve)}: held-out top-1 {curve[-1]:.1f}", flush=True)
    return tower, curve


@torch.no_grad()
def _top1(tower: CLIPVisionTransformer, head: torch.nn.Linear, data: tuple[torch.Tensor, torch.Tensor],
          classes: list[int]) -> float:
    """Held-out top-1 of every label column, averaged over the columns."""
    tower.eval()
    images, labels = data[0], data[1].view(len(data[1]), -1)
    logits = torch.cat([head(tower(_normalise(images[i:i + 512].float()))) for i in range(0, len(labels), 512)])
    hits = [(z.argmax(-1) == labels[:, k]).float().mean() for k, z in enumerate(logits.split(classes, dim=-1))]
    return 100.0 * torch.stack(hits).mean().item()


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
    # the runs the target needs first (fine-tuned, then from random weights), the ladder's lower rungs last
    first = {f"tower/{len(LADDER) - 1}": 0, "random": 1}
    return sorted(jobs, key=lambda j: first.get(j.meta["start"], 2))


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
             f"the tower, epochs 1-{epochs} | fine-tuned, epoch {epochs}: mean ± sd (per seed) | same model from "
             f"random weights, epochs 1-{epochs} | first fine-tuned epoch at the from-scratch final |",
             "|---|---|---|---|---|---|---|"]
    for kind in kinds:
        scratch = [r for r in family if r["kind"] == kind and r["model"] == "pks4_vit_tiny"]
        tuned = [r for r in results if r["kind"] == kind and r["start"] == f"tower/{len(LADDER) - 1}"]
        rand = [r for r in results if r["kind"] == kind and r["start"] == "random"]
        if not (scratch and tuned):
            continue
        final = statistics.mean(r["top1"] for r in scratch)
        reach = next((i + 1 for i, v in enumerate(_curve(tuned)) if v >= final), None)
        at_end = [r["curve"][epochs - 1] for r in tuned if len(r["curve"]) >= epochs]
        per_seed = " / ".join(f"{v:.1f}" for v in at_end)
        lines.append(f"| `{kind}` | {mean_sd([r['top1'] for r in scratch])} (n={len(scratch)}) | "
                     f"{_curve_cell(scratch, epochs)} | {_curve_cell(tuned, epochs)} | {mean_sd(at_end)} "
                     f"({per_seed}) | {_curve_cell(rand, epochs)} | {reach if reach else f'not within {epochs}'} |")
    return lines


def ladder_table(results: list[dict], kinds: list[str]) -> list[str]:
    lines = ["| kind | " + " | ".join(name for name, _, _ in LADDER) + " |", "|---|" + "---|" * len(LADDER)]
    for kind in kinds:
        runs = [[r["top1"] for r in results if r["kind"] == kind and r["start"] == f"tower/{i}"]
                for i in range(len(LADDER))]
        if any(runs):
            lines.append(f"| `{kind}` | " + " | ".join(f"{mean_sd(v)} (n={len(v)})" for v in runs) + " |")
    return lines


# ---- 4. a larger test set for the final checkpoints --------------------------------------------------------
def final_checkpoint(run: Path) -> Path:
    """The last step checkpoint a run wrote (``checkpoints/step-NNNNNNNN``): its final weights, not its best."""
    steps = sorted((run / "checkpoints").glob("step-*"))
    if not steps:
        raise FileNotFoundError(f"{run}: no step checkpoint; was the run finished?")
    return steps[-1]


def test_top1(run: Path, test_list: Path, tag: str) -> float:
    """Top-1 of ``run``'s final checkpoint on ``test_list`` (``pks4 eval --json``), cached in the run folder."""
    cached = run / f"test_{tag}.json"
    if not cached.is_file():
        cmd = [*pks4_command("eval"), "--checkpoint", str(final_checkpoint(run)), "--data", str(test_list), "--json",
               "--workers", "0", "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, env=env, check=True)
        cached.write_text(done.stdout.strip().splitlines()[-1])
    return json.loads(cached.read_text())["top1"]


def test_table(args: argparse.Namespace, out: Path) -> list[str]:
    """Both starts' final checkpoints (from scratch after 15 epochs, fine-tuned after 5) on a test set of
    ``--test-per-class`` clips per class drawn with ``--test-seed``: where the validation set (20 clips per class)
    saturates, one clip decides a comparison; five times as many clips separate the two."""
    tag = f"seed{args.test_seed}_n{args.test_per_class}"
    lines = ["| kind | test clips | from scratch (recipe), 15 epochs | fine-tuned from the tower, 5 epochs | "
             "fine-tuned minus from scratch (means) |", "|---|---|---|---|---|"]
    for kind in args.kinds:
        data = generate_synth(out / "test" / kind, kind=kind, seed=args.test_seed, size=args.size,
                              num_frames=args.frames, num_train_per_class=0, num_val_per_class=args.test_per_class)
        runs = {"scratch": [out / "runs" / kind / "pks4_vit_tiny" / f"seed{s}" for s in args.seeds],
                "tuned": [out / "finetune" / kind / "tower" / str(len(LADDER) - 1) / f"seed{s}" for s in args.seeds]}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            top1 = {k: list(pool.map(lambda r: test_top1(r, data.val, tag), v)) for k, v in runs.items()}
        clips = len(data.val.read_text().splitlines())
        cells = [f"{mean_sd(v)} ({' / '.join(f'{x:.2f}' for x in v)})" for v in top1.values()]
        gap = statistics.mean(top1["tuned"]) - statistics.mean(top1["scratch"])
        lines.append(f"| `{kind}` | {clips} | {cells[0]} | {cells[1]} | {gap:+.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/synth_family", help="the folder benchmarks/synth_family.py used")
    p.add_argument("--recipe", default="tiny_finetune", help="a YAML file or a packaged recipe's name")
    p.add_argument("--tower-task", choices=["shapes", "scene"], default="shapes",
                   help="what the tower learns to name: an object's attributes (shapes) or a frame's scene (scene)")
    p.add_argument("--tower-images", type=int, default=60000, help="shapes images the tower learns from")
    p.add_argument("--tower-clips", type=int, default=48, help="scene: clips per (kind, pair) for the tower's frames")
    p.add_argument("--tower-epochs", type=int, default=30)
    p.add_argument("--test-per-class", type=int, default=100, help="test clips per class (0: no test table)")
    p.add_argument("--test-seed", type=int, default=100, help="data seed of the test clips")
    add_common_args(p)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    tower_path, tower_note = build_tower(args, out)
    results = run_all(workflow_jobs(args, out, tower_path), args.jobs, args.done_only)
    (out / "workflow.json").write_text(json.dumps(results, indent=1))
    family = json.loads((out / "family.json").read_text())
    lines = [tower_note, ""] + epoch_table(results, family, args.kinds) + [""] + ladder_table(results, args.kinds)
    if args.test_per_class:
        lines += ["", f"Final checkpoints on a test set ({args.test_per_class} clips per class, data seed "
                      f"{args.test_seed}):", ""] + test_table(args, out)
    cpu = {s: statistics.mean(r["cpu_s"] for r in results if r["start"] == s) for s in {r["start"] for r in results}}
    lines += ["", "Mean CPU s per run: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items())),
              f"Machine: {platform.machine()}, {os.cpu_count()} cores shared, torch threads 1 per run.",
              "Command: `python benchmarks/pretrained_workflow.py " + " ".join(sys.argv[1:]) + "`"]
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")


def build_tower(args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    """Pretrain and save the tower once (``out/tower_<task>.pt``); returns its path and a line describing it."""
    path, note = out / f"tower_{args.tower_task}.pt", out / f"tower_{args.tower_task}.json"
    if not (path.is_file() and note.is_file()):
        start = time.process_time()
        if args.tower_task == "shapes":
            train = shape_images(args.tower_images, args.data_seed + 1, args.size)
            held_out = shape_images(2000, args.data_seed + 2, args.size)
            classes, augment = list(SHAPE_ATTRIBUTES.values()), False
        else:
            train = scene_frames(args.tower_clips, args.data_seed + 1, args.frames, args.size)
            held_out = scene_frames(4, args.data_seed + 2, args.frames, args.size)
            classes, augment = [len(train[2])], True
        tower, curve = train_tower(train[:2], held_out[:2], classes, args.tower_epochs, seed=0, augment=augment)
        save_openai_layout(tower, path)
        note.write_text(json.dumps(dict(task=args.tower_task, curve=curve, images=len(train[1]), labels=train[2],
                                        cpu_s=round(time.process_time() - start, 1)), indent=1))
    info = json.loads(note.read_text())
    what = ("single images of one object, naming " + ", ".join(info["labels"]) if info["task"] == "shapes"
            else f"frames of {len(info['labels'])} scenes, naming the scene")
    return path, (f"Tower ({info['task']}): {info['images']} {what}; {len(info['curve'])} epochs, held-out top-1 "
                  f"{info['curve'][-1]:.1f}% (mean over the labels; {info['cpu_s']:.0f} CPU s, rendering included).")


if __name__ == "__main__":
    main()
