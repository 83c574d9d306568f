"""Training memory of every shipped VideoMamba recipe (Li et al., Park et al., masked pretraining) on one GPU.

For each recipe's model, clip size and per-step batch: the bytes autograd saves for the backward pass of one
training forward under bfloat16 autocast (``pks4.engine.profile.saved_activation_bytes``; for pretraining, the
masked-alignment loss with the frozen CLIP teacher), counted on the CPU at batch 2 and 3, each in its own
process: per clip = the difference (both also hold the autocast copies of the weights, a constant), scaled to
the recipe's batch. Batch 1 is not used: there some reshapes are views that need copies at any larger batch, so
it under-counts (VideoMamba-Ti, 2 blocks: +45.9 MiB from batch 1 to 2, then +41.3 MiB per clip exactly from
2 to 3 and 3 to 4; ``--check-linearity``). The CPU scan keeps the same bytes as the GPU's Triton path: its
inputs and one float32 state per 256 steps (mamba_ssm's kernel, where installed, also keeps its output: 2 bytes
more per token, channel and direction, +6.9 GiB for VideoMamba-S at 16 frames and batch 32). Weight state: 16
bytes per trained parameter (float32 weight, gradient, two AdamW moments), 4 per frozen one (the teacher). With
activation checkpointing the saved bytes are measured the same way, and one block's activations (the
non-checkpointed count over the depth) are added for the block being recomputed.

The estimate leaves out short-lived workspace (the scan's partial sums, matmul workspaces, allocator slack); a
recipe counts as fitting one 80 GB GPU when the estimate is at most ``LIMIT_GIB``, leaving the rest for that.

    .venv/bin/python benchmarks/recipe_memory.py              # about an hour on 2 busy cores
    .venv/bin/python benchmarks/recipe_memory.py --only videomamba_tiny_lvu_f32.yaml   # add one recipe's rows
    .venv/bin/python benchmarks/recipe_memory.py --from-rows benchmarks/recipe_memory.jsonl
    .venv/bin/python benchmarks/recipe_memory.py --check-linearity
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "src" / "pks4" / "configs"
BATCHES = (2, 3)
PLAIN_MAX_FRAMES = 32  # longer clips at 224 px are counted with checkpointing only; their plain count is scaled
LIMIT_GIB = 60.0  # of an 80 GB card's 80 GiB: the rest for workspace, allocator slack and the CUDA context


def recipes() -> list[Path]:
    """The VideoMamba classification and masked-pretraining recipes (a video-text recipe adds a text encoder this
    count does not build)."""
    return sorted(p for p in RECIPES.glob("videomamba_*.yaml") if "task" not in yaml.safe_load(p.read_text()))


def recipe_setting(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    train, data, model = cfg["train"], cfg["data"], cfg["model"]
    overrides = {k: v for k, v in (model.get("overrides") or {}).items() if k != "pretrained"}
    return {"recipe": path.name, "model": model["name"], "overrides": overrides, "frames": data["num_frames"],
            "size": data["size"], "batch": train["batch_size"], "accum": train.get("accum_steps", 1),
            "pretrain": "teacher" in cfg, "mask_ratio": cfg.get("mask", {}).get("ratio", 0.8),
            "grad_checkpointing": bool(train.get("grad_checkpointing", False))}


def key(setting: dict) -> str:
    """What a measurement depends on: recipes that differ only in their dataset (the head's class count, a
    0.1% difference in weights) share one."""
    return json.dumps([setting[k] for k in ("model", "overrides", "frames", "size", "pretrain", "mask_ratio")])


def _build(setting: dict):
    import torch

    from pks4.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(setting["model"], num_frames=setting["frames"], image_size=setting["size"],
                         **setting["overrides"])
    if not setting["pretrain"]:
        return model, None
    from pks4.engine.pretrain import TEACHER_ARCHS
    from pks4.models.clip_vit import CLIPVisionTransformer
    from pks4.models.videomamba_pretrain import MaskedAlignmentStudent

    teacher = CLIPVisionTransformer(TEACHER_ARCHS["b16"]).eval().requires_grad_(False)
    student = MaskedAlignmentStudent(model, teacher.cfg.output_dim, setting["mask_ratio"])
    last = f"model.layers.{model.num_layers - 1}."
    for name, p in student.named_parameters():  # as the pretraining engine does: no gradient reaches these
        if name.startswith((last, "model.norm_f.", "model.head.")):
            p.requires_grad_(False)
    return student, teacher


def worker(setting: dict, batch: int, checkpointing: bool) -> dict:
    """Saved bytes of one bf16-autocast training forward at ``batch``, and the parameter counts."""
    import torch

    from pks4.engine.profile import saved_activation_bytes

    torch.set_num_threads(2)
    model, teacher = _build(setting)
    inner = model.model if teacher is not None else model
    inner.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, setting["frames"], 3, setting["size"], setting["size"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if teacher is None:
            saved = saved_activation_bytes(model, x)
        else:
            saved = _pretrain_saved_bytes(model, teacher, x)
    everything = [*model.parameters(), *([] if teacher is None else teacher.parameters())]
    trained = sum(p.numel() for p in everything if p.requires_grad)
    return {"key": key(setting), "batch": batch, "checkpointing": checkpointing, "saved": saved,
            "trained_params": trained, "frozen_params": sum(p.numel() for p in everything) - trained,
            "depth": inner.config.depth}


def _pretrain_saved_bytes(student, teacher, x) -> int:
    import torch

    from pks4.models.videomamba_pretrain import masked_alignment_loss

    saved: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in [*student.parameters(), *teacher.parameters()]}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    student.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = masked_alignment_loss(student, teacher, x)
    del loss
    return sum(saved.values())


# ---- from measurements to estimates --------------------------------------------------------------------------
def _saved_at(setting: dict, rows: list[dict], ckpt: bool) -> float | None:
    """Saved bytes at the recipe's batch from its batch-2 and batch-3 rows (None when they are not measured)."""
    got = {r["batch"]: r["saved"] for r in rows if r["key"] == key(setting) and r["checkpointing"] == ckpt}
    if set(got) != set(BATCHES):
        return None
    per_clip = got[3] - got[2]
    return got[2] + (setting["batch"] - 2) * per_clip  # the constant (weight copies) is in got[2] once


def _plain_from_fewer_frames(setting: dict, rows: list[dict]) -> tuple[float, int] | None:
    """The plain count of a clip too long to measure here without checkpointing (VideoMamba-S at 64 x 224 saves
    about 7 GiB per clip), from the same model at the most frames measured: every saved tensor of a Mamba stack
    is per token (no attention matrix; the scan keeps its inputs and one state per 256 steps), so the count per
    clip is linear in the frames. Returns (bytes, frames it was scaled from)."""
    for frames in sorted({json.loads(r["key"])[2] for r in rows}, reverse=True):
        if frames >= setting["frames"]:
            continue
        shorter = key({**setting, "frames": frames})
        got = {r["batch"]: r["saved"] for r in rows if r["key"] == shorter and not r["checkpointing"]}
        if set(got) == set(BATCHES):
            per_clip = got[3] - got[2]
            constant = got[2] - 2 * per_clip  # the weight copies, at any clip length
            return constant + setting["batch"] * per_clip * setting["frames"] / frames, frames
    return None


def estimate(setting: dict, rows: list[dict]) -> dict:
    """GiB at the recipe's batch, without and (where measured) with activation checkpointing."""
    any_row = next(r for r in rows if r["key"] == key(setting))
    weights = 16 * any_row["trained_params"] + 4 * any_row["frozen_params"]
    plain, ckpt = _saved_at(setting, rows, False), _saved_at(setting, rows, True)
    scaled_from = None
    if plain is None:
        plain, scaled_from = _plain_from_fewer_frames(setting, rows)
    gib = 2**30
    out = {**setting, "weights_gib": weights / gib, "plain_gib": (plain + weights) / gib, "scaled_from": scaled_from}
    if ckpt is not None:
        block = plain / any_row["depth"]  # the block being recomputed in the backward pass
        out["checkpointed_gib"] = (ckpt + block + weights) / gib
    return out


def render(estimates: list[dict], command: str) -> str:
    lines = ["# Training memory of the shipped VideoMamba recipes", "", __doc__.split("\n\n    .venv")[0], "",
             f"Command: `{command}`. Limit: {LIMIT_GIB:g} GiB of an 80 GB GPU.", "",
             "| recipe | model | frames x size | batch per step (x accumulation) | weight state GiB | estimate GiB, "
             "no checkpointing | estimate GiB, activation checkpointing | recipe sets | fits |",
             "|" + "---|" * 9]
    for e in estimates:
        ck = e.get("checkpointed_gib")
        used = ck if e["grad_checkpointing"] and ck is not None else e["plain_gib"]
        plain = f"{e['plain_gib']:.1f}" + (f" (scaled from {e['scaled_from']} frames)" if e.get("scaled_from") else "")
        lines.append(f"| {e['recipe']} | {e['model']} | {e['frames']} x {e['size']} | {e['batch']} (x {e['accum']}) "
                     f"| {e['weights_gib']:.1f} | {plain} | {'-' if ck is None else f'{ck:.1f}'} "
                     f"| {'checkpointing' if e['grad_checkpointing'] else 'no checkpointing'} "
                     f"| {'yes' if used <= LIMIT_GIB else 'NO'} ({used:.1f} GiB) |")
    return "\n".join(lines) + "\n"


def measure_all(settings: list[dict], out_rows: Path) -> list[dict]:
    """Every recipe at batch 2 and 3 without checkpointing; with it too where that estimate exceeds the limit
    (or the recipe already sets it). One process per measurement, so no allocator cache carries over."""
    rows = [json.loads(x) for x in out_rows.read_text().splitlines() if x.strip()] if out_rows.exists() else []
    for setting in settings:
        for ckpt in (False, True):
            if any(r["key"] == key(setting) and r["checkpointing"] == ckpt for r in rows):
                continue  # measured for another recipe of the same model setting
            if ckpt and not setting["grad_checkpointing"] and estimate(setting, rows)["plain_gib"] <= LIMIT_GIB:
                continue
            if not ckpt and setting["frames"] > PLAIN_MAX_FRAMES:
                continue  # too large for this machine's memory without checkpointing: scaled (_plain_from_fewer_frames)
            for batch in BATCHES:
                cmd = [sys.executable, __file__, "--worker", json.dumps(setting), "--batch", str(batch)]
                cmd += ["--checkpointing"] if ckpt else []
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                with out_rows.open("a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
                print(json.dumps(rows[-1]), flush=True)
    return rows


def check_linearity(batches: tuple[int, ...] = (1, 2, 3, 4)) -> list[float]:
    """Saved MiB of VideoMamba-Ti with 2 blocks (8 x 224, bf16 autocast) at each batch: why batch 1 is not used."""
    import torch

    from pks4.engine.profile import saved_activation_bytes
    from pks4.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("videomamba_tiny", num_frames=8, depth=2)
    saved = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved.append(saved_activation_bytes(model, torch.randn(batch, 8, 3, 224, 224)) / 2**20)
    steps = ", ".join(f"{b0} -> {b1}: +{s1 - s0:.1f}" for b0, b1, s0, s1 in zip(batches, batches[1:], saved, saved[1:]))
    print(f"VideoMamba-Ti, 2 blocks, saved MiB at batch {batches}: {[round(x, 1) for x in saved]} ({steps})")
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help="(internal) one measurement: the recipe setting as JSON")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--from-rows", type=Path, help="re-render from the JSON lines of an earlier run")
    ap.add_argument("--only", nargs="*", help="recipe file names to measure (default: all)")
    ap.add_argument("--check-linearity", action="store_true", help="saved bytes at batch 1-4 of a 2-block model")
    args = ap.parse_args()
    if args.check_linearity:
        check_linearity()
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.batch, args.checkpointing)))
        return
    settings = [recipe_setting(p) for p in recipes() if not args.only or p.name in args.only]
    settings.sort(key=lambda s: (s["model"] != "videomamba_tiny", s["model"] == "videomamba_middle", s["frames"]))
    if args.from_rows:
        rows = [json.loads(x) for x in args.from_rows.read_text().splitlines() if x.strip()]
    else:
        if not args.only:  # a full run starts afresh; --only adds the recipes it names to the rows kept
            (HERE / "recipe_memory.jsonl").unlink(missing_ok=True)
        rows = measure_all(settings, HERE / "recipe_memory.jsonl")
        settings = [recipe_setting(p) for p in recipes()]
        settings.sort(key=lambda s: (s["model"] != "videomamba_tiny", s["model"] == "videomamba_middle", s["frames"]))
    estimates = [estimate(s, rows) for s in settings if any(r["key"] == key(s) for r in rows)]
    text = render(estimates, "python benchmarks/recipe_memory.py")
    (HERE / "recipe_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
