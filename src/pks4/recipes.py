"""Packaged training recipes, and the one a run gets when it names none.

A run that names no recipe (``pks4 train --model ... --train-list ...``, flags alone) and starts from random
weights gets :data:`FROM_SCRATCH_RECIPE`: the defaults of the built-in ``RunConfig`` follow the paper's
fine-tuning recipe (LR scaled by batch / 256, module late in the tower, zero-initialised residuals), which is
meant to protect a pretrained CLIP tower and leaves a tiny model trained from scratch far from converged in 15
epochs. A run given a pretrained backbone (``model.pretrained`` / ``model.overrides.pretrained``) or weights to
start from (``model.init_from``) keeps the built-in defaults, as does any model the recipe was not tuned for.
``benchmarks/synth_family.md`` has the measurements behind the recipe.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["FROM_SCRATCH_RECIPE", "FROM_SCRATCH_MODELS", "choose_recipe"]

FROM_SCRATCH_RECIPE = "tiny_from_scratch"  # a packaged recipe (``pks4 recipes``; pks4.cli.training.recipe_path)
# The models the from-scratch recipe was tuned for (its model.overrides set their shape and module switches).
FROM_SCRATCH_MODELS = ("pks4_vit_tiny", "vit_tiny_avgpool")
# Config keys that give a run weights to start from; any of them set to a non-empty value means "not from scratch".
_START_KEYS = ("model.pretrained", "model.overrides.pretrained", "model.init_from")
_EMPTY = ("", "''", '""', "null", "none", "~")


def _last_values(overrides: Sequence[str]) -> dict[str, str]:
    """key -> value of the last assignment of each key (later ones win, as when the config is built)."""
    values: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key.strip()] = value.strip()
    return values


def choose_recipe(recipe: str | None, overrides: Sequence[str] = ()) -> tuple[str | None, str]:
    """Which recipe a run loads, and the line to print at start saying why.

    Args:
        recipe: the recipe the user named (a YAML path or a packaged name), or None.
        overrides: every ``key=value`` the run was given (``--model`` and the other flags turned into keys, then
            ``--set``), in order.
    Returns:
        (recipe, message): the user's recipe when one is named; the from-scratch recipe's name when none is named,
        no key gives starting weights and the model (``model.name``, default ``pks4_vit_tiny``) is one the recipe
        was tuned for; else None, which means the built-in defaults.
    """
    if recipe is not None:
        return recipe, f"recipe {recipe}"
    values = _last_values(overrides)
    if any(values.get(key, "").lower() not in _EMPTY for key in _START_KEYS):
        return None, "no recipe named; starting weights given: the built-in (fine-tuning) defaults"
    model = values.get("model.name", FROM_SCRATCH_MODELS[0])
    if model not in FROM_SCRATCH_MODELS:
        return None, (f"no recipe named; model {model} is not one the from-scratch recipe was tuned for "
                      f"({', '.join(FROM_SCRATCH_MODELS)}): the built-in defaults")
    return FROM_SCRATCH_RECIPE, (f"no recipe named and no pretrained backbone: the from-scratch recipe "
                                 f"{FROM_SCRATCH_RECIPE} (`pks4 recipes {FROM_SCRATCH_RECIPE}` prints it)")
