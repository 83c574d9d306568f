"""``pks4 train``, ``pks4 pretrain`` and ``pks4 recipes`` (the YAML recipes packaged with pks4)."""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_parsers", "packaged_recipes", "recipe_path"]

# `pks4 train` flags that stand for config keys, so a run needs no YAML file.
_TRAIN_FLAGS = {
    "model": ("model.name", str), "train_list": ("data.train", str), "val_list": ("data.val", str),
    "data_root": ("data.root", str), "labels": ("data.labels", str), "num_classes": ("model.num_classes", int),
    "frames": ("data.num_frames", int), "size": ("data.size", int), "epochs": ("train.epochs", int),
    "batch_size": ("train.batch_size", int), "lr": ("optim.lr", float), "device": ("train.device", str),
    "workers": ("train.num_workers", int), "amp": ("train.amp", str), "seed": ("train.seed", int),
    "data_format": ("data.format", str),
}


# ---- recipes -------------------------------------------------------------------------------------------------------
def _recipe_dir() -> Any:
    return resources.files("pks4") / "configs"


def _command_for(text: str) -> str:
    """The sub-command a recipe is for, from its top-level sections."""
    import yaml

    sections = set(yaml.safe_load(text) or {})
    return "pretrain" if {"teacher", "mask", "task"} & sections else "demo" if "run" in sections else "train"


def packaged_recipes() -> dict[str, tuple[str, str]]:
    """Name -> (the sub-command it is for, its one-line description: the first comment line) of every packaged
    YAML recipe."""
    out = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            text = entry.read_text()
            first = next((ln for ln in text.splitlines() if ln.strip()), "")
            out[entry.name[:-len(".yaml")]] = (_command_for(text), first.lstrip("#").strip())
    return out


def recipe_path(name_or_path: str) -> Path:
    """The YAML file ``name_or_path`` names: a path as it is (whatever is there, the config reader says what is
    wrong with it), or, where nothing is at that path, the packaged recipe of that name (``pks4 recipes``)."""
    path = Path(name_or_path)
    name = name_or_path[:-len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    if not (path.exists() or path.is_symlink()) and name in packaged_recipes():
        return _packaged(name)
    return path


def _packaged(name: str) -> Path:
    return Path(str(_recipe_dir() / f"{name}.yaml"))


def _recipes_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.config import ConfigError

    recipes = packaged_recipes()
    if args.name:
        name = args.name[:-len(".yaml")] if args.name.endswith(".yaml") else args.name
        if name not in recipes:
            raise ConfigError(f"{args.name}: not a packaged recipe; `pks4 recipes` lists them: {', '.join(recipes)}")
        print(_packaged(name).read_text(), end="")
        return 0
    width = max(len(n) for n in recipes)
    print(f"{'name':<{width}}  {'command':<8}  description")
    for name, (command, description) in recipes.items():
        print(f"{name:<{width}}  {command:<8}  {description}")
    print("\n`pks4 recipes NAME` prints one (copy it to start your own); `pks4 train NAME` and `pks4 pretrain NAME` "
          "run one as it is, with --set overrides; the demo preset is what `pks4 demo` runs.")
    return 0


# ---- train / pretrain -----------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, sets: list[str], load: Callable[..., Any], run: Callable[..., Any],
         summary: Callable[[Any], str]) -> int:
    """Load the recipe (``args.config``: a file or a packaged name) with ``sets`` and ``--set``, run, report."""
    if args.out:
        sets.append(f"out={args.out}")
    config = recipe_path(args.config) if args.config else None
    result = run(load(config, sets + list(args.set or [])), resume=args.resume, overwrite=args.overwrite)
    print(f"{result.status}: {result.global_step} steps, {summary(result)}; run dir {result.run_dir}")
    return result.exit_code


def _train_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.config import load_config
    from pks4.engine.train import train
    from pks4.recipes import choose_recipe

    sets = [f"{key}={getattr(args, flag)}" for flag, (key, _) in _TRAIN_FLAGS.items()
            if getattr(args, flag) is not None]
    if args.skip_bad_videos:
        sets.append("data.skip_bad_videos=true")
    if args.config is None:
        # Flags alone: a tiny model from random weights gets the from-scratch recipe, not the fine-tuning defaults.
        args.config, why = choose_recipe(None, sets + list(args.set or []))
        print(why, flush=True)
    return _run(args, sets, load_config, train, lambda r: "best val top-1 "
                + (f"{r.best_score:.2f}" if r.best_score is not None else "n/a"))


def _recipe_task(args: argparse.Namespace) -> str:
    """``--task``, else the recipe's ``task:`` key (a ``--set task=...`` counts), else masked alignment."""
    from pks4.engine.config import read_yaml

    if args.task:
        return args.task
    given = [s.split("=", 1)[1].strip() for s in (args.set or []) if s.split("=", 1)[0].strip() == "task"]
    if given:
        return given[-1]
    values = read_yaml(recipe_path(args.config), "recipe") if args.config else None
    return str(values.get("task", PRETRAIN_TASKS[0])) if isinstance(values, dict) else PRETRAIN_TASKS[0]


def _last_loss(result: Any) -> str:
    return "last loss " + (f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a")


def _pretrain_cmd(args: argparse.Namespace) -> int:
    from pks4.engine.config import ConfigError

    task = _recipe_task(args)
    if task not in PRETRAIN_TASKS:
        raise ConfigError(f"task {task!r}: `pks4 pretrain` runs {' or '.join(PRETRAIN_TASKS)}")
    sets = [f"teacher.path={args.teacher}"] if args.teacher else []
    args.set = [s for s in args.set or [] if s.split("=", 1)[0].strip() != "task"]  # decided above
    if task == "video-text":
        from pks4.engine.video_text_task import load_video_text_config, pretrain_video_text

        return _run(args, sets, load_video_text_config, pretrain_video_text, lambda r: _last_loss(r) + (
            f", best mean recall {r.best_score:.2f}" if r.best_score is not None else ""))
    from pks4.engine.pretrain import load_pretrain_config, pretrain

    return _run(args, sets, load_pretrain_config, pretrain, _last_loss)


_RECIPE_HELP = "YAML recipe: a file, or the name of a packaged one (`pks4 recipes` lists them)"
# What `pks4 pretrain` trains: the masked alignment of a VideoMamba to a frozen CLIP (§3.4), or the video-text
# model (§4.4); the first is the default.
PRETRAIN_TASKS = ("masked-alignment", "video-text")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="run directory (config key `out`)")
    p.add_argument("--resume", help="'auto' (latest valid checkpoint in --out) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="--out holds an earlier run: move it aside to "
                   "OUT.old-<date>-<time> (nothing is deleted) and start afresh")


def add_parsers(sub: Any) -> None:
    """``train``, ``pretrain`` and ``recipes``."""
    tr = sub.add_parser("train", help="train a classifier from a YAML recipe and/or flags")
    tr.add_argument("config", nargs="?", help=_RECIPE_HELP)
    _add_run_options(tr)
    tr.add_argument("--skip-bad-videos", action="store_true", help="skip unreadable videos, list them at the end")
    for flag, (key, typ) in _TRAIN_FLAGS.items():
        tr.add_argument("--" + flag.replace("_", "-"), type=typ, default=None, help=f"= --set {key}=...")
    tr.set_defaults(func=_train_cmd)
    pt = sub.add_parser("pretrain", help="masked-alignment pretraining of a VideoMamba against a frozen CLIP, or "
                        "video-text pretraining (--task video-text)")
    pt.add_argument("config", nargs="?", help=_RECIPE_HELP + ", e.g. videomamba_middle_pretrain_k400")
    pt.add_argument("--task", choices=PRETRAIN_TASKS, help="what to train (default: the recipe's `task:` key, else "
                    "masked-alignment)")
    pt.add_argument("--teacher", help="CLIP vision weights (OpenAI, open_clip or Hugging Face); without it the "
                    "teacher is randomly initialised (pipeline tests only)")
    _add_run_options(pt)
    pt.set_defaults(func=_pretrain_cmd)
    rc = sub.add_parser("recipes", help="list the packaged YAML recipes, or print one (copy it to start your own)")
    rc.add_argument("name", nargs="?", metavar="NAME", help="print this recipe (e.g. `pks4 recipes NAME > my.yaml`)")
    rc.set_defaults(func=_recipes_cmd)
