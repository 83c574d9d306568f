"""Training memory at equal batch and frames: PKS4 vs ST-Adapter vs full fine-tuning (PKS4 Table 1's ordering).

PKS4 Table 1 (ViT-B/16, batch 32, 8 frames, GPU): PKS4 21.8 GB, ST-Adapter 28.8 GB. Here, on CPU, at a small
scale every model shares: a CLIP-style ViT of width 256, 8 blocks, 4 heads, 112x112 input, 8 frames, batch 4,
10 classes. PKS4 inserts its module after block 5 (2/3 of the depth, as block 8 of 12), 9x9 correlation;
ST-Adapter has a bottleneck of width/2 (384 for 768 in the paper) in every block and a frozen backbone; full
fine-tuning is the frame-average ViT with every weight trained. Each model runs in a fresh process; peak
memory = RSS growth over the first training step (forward, cross-entropy, backward, AdamW step: activations,
gradients and optimizer state), time = median of 2 further steps.

    python benchmarks/train_memory.py              # writes benchmarks/train_memory.md and .png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = ("full_finetune", "pks4", "stadapter")
HERE = Path(__file__).resolve().parent
BATCH, FRAMES, SIZE = 4, 8, 112


def build(kind: str):
    from pks4.models.clip_vit import CLIPVisionConfig
    from pks4.models.registry import create_model

    backbone = CLIPVisionConfig(image_size=SIZE, patch_size=16, width=256, layers=8, heads=4, output_dim=256)
    if kind == "pks4":
        return create_model("pks4_vit_tiny", backbone=backbone, insert_layer=5, corr_window=9, num_classes=10)
    if kind == "stadapter":
        return create_model("stadapter_vit_tiny", backbone=backbone, adapter_dim=128, num_classes=10)
    return create_model("pks4_vit_tiny", backbone=backbone, use_module=False, insert_layer=0, num_classes=10)


def worker(kind: str, threads: int) -> dict:
    import torch

    from pks4.engine.profile import PeakMemory, train_step_fn, time_call

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(kind).train()
    x = torch.randn(BATCH, FRAMES, 3, SIZE, SIZE)
    step = train_step_fn(model, x)
    with PeakMemory(x.device) as mem:
        step()
    times = time_call(step, x.device, 0, 2)
    return {"model": kind, "peak_mb": mem.peak_mb, "step_ms": statistics.median(times),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def write_results(rows: list[dict], out: Path, cmd: str, threads: int) -> None:
    base = next(r for r in rows if r["model"] == "full_finetune")
    lines = ["# Training memory at equal batch and frames", "", f"Reproduce: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch "
             "threads, CPU RSS (other jobs shared the CPU: times are noisy, memory is not).", "",
             f"Scale: ViT width 256, 8 blocks, 112x112, {FRAMES} frames, batch {BATCH}. Ratios are to full "
             "fine-tuning measured in the same run.", "",
             "Weight state = gradient + two AdamW moments of the trainable weights (3 x 4 bytes each, computed); "
             "the rest of the peak is activations and workspace.", "",
             "| model | params | trainable | peak MiB (train step) | x full FT | weight state MiB | rest MiB | "
             "x full FT | step ms | x full FT |", "|---|---|---|---|---|---|---|---|---|---|"]
    rest = {r["model"]: r["peak_mb"] - 12 * r["trainable"] / 2**20 for r in rows}
    for r in rows:
        mem, ms, state = r["peak_mb"], r["step_ms"], 12 * r["trainable"] / 2**20
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['trainable'] / 1e6:.2f}M | {mem:.0f} | "
                     f"{mem / base['peak_mb']:.2f} | {state:.0f} | {rest[r['model']]:.0f} | "
                     f"{rest[r['model']] / rest['full_finetune']:.2f} | {ms:.0f} | {ms / base['step_ms']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar([r["model"] for r in rows], [r["peak_mb"] for r in rows], color=["gray", "tab:blue", "tab:orange"])
    ax.set_ylabel("peak training-step memory (MiB)")
    ax.set_title(f"batch {BATCH} x {FRAMES} frames, CPU")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", metavar="MODEL")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "train_memory"))
    p.add_argument("--from-log", help="re-render the tables from the JSON lines a previous run printed")
    args = p.parse_args()
    if args.from_log:
        rows = [json.loads(x) for x in Path(args.from_log).read_text().splitlines() if x.startswith("{")]
        write_results(rows, Path(args.out), "python benchmarks/train_memory.py", args.threads)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    rows = []
    for kind in MODELS:
        cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    write_results(rows, Path(args.out), "python benchmarks/train_memory.py", args.threads)


if __name__ == "__main__":
    main()
