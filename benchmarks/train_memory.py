"""Training memory at equal batch and frames: PKS4 vs ST-Adapter vs full fine-tuning (PKS4 Table 1's ordering).

PKS4 Table 1 (8 frames, GPU): ViT-B/16 at batch 32: PKS4 21.8 GB, ST-Adapter 28.8 GB; ViT-L/14 at batch 16:
PKS4 20.7 GB, ST-Adapter 51.4 GB. Two measurements:

1. Paper scale, exact (``--paper``, written to train_memory_paper.md): the registry's real ViT-B/16 and ViT-L/14
   models (174 classes, 8 x 224). The activation memory of a training step is what autograd saves for the
   backward pass (``pks4.engine.profile.saved_activation_bytes``, every saved tensor once per storage), in float32
   and under bfloat16 autocast. It is measured on the CPU at batch 1 and 2, each in its own process (the
   difference is the per-clip cost), then scaled to the paper's batch; weights (4 B per parameter) and gradient + two AdamW moments (12 B per
   trainable parameter) are added.
2. Small scale, measured (the default, written to train_memory.md and .png): a CLIP-style ViT of width 256, 8 blocks, 4 heads, 112x112 input, 8 frames,
   batch 4, 10 classes; peak RSS growth over one real training step (forward, cross-entropy, backward, AdamW),
   time = median of 2 further steps. At this scale the weight state is a large share of the total, unlike at the
   paper's scale.

PKS4 inserts its module at 2/3 of the depth (after block 8 of 12, 16 of 24, 5 of 8) with the 9x9 correlation;
ST-Adapter has a bottleneck adapter (width 384; 128 at small scale) before the attention of every block and a
frozen backbone; full fine-tuning is the frame-average ViT with every weight trained.

    python benchmarks/train_memory.py              # small scale, measured RSS
    python benchmarks/train_memory.py --paper      # paper scale, saved activations (about 3 minutes on 2 cores)
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


# scale -> (batch of PKS4 Table 1, {row: registry model}, {row: Table 1 GB})
PAPER = {
    "ViT-B/16": (32, {"full_finetune": "vit_b16_avgpool", "pks4": "pks4_vit_b16", "stadapter": "stadapter_vit_b16"},
                 {"pks4": 21.8, "stadapter": 28.8}),
    "ViT-L/14": (16, {"full_finetune": "vit_l14_avgpool", "pks4": "pks4_vit_l14", "stadapter": "stadapter_vit_l14"},
                 {"pks4": 20.7, "stadapter": 51.4}),
}
PAPER_FRAMES, PAPER_SIZE, PAPER_CLASSES = 8, 224, 174
PRECISIONS = ("fp32", "mixed")


def paper_worker(name: str, threads: int, batch: int, precision: str) -> dict:
    """One measurement per process: the allocator's cache from an earlier one would otherwise add up (ViT-L/14
    at batch 2 then needs more than 24 GiB)."""
    import contextlib

    import torch

    from pks4.engine.profile import saved_activation_bytes
    from pks4.models.registry import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=PAPER_CLASSES)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "mixed" else contextlib.nullcontext()
    with ctx:
        saved = saved_activation_bytes(model, torch.randn(batch, PAPER_FRAMES, 3, PAPER_SIZE, PAPER_SIZE))
    return {"name": name, "batch": batch, "precision": precision, "saved": saved,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def merge_rows(measurements: list[dict]) -> dict[str, dict]:
    """Per model: params, trainable and {precision: [saved at batch 1, saved at batch 2]}."""
    rows: dict[str, dict] = {}
    for m in sorted(measurements, key=lambda m: m["batch"]):
        row = rows.setdefault(m["name"], {"name": m["name"], "params": m["params"], "trainable": m["trainable"]})
        row.setdefault(m["precision"], []).append(m["saved"])
    return rows


def write_paper_results(rows: dict[str, dict], out: Path, cmd: str) -> None:
    gib = 2**30
    lines = ["# Training memory at the paper's scale (PKS4 Table 1)", "", f"Reproduce: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; the numbers below do not "
             "depend on the machine or its load (the bytes autograd saves are a property of the model and its "
             "input).", "",
             f"Input {PAPER_FRAMES} x {PAPER_SIZE} x {PAPER_SIZE}, {PAPER_CLASSES} classes. Activations = bytes saved "
             "for the backward pass, measured at batch 1 and 2 (per clip = difference; `b2/b1` = 2 in float32 "
             "confirms linearity; under autocast batch 1 also holds bfloat16 copies of the weights, a constant) and "
             "scaled to the paper's batch, in float32 and under bfloat16 autocast (mixed precision; "
             "float16 autocast saves the same number of bytes). Total = activations + weights (4 B/param) + "
             "gradient and AdamW moments (12 B/trainable param, float32 master weights in both cases); it leaves "
             "out short-lived workspace, so it is a lower bound of a GPU's peak. Ratios are to full fine-tuning of "
             "the same backbone at the same precision.", ""]
    for precision in PRECISIONS:
        lines += [f"## {'float32' if precision == 'fp32' else 'mixed precision (bfloat16 autocast)'}", "",
                  "| backbone | model | params | trainable | activations MiB/clip | b2/b1 | batch | activations GiB | "
                  "total GiB | x full FT | x PKS4 | paper GB | paper x PKS4 |", "|" + "---|" * 13]
        for scale, (batch, names, paper) in PAPER.items():
            est = {}
            for kind, name in names.items():
                r = rows[name]
                b1, b2 = r[precision]
                # the per-clip cost is the difference: under autocast, batch 1 also holds bfloat16 copies of the
                # weights, which do not grow with the batch (so b2/b1 < 2 there)
                act = b1 + (batch - 1) * (b2 - b1)
                est[kind] = (b2 - b1, b2 / b1, act, act + 4 * r["params"] + 12 * r["trainable"])
            for kind, name in names.items():
                r, (per_clip, lin, act, total) = rows[name], est[kind]
                ref = f"{paper[kind]:.1f}" if kind in paper else "-"
                ref_ratio = f"{paper[kind] / paper['pks4']:.2f}" if kind in paper else "-"
                lines.append(f"| {scale} | {kind} (`{name}`) | {r['params'] / 1e6:.2f}M | {r['trainable'] / 1e6:.2f}M "
                             f"| {per_clip / 2**20:.0f} | {lin:.3f} | {batch} | {act / gib:.1f} | {total / gib:.1f} | "
                             f"{total / est['full_finetune'][3]:.2f} | {total / est['pks4'][3]:.2f} | {ref} | "
                             f"{ref_ratio} |")
        lines.append("")
    lines += ["What this shows, and how it compares with the paper: benchmarks/README.md, section Training memory.", ""]
    out.write_text("\n".join(lines))


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
    p.add_argument("--paper", action="store_true", help="ViT-B/16 and L/14 at the paper's batch (saved activations)")
    p.add_argument("--batch", type=int, default=1, help="(with --paper --worker) the batch to measure")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="(with --paper --worker)")
    p.add_argument("--from-rows", help="(with --paper) re-render train_memory_paper.md from the JSON lines of a run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "train_memory"))
    p.add_argument("--from-log", help="re-render the tables from the JSON lines a previous run printed")
    args = p.parse_args()
    if args.from_log:
        rows = [json.loads(x) for x in Path(args.from_log).read_text().splitlines() if x.startswith("{")]
        write_results(rows, Path(args.out), "python benchmarks/train_memory.py", args.threads)
        return
    if args.worker:
        print(json.dumps(paper_worker(args.worker, args.threads, args.batch, args.precision) if args.paper
                         else worker(args.worker, args.threads)))
        return
    if args.paper:
        if args.from_rows:
            measurements = [json.loads(x) for x in Path(args.from_rows).read_text().splitlines() if x.strip()]
        else:
            measurements = []
            for _, names, _ in PAPER.values():
                for name in names.values():
                    for batch in (1, 2):
                        for precision in PRECISIONS:
                            cmd = [sys.executable, __file__, "--paper", "--worker", name, "--threads",
                                   str(args.threads), "--batch", str(batch), "--precision", precision]
                            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=True)
                            measurements.append(json.loads(out.stdout.strip().splitlines()[-1]))
                            print(json.dumps(measurements[-1]), flush=True)
        write_paper_results(merge_rows(measurements), HERE / "train_memory_paper.md",
                            "python benchmarks/train_memory.py --paper")
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
