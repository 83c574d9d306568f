"""Long-term video benchmarks of Li et al. §4.3 (Tables 6-7), read as they are published: Breakfast, COIN, LVU.

Each parser returns :class:`Annotations` -- the ``Sample`` list every dataset format of
:mod:`pks4.data.datasets` produces, the class names, and where each sample was declared -- so the clip
pipeline (sampling, transforms, multi-view testing) is the one of every other dataset.

* **Breakfast** (Kuehne et al.): 1,712 videos of 10 breakfast activities by 52 people, 4 splits by person.
  The split files list one recording per line as ``P03_cam01_P03_cereals`` (``.txt`` suffix and a
  ``#bundle`` header allowed, as in the ``{train,test}.splitN.bundle`` files distributed with the
  benchmark); the activity is the name's last part and the video is ``<person>/<camera>/<person>_<activity>``
  in the dataset folder, ``stereo01`` naming ``<person>/stereo/<person>_<activity>_ch1``.
* **COIN** (Tang et al.): ``COIN.json``, ``{"database": {youtube id: {"recipe_type": task id, "class": task
  name, "subset": "training" | "testing", ...}}}``; the label is the task (180 classes, Table 6's "COIN
  Top-1"). Videos ``<id>`` or ``<recipe_type>/<id>`` (the layout of COIN's download script).
* **LVU** (Wu & Krähenbühl): ``lvu_1.0/<task>/{train,val,test}.csv``, space-separated with a header line,
  the YouTube id second to last; videos ``<youtube id>``. Seven classification tasks read ``<label id>
  <label name...> <youtube id> <imdb id>``. The two regression tasks are ``like_ratio`` (``<likes>
  <dislikes> <youtube id> <imdb id>``; target 10 * likes / (likes + dislikes)) and ``view_count``
  (``<views> <youtube id> <imdb id>``; target log(views)), the targets and mean-squared error Table 7
  reports (as in ViS4mer); a regression sample carries its float target in ``Sample.label``.

The three are dataset formats (``data.format: breakfast | coin | lvu``): a recipe trains on them like on any
list; COIN's one file names its subset as ``COIN.json#training`` / ``COIN.json#testing``, and an LVU regression
task reaches the training as targets (``Parsed.targets``, ``train.loss=mse``).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .datasets import (VIDEO_SUFFIXES, DataConfig, DatasetError, Parsed, Sample, read_lines, register_format,
                       split_selector)

__all__ = ["Annotations", "BREAKFAST_ACTIVITIES", "LVU_TASKS", "read_breakfast", "read_coin", "read_lvu",
           "COIN_SUBSETS"]

BREAKFAST_ACTIVITIES = ("cereals", "coffee", "friedegg", "juice", "milk", "pancake", "salat", "sandwich",
                        "scrambledegg", "tea")
# task folder -> "classification" | "regression" (Table 7: content, metadata, user engagement)
LVU_TASKS = {"relationship": "classification", "way_speaking": "classification", "scene": "classification",
             "director": "classification", "genre": "classification", "writer": "classification",
             "year": "classification", "like_ratio": "regression", "view_count": "regression"}
_SHOWN = 20


@dataclass
class Annotations:
    """Samples of one annotation file; ``where[i]`` says where sample i was declared. Regression tasks have no
    classes and a float target in each ``Sample.label``."""

    source: str
    samples: list[Sample]
    classes: list[str]
    where: list[str]
    task: str = "classification"  # "classification" | "regression"


@dataclass
class _Found:
    samples: list[Sample] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, candidates: Sequence[Path], label: int | float, where: str) -> None:
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            self.missing.append(f"{where}: {path}")
        self.samples.append(Sample(str(path), label))
        self.where.append(where)


def _videos(folder: Path, stem: str, first: str = ".mp4") -> list[Path]:
    """``folder/stem`` with each video suffix, ``first`` (the dataset's own) first: it names a missing video."""
    return [folder / f"{stem}{s}" for s in (first, *(x for x in VIDEO_SUFFIXES if x != first))]


def _finish(found: _Found, path: Path, what: str, classes: list[str], task: str, check_files: bool) -> Annotations:
    def listing(items: list[str]) -> str:
        more = f"\n  ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
        return "\n  " + "\n  ".join(items[:_SHOWN]) + more

    if found.problems:
        raise DatasetError(path, f"{len(found.problems)} problem(s) in the {what} annotations:"
                                 + listing(found.problems))
    if not found.samples:
        raise DatasetError(path, f"no {what} samples found")
    if check_files and found.missing:
        raise DatasetError(path, f"{len(found.missing)} of {len(found.samples)} listed videos are missing:"
                                 + listing(found.missing))
    return Annotations(str(path), found.samples, classes, found.where, task)


# ---- Breakfast ------------------------------------------------------------------------------------------
_BREAKFAST_NAME = re.compile(r"(P\d+)_([A-Za-z]+\d*)_(P\d+)_([a-z]+)")


def read_breakfast(split_file: str | os.PathLike, root: str | os.PathLike, *, check_files: bool = True) -> Annotations:
    """One Breakfast split file (e.g. ``test.split1.bundle``) -> samples labelled with the 10 activities."""
    path, root = Path(split_file), Path(root)
    found = _Found()
    index = {a: i for i, a in enumerate(BREAKFAST_ACTIVITIES)}
    for n, line in enumerate(read_lines(path), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        name = name[:-4] if name.endswith(".txt") else name
        m = _BREAKFAST_NAME.fullmatch(name)
        if m is None or m.group(4) not in index:
            found.problems.append(f"line {n}: {name!r} is not <person>_<camera>_<person>_<activity> with an activity "
                                  f"of {BREAKFAST_ACTIVITIES}")
            continue
        person, camera, _, activity = m.groups()
        if camera.startswith("stereo"):  # the bundles' stereo01 is the right channel of the stereo camera
            folder, stem = root / person / "stereo", f"{person}_{activity}_ch1"
        else:
            folder, stem = root / person / camera, f"{person}_{activity}"
        found.add(_videos(folder, stem, ".avi"), index[activity], f"line {n}")
    return _finish(found, path, "Breakfast", list(BREAKFAST_ACTIVITIES), "classification", check_files)


# ---- COIN -----------------------------------------------------------------------------------------------
def _coin_tasks(database: dict, path: Path) -> list[str]:
    names: dict[int, str] = {}
    for vid, entry in database.items():
        if isinstance(entry, dict) and isinstance(entry.get("recipe_type"), int):
            names.setdefault(entry["recipe_type"], str(entry.get("class", entry["recipe_type"])))
    if not names:
        raise DatasetError(path, "no entry carries an integer 'recipe_type' (COIN's task id)")
    return [names.get(i, f"task_{i}") for i in range(max(names) + 1)]


def read_coin(json_file: str | os.PathLike, root: str | os.PathLike, subset: str = "training", *,
              check_files: bool = True) -> Annotations:
    """COIN.json -> the ``subset`` ("training" | "testing") videos labelled with their task (recipe_type)."""
    path, root = Path(json_file), Path(root)
    try:
        data = json.loads("\n".join(read_lines(path)))
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"not valid JSON ({err})") from err
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise DatasetError(path, "expected COIN's {\"database\": {youtube id: {...}}} layout")
    classes = _coin_tasks(database, path)
    found = _Found()
    for vid, entry in database.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("recipe_type"), int) or "subset" not in entry:
            found.problems.append(f"video {vid}: needs an integer 'recipe_type' and a 'subset'")
        elif entry["subset"] == subset:
            folder = root / str(entry["recipe_type"])
            found.add(_videos(root, vid) + _videos(folder, vid), entry["recipe_type"], f"video {vid}")
    if not found.samples and not found.problems:
        subsets = sorted({str(e.get("subset")) for e in database.values() if isinstance(e, dict)})
        found.problems.append(f"no video in subset {subset!r}; the file has {subsets}")
    return _finish(found, path, "COIN", classes, "classification", check_files)


# ---- LVU ------------------------------------------------------------------------------------------------
def _lvu_target(task: str, parts: list[str]) -> float:
    if task == "like_ratio":
        likes, dislikes = float(parts[0]), float(parts[1])
        if likes < 0 or dislikes < 0 or likes + dislikes == 0:
            raise ValueError(f"likes {parts[0]} and dislikes {parts[1]} give no ratio")
        return 10.0 * likes / (likes + dislikes)
    views = float(parts[0])
    if views <= 0:
        raise ValueError(f"view count {parts[0]} has no logarithm")
    return math.log(views)


def read_lvu(csv_file: str | os.PathLike, root: str | os.PathLike, task: str = "", *,
             check_files: bool = True) -> Annotations:
    """One LVU csv (``lvu_1.0/<task>/<split>.csv``); ``task`` defaults to the csv's folder name."""
    path, root = Path(csv_file), Path(root)
    task = task or path.parent.name
    if task not in LVU_TASKS:
        raise DatasetError(path, f"LVU task {task!r} (from the folder name or the task argument); expected one "
                                 f"of {sorted(LVU_TASKS)}")
    kind = LVU_TASKS[task]
    found, names = _Found(), {}
    for n, line in enumerate(read_lines(path), 1):
        parts = line.split()
        if not parts or (n == 1 and not re.fullmatch(r"[-+\d.eE]+", parts[0])):
            continue  # blank, or the header line
        where = f"line {n}"
        needed = 3 if task == "view_count" else 4
        if len(parts) < needed:
            found.problems.append(f"{where}: expected at least {needed} space-separated fields, got {line.strip()!r}")
            continue
        try:
            label = _lvu_target(task, parts) if kind == "regression" else int(parts[0])
        except ValueError as err:
            found.problems.append(f"{where}: {err}")
            continue
        if kind == "classification" and label < 0:
            found.problems.append(f"{where}: negative label {label}")
            continue
        if kind == "classification":
            names.setdefault(label, "_".join(parts[1:-2]) or str(label))
        found.add(_videos(root, parts[-2]), label, where)
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []
    return _finish(found, path, f"LVU {task}", classes, kind, check_files)


# ---- as dataset formats ----------------------------------------------------------------------------------
COIN_SUBSETS = ("training", "testing")


def _parsed(ann: Annotations, fmt: str) -> Parsed:
    """Annotations -> the registry's Parsed; a regression task's targets travel beside label-0 samples."""
    if ann.task == "regression":
        target = Path(ann.source).parent.name
        return Parsed(Path(ann.source), fmt, [Sample(s.path, 0) for s in ann.samples], list(ann.where), [target],
                      targets=[float(s.label) for s in ann.samples])
    return Parsed(Path(ann.source), fmt, list(ann.samples), list(ann.where), list(ann.classes))


def parse_breakfast(source: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``data.format: breakfast``: a split file (``train.split1.bundle``), videos under ``data.root``."""
    return _parsed(read_breakfast(source, root, check_files=False), "breakfast")


def parse_coin(source: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``data.format: coin``: ``COIN.json#training`` / ``COIN.json#testing`` (the file holds both subsets)."""
    path, subset = split_selector(source)
    if subset not in COIN_SUBSETS:
        given = f"'#{subset}' names no subset" if subset else "no subset is named"
        raise DatasetError(path, f"{given}: COIN.json holds both subsets, name one as "
                                 f"{path.name}#training or {path.name}#testing")
    return _parsed(read_coin(path, root, subset, check_files=False), "coin")


def parse_lvu(source: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``data.format: lvu``: one task's csv (``lvu_1.0/<task>/<split>.csv``; the folder names the task). The
    regression tasks (like_ratio, view_count) give their targets (train with ``train.loss=mse``)."""
    return _parsed(read_lvu(source, root, check_files=False), "lvu")


register_format("breakfast", parse_breakfast)
register_format("coin", parse_coin)
register_format("lvu", parse_lvu)
