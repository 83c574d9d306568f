"""Datasets read as they are published: SSV2 json, Kinetics-400 csv, list files, raw frames, class folders.

Every format is parsed into the same thing, a list of ``Sample(path, label, num_frames)`` plus class names
(:class:`Parsed`), and one ``VideoDataset`` turns samples into clips (:class:`pks4.data.items.Item`, or a
:class:`~pks4.data.items.Skipped` for a video that cannot be read). Mistakes in the annotation files (labels out
of range, missing videos, wrong delimiters) are caught when the dataset is built, reported all at once with the
file name and line numbers, instead of surfacing as a crash hours into training.

Formats are registry entries: a new one is a parser function and one :func:`register_format` line (with an
optional detector for ``format: auto``), wherever it is defined, e.g.::

    def parse_coin(source, root, cfg, classes) -> Parsed: ...
    register_format("coin", parse_coin)
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .flex_sampler import data_config_at
from .items import Item, Skipped
from .sampling import ViewSpec, dense_indices, rng_from_torch, segment_indices
from .transforms import CLIP_MEAN, CLIP_STD, EvalTransform, FLIP_MODES, TrainTransform, parse_rand_augment
from .video import DataError, VideoError, probe_video, read_raw_frames, read_sampled

__all__ = [
    "DataConfig",
    "Sample",
    "DatasetError",
    "VideoDataset",
    "Parsed",
    "DatasetFormat",
    "register_format",
    "dataset_formats",
    "build_dataset",
    "load_video_views",
    "read_class_names",
    "CheckReport",
    "check_dataset",
]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
_HEADER_WORDS = {"path", "label", "video", "filename", "file", "class", "class_id", "label_id", "total_frames",
                 "frames", "name", "id"}
_MAX_LISTED = 20  # problems shown per error message; the count of the rest follows
# Videos decoded under DataConfig.cache_decoded, shared by every dataset of the process (the demo trains two
# models on the same files: each is decoded once). The key holds size and modification time, so a file rewritten
# in place is decoded again. Cleared by clear_decoded_cache().
_DECODED: dict[tuple[str, int, int], torch.Tensor] = {}


def clear_decoded_cache() -> None:
    """Drop every video kept by ``DataConfig.cache_decoded`` in this process."""
    _DECODED.clear()


def _decoded_video(path: str) -> torch.Tensor:
    def every_frame() -> torch.Tensor:
        return read_sampled(path, lambda total: list(range(total)))[0]

    try:
        st = os.stat(path)
    except OSError:
        return every_frame()  # raises the decoder's error, which names the file and the problem
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DECODED:
        _DECODED[key] = every_frame()
    return _DECODED[key]


@dataclass
class DataConfig:
    """Where the data is and how clips are made. Defaults follow the CLIP-based PKS4 recipe (§4.1).

    Paths in ``train``/``val`` are used as given, else looked up under ``root``; video paths inside lists
    are relative to ``root`` (default: the list file's folder). ``short_side`` is the test-time resize:
    set it equal to ``size`` for full-frame 3-crop testing.
    """

    format: str = "auto"  # auto (detected) or a registered format: list | rawframes | ssv2 | k400 | folder | ...
    root: str = ""
    train: str = ""
    val: str = ""
    labels: str = ""  # class-names file (one per line or "id name"), or SSV2 labels.json
    num_frames: int = 8  # PKS4 trains on 8 (or 32) frames
    size: int = 224
    short_side: int = 256
    sampling: str = "segment"  # segment (SSV2 / TSN) | dense (Kinetics)
    dense_stride: int = 4
    flip: str = "on"  # on | off (SSV2: direction matters) | swap (flip and map the label via flip_pairs)
    flip_pairs: str = ""  # file of "class_a class_b" lines (names or ids)
    rand_augment: str = ""  # e.g. "m7-n4" as in the VideoMamba recipes
    random_erasing: float = 0.0
    scale: tuple[float, float] = (0.25, 1.0)  # random-resized-crop area range
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    skip_bad_videos: bool = False
    # Keep every decoded video in memory (uint8) after its first read: for small datasets (the built-in
    # benchmark: ~570 MB) decoding, not the model, bounds a CPU run. One cache per process, shared by its
    # datasets: use with num_workers=0 or persistent workers.
    cache_decoded: bool = False
    frame_template: str = "img_{:05d}.jpg"  # raw-frame file names; index i reads template.format(i + start)
    frame_start_index: int = 1

    def __post_init__(self) -> None:
        # YAML gives lists where tuples are declared
        self.scale, self.mean, self.std = tuple(self.scale), tuple(self.mean), tuple(self.std)
        if self.format != "auto" and self.format not in _FORMATS:
            raise ValueError(f"DataConfig.format={self.format!r}; expected one of {dataset_formats()}")
        if self.sampling not in ("segment", "dense"):
            raise ValueError(f"DataConfig.sampling={self.sampling!r}; expected 'segment' or 'dense'")
        if self.flip not in FLIP_MODES:
            raise ValueError(f"DataConfig.flip={self.flip!r}; expected one of {FLIP_MODES}")
        parse_rand_augment(self.rand_augment)  # fail on a typo now, not in a worker


@dataclass(frozen=True)
class Sample:
    """One video: absolute ``path`` (file, or folder for raw frames), class index, frame count if known."""

    path: str
    label: int
    num_frames: int | None = None


class DatasetError(DataError):
    """A problem with an annotation file or dataset folder; ``path`` names it, ``message`` says what."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


def _listed(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


@dataclass
class Parsed:
    """Samples of one annotation file (what a format's parser returns); ``lines[i]`` is where sample i was
    declared (for messages), ``errors`` every problem found (reported all at once)."""

    source: Path
    format: str
    samples: list[Sample] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    classes: list[str] | None = None
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- class names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a file: one name per line, ``id name`` lines, or an SSV2-style ``labels.json``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(p, "class-names file not found")
    if p.suffix.lower() == ".json":
        data = _read_json(p)
        if not isinstance(data, dict):
            raise DatasetError(p, "expected a JSON object {class name: id} (the SSV2 labels.json layout)")
        return _names_from_ids(p, {int(v): k for k, v in data.items()}, len(data))
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(p, "class-names file is empty")
    pairs = [ln.split(maxsplit=1) for ln in lines]
    if all(len(q) == 2 and re.fullmatch(r"\d+", q[0]) for q in pairs):
        return _names_from_ids(p, {int(q[0]): q[1].strip() for q in pairs}, len(pairs))
    return lines


def _names_from_ids(p: Path, by_id: dict[int, str], count: int) -> list[str]:
    if len(by_id) != count or sorted(by_id) != list(range(count)):
        raise DatasetError(p, f"class ids must be 0..{count - 1} without gaps or repeats, got {sorted(by_id)[:10]}...")
    return [by_id[i] for i in range(count)]


def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(p, f"not valid JSON ({e})") from e


def _read_flip_pairs(path: str, classes: list[str]) -> dict[int, int]:
    """Symmetric label map from lines ``a b`` (class names or ids)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(p, "flip-pairs file not found (needed for flip='swap')")
    index = {name: i for i, name in enumerate(classes)}
    table: dict[int, int] = {}
    for n, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        parts = [x.strip() for x in (ln.split(",") if "," in ln else ln.split())]
        if len(parts) != 2:
            raise DatasetError(p, f"line {n}: expected two classes 'a b', got {ln!r}")
        ids = []
        for x in parts:
            if x in index:
                ids.append(index[x])
            elif x.isdigit() and int(x) < len(classes):
                ids.append(int(x))
            else:
                raise DatasetError(p, f"line {n}: {x!r} is neither a class name nor a class id < {len(classes)}")
        table[ids[0]], table[ids[1]] = ids[1], ids[0]
    return table


# -------------------------------------------------------------------------------------------- format parsers


def _parse_int(text: str, what: str, errors: list[str], where: str) -> int | None:
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        value = int(text)
        if value < 0:
            errors.append(f"{where}: negative {what} {value}")
            return None
        return value
    errors.append(f"{where}: {what} {text!r} is not an integer")
    return None


def _split_line(line: str, n_fields: int) -> list[str]:
    # Split from the right so paths may contain spaces (or commas, in space-separated files).
    if "," in line and len(line.rsplit(",", n_fields - 1)) == n_fields:
        return [x.strip() for x in line.rsplit(",", n_fields - 1)]
    return line.rsplit(maxsplit=n_fields - 1)


def parse_list(p: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``path label`` lines, space- or comma-separated, optional header (Kinetics / SSV2 list files)."""
    return _parse_lines(p, root, rawframes=False)


def parse_rawframes(p: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``folder total_frames label`` lines: videos stored as folders of frame images."""
    return _parse_lines(p, root, rawframes=True)


def _parse_lines(p: Path, root: Path, rawframes: bool) -> Parsed:
    out = Parsed(p, "rawframes" if rawframes else "list")
    n_fields = 3 if rawframes else 2
    layout = "'<path> <total_frames> <label>'" if rawframes else "'<path> <label>'"
    for n, ln in enumerate(_read_lines(p), 1):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        parts = _split_line(ln.strip(), n_fields)
        if n == 1 and _HEADER_WORDS & {x.strip().lower() for x in re.split(r"[,\s]+", ln)}:
            continue
        where = f"line {n}"
        if len(parts) != n_fields:
            hint = next((f" (found {d!r}: wrong delimiter? use space or comma)" for d in (";", "\t", "|")
                         if d in ln and d.strip()), "")
            out.errors.append(f"{where}: expected {layout}, space- or comma-separated, got {ln.strip()!r}{hint}")
            continue
        label = _parse_int(parts[-1], "label", out.errors, where)
        frames = _parse_int(parts[1], "total_frames", out.errors, where) if rawframes else None
        if label is None or (rawframes and frames is None):
            continue
        out.samples.append(Sample(str(root / parts[0]), label, frames))
        out.lines.append(where)
    return out


def _read_lines(p: Path) -> list[str]:
    if not p.is_file():
        raise DatasetError(p, "annotation file not found")
    try:
        return p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(p, f"not a UTF-8 text file ({e}); is this a video passed as a list?") from e


def parse_ssv2(p: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """Official SSV2 ``something-something-v2-{train,validation}.json`` + ``labels.json``; videos ``<id>.webm``."""
    labels_file = _resolve(cfg.labels, cfg) if cfg.labels else p.parent / "labels.json"
    if not labels_file.is_file():
        raise DatasetError(p, f"SSV2 needs its labels.json (looked for {labels_file}); set the labels path")
    mapping = _read_json(labels_file)
    if not isinstance(mapping, dict):
        raise DatasetError(labels_file, "expected the SSV2 labels.json object {template: id}")
    out = Parsed(p, "ssv2", classes=read_class_names(labels_file))
    entries = _read_json(p)
    if not isinstance(entries, list):
        raise DatasetError(p, "expected a JSON list of {'id', 'template', ...} entries (SSV2 layout)")
    for n, entry in enumerate(entries):
        where = f"entry {n}"
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            out.errors.append(f"{where}: needs 'id' and 'template' keys (test-set files have no labels)")
            continue
        name = entry["template"].replace("[", "").replace("]", "")
        if name not in mapping:
            out.errors.append(f"{where} (id {entry['id']}): template {name!r} not in {labels_file.name}")
            continue
        out.samples.append(Sample(_find_video(root, [str(entry["id"])]), int(mapping[name])))
        out.lines.append(f"{where} (id {entry['id']})")
    return out


def _find_video(root: Path, stems: Sequence[str], suffixes: Sequence[str] = (".webm", ".mp4", ".mkv")) -> str:
    """First existing ``root/stem+suffix``; else the first candidate (reported later as missing)."""
    for stem in stems:
        for suf in suffixes:
            cand = root / (stem + suf)
            if cand.exists():
                return str(cand)
    return str(root / (stems[0] + suffixes[0]))


_K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def parse_k400(p: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """Official Kinetics csv; videos under ``<split>/<label>/``, ``<split>/`` or the root itself."""
    lines = _read_lines(p)
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    if not set(_K400_COLUMNS) <= set(header):
        delim = next((d for d in (";", "\t", "|") if lines and d in lines[0]), None)
        hint = f"; the header uses {delim!r}: Kinetics csv files are comma-separated" if delim else ""
        raise DatasetError(p, f"line 1: expected columns {','.join(_K400_COLUMNS)}[,split], got {lines[:1]}{hint}")
    rows = list(reader)
    names = classes if classes is not None else sorted({r["label"] for r in rows})
    out = Parsed(p, "k400", classes=names)
    index = {name: i for i, name in enumerate(names)}
    for n, row in enumerate(rows, 2):
        where = f"line {n}"
        if row["label"] not in index:
            out.errors.append(f"{where}: label {row['label']!r} is not a known class")
            continue
        try:
            stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
        except (TypeError, ValueError):
            out.errors.append(f"{where}: time_start/time_end must be integers, "
                              f"got {row['time_start']!r}, {row['time_end']!r}")
            continue
        split = (row.get("split") or p.stem).strip()
        dirs = [f"{split}/{row['label']}", f"{split}/{row['label'].replace(' ', '_')}", split, "."]
        path = _find_video(root, [f"{d}/{stem}" for d in dirs], (".mp4", ".mkv", ".webm"))
        out.samples.append(Sample(path, index[row["label"]]))
        out.lines.append(where)
    return out


def parse_folder(d: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    """``<class>/<video>`` trees; classes are the sorted sub-folder names (of the training folder)."""
    if not d.is_dir():
        raise DatasetError(d, "dataset folder not found")
    names = classes if classes is not None else sorted(x.name for x in d.iterdir() if x.is_dir())
    if not names:
        raise DatasetError(d, "no class sub-folders found; expected <root>/<class name>/<video files>")
    out = Parsed(d, "folder", classes=names)
    for label, name in enumerate(names):
        sub = d / name
        if not sub.is_dir():
            continue
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES:
                out.samples.append(Sample(str(f), label))
                out.lines.append(f"{name}/{f.name}")
    return out


def _is_k400(p: Path, head: list[str], root: Path) -> bool:
    return bool(head) and {"youtube_id", "label"} <= {x.strip() for x in head[0].split(",")}


def _is_rawframes(p: Path, head: list[str], root: Path) -> bool:
    """``folder total_frames label`` lines whose folders are there. A ``path label`` list whose paths end in a
    number reads the same (``v0 1 0``), so the folders on disk decide; while they are missing, say
    ``format: rawframes``."""
    data = head[1:] if head and _HEADER_WORDS & set(re.split(r"[,\s]+", head[0].lower())) else head
    three = [_split_line(ln.strip(), 3) for ln in data[:10]]
    if not three or not all(len(q) == 3 and q[1].isdigit() and q[2].isdigit() for q in three):
        return False
    return any((root / q[0]).is_dir() for q in three)


# ------------------------------------------------------------------------------------------ the registry

FormatParser = Callable[[Path, Path, DataConfig, "list[str] | None"], Parsed]
FormatDetector = Callable[[Path, "list[str]", Path], bool]


@dataclass(frozen=True)
class DatasetFormat:
    """A registered annotation format: ``parse(source, root, cfg, classes)`` and, for ``format: auto``, an
    optional ``detect(source, head, root)`` (``head``: the first non-comment lines of a file, [] for a folder;
    ``root``: what the listed paths are relative to)."""

    name: str
    parse: FormatParser
    detect: FormatDetector | None = None


_FORMATS: dict[str, DatasetFormat] = {}


def register_format(name: str, parse: FormatParser, detect: FormatDetector | None = None) -> None:
    """Make ``DataConfig.format=name`` read annotations with ``parse``; ``detect`` joins auto-detection
    (tried in registration order; a file no detector claims is read as a ``list``)."""
    if name == "auto" or name in _FORMATS:
        raise ValueError(f"dataset format {name!r} is already registered")
    _FORMATS[name] = DatasetFormat(name, parse, detect)


def dataset_formats() -> tuple[str, ...]:
    """The values ``DataConfig.format`` accepts."""
    return ("auto", *_FORMATS)


register_format("folder", parse_folder, detect=lambda p, head, root: p.is_dir())
register_format("ssv2", parse_ssv2, detect=lambda p, head, root: p.suffix.lower() == ".json")
register_format("k400", parse_k400, detect=_is_k400)
register_format("rawframes", parse_rawframes, detect=_is_rawframes)
register_format("list", parse_list)


def _guess_format(p: Path, root: Path) -> str:
    head = [] if p.is_dir() or p.suffix.lower() == ".json" else \
        [ln for ln in _read_lines(p)[:20] if ln.strip() and not ln.lstrip().startswith("#")]
    return next((f.name for f in _FORMATS.values() if f.detect is not None and f.detect(p, head, root)), "list")


# -------------------------------------------------------------------------------------------- building


def _resolve(path: str, cfg: DataConfig) -> Path:
    p = Path(path)
    if not p.exists() and cfg.root and not p.is_absolute() and (Path(cfg.root) / p).exists():
        return Path(cfg.root) / p
    return p


def _split_source(cfg: DataConfig, split: str) -> Path:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    given = cfg.train if split == "train" else cfg.val
    if given:
        return _resolve(given, cfg)
    if cfg.root and (Path(cfg.root) / split).is_dir():
        return Path(cfg.root) / split  # folder-per-class trees: <root>/train, <root>/val
    raise DatasetError(cfg.root or ".", f"no {split} annotation set: give DataConfig.{split} "
                                        "(a list/json/csv file or folder)")


def _parse(source: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
    root = Path(cfg.root) if cfg.root else (source if source.is_dir() else source.parent)
    fmt = cfg.format if cfg.format != "auto" else _guess_format(source, root)
    return _FORMATS[fmt].parse(source, root, cfg, classes)


def _known_classes(cfg: DataConfig, split: str) -> list[str] | None:
    """Class names shared by both splits: the labels file, else derived from the training annotations."""
    if cfg.labels:
        return read_class_names(_resolve(cfg.labels, cfg))
    if split == "val" and cfg.train:
        train = _parse(_split_source(cfg, "train"), cfg, None)
        if train.classes is not None:
            return train.classes
        if train.samples:
            return [str(i) for i in range(max(s.label for s in train.samples) + 1)]
    return None


def _check_labels(parsed: Parsed, classes: list[str] | None) -> None:
    if not parsed.samples and not parsed.errors:
        parsed.errors.append("no samples found (empty list)")
    if classes is None:
        return
    for s, where in zip(parsed.samples, parsed.lines):
        if s.label >= len(classes):
            parsed.errors.append(f"{where}: label {s.label} out of range for {len(classes)} classes")


def _missing(samples: Sequence[Sample], lines: Sequence[str]) -> list[str]:
    return [f"{where}: {s.path}" for s, where in zip(samples, lines) if not os.path.exists(s.path)]


def _duplicates(samples: Sequence[Sample], lines: Sequence[str]) -> list[str]:
    """Entries listing a video already listed earlier (kept: oversampling is legitimate, but worth a look)."""
    first: dict[str, str] = {}
    out = []
    for s, where in zip(samples, lines):
        if s.path in first:
            out.append(f"{where}: {s.path} (first at {first[s.path]})")
        else:
            first[s.path] = where
    return out


def build_dataset(cfg: DataConfig, split: str, *, train: bool, views: ViewSpec | None = None) -> "VideoDataset":
    """Parse the ``split`` ("train" | "val") annotations of ``cfg`` and return a VideoDataset.

    Raises DatasetError naming the annotation file and line numbers for bad labels, an empty list, or missing
    videos (all listed at once). With ``cfg.skip_bad_videos`` missing videos are dropped with a warning.
    """
    source = _split_source(cfg, split)
    classes = _known_classes(cfg, split)
    parsed = _parse(source, cfg, classes)
    classes = classes if classes is not None else parsed.classes
    if classes is None and parsed.samples:
        classes = [str(i) for i in range(max(s.label for s in parsed.samples) + 1)]
    _check_labels(parsed, classes)
    if parsed.errors:
        raise DatasetError(source, f"{len(parsed.errors)} problem(s) in the {parsed.format} annotations:"
                                   + _listed(parsed.errors))
    missing = _missing(parsed.samples, parsed.lines)
    bad: list[tuple[str, str]] = []
    if missing and not cfg.skip_bad_videos:
        raise DatasetError(source, f"{len(missing)} of {len(parsed.samples)} listed videos are missing "
                                   f"(root {cfg.root or source.parent}):" + _listed(missing))
    samples = parsed.samples
    if missing:
        warnings.warn(f"{source}: skipping {len(missing)} missing videos", stacklevel=2)
        gone = {m.split(": ", 1)[1] for m in missing}
        bad = [(p, "missing") for p in sorted(gone)]
        samples = [s for s in samples if s.path not in gone]
    if cfg.flip == "swap" and train and not cfg.flip_pairs:
        raise DatasetError(source, "flip='swap' needs DataConfig.flip_pairs (a file of 'class_a class_b' lines)")
    flip_pairs = _read_flip_pairs(str(_resolve(cfg.flip_pairs, cfg)), classes) if cfg.flip == "swap" and train else {}
    return VideoDataset(samples, classes, cfg, train=train, views=views, flip_pairs=flip_pairs, bad=bad)


# -------------------------------------------------------------------------------------------- the dataset


def _sampler(cfg: DataConfig, num_frames: int, train: bool, clips: int) -> Callable[[int], list[int]]:
    """Indices for all ``clips`` clips, concatenated clip after clip, given the video's frame count."""

    def choose(total: int) -> list[int]:
        rng = rng_from_torch() if train else None
        out: list[int] = []
        for k in range(clips):
            if cfg.sampling == "dense":
                out += dense_indices(total, num_frames, cfg.dense_stride, train=train, clip_index=k,
                                     num_clips=clips, rng=rng)
            else:
                out += segment_indices(total, num_frames, train=train, rng=rng, clip_index=k, num_clips=clips)
        return out

    return choose


def _read_clip_frames(sample: Sample, cfg: DataConfig, choose: Callable[[int], list[int]]) -> torch.Tensor:
    if sample.num_frames is not None or Path(sample.path).is_dir():  # raw-frame folder
        total = sample.num_frames or _count_frame_files(Path(sample.path), cfg)
        return read_raw_frames(sample.path, choose(total), cfg.frame_template,
                               start_index=cfg.frame_start_index, num_frames=total)
    return read_sampled(sample.path, choose)[0]


def _count_frame_files(d: Path, cfg: DataConfig) -> int:
    n = 0
    while (d / cfg.frame_template.format(n + cfg.frame_start_index)).is_file():
        n += 1
    if n == 0:
        raise DatasetError(d, f"no frame files named like {cfg.frame_template.format(cfg.frame_start_index)}")
    return n


def _eval_views(frames: torch.Tensor, views: ViewSpec, size: int, cfg: DataConfig) -> torch.Tensor:
    """Frames of all clips (clips*T, H, W, 3) -> (clips*crops, T, 3, size, size), clip-major."""
    tf = EvalTransform(size=size, short_side=max(cfg.short_side, size), num_crops=views.crops,
                       mean=cfg.mean, std=cfg.std)
    per_clip = frames.reshape(views.clips, -1, *frames.shape[1:])
    return torch.cat([tf(clip) for clip in per_clip])


class VideoDataset(Dataset):
    """Samples -> :class:`~pks4.data.items.Item` clips. Training clips are (T, 3, size, size); evaluation clips
    with ``views`` are (clips*crops, T, 3, size, size) in clip-major order (view ``c * crops + k`` = clip c,
    crop k); evaluation without views is one centre clip (T, 3, size, size).

    A video that cannot be read yields :class:`~pks4.data.items.Skipped` (path and reason), whatever
    ``cfg.skip_bad_videos`` says: the reader of the batches decides whether that ends the run. With
    ``skip_bad_videos`` any exception while reading or transforming counts as unreadable (one odd file must not
    end a run mid-epoch), is recorded in ``bad`` (in the process that read it) and warned about; without it only
    a :class:`DataError` does, and anything else (a bug) keeps its traceback.
    """

    def __init__(self, samples: list[Sample], classes: list[str], cfg: DataConfig, *, train: bool,
                 views: ViewSpec | None = None, flip_pairs: dict[int, int] | None = None,
                 bad: list[tuple[str, str]] | None = None) -> None:
        self.samples = samples
        self.classes = classes
        self.cfg = cfg
        self.train = train
        self.views = views
        self.bad: list[tuple[str, str]] = list(bad or [])
        self._train_tf = TrainTransform(size=cfg.size, scale=cfg.scale, flip=cfg.flip, flip_pairs=flip_pairs or {},
                                        rand_augment=parse_rand_augment(cfg.rand_augment),
                                        random_erasing=cfg.random_erasing, mean=cfg.mean, std=cfg.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Item | Skipped:
        sample = self.samples[i]
        try:
            video, label = self._load(sample)
        except Exception as exc:  # noqa: BLE001 - becomes a Skipped naming the file, or is re-raised
            if not (isinstance(exc, DataError) or self.cfg.skip_bad_videos):
                raise
            skipped = Skipped(sample.path, _reason(sample.path, exc))
            if self.cfg.skip_bad_videos:
                self.bad.append((skipped.path, skipped.reason))
                warnings.warn(f"skipping unreadable video: {skipped}", stacklevel=2)
            return skipped
        return Item(video, label, i)

    def with_shape(self, frames: int, size: int) -> "VideoDataset":
        """The same samples loaded as ``frames`` x ``size`` clips, with the same field of view
        (:func:`pks4.data.flex_sampler.data_config_at`): what flexible training and any-size evaluation read."""
        views = replace(self.views, frames=frames) if self.views is not None else None
        return VideoDataset(self.samples, self.classes, data_config_at(self.cfg, frames, size), train=self.train,
                            views=views, flip_pairs=self._train_tf.flip_pairs, bad=self.bad)

    def _read(self, sample: Sample, choose: Callable[[int], list[int]]) -> torch.Tensor:
        if not self.cfg.cache_decoded or sample.num_frames is not None:
            return _read_clip_frames(sample, self.cfg, choose)
        every = _decoded_video(sample.path)
        return every[torch.as_tensor(choose(len(every)), dtype=torch.long)]

    def _load(self, sample: Sample) -> tuple[torch.Tensor, int]:
        if self.train:
            frames = self._read(sample, _sampler(self.cfg, self.cfg.num_frames, True, 1))
            return self._train_tf(frames, sample.label)
        views = self.views or ViewSpec(self.cfg.num_frames, 1, 1)
        frames = self._read(sample, _sampler(self.cfg, views.frames, False, views.clips))
        video = _eval_views(frames, views, self.cfg.size, self.cfg)
        return (video if self.views is not None else video[0]), sample.label


def _reason(path: str, exc: BaseException) -> str:
    """Why ``path`` gave no clip, without repeating the path the error message may start with."""
    if isinstance(exc, VideoError) and exc.path == path:
        return exc.reason
    text = str(exc)
    if not isinstance(exc, DataError):
        return f"{type(exc).__name__}: {text}"
    return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


def load_video_views(path: str | os.PathLike, num_frames: int, size: int, views: ViewSpec,
                     cfg: DataConfig) -> torch.Tensor:
    """One video file (or raw-frame folder) -> (clips*crops, num_frames, 3, size, size) test views.

    ``num_frames`` and ``size`` (the model's) take precedence over ``views.frames`` and ``cfg.size``; the
    sampling rule and normalisation come from ``cfg``, exactly as in evaluation.
    """
    spec = ViewSpec(num_frames, views.clips, views.crops)
    frames = _read_clip_frames(Sample(str(path), -1), cfg, _sampler(cfg, num_frames, False, spec.clips))
    return _eval_views(frames, spec, size, cfg)


# -------------------------------------------------------------------------------------------- checking


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``ok`` is False when a training run on this data would fail."""

    source: str
    format: str
    classes: list[str]
    counts: dict[str, int]
    errors: list[str] = field(default_factory=list)  # annotation problems (bad labels, bad lines)
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds, readable videos only
    frame_counts: list[int] = field(default_factory=list)
    short: int = 0  # videos with fewer frames than a clip (frames will repeat)
    skip_bad_videos: bool = False
    duplicates: list[str] = field(default_factory=list)  # repeated entries (reported, not an error)
    # videos whose header disagrees with their packets (path, how): read from the frames that exist, not an error
    mismatched: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        if self.errors or self.num_samples == 0:
            return False
        return self.skip_bad_videos or not (self.missing or self.unreadable)

    def to_text(self) -> str:
        out = [f"{self.source} ({self.format}): {self.num_samples} videos, {len(self.classes)} classes"]
        if self.counts:
            lo, hi = min(self.counts.values()), max(self.counts.values())
            empty = [c for c, n in self.counts.items() if n == 0]
            out.append(f"  per class: min {lo}, max {hi}" + (f"; {len(empty)} empty: {empty[:5]}" if empty else ""))
        if self.durations:
            d = sorted(self.durations)
            out.append(f"  duration s: min {d[0]:.2f}, median {d[len(d) // 2]:.2f}, max {d[-1]:.2f}")
        if self.frame_counts:
            f = sorted(self.frame_counts)
            out.append(f"  frames: min {f[0]}, median {f[len(f) // 2]}, max {f[-1]}"
                       + (f"; {self.short} shorter than a clip (frames repeat)" if self.short else ""))
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate entries (kept): " + "; ".join(self.duplicates[:5]))
        for title, items in (("annotation errors", self.errors), ("missing files", self.missing),
                             ("unreadable videos", [f"{p}: {r}" for p, r in self.unreadable]),
                             ("videos whose header disagrees with their frames (read from the frames that exist)",
                              [f"{p}: {r}" for p, r in self.mismatched])):
            if items:
                out.append(f"  {len(items)} {title}:" + _listed(items).replace("\n  ", "\n    "))
        out.append("  OK" if self.ok else "  NOT OK: a training run on this data would fail"
                   + ("" if self.errors else " (set skip_bad_videos to drop bad videos)"))
        return "\n".join(out)


def check_dataset(path_or_dir: str | os.PathLike, cfg: DataConfig, *, max_videos: int | None = None) -> CheckReport:
    """Parse an annotation file (or class-folder tree) like ``build_dataset`` and open every listed video.

    Reports counts per class, annotation errors, missing and unreadable files, durations and frame counts.
    ``max_videos`` limits how many videos are opened (all by default).
    """
    source = _resolve(str(path_or_dir), cfg)
    classes = read_class_names(_resolve(cfg.labels, cfg)) if cfg.labels else None
    try:
        parsed = _parse(source, cfg, classes)
    except DatasetError as e:
        return CheckReport(str(source), cfg.format, classes or [], {}, errors=[e.message])
    classes = classes if classes is not None else parsed.classes
    if classes is None:
        classes = [str(i) for i in range(max((s.label for s in parsed.samples), default=-1) + 1)]
    _check_labels(parsed, classes)
    report = CheckReport(str(source), parsed.format, classes, {c: 0 for c in classes}, errors=list(parsed.errors),
                         missing=_missing(parsed.samples, parsed.lines), skip_bad_videos=cfg.skip_bad_videos,
                         duplicates=_duplicates(parsed.samples, parsed.lines))
    gone = {m.split(": ", 1)[1] for m in report.missing}
    for s in parsed.samples:
        if s.label < len(classes):
            report.counts[classes[s.label]] += 1
    readable = [s for s in parsed.samples if s.path not in gone]
    for s in readable[:max_videos]:
        _check_one(s, cfg, report)
    return report


def _check_one(s: Sample, cfg: DataConfig, report: CheckReport) -> None:
    try:
        if s.num_frames is not None or Path(s.path).is_dir():
            n = s.num_frames or _count_frame_files(Path(s.path), cfg)
            read_raw_frames(s.path, [0, n - 1], cfg.frame_template, start_index=cfg.frame_start_index)
        else:
            info = probe_video(s.path)
            n = info.num_frames
            report.durations.append(info.duration)
            if info.mismatch:
                report.mismatched.append((s.path, info.mismatch))
    except DataError as e:
        report.unreadable.append((s.path, getattr(e, "reason", None) or getattr(e, "message", str(e))))
        return
    report.frame_counts.append(n)
    report.short += int(n < cfg.num_frames)
