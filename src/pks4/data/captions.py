"""Caption datasets read as they are published, for video-text pretraining and retrieval (Li et al. §4.4).

Every layout is parsed into one :class:`CaptionSet`: the media files (videos, or images for CC3M), the
captions, and for each caption the index of its video -- several captions may share a video (MSRVTT, MSVD),
and DiDeMo and ActivityNet are read paragraph-to-video (each video's sentences joined into one caption, the
benchmark protocol). :class:`CaptionDataset` turns a set into clips with the clip pipeline of
:mod:`pks4.data.datasets`; an image is a one-frame clip.

======================  ====================================================================================
format                  what it reads (video names are looked up under ``root`` with any video suffix)
======================  ====================================================================================
``captions``            a JSON list of ``{"video": NAME, "caption": TEXT or [TEXT, ...]}`` (the annotation
                        files of UMT / the official VideoMamba code, e.g. MSRVTT's 1k-A test json)
``msrvtt``              the 1k-A test split as JSFusion published it (``MSRVTT_JSFUSION_test.csv``:
                        ``key,vid_key,video_id,sentence``), the original ``*_videodatainfo.json`` /
                        ``MSRVTT_data.json`` (``videos`` + ``sentences``; ``split`` picks train/validate/
                        test: ``MSRVTT_data.json#test``), or the ``captions`` list above; videos
                        ``<video_id>.mp4``
``didemo``              LocalizingMoments' ``{train,val,test}_data.json`` (``video``, ``description``,
                        ``times``); paragraph-to-video
``activitynet``         ActivityNet Captions' ``train.json`` / ``val_1.json`` / ``val_2.json``
                        (``{id: {"sentences": [...], ...}}``); videos ``<id>`` or ``<id without v_>``;
                        paragraph-to-video
``lsmdc``               LSMDC's tab-separated ``LSMDC16_*.csv`` (clip id, four times, sentence); videos
                        ``<movie>/<clip id>.avi`` (movie = the clip id up to its last ``_``)
``msvd``                ``AllVideoDescriptions.txt`` (``<video id> <caption>`` lines, ``#`` comments);
                        ``#train|val|test`` picks the standard 1200/100/670 split (``youtube_mapping.txt``)
``webvid``              WebVid's csv (``videoid,contentUrl,duration,page_dir,name``); videos
                        ``<page_dir>/<videoid>.mp4``
``cc3m``                Conceptual Captions' tsv (``caption<TAB>url``, no header); the image of row i
                        (from 0) is the file whose stem is i, at any depth and zero padding
                        (img2dataset's ``00000/000000123.jpg``); a second column naming a local file
                        (not a URL) is used as it is
======================  ====================================================================================

Each format is also a dataset format (``data.format: webvid`` ...; :func:`pks4.data.datasets.register_format`):
read that way a caption file is a list of its videos without labels, which ``pks4 data check`` verifies and
masked pretraining trains on.

Bad input is reported with the file and the line (or entry): empty captions, rows of the wrong shape, and
captions naming media that are not there (all listed at once; ``skip_missing`` drops them with a warning).
Captions too long for the text encoder are cut by the tokenizer; :meth:`CaptionSet.long_captions` lists them
so the caller can say so once.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import (VIDEO_SUFFIXES, DataConfig, DatasetError, Parsed, Sample, VideoDataset, read_lines,
                       register_format, split_selector)
from .items import Item, Skipped
from .video import read_image

__all__ = ["CaptionSet", "CAPTION_FORMATS", "parse_captions", "read_captions", "write_caption_json",
           "CaptionDataset", "CaptionSources", "UNLABELLED"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SHOWN = 20  # problems listed per message
UNLABELLED = "unlabelled"  # the one class of a caption file read as a dataset format (its videos, no labels)


def _listing(items: Sequence[str]) -> str:
    more = f"\n  ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "\n  " + "\n  ".join(items[:_SHOWN]) + more


@dataclass
class CaptionSet:
    """Media files and captions; ``caption_video[i]`` is the index in ``videos`` of caption i, ``where[i]``
    where the caption was read (for messages)."""

    source: str
    format: str
    videos: list[str]
    captions: list[str]
    caption_video: list[int]
    where: list[str]
    images: bool = False  # the media are still images (one-frame clips)

    def __len__(self) -> int:
        return len(self.captions)

    def paragraphs(self) -> "CaptionSet":
        """One caption per video: its sentences joined in file order (paragraph-to-video retrieval)."""
        joined: dict[int, list[int]] = defaultdict(list)
        for i, v in enumerate(self.caption_video):
            joined[v].append(i)
        order = sorted(joined)
        return replace(self, captions=[" ".join(self.captions[i] for i in joined[v]) for v in order],
                       caption_video=order, where=[self.where[joined[v][0]] for v in order])

    def missing(self) -> list[str]:
        """``where: path`` of every caption's medium that is not on disk (one line per medium)."""
        first = {}
        for v, where in zip(self.caption_video, self.where):
            first.setdefault(v, where)
        return [f"{first[v]}: {self.videos[v]}" for v in sorted(first) if not os.path.exists(self.videos[v])]

    def without_missing(self) -> "CaptionSet":
        """The same set without the captions whose medium is not on disk (videos renumbered)."""
        present = [i for i, p in enumerate(self.videos) if os.path.exists(p)]
        new_index = {old: new for new, old in enumerate(present)}
        keep = [i for i, v in enumerate(self.caption_video) if v in new_index]
        return replace(self, videos=[self.videos[i] for i in present],
                       captions=[self.captions[i] for i in keep],
                       caption_video=[new_index[self.caption_video[i]] for i in keep],
                       where=[self.where[i] for i in keep])

    def groups(self) -> list[int]:
        """Per video, the first video whose caption list is the same (word for word): clips no caption can tell
        apart (templated captions: the built-in benchmarks) may then count as one video in the losses."""
        lists: dict[int, list[str]] = defaultdict(list)
        for text, v in zip(self.captions, self.caption_video):
            lists[v].append(text)
        first: dict[tuple[str, ...], int] = {}
        return [first.setdefault(tuple(lists[v]), v) for v in range(len(self.videos))]

    def long_captions(self, count_tokens: Callable[[str], int], max_len: int) -> list[str]:
        """``where (n tokens)`` of each caption longer than ``max_len`` tokens (the tokenizer will cut it)."""
        out = []
        for text, where in zip(self.captions, self.where):
            n = count_tokens(text)
            if n > max_len:
                out.append(f"{where} ({n} tokens)")
        return out


# ---- reading ------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """What a format reader found: per caption (video key, candidate paths, caption, where) and problems."""

    keys: list[str] = field(default_factory=list)
    candidates: dict[str, list[Path]] = field(default_factory=dict)
    captions: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, candidates: Iterable[Path], caption: object, where: str) -> None:
        if not isinstance(caption, str) or not caption.strip():
            self.problems.append(f"{where}: empty caption {caption!r} (video {key})")
            return
        self.candidates.setdefault(key, list(candidates))
        self.keys.append(key)
        self.captions.append(" ".join(caption.split()))
        self.where.append(where)


def _named(root: Path, name: str, suffixes: Sequence[str] = VIDEO_SUFFIXES) -> list[Path]:
    """``root/name`` as given, then with each suffix added, then with its own suffix replaced."""
    base = root / name
    stem = base.with_suffix("") if base.suffix else base
    return [base] + [Path(f"{base}{s}") for s in suffixes] + [stem.with_suffix(s) for s in suffixes]


def _read_text(path: Path) -> str:
    return "\n".join(read_lines(path))  # the dataset formats' reader: missing file, not UTF-8 -> DatasetError


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"not valid JSON ({err})") from err


def _json_list(data: object, path: Path, root: Path) -> _Rows:
    """``[{"video": NAME, "caption": TEXT | [TEXT, ...]}, ...]``."""
    rows = _Rows()
    if not isinstance(data, list):
        raise DatasetError(path, 'expected a JSON list of {"video": ..., "caption": ...} entries')
    for n, entry in enumerate(data):
        where = f"entry {n}"
        if not isinstance(entry, dict) or "video" not in entry or "caption" not in entry:
            rows.problems.append(f'{where}: needs "video" and "caption" keys, got {str(entry)[:80]}')
            continue
        texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not texts:
            rows.problems.append(f"{where}: empty caption list (video {entry['video']})")
        for k, text in enumerate(texts):
            rows.add(str(entry["video"]), _named(root, str(entry["video"])), text,
                     where if len(texts) == 1 else f"{where} caption {k}")
    return rows


def _read_msrvtt(path: Path, root: Path, split: str) -> _Rows:
    if path.suffix.lower() == ".csv":  # JSFusion's 1k-A test csv
        reader = csv.DictReader(_read_text(path).splitlines())
        if not {"video_id", "sentence"} <= set(reader.fieldnames or []):
            raise DatasetError(path, f"line 1: expected the columns key,vid_key,video_id,sentence, got "
                                     f"{reader.fieldnames}")
        rows = _Rows()
        for n, row in enumerate(reader, 2):
            rows.add(row["video_id"], _named(root, row["video_id"]), row["sentence"], f"line {n}")
        return rows
    data = _read_json(path)
    if isinstance(data, list):
        return _json_list(data, path, root)
    if not isinstance(data, dict) or "sentences" not in data:
        raise DatasetError(path, 'expected MSR-VTT\'s {"videos": [...], "sentences": [...]} or a JSON list of '
                                 '{"video", "caption"} entries (the 1k-A test json)')
    chosen = None
    if split:
        chosen = {v.get("video_id") for v in data.get("videos", []) if v.get("split") == split}
        if not chosen:
            raise DatasetError(path, f"no video has split {split!r} (MSR-VTT splits: train, validate, test)")
    rows = _Rows()
    for n, s in enumerate(data["sentences"]):
        vid = s.get("video_id") if isinstance(s, dict) else None
        if vid is None:
            rows.problems.append(f"sentences[{n}]: needs 'video_id' and 'caption'")
        elif chosen is None or vid in chosen:
            rows.add(vid, _named(root, vid), s.get("caption"), f"sentences[{n}]")
    return rows


def _read_didemo(path: Path, root: Path, split: str) -> _Rows:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(path, "expected DiDeMo's JSON list of {'video', 'description', 'times'} entries")
    rows = _Rows()
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or "video" not in entry:
            rows.problems.append(f"entry {n}: needs 'video' and 'description' keys")
            continue
        rows.add(entry["video"], _named(root, entry["video"]), entry.get("description"), f"entry {n}")
    return rows


def _read_activitynet(path: Path, root: Path, split: str) -> _Rows:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(path, "expected ActivityNet Captions' JSON object {video id: {'sentences': [...]}}")
    rows = _Rows()
    for vid, entry in data.items():
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not sentences:
            rows.problems.append(f"video {vid}: needs a non-empty 'sentences' list")
            continue
        names = _named(root, vid) + (_named(root, vid[2:]) if vid.startswith("v_") else [])
        for k, text in enumerate(sentences):
            rows.add(vid, names, text, f"video {vid} sentence {k}")
    return rows


def _read_lsmdc(path: Path, root: Path, split: str) -> _Rows:
    rows = _Rows()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t", 5)
        if len(parts) != 6:
            rows.problems.append(f"line {n}: expected 6 tab-separated fields (clip id, 4 times, sentence), "
                                 f"got {len(parts)}")
            continue
        clip = parts[0].strip()
        movie = clip.rsplit("_", 1)[0]
        rows.add(clip, _named(root / movie, clip) + _named(root, clip), parts[5], f"line {n}")
    return rows


_MSVD_SPLITS = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}


def _msvd_chosen(path: Path, split: str) -> set[str] | None:
    if not split:
        return None
    if split not in _MSVD_SPLITS:
        raise DatasetError(path, f"split {split!r}: MSVD splits are {sorted(_MSVD_SPLITS)}")
    mapping = path.parent / "youtube_mapping.txt"
    if not mapping.is_file():
        raise DatasetError(path, f"split {split!r} needs youtube_mapping.txt next to it (looked for {mapping})")
    lo, hi = _MSVD_SPLITS[split]
    chosen = set()
    for line in _read_text(mapping).splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"vid\d+", parts[1]) and lo <= int(parts[1][3:]) <= hi:
            chosen.add(parts[0])
    return chosen


def _read_msvd(path: Path, root: Path, split: str) -> _Rows:
    chosen = _msvd_chosen(path, split)
    rows = _Rows()
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if chosen is not None and parts[0] not in chosen:
            continue
        rows.add(parts[0], _named(root, parts[0]), parts[1] if len(parts) == 2 else "", f"line {n}")
    return rows


def _read_webvid(path: Path, root: Path, split: str) -> _Rows:
    reader = csv.DictReader(_read_text(path).splitlines())
    if not {"videoid", "name"} <= set(reader.fieldnames or []):
        raise DatasetError(path, f"line 1: expected WebVid's columns videoid,contentUrl,duration,page_dir,name, "
                                 f"got {reader.fieldnames}")
    rows = _Rows()
    for n, row in enumerate(reader, 2):
        vid, page = row["videoid"], row.get("page_dir") or ""
        rows.add(vid, _named(root / page, vid) + _named(root, vid), row["name"], f"line {n}")
    return rows


def _read_cc3m(path: Path, root: Path, split: str) -> _Rows:
    rows, by_row = _Rows(), None
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            rows.problems.append(f"line {n}: expected 'caption<TAB>url' (2 fields), got {len(parts)}")
            continue
        caption, image = parts[0], parts[1].strip()
        if "://" in image:
            if by_row is None:  # index the images once, by numeric stem
                by_row = {int(p.stem): p for p in root.rglob("*")
                          if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit()}
            candidates = [by_row.get(n - 1, root / f"{n - 1:09d}.jpg")]
        else:
            candidates = [root / image]
        rows.add(str(n - 1) if "://" in image else image, candidates, caption, f"line {n}")
    return rows


_READERS = {"captions": lambda p, r, s: _json_list(_read_json(p), p, r), "msrvtt": _read_msrvtt,
            "didemo": _read_didemo, "activitynet": _read_activitynet, "lsmdc": _read_lsmdc, "msvd": _read_msvd,
            "webvid": _read_webvid, "cc3m": _read_cc3m}
CAPTION_FORMATS = tuple(_READERS)
_PARAGRAPH_FORMATS = ("didemo", "activitynet")


def _assemble(rows: _Rows, path: Path, fmt: str) -> CaptionSet:
    index: dict[str, int] = {}
    videos: list[str] = []
    for key in rows.keys:
        if key not in index:
            index[key] = len(videos)
            cands = rows.candidates[key]
            videos.append(str(next((c for c in cands if c.is_file()), cands[0])))
    return CaptionSet(str(path), fmt, videos, rows.captions, [index[k] for k in rows.keys], rows.where,
                      images=fmt == "cc3m")


def parse_captions(path: str | os.PathLike, format: str, root: str | os.PathLike = "", *, split: str = "",
                   paragraphs: bool | None = None) -> CaptionSet:
    """Parse a caption file of ``format`` without looking at the media (:func:`read_captions` checks them).

    ``path`` may name one part of a file that holds several after a ``#`` (``videodatainfo.json#test``), the same
    as ``split``."""
    path, part = split_selector(path)
    split = split or part
    if format not in _READERS:
        raise ValueError(f"caption format {format!r}; expected one of {CAPTION_FORMATS}")
    root = Path(root) if root else path.parent
    rows = _READERS[format](path, root, split)
    if rows.problems:
        raise DatasetError(path, f"{len(rows.problems)} problem(s) in the {format} captions:" + _listing(rows.problems))
    if not rows.captions:
        raise DatasetError(path, "no captions found")
    captions = _assemble(rows, path, format)
    if paragraphs if paragraphs is not None else format in _PARAGRAPH_FORMATS:
        captions = captions.paragraphs()
    return captions


def read_captions(path: str | os.PathLike, format: str, root: str | os.PathLike = "", *, split: str = "",
                  paragraphs: bool | None = None, skip_missing: bool = False) -> CaptionSet:
    """Parse a caption file of ``format`` (one of :data:`CAPTION_FORMATS`; see the module docstring).

    ``root``: the folder the media are under (default: the file's folder). ``split`` (or ``path#split``):
    MSR-VTT's train/validate/test or MSVD's train/val/test, for the files that hold several splits.
    ``paragraphs`` joins each video's sentences (default: on for DiDeMo and ActivityNet). Raises
    ``DatasetError`` naming the file and the lines for empty captions, malformed rows and media not on disk
    (``skip_missing`` drops those captions with a warning instead).
    """
    captions = parse_captions(path, format, root, split=split, paragraphs=paragraphs)
    missing = captions.missing()
    if missing and not skip_missing:
        where = Path(root) if root else split_selector(path)[0].parent
        raise DatasetError(captions.source, f"{len(missing)} of {len(captions.videos)} media named by the captions "
                                            f"are not on disk (root {where}):" + _listing(missing))
    if missing:
        warnings.warn(f"{captions.source}: dropping the captions of {len(missing)} missing media", stacklevel=2)
        captions = captions.without_missing()
    return captions


def _format_parser(fmt: str) -> Callable[..., Parsed]:
    """The dataset-format view of a caption file: its media as unlabelled samples, one per video (what
    ``pks4 data check`` and masked pretraining read; the video-text task reads the captions themselves)."""
    def parse(source: Path, root: Path, cfg: DataConfig, classes: list[str] | None) -> Parsed:
        captions = parse_captions(source, fmt, root)
        first: dict[int, str] = {}
        for v, where in zip(captions.caption_video, captions.where):
            first.setdefault(v, where)
        return Parsed(Path(captions.source), fmt, samples=[Sample(path, 0) for path in captions.videos],
                      lines=[first[v] for v in range(len(captions.videos))], classes=[UNLABELLED])

    parse.__doc__ = f"{fmt} captions read as a list of unlabelled videos (pks4.data.captions)."
    return parse


for _fmt in CAPTION_FORMATS:
    register_format(_fmt, _format_parser(_fmt))


def write_caption_json(path: str | os.PathLike, videos: Sequence[str], captions: Sequence[Sequence[str]]) -> Path:
    """Write the ``json`` layout: one entry per video, ``{"video": NAME, "caption": [TEXT, ...]}``."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} caption lists")
    entries = [{"video": str(v), "caption": list(c)} for v, c in zip(videos, captions)]
    path = Path(path)
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return path


# ---- clips ----------------------------------------------------------------------------------------------
class _StillImages(VideoDataset):
    """The clip pipeline on image files: each image is a one-frame video."""

    def _read(self, sample: Sample, choose: Callable[[int], list[int]]) -> torch.Tensor:
        frames = torch.from_numpy(np.array(read_image(sample.path)))[None]  # (1, H, W, 3), a writable copy
        return frames[torch.as_tensor(choose(1), dtype=torch.long)]


class CaptionDataset(Dataset):
    """A :class:`CaptionSet` as :class:`~pks4.data.items.Item` clips (or :class:`~pks4.data.items.Skipped` for a
    medium that cannot be read). ``per="caption"`` (training): item i is caption i with a clip of its video,
    ``Item.extra = {"caption": text, "video_index": v, "group": g}``; ``per="video"`` (retrieval): item i is video
    i, ``Item.extra = {"video_index": i}``, and the captions stay in ``.captions``. ``Item.label`` is the video
    index too (captions carry no class). ``group`` is the video index, or with ``group_identical`` the first video
    with the same captions (:meth:`CaptionSet.groups`); ``offset`` is added to both (several files in one run).
    Clips come from the dataset pipeline of ``cfg`` (images: one frame). Mind ``cfg.flip``: a mirrored clip no
    longer fits a caption that says "left" or "right"."""

    def __init__(self, captions: CaptionSet, cfg: DataConfig, *, train: bool, per: str = "caption",
                 group_identical: bool = False, offset: int = 0) -> None:
        if per not in ("caption", "video"):
            raise ValueError(f"CaptionDataset per={per!r}; expected 'caption' or 'video'")
        self.captions, self.per, self.offset = captions, per, offset
        self.group = captions.groups() if group_identical else list(range(len(captions.videos)))
        if captions.images:
            cfg = replace(cfg, num_frames=1)
        self.clips = (_StillImages if captions.images else VideoDataset)(
            [Sample(path, i) for i, path in enumerate(captions.videos)], [], cfg, train=train)

    @property
    def bad(self) -> list[tuple[str, str]]:
        """(path, reason) of the media skipped so far (in this process), as :class:`VideoDataset` keeps them."""
        return self.clips.bad

    @property
    def samples(self) -> list[Sample]:
        """One sample per item (the loader names a lost batch's files from them)."""
        if self.per == "video":
            return self.clips.samples
        return [self.clips.samples[v] for v in self.captions.caption_video]

    def __len__(self) -> int:
        return len(self.captions) if self.per == "caption" else len(self.captions.videos)

    def __getitem__(self, i: int) -> Item | Skipped:
        v = self.captions.caption_video[i] if self.per == "caption" else i
        item = self.clips[v]
        if isinstance(item, Skipped):
            return item
        extra: dict[str, object] = {"video_index": v + self.offset}
        if self.per == "caption":
            extra |= {"caption": self.captions.captions[i], "group": self.group[v] + self.offset}
        return Item(item.video, v + self.offset, i, extra=extra)


class CaptionSources(Dataset):
    """Several :class:`CaptionDataset` (``per="caption"``) as one, item after item (UMT's WebVid + CC3M): video
    indices and groups stay distinct across them; ``spans`` are the (start, length) of each in the whole."""

    def __init__(self, parts: Sequence[CaptionDataset]) -> None:
        self.parts, self.spans, start = list(parts), [], 0
        for part in self.parts:
            self.spans.append((start, len(part)))
            start += len(part)

    def __len__(self) -> int:
        return sum(n for _, n in self.spans)

    def _locate(self, i: int) -> tuple[CaptionDataset, int]:
        for part, (start, n) in zip(self.parts, self.spans):
            if i < start + n:
                return part, i - start
        raise IndexError(f"caption item {i} of {len(self)}")

    def __getitem__(self, i: int) -> Item | Skipped:
        part, j = self._locate(i)
        item = part[j]
        if isinstance(item, Item):
            item.index = i
        return item

    @property
    def bad(self) -> list[tuple[str, str]]:
        return [b for part in self.parts for b in part.bad]

    @property
    def samples(self) -> list[Sample]:
        return [s for part in self.parts for s in part.samples]
