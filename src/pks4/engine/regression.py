"""Regression on video (LVU's ``like_ratio`` and ``view_count``, Li et al. Table 7): a one-output head and MSE.

Any registered model becomes a regressor by swapping its linear classification head for a one-output one
(:func:`attach_regression_head`); it then predicts the target standardised by the training set's mean and
standard deviation (:class:`TargetScale`), which keeps the head's output near unit scale whatever the
target's units (log views are ~12). :func:`regression_loss` is the MSE in those units, and
:func:`mean_squared_error` the error in the target's own units, the number Table 7 reports.

In training (``pks4 train`` with ``train.loss: mse``) :class:`RegressTask` is the classification task with this
head, loss and metric: the targets come with the data (``Item.extra["target"]``: LVU's regression csv files,
``data.format: lvu``), the scale is fitted on the training targets and kept in every checkpoint, and the
evaluation reports the MSE in the target's units (``score_key`` ``neg_mse``: the best checkpoint has the
smallest error).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pks4.data.items import Batch
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import config_to_dict
from pks4.engine.infer import run_views
from pks4.engine.loop import Loop, Task

__all__ = ["TargetScale", "attach_regression_head", "regression_loss", "mean_squared_error", "RegressTask",
           "regression_outputs"]


@dataclass(frozen=True)
class TargetScale:
    """Standardisation of a regression target: ``z = (y - mean) / std``."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"target std must be positive, got {self.std}")

    @classmethod
    def fit(cls, targets: Sequence[float]) -> "TargetScale":
        """Mean and (population) standard deviation of the training targets; std 1 if they are all equal."""
        t = torch.as_tensor(list(targets), dtype=torch.float64)
        if t.numel() == 0:
            raise ValueError("cannot fit a target scale to no targets")
        std = float(t.std(unbiased=False))
        return cls(float(t.mean()), std if std > 0 else 1.0)

    def normalise(self, y: Tensor) -> Tensor:
        return (y - self.mean) / self.std

    def denormalise(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean


def attach_regression_head(model: nn.Module) -> nn.Module:
    """Replace ``model.head`` (a Linear on the pooled feature) by a zero-initialised Linear(D, 1): the model then
    starts by predicting the training mean. Returns the model."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear `head` to turn into a regression head")
    new = nn.Linear(head.in_features, 1).to(head.weight.device, head.weight.dtype)
    nn.init.zeros_(new.weight)
    nn.init.zeros_(new.bias)
    model.head = new
    return model


def _as_vector(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.dim() == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"regression needs predictions (B,) or (B, 1) and targets (B,), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return pred.float(), target.float()


def regression_loss(pred: Tensor, target: Tensor, scale: TargetScale = TargetScale()) -> Tensor:
    """Mean squared error between the head's output (standardised units) and ``scale.normalise(target)``."""
    pred, target = _as_vector(pred, target)
    return F.mse_loss(pred, scale.normalise(target))


def mean_squared_error(pred: Tensor, target: Tensor, scale: TargetScale = TargetScale()) -> float:
    """MSE in the target's own units of the head's standardised outputs (Table 7's metric)."""
    pred, target = _as_vector(pred, target)
    return float(((scale.denormalise(pred) - target) ** 2).mean())


@torch.no_grad()
def regression_outputs(model: nn.Module, batches: Iterable[Batch], amp_dtype: torch.dtype | None = None
                       ) -> tuple[Tensor, Tensor]:
    """(outputs averaged over the test views, targets) of every clip of ``batches``, gathered from every process
    and ordered by dataset index (the distributed sampler's padding repeats dropped)."""
    was_training = model.training
    model.eval()
    outs, targets, index = [], [], []
    for batch in batches:
        if batch.video is None:
            continue
        outs.append(run_views(model, batch.video, amp_dtype=amp_dtype).float().mean(dim=1)[:, 0].cpu())
        targets.append(torch.as_tensor(batch.extra["target"], dtype=torch.float64))
        index.append(batch.index)
    model.train(was_training)
    local = (torch.cat(outs) if outs else torch.zeros(0), torch.cat(targets) if targets else torch.zeros(0),
             torch.cat(index) if index else torch.zeros(0, dtype=torch.long))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = tuple(torch.cat([p[k] for p in parts]) for k in range(3))
    first_seen: dict[int, int] = {}
    for pos, i in enumerate(local[2].tolist()):
        first_seen.setdefault(i, pos)
    first = [first_seen[i] for i in sorted(first_seen)]
    return local[0][first], local[1][first]


class RegressTask(Task):
    """Clips -> one number: MSE against the standardised target; evaluated by the MSE in the target's units."""

    score_key = "neg_mse"

    def __init__(self, cfg: Any, model: nn.Module, train_set: Dataset, val_set: Dataset | None, target: str,
                 scale: TargetScale, log: Callable[[str], None]) -> None:
        super().__init__()
        self.cfg, self.model, self.train_set, self.val_set = cfg, model, train_set, val_set
        self.target, self.scale, self.log = target, scale, log

    def describe(self) -> str:
        return f"model {self.cfg.model.name} regressing {self.target} (mean {self.scale.mean:.4g}, std {self.scale.std:.4g})"

    def inputs(self, batch: Batch) -> dict[str, Any]:
        return {"video": batch.video, "target": torch.as_tensor(batch.extra["target"], dtype=torch.float32)}

    def loss(self, inputs: dict[str, Tensor], geometry: Any = None) -> dict[str, Tensor]:
        return {"mse": regression_loss(self.model(inputs["video"], geometry=geometry), inputs["target"], self.scale)}

    def evaluate(self, model: nn.Module, loop: Loop) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        pred, target = regression_outputs(model, loop.eval_stream(self.val_set, self.cfg.eval.batch_size),
                                          amp_dtype=loop.amp_dtype)
        mse = mean_squared_error(pred, target, self.scale)
        self.log(f"epoch {loop.epoch}: val MSE {mse:.4f} ({len(target)} clips"
                 f"{', EMA weights' if loop.ema is not None else ''})")
        return {"samples": len(target), "mse": mse, "neg_mse": -mse}

    def metadata(self) -> dict[str, Any]:
        return {**ckpt.model_metadata(self.model, [self.target], config_to_dict(self.cfg)), "task": "regression",
                "target_scale": asdict(self.scale)}
