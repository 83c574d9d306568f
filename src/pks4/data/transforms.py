"""Clip-consistent augmentation: every random choice is drawn once per clip and applied to all its frames.

Redrawing crops or colours per frame would add motion that is not in the video, which is exactly the signal a
temporal model such as PKS4 is meant to read. The image operations are kornia's (pure PyTorch); this module
only samples their parameters. Clips are float (T, 3, H, W) everywhere; frames from the readers are uint8
(T, H, W, 3).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import kornia.enhance as KE
import kornia.geometry.transform as KG
import numpy as np
import torch

from .sampling import spatial_crop_boxes

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "to_float_clip",
    "normalize",
    "resize_short_side",
    "random_resized_crop_box",
    "crop_resize",
    "RandAugment",
    "parse_rand_augment",
    "random_erase",
    "TrainTransform",
    "EvalTransform",
    "mixup_cutmix",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FLIP_MODES = ("off", "on", "swap")


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def to_float_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [0, 1]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got shape {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(clip: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on (..., 3, H, W)."""
    m = torch.tensor(mean, dtype=clip.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=clip.dtype).view(3, 1, 1)
    return (clip - m) / s


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, 3, H, W) so that min(H, W) == size, keeping the aspect ratio (antialiased)."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    scale = size / min(h, w)
    return _resize(clip, (max(1, round(h * scale)), max(1, round(w * scale))))


def _resize(clip: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of (T, 3, H, W). torch's separable antialias kernel costs the same at any
    scale factor, where a Gaussian pre-blur grows with it (seconds per frame for 4K input)."""
    return torch.nn.functional.interpolate(clip, size=hw, mode="bilinear", antialias=True, align_corners=False)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` covering a random fraction ``scale`` of the area with aspect ratio in ``ratio``.

    Ten tries at a box that fits, then the largest centred box of clamped aspect (the usual Inception crop).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(clip: torch.Tensor, box: tuple[int, int, int, int], size: int | tuple[int, int]) -> torch.Tensor:
    """Crop ``box = (top, left, h, w)`` from every frame of (T, 3, H, W) and resize it to ``size``."""
    top, left, h, w = box
    out = clip[..., top:top + h, left:left + w]
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(out.shape[-2:]) != target:
        out = _resize(out, tuple(target))
    return out


def _affine(clip: torch.Tensor, a: float, b: float, c: float, d: float,
            tx: float = 0.0, ty: float = 0.0) -> torch.Tensor:
    """Warp every frame by the same 2x2 matrix about the image centre, plus a shift; fills with grey."""
    t, _, h, w = clip.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    m = torch.tensor([[a, b, cx - a * cx - b * cy + tx], [c, d, cy - c * cx - d * cy + ty]], dtype=clip.dtype)
    fill = torch.full((3,), 0.5, dtype=clip.dtype)
    return KG.warp_affine(clip, m.expand(t, 2, 3), (h, w), padding_mode="fill", fill_value=fill)


def _autocontrast(clip: torch.Tensor) -> torch.Tensor:
    # Channel ranges over the whole clip, not per frame, so brightness does not flicker between frames.
    lo = clip.amin(dim=(0, 2, 3), keepdim=True)
    hi = clip.amax(dim=(0, 2, 3), keepdim=True)
    return ((clip - lo) / (hi - lo).clamp_min(1e-3)).clamp(0, 1)


def _rotate(x, m):
    r = math.radians(30 * m)
    return _affine(x, math.cos(r), -math.sin(r), math.sin(r), math.cos(r))


# name -> (apply(clip, signed_magnitude in [-1, 1]), takes a random sign); magnitudes follow RandAugment's
# ranges (Cubuk et al. 2020, as used by the VideoMamba recipes): rotate 30 deg, shear 0.3, translate 45%, etc.
_OPS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], bool]] = {
    "AutoContrast": (lambda x, m: _autocontrast(x), False),
    "Equalize": (lambda x, m: KE.equalize(x), False),
    "Invert": (lambda x, m: KE.invert(x), False),
    "Rotate": (_rotate, True),
    "Posterize": (lambda x, m: KE.posterize(x, 8 - int(4 * m)), False),
    "Solarize": (lambda x, m: KE.solarize(x, 1.0 - m), False),
    "SolarizeAdd": (lambda x, m: torch.where(x < 0.5, (x + 110 / 255 * m).clamp(0, 1), x), False),
    "Color": (lambda x, m: KE.adjust_saturation(x, 1 + 0.9 * m), True),
    "Contrast": (lambda x, m: KE.adjust_contrast(x, 1 + 0.9 * m), True),
    "Brightness": (lambda x, m: x * (1 + 0.9 * m), True),
    "Sharpness": (lambda x, m: KE.sharpness(x, 1 + 0.9 * m), True),
    "ShearX": (lambda x, m: _affine(x, 1, 0.3 * m, 0, 1), True),
    "ShearY": (lambda x, m: _affine(x, 1, 0, 0.3 * m, 1), True),
    "TranslateX": (lambda x, m: _affine(x, 1, 0, 0, 1, tx=0.45 * m * x.shape[-1]), True),
    "TranslateY": (lambda x, m: _affine(x, 1, 0, 0, 1, ty=0.45 * m * x.shape[-2]), True),
}


@dataclass
class RandAugment:
    """RandAugment with ``num_ops`` operations of strength ``magnitude`` (0-10), chosen once per clip.

    Each chosen operation runs with probability ``prob`` (0.5 in the timm-style video recipes) and, where it
    has a direction (rotate, shear, brightness...), with a random sign; Posterize and Solarize grow stronger
    with the magnitude. Input and output: float (T, 3, H, W) in [0, 1].
    """

    magnitude: float = 7
    num_ops: int = 4
    prob: float = 0.5
    ops: tuple[str, ...] = tuple(_OPS)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        m = min(max(self.magnitude / 10.0, 0.0), 1.0)
        for _ in range(self.num_ops):
            name = self.ops[int(torch.randint(len(self.ops), (), generator=generator))]
            if float(torch.rand((), generator=generator)) >= self.prob:
                continue
            fn, signed = _OPS[name]
            sign = -1.0 if signed and float(torch.rand((), generator=generator)) < 0.5 else 1.0
            clip = fn(clip, sign * m).clamp(0, 1)
        return clip


def parse_rand_augment(text: str) -> RandAugment | None:
    """``"m7-n4"`` (also ``"rand-m7-n4"``, ``"m7-n4-p0.5"``) -> RandAugment; ``""``/``"off"`` -> None."""
    text = (text or "").strip().lower()
    if text in ("", "off", "none"):
        return None
    fields = dict(re.findall(r"([mnp])([\d.]+)", text))
    body = re.sub(r"^rand-?", "", text)
    if "m" not in fields or "n" not in fields or not re.fullmatch(r"([mnp][\d.]+-?)+", body):
        raise ValueError(f"cannot parse rand_augment {text!r}: expected 'm<magnitude>-n<num_ops>', e.g. 'm7-n4'")
    return RandAugment(magnitude=float(fields["m"]), num_ops=int(float(fields["n"])),
                       prob=float(fields.get("p", 0.5)))


def random_erase(
    clip: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(3.3)),
) -> torch.Tensor:
    """With probability ``prob``, replace one box with Gaussian noise: the same box AND noise on every frame.

    Applied after normalisation (noise ~ N(0, 1) then matches the data's scale), as in timm's random erasing.
    """
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return clip
    t, c, h, w = clip.shape
    for _ in range(10):
        target = h * w * _uniform(area[0], area[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, (), generator=generator))
            left = int(torch.randint(0, w - ew + 1, (), generator=generator))
            noise = torch.randn((c, eh, ew), generator=generator, dtype=clip.dtype)
            clip = clip.clone()
            clip[:, :, top:top + eh, left:left + ew] = noise
            return clip
    return clip


@dataclass
class TrainTransform:
    """Training augmentation for one clip: random resized crop -> flip -> RandAugment -> normalise -> erase.

    ``flip``: "off" (direction-sensitive data such as SSV2, where the VideoMamba recipes use no flip), "on"
    (50% flips, label kept), "swap" (50% flips; the label is mapped through ``flip_pairs``, e.g. "moving
    left" <-> "moving right", and kept when absent from the table).
    """

    size: int = 224
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: str = "on"
    flip_pairs: Mapping[int, int] = field(default_factory=dict)
    rand_augment: RandAugment | None = None
    random_erasing: float = 0.0
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {self.flip!r}")

    def __call__(self, frames: torch.Tensor, label: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, int]:
        """uint8 (T, H, W, 3) and its label -> float (T, 3, size, size) and the (possibly swapped) label."""
        h, w = frames.shape[1:3]
        box = random_resized_crop_box(h, w, self.scale, self.ratio, generator)
        top, left, bh, bw = box
        # Crop the uint8 frames before converting: only the kept pixels are turned into floats.
        clip = crop_resize(to_float_clip(frames[:, top:top + bh, left:left + bw]), (0, 0, bh, bw), self.size)
        if self.flip != "off" and float(torch.rand((), generator=generator)) < 0.5:
            clip = clip.flip(-1)
            if self.flip == "swap":
                label = int(self.flip_pairs.get(label, label))
        if self.rand_augment is not None:
            clip = self.rand_augment(clip, generator)
        clip = normalize(clip, self.mean, self.std)
        return random_erase(clip, self.random_erasing, generator), label


@dataclass
class EvalTransform:
    """Test transform: resize the short side to ``short_side``, then ``num_crops`` crops of ``size``.

    Returns (num_crops, T, 3, size, size). With ``short_side == size`` and 3 crops, the crops cover the whole
    frame (the SlowFast / VideoMamba "3 crops" protocol); with ``short_side > size`` and 1 crop, it is the
    classic resize-256 centre-crop-224.
    """

    size: int = 224
    short_side: int = 256
    num_crops: int = 1
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        clip = resize_short_side(to_float_clip(frames), max(self.short_side, self.size))
        boxes = spatial_crop_boxes(clip.shape[-2], clip.shape[-1], self.size, self.num_crops)
        crops = [clip[..., t:t + h, l:l + w] for t, l, h, w in boxes]
        return normalize(torch.stack(crops), self.mean, self.std)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator; a NumPy one seeded from it keeps the batch reproducible.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (), generator=generator))
    cx = int(torch.randint(0, w, (), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


def mixup_cutmix(
    videos: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level MixUp / CutMix for clips (B, T, 3, H, W) with integer ``labels`` (B,).

    Each batch is mixed with its reverse (sample i with B-1-i). With probability ``prob`` one of the two is
    applied (CutMix with ``switch_prob`` when both alphas are > 0); CutMix pastes the same box on every frame
    and sets lambda to the kept area. Returns the mixed videos and soft targets (B, num_classes) that include
    label smoothing: ``lam * smooth(y) + (1 - lam) * smooth(y_reversed)``.
    """
    if videos.ndim != 5:
        raise ValueError(f"mixup_cutmix expects videos (B, T, 3, H, W), got shape {tuple(videos.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    off = label_smoothing / num_classes
    one_hot = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    one_hot.scatter_(1, labels[:, None], 1.0 - label_smoothing + off)
    lam = 1.0
    use_mix = (mixup_alpha > 0 or cutmix_alpha > 0) and float(torch.rand((), generator=generator)) < prob
    if use_mix:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < switch_prob)
        if use_cutmix:
            lam = _beta(cutmix_alpha, generator)
            h, w = videos.shape[-2:]
            y0, y1, x0, x1 = _cutmix_box(h, w, lam, generator)
            videos = videos.clone()
            videos[..., y0:y1, x0:x1] = videos.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            lam = _beta(mixup_alpha, generator)
            videos = videos * lam + videos.flip(0) * (1.0 - lam)
    targets = one_hot * lam + one_hot.flip(0) * (1.0 - lam)
    return videos, targets
