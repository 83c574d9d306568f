"""What a run writes as it goes: ``metrics.jsonl`` (one JSON object per logged step or evaluation), TensorBoard
scalars, and ``curves.png`` drawn from the JSON lines at the end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_curves"]


class MetricsLog:
    """JSON lines (``metrics.jsonl``) plus optional TensorBoard scalars; writes on the main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training loss and LR per step, validation accuracy per epoch (when evaluated), from ``metrics.jsonl``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train_rows], [r["lr"] for r in train_rows])
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("top1", "top5", "mean_class"):
        if any(key in r for r in val_rows):
            axes[2].plot([r["epoch"] for r in val_rows], [r[key] for r in val_rows], marker="o", label=key)
    axes[2].set(title="validation accuracy (%)", xlabel="epoch")
    if val_rows:
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
