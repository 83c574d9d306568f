"""``pks4 pretrain RECIPE --task video-text``: the video-text model of Li et al. §4.4 (UMT's recipe) as a task of
the one training loop (:mod:`pks4.engine.loop`), so it is resumable, DDP-aware and checkpointed like every
training.

**What is trained.** :class:`~pks4.models.video_text.VideoTextModel`: a visual encoder from the registry
(``model.name``; ``model.overrides.pretrained`` starts it from a masked-pretraining checkpoint, the first stage of
§4.4), a BERT text encoder (``text``: a folder holding ``vocab.txt`` and optionally BERT weights), and the four
objectives (contrastive, matching with hard negatives, masked language modelling, unmasked token alignment to a
frozen CLIP teacher). ``model.init_from`` starts the whole model from a video-text run (fine-tuning on a
retrieval dataset).

**The phases, a schedule the checkpoint remembers.** The first ``train.epochs - unmasked_epochs`` epochs are the
masked phase (50% of an image's patches hidden, 80% of a video's; the teacher's attention chooses, or chance
without one), the last ``unmasked_epochs`` the unmasked tuning phase (every token, no alignment): §4.4's 10 + 1
epochs are ``train.epochs: 11, unmasked_epochs: 1``. The epoch where the unmasked phase starts is kept in every
checkpoint; a resumed run keeps it. An encoder that cannot run a subset of its tokens trains unmasked throughout.

**Data.** ``captions.train``: caption files of any format of :mod:`pks4.data.captions` (UMT 5M: WebVid-2M videos
and CC3M images, one-frame clips); a batch never mixes files (:class:`SourcePlan`), so images and videos are
never stacked together. ``captions.val``: the zero-shot retrieval evaluated after every ``train.eval_every``
epochs (R@1/5/10 and median rank both ways; ``r_mean``, the mean of the six recalls, marks the best checkpoint).
Without ``captions``, ``data.train`` / ``data.val`` in ``data.format`` are the two files. ``data`` is the clip
pipeline (frames, size, crops; keep ``flip: "off"`` for captions that say left or right).

**Several processes.** The contrastive objective compares each process's pairs with every process's pairs
(gathered with gradients); the evaluation encodes each process's share of the videos and gathers them.

**A checkpoint** holds the whole video-text model as its weights and, in its metadata, the visual encoder's
name and config, the text encoder's config and vocabulary: :func:`load_video_text` rebuilds it without the text
folder (``pks4 text-retrieval``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from pks4.data.captions import CAPTION_FORMATS, CaptionDataset, CaptionSet, CaptionSources, read_captions
from pks4.data.datasets import DataConfig
from pks4.data.items import Batch
from pks4.engine import checkpoint as ckpt
from pks4.engine.config import (ConfigError, ModelConfig, OptimConfig, TrainConfig, build_section, config_to_dict,
                                load_section)
from pks4.engine.loader import ShardPlan
from pks4.engine.loop import Loop, LoopSettings, RunResult, Task, run_printed
from pks4.engine.pretrain import TeacherConfig, build_teacher
from pks4.engine.runtime import DistInfo, TrainingError, start_process
from pks4.engine.text_retrieval import encode_texts, encode_videos, note_long_captions, rank
from pks4.models.text import TextConfig, TextEncoder, TokenBatch, WordPieceTokenizer
from pks4.models.video_text import VideoTextConfig, VideoTextModel, can_run_visible

__all__ = ["CaptionFile", "CaptionData", "RetrievalConfig", "VideoTextRunConfig", "load_video_text_config",
           "SourcePlan", "VideoTextTask", "build_video_text_trainer", "pretrain_video_text", "load_video_text",
           "retrieval_metrics_of", "retrieval_from_checkpoint", "TASK_NAME"]

Log = Callable[[str], None]
TASK_NAME = "video-text"


@dataclass
class CaptionFile:
    """One caption file: ``path`` (``file#part`` for one part of a file holding several, e.g.
    ``MSRVTT_data.json#test``), its ``format`` and the folder of its media ("" = ``data.root``, else the file's)."""

    path: str = ""
    format: str = "captions"
    root: str = ""

    def __post_init__(self) -> None:
        if self.format not in CAPTION_FORMATS:
            raise ValueError(f"format={self.format!r}; expected a caption format: {', '.join(CAPTION_FORMATS)}")


@dataclass
class CaptionData:
    """The caption files trained on and evaluated on (empty: ``data.train`` / ``data.val``)."""

    train: list[CaptionFile] = field(default_factory=list)
    val: CaptionFile = field(default_factory=CaptionFile)  # path "" = data.val, or no evaluation
    # Clips whose captions are word for word the same count as one video in the losses (templated captions).
    group_identical: bool = False


@dataclass
class RetrievalConfig:
    """Zero-shot retrieval during training (and the default of ``pks4 text-retrieval``)."""

    rerank_k: int = 0  # re-score each query's top-k with the matching head (UMT: 128); 0 = off
    batch_size: int = 16  # clips per evaluation batch
    text_batch_size: int = 64  # captions per text-encoder batch

    def __post_init__(self) -> None:
        for name, low in (("rerank_k", 0), ("batch_size", 1), ("text_batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"retrieval.{name}={getattr(self, name)}; expected an integer >= {low}")


@dataclass
class VideoTextRunConfig:
    """Everything one ``pks4 pretrain --task video-text`` run needs (module docstring)."""

    task: Literal["video-text"] = TASK_NAME
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="videomamba_middle"))  # the visual encoder
    text: TextConfig = field(default_factory=TextConfig)
    video_text: VideoTextConfig = field(default_factory=VideoTextConfig)
    unmasked_epochs: int = 1  # the last epochs run every token without alignment (§4.4: 1 after 10 masked)
    use_teacher: bool = True  # a frozen CLIP picks the visible tokens and is UTA's target in the masked phase
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    captions: CaptionData = field(default_factory=CaptionData)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    out: str = "runs/video_text"

    def __post_init__(self) -> None:
        if self.unmasked_epochs < 0:
            raise ValueError(f"unmasked_epochs={self.unmasked_epochs}; expected an integer >= 0")

    def train_files(self) -> list[CaptionFile]:
        if self.captions.train:
            return list(self.captions.train)
        if not self.data.train:
            raise ConfigError("no training captions: give captions.train (a list of {path, format, root}) or "
                              "data.train with data.format naming a caption format")
        return [CaptionFile(self.data.train, self._data_format("data.train"), self.data.root)]

    def val_file(self) -> CaptionFile | None:
        if self.captions.val.path:
            return self.captions.val
        return CaptionFile(self.data.val, self._data_format("data.val"), self.data.root) if self.data.val else None

    def _data_format(self, key: str) -> str:
        if self.data.format not in CAPTION_FORMATS:
            raise ConfigError(f"{key} is read with data.format={self.data.format!r}, which is not a caption format; "
                              f"expected one of {', '.join(CAPTION_FORMATS)} (or give captions.train / captions.val)")
        return self.data.format


def load_video_text_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VideoTextRunConfig:
    """A YAML recipe (or the defaults) with ``key=value`` overrides, type-checked; every error names the key."""
    return load_section(VideoTextRunConfig, path, overrides)


# ---- data ------------------------------------------------------------------------------------------------------
def _caption_set(f: CaptionFile, cfg: VideoTextRunConfig) -> CaptionSet:
    return read_captions(f.path, f.format, f.root or cfg.data.root, skip_missing=cfg.data.skip_bad_videos)


def _train_set(cfg: VideoTextRunConfig) -> CaptionSources:
    parts, offset = [], 0
    for f in cfg.train_files():
        captions = _caption_set(f, cfg)
        parts.append(CaptionDataset(captions, cfg.data, train=True, group_identical=cfg.captions.group_identical,
                                    offset=offset))
        offset += len(captions.videos)
    return CaptionSources(parts)


class SourcePlan:
    """Batches that never mix caption files: each file's shard of this process in batches of ``batch_size``
    (the last, smaller one dropped), all files' batches in one order drawn from (seed, epoch) -- the same on every
    process, so the processes step through the same file at once. A pure function of (seed, epoch), like the
    loop's own plans."""

    def __init__(self, spans: list[tuple[int, int]], dist_info: DistInfo, batch_size: int, seed: int) -> None:
        self.spans, self.seed = spans, seed
        self.plans = [ShardPlan(n, dist_info, batch_size, shuffle=True, seed=seed + 7919 * k, drop_last=True)
                      for k, (_, n) in enumerate(spans)]
        short = [k for k, p in enumerate(self.plans) if p.length(0) == 0]
        if short:
            raise TrainingError(f"caption file {short[0] + 1} of captions.train has fewer pairs per process than "
                                f"train.batch_size={batch_size}: it would never be trained on")

    def length(self, epoch: int) -> int:
        return sum(p.length(epoch) for p in self.plans)

    def batches(self, epoch: int) -> list[list[int]]:
        per = [[[start + i for i in b] for b in plan.batches(epoch)] for plan, (start, _) in zip(self.plans, self.spans)]
        order = torch.tensor([k for k, bs in enumerate(per) for _ in bs])
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))]
        taken = [iter(bs) for bs in per]
        return [next(taken[k]) for k in order.tolist()]

    def wrap(self, dataset: Any) -> Any:
        return dataset


# ---- evaluation ---------------------------------------------------------------------------------------------------
def retrieval_metrics_of(model: VideoTextModel, tokenizer: WordPieceTokenizer, captions: CaptionSet,
                         batches: Any, *, max_len: int, device: torch.device, rerank_k: int = 0,
                         text_batch_size: int = 64, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Zero-shot retrieval of ``captions`` over the clips of ``batches`` (this process's share of the videos; all
    processes' shares are gathered): R@1/5/10, MdR, MnR both ways and ``r_mean`` (mean of the six recalls)."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            videos = encode_videos(model, batches, len(captions.videos), device=device, keep_tokens=rerank_k > 0)
            videos = videos.gathered()
            texts = encode_texts(model, tokenizer, captions.captions, max_len, device=device,
                                 batch_size=text_batch_size, keep_hidden=rerank_k > 0)
            metrics = rank(model, texts, videos, captions.caption_video, rerank_k=rerank_k, device=device)
    finally:
        model.train(was_training)
    recalls = [metrics[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)]
    return metrics | {"r_mean": sum(recalls) / len(recalls)}


# ---- the task ---------------------------------------------------------------------------------------------------
class VideoTextTask(Task):
    """The four objectives over caption-clip pairs, the phase schedule, zero-shot retrieval as the evaluation."""

    score_key = "r_mean"

    def __init__(self, cfg: VideoTextRunConfig, model: VideoTextModel, tokenizer: WordPieceTokenizer,
                 teacher: nn.Module | None, train_set: CaptionSources, val: CaptionSet | None, log: Log) -> None:
        super().__init__()
        w = model.cfg.weights
        if teacher is None and w.uta and self._masks(cfg, model):
            raise ConfigError("video_text.weights.uta > 0 aligns to a CLIP teacher, and none is used: set use_teacher "
                              "(teacher.path), or video_text.weights.uta=0 to train without alignment")
        self.cfg, self.model, self.tokenizer, self.teacher = cfg, model, tokenizer, teacher
        self.train_set, self.val, self.log = train_set, val, log
        epochs = cfg.train.epochs
        self.unmasked_from = max(0, epochs - cfg.unmasked_epochs) if self._masks(cfg, model) else 0
        self.unused_parameters = model.decoder is not None and self.unmasked_from < epochs  # no UTA when unmasked
        self._noted_cut = False
        if val is not None:
            self.val_videos = CaptionDataset(val, cfg.data, train=False, per="video")
            note_long_captions(val, tokenizer, cfg.text.max_len, log)

    @staticmethod
    def _masks(cfg: VideoTextRunConfig, model: VideoTextModel) -> bool:
        return cfg.unmasked_epochs < cfg.train.epochs and can_run_visible(model.visual)

    def describe(self) -> str:
        phases = (f"masked epochs 1-{self.unmasked_from}, unmasked from epoch {self.unmasked_from + 1}"
                  if self.unmasked_from else "unmasked throughout")
        return f"video-text model ({self.cfg.model.name} + text encoder; {phases})"

    def train(self, mode: bool = True) -> "VideoTextTask":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: its dropout or norm statistics must not follow the student's mode
        return self

    def start_epoch(self, epoch: int) -> None:
        masked = epoch < self.unmasked_from
        if masked != self.model.masked:
            self.log(f"epoch {epoch + 1}: {'masked phase' if masked else 'unmasked tuning phase (every token)'}")
        self.model.set_masked(masked)

    def batch_plan(self, dist_info: DistInfo, batch_size: int, seed: int) -> SourcePlan | None:
        return SourcePlan(self.train_set.spans, dist_info, batch_size, seed) if len(self.train_set.parts) > 1 else None

    def inputs(self, batch: Batch) -> dict[str, Any]:
        captions = batch.extra["caption"]
        tokens = self.tokenizer(captions, self.cfg.text.max_len)
        if tokens.truncated and not self._noted_cut:
            self._noted_cut = True
            self.log(f"note: captions longer than {self.cfg.text.max_len} tokens are cut (first seen: "
                     f"{captions[tokens.truncated[0]][:80]!r}); text.max_len sets the limit")
        return {"video": batch.video, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                "group": batch.extra["group"]}

    def loss(self, inputs: dict[str, Tensor], geometry: Any = None) -> dict[str, Tensor]:
        tokens = TokenBatch(inputs["input_ids"], inputs["attention_mask"])
        return self.model.losses(inputs["video"], tokens, inputs["group"], self.teacher)

    def evaluate(self, model: nn.Module, loop: Loop) -> dict[str, float] | None:
        if self.val is None:
            return None
        r = self.cfg.retrieval
        metrics = retrieval_metrics_of(model, self.tokenizer, self.val, loop.eval_stream(self.val_videos, r.batch_size),
                                       max_len=self.cfg.text.max_len, device=loop.dist.device, rerank_k=r.rerank_k,
                                       text_batch_size=r.text_batch_size, amp_dtype=loop.amp_dtype)
        self.log(f"epoch {loop.epoch}: text-to-video R@1 {metrics['t2v_r1']:.2f} R@5 {metrics['t2v_r5']:.2f} "
                 f"R@10 {metrics['t2v_r10']:.2f} MdR {metrics['t2v_mdr']:g}; video-to-text R@1 {metrics['v2t_r1']:.2f}"
                 f" ({int(metrics['texts'])} captions, {int(metrics['videos'])} videos)")
        return metrics

    def metadata(self) -> dict[str, Any]:
        visual = asdict(self.model.visual.config)
        if "pretrained" in visual:
            visual["pretrained"] = ""  # the weights are in the checkpoint; do not re-read the init file
        return {"task": TASK_NAME, "model_name": f"video_text/{self.model.visual.model_name}",
                "visual_name": self.model.visual.model_name, "visual_config": visual,
                "text_config": asdict(replace(self.model.text.cfg, path="")), "text_vocab": self.tokenizer.words,
                "video_text_config": asdict(self.model.cfg),
                "teacher_dim": self.model.decoder.proj.out_features if self.model.decoder is not None else None,
                "config": config_to_dict(self.cfg)}

    def extra_state(self) -> dict[str, Any]:
        return {"unmasked_from_epoch": self.unmasked_from}

    def load_extra_state(self, state: dict[str, Any], source: Path) -> None:
        if "unmasked_from_epoch" not in state:
            raise ckpt.CheckpointError(f"{source / ckpt.STATE_FILE}: no phase schedule: not a video-text checkpoint")
        stored = int(state["unmasked_from_epoch"])
        if stored != self.unmasked_from:
            self.log(f"{source}: the run's unmasked phase starts at epoch {stored + 1} (this config says "
                     f"{self.unmasked_from + 1}); the checkpoint's schedule is kept")
            self.unmasked_from = stored

    def finished(self, loop: Loop, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            self.log(f"video-text checkpoint {checkpoint}; zero-shot retrieval: `pks4 text-retrieval --checkpoint "
                     f"{loop.run_dir} --captions FILE --format FORMAT`")


# ---- building ---------------------------------------------------------------------------------------------------
def _special_ids(tokenizer: WordPieceTokenizer) -> tuple[int, ...]:
    return tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id


def _tokenizer_and_text(cfg: VideoTextRunConfig) -> tuple[TextEncoder, WordPieceTokenizer]:
    """The text encoder of ``text.path`` (its BERT weights when the folder holds any); with ``text.path`` empty
    and ``model.init_from`` a video-text run, that run's vocabulary (its weights come with the whole model)."""
    from pks4.weights.bert import build_text_encoder

    if cfg.text.path or not cfg.model.init_from:
        return build_text_encoder(cfg.text)
    meta = ckpt.read_weights(ckpt.resolve_checkpoint(cfg.model.init_from))[1]
    if meta.get("task") != TASK_NAME:
        raise ConfigError(f"text.path is empty and model.init_from={cfg.model.init_from} is not a video-text run: "
                          "give text.path (a folder holding vocab.txt)")
    tokenizer = WordPieceTokenizer(meta["text_vocab"], cfg.text.lowercase, source=f"{cfg.model.init_from} [text_vocab]")
    return TextEncoder(cfg.text, tokenizer.vocab_size, tokenizer.pad_id), tokenizer


def _visual_encoder(cfg: VideoTextRunConfig) -> nn.Module:
    """The registry's ``model.name`` at the data's clip shape (its ``pretrained`` weights read first)."""
    from pks4.weights import create_model

    if cfg.train.freeze_backbone:
        raise ConfigError("train.freeze_backbone keeps a classifier's backbone fixed; the video-text task trains its "
                          "visual encoder (set it false)")
    overrides = {"num_frames": cfg.data.num_frames, "image_size": cfg.data.size, **cfg.model.overrides}
    try:
        visual = create_model(cfg.model.name, **overrides)
    except (KeyError, ValueError) as exc:
        raise TrainingError(f"model '{cfg.model.name}': {exc}") from None
    visual.set_grad_checkpointing(cfg.train.grad_checkpointing)  # the masked path runs the same blocks
    return visual


def build_video_text_model(cfg: VideoTextRunConfig, log: Log = print
                           ) -> tuple[VideoTextModel, WordPieceTokenizer, nn.Module | None]:
    """Visual encoder, text encoder, heads, and the frozen CLIP teacher when the run masks and uses one."""
    visual = _visual_encoder(cfg)
    masks = cfg.unmasked_epochs < cfg.train.epochs and can_run_visible(visual)
    teacher = build_teacher(cfg.teacher, log) if cfg.use_teacher and masks else None
    teacher_dim = (teacher.cfg.output_dim or teacher.cfg.width) if teacher is not None else None
    text, tokenizer = _tokenizer_and_text(cfg)
    model = VideoTextModel(visual, text, cfg.video_text, mask_id=tokenizer.mask_id, special_ids=_special_ids(tokenizer),
                           teacher_dim=teacher_dim if cfg.video_text.weights.uta else None)
    return model, tokenizer, teacher


def build_video_text_trainer(cfg: VideoTextRunConfig, resume: str | None = None, log: Log = print) -> Loop:
    """The training loop of one video-text run, set up (and resumed, with ``resume``), not yet started."""
    from pks4.engine.train import _init_from

    dist_info = start_process(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    main_log: Log = log if dist_info.is_main else (lambda msg: None)
    train_set = _train_set(cfg)
    val_file = cfg.val_file()
    val = _caption_set(val_file, cfg) if val_file is not None else None
    model, tokenizer, teacher = build_video_text_model(cfg, main_log)
    init_report = _init_from(cfg, model, resume, main_log)
    model.gather = dist_info.distributed
    task = VideoTextTask(cfg, model.to(dist_info.device), tokenizer,
                         teacher.to(dist_info.device) if teacher is not None else None, train_set, val, main_log)
    task.init_report = init_report
    settings = LoopSettings(cfg.train, cfg.optim, Path(cfg.out), cfg, cfg.data.skip_bad_videos)
    return Loop(task, settings, dist_info, resume=resume, log=log)


def pretrain_video_text(cfg: VideoTextRunConfig, resume: str | None = None, log: Log = print,
                        overwrite: bool = False) -> RunResult:
    """Print the resolved config and run the video-text training (:func:`pks4.engine.loop.run_printed`: locked,
    never over an earlier run; ``overwrite`` moves one aside)."""
    return run_printed(cfg, build_video_text_trainer, resume, log, overwrite)


# ---- reading a checkpoint ---------------------------------------------------------------------------------------
def load_video_text(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[VideoTextModel, WordPieceTokenizer, VideoTextRunConfig]:
    """The video-text model (eval mode), its tokenizer and run config from a run directory (its best checkpoint)
    or a checkpoint; the text folder is not needed (the vocabulary is in the checkpoint)."""
    from pks4.models.registry import model_from_config

    weights = ckpt.resolve_checkpoint(path)
    tensors, meta = ckpt.read_weights(weights)
    if meta.get("task") != TASK_NAME:
        raise ckpt.CheckpointError(f"{weights}: not a video-text checkpoint (model {meta.get('model_name')!r}); "
                                   "`pks4 retrieval` ranks videos by videos with a classifier")
    cfg = build_section(VideoTextRunConfig, meta["config"])
    text_cfg = TextConfig(**meta["text_config"])
    tokenizer = WordPieceTokenizer(meta["text_vocab"], text_cfg.lowercase, source=f"{weights} [text_vocab]")
    model = VideoTextModel(model_from_config(meta["visual_name"], meta["visual_config"]),
                           TextEncoder(text_cfg, tokenizer.vocab_size, tokenizer.pad_id),
                           VideoTextConfig(**meta["video_text_config"]), mask_id=tokenizer.mask_id,
                           special_ids=_special_ids(tokenizer), teacher_dim=meta.get("teacher_dim"))
    ckpt.load_weights_into(model, tensors, str(weights))
    return model.to(map_location).eval(), tokenizer, cfg


def retrieval_from_checkpoint(checkpoint: str | Path, captions: str | None = None, format: str | None = None,
                              root: str | None = None, *, rerank_k: int | None = None, batch_size: int | None = None,
                              device: str = "auto", num_workers: int = 0, log: Log = print) -> dict[str, Any]:
    """``pks4 text-retrieval``: a video-text run or checkpoint ranks the videos of a caption file (default: the
    run's ``captions.val``) for every caption and the captions for every video, zero-shot or after fine-tuning.
    Returns the metrics of :func:`retrieval_metrics_of` plus the file read and the re-ranking depth."""
    from pks4.engine.loader import LoaderOptions, sequential_stream

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tokenizer, cfg = load_video_text(checkpoint, map_location=dev)
    if captions:  # media under --root, else beside the file
        given = CaptionFile(captions, format or "captions", root or "")
        caption_set = read_captions(given.path, given.format, given.root)
    else:
        given = cfg.val_file()
        if given is None:
            raise ConfigError(f"{checkpoint}: the run evaluated no captions; give --captions FILE --format FORMAT")
        caption_set = read_captions(given.path, given.format, given.root or cfg.data.root)
    long = note_long_captions(caption_set, tokenizer, cfg.text.max_len, log)
    r = cfg.retrieval
    k = r.rerank_k if rerank_k is None else rerank_k
    clips = CaptionDataset(caption_set, cfg.data, train=False, per="video")
    batches = sequential_stream(clips, batch_size or r.batch_size, LoaderOptions(num_workers, cfg.train.loader_timeout),
                                skip_bad=False, where="text retrieval")
    metrics = retrieval_metrics_of(model, tokenizer, caption_set, batches, max_len=cfg.text.max_len, device=dev,
                                   rerank_k=k, text_batch_size=r.text_batch_size)
    return {**metrics, "captions": caption_set.source, "format": given.format, "rerank_k": k, "cut_captions": len(long)}
