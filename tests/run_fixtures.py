"""What a training run leaves in its folder, for the tests of the run-directory guard."""
from pathlib import Path


def a_run(path: Path) -> Path:
    """What `pks4 train --out path` leaves: its config, its metrics and a checkpoint folder."""
    (path / "checkpoints" / "step-00000010").mkdir(parents=True)
    (path / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"weights")
    (path / "config.yaml").write_text("train: {epochs: 3}\n")
    (path / "metrics.jsonl").write_text('{"step": 10}\n')
    return path
