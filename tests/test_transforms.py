"""Clip-consistent augmentation: identical frames stay identical; labels, boxes and mixing weights add up."""
from __future__ import annotations

import pytest
import torch

from pks4.data.sampling import spatial_crop_boxes
from pks4.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    RandAugment,
    TrainTransform,
    mixup_cutmix,
    normalize,
    parse_rand_augment,
    random_erase,
    random_resized_crop_box,
    to_float_clip,
)


def still_clip(t=6, h=40, w=52, seed=0) -> torch.Tensor:
    """uint8 (T, H, W, 3) whose frames are all the same random image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return img.expand(t, h, w, 3).contiguous()


def test_train_transform_is_clip_consistent():
    tf = TrainTransform(size=24, flip="on", rand_augment=RandAugment(9, 4, prob=1.0), random_erasing=1.0)
    for seed in range(12):
        out, _ = tf(still_clip(), 0, torch.Generator().manual_seed(seed))
        assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
        assert torch.allclose(out, out[:1].expand_as(out), atol=1e-5), f"frames differ for seed {seed}"


def test_train_transform_is_reproducible_and_random():
    tf = TrainTransform(size=24, rand_augment=parse_rand_augment("m7-n4"))
    a, _ = tf(still_clip(), 0, torch.Generator().manual_seed(3))
    b, _ = tf(still_clip(), 0, torch.Generator().manual_seed(3))
    c, _ = tf(still_clip(), 0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _flipped_or_not(mode: str, pairs=None):
    """Whole-frame crop (scale 1, ratio 1, square input): output is the frame, flipped or not."""
    frames = still_clip(h=24, w=24)
    plain = normalize(to_float_clip(frames))
    tf = TrainTransform(size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=mode, flip_pairs=pairs or {})
    results = []
    for seed in range(40):
        out, label = tf(frames, 2, torch.Generator().manual_seed(seed))
        flipped = torch.allclose(out, plain.flip(-1), atol=1e-5)
        assert flipped or torch.allclose(out, plain, atol=1e-5)
        results.append((flipped, label))
    return results


def test_flip_modes():
    assert all(not f and lab == 2 for f, lab in _flipped_or_not("off"))
    on = _flipped_or_not("on")
    assert {f for f, _ in on} == {True, False} and all(lab == 2 for _, lab in on)
    swap = _flipped_or_not("swap", {2: 5, 5: 2})
    assert {f for f, _ in swap} == {True, False}
    assert all(lab == (5 if f else 2) for f, lab in swap)
    with pytest.raises(ValueError, match="flip"):
        TrainTransform(flip="sometimes")


def test_normalize_clip_mean_maps_to_zero():
    mean_img = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize(mean_img), torch.zeros(2, 3, 4, 4), atol=1e-6)
    one = normalize(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(one, (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))


def test_random_resized_crop_box_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 90, (0.25, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        assert 0.2 <= h * w / (60 * 90) <= 1.05


def test_eval_transform_crops_match_boxes():
    frames = still_clip(t=3, h=32, w=48)
    out = EvalTransform(size=32, short_side=32, num_crops=3)(frames)
    assert out.shape == (3, 3, 3, 32, 32)
    ref = normalize(to_float_clip(frames))
    for k, (t, l, h, w) in enumerate(spatial_crop_boxes(32, 48, 32, 3)):
        assert torch.allclose(out[k], ref[..., t:t + h, l:l + w], atol=1e-5)
    resized = EvalTransform(size=16, short_side=20, num_crops=1)(frames)
    assert resized.shape == (1, 3, 3, 16, 16)


def test_parse_rand_augment():
    ra = parse_rand_augment("m7-n4")
    assert (ra.magnitude, ra.num_ops, ra.prob) == (7.0, 4, 0.5)
    assert parse_rand_augment("rand-m9-n2-p1.0").num_ops == 2
    assert parse_rand_augment("") is None and parse_rand_augment("off") is None
    for bad in ("m7", "n4", "mx-n4", "m7-n4-foo"):
        with pytest.raises(ValueError, match="m7-n4"):
            parse_rand_augment(bad)


def test_random_erase_same_box_and_noise_on_every_frame():
    clip = torch.zeros(4, 3, 20, 20)
    out = random_erase(clip, 1.0, torch.Generator().manual_seed(0))
    changed = out != 0
    assert changed.any() and torch.equal(out, out[:1].expand_as(out))
    assert torch.equal(random_erase(clip, 0.0), clip)


def _label_batch(b=4, num_classes=5):
    videos = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, 3, 8, 8).contiguous()
    return videos, torch.arange(b) % num_classes


def test_mixup_weights_match_targets():
    videos, labels = _label_batch()
    g = torch.Generator().manual_seed(0)
    mixed, targets = mixup_cutmix(videos, labels, 5, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0,
                                  label_smoothing=0.0, generator=g)
    lam = float(targets[0, 0])
    assert torch.allclose(mixed, lam * videos + (1 - lam) * videos.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_cutmix_box_is_shared_by_frames_and_sets_lambda():
    videos, labels = _label_batch()
    g = torch.Generator().manual_seed(1)
    mixed, targets = mixup_cutmix(videos, labels, 5, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0,
                                  label_smoothing=0.0, generator=g)
    pasted = mixed[0] != videos[0]  # sample 0 receives a box from sample 3
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))
    kept_fraction = 1 - pasted[0, 0].float().mean()
    assert float(targets[0, 0]) == pytest.approx(float(kept_fraction), abs=1e-6)
    assert float(targets[0, 3]) == pytest.approx(1 - float(kept_fraction), abs=1e-6)


def test_no_mixing_gives_smoothed_one_hot():
    videos, labels = _label_batch()
    out, targets = mixup_cutmix(videos, labels, 5, prob=0.0, label_smoothing=0.1)
    assert torch.equal(out, videos)
    expected = torch.full((4, 5), 0.02)
    expected[torch.arange(4), labels] = 0.92
    assert torch.allclose(targets, expected)
    with pytest.raises(ValueError, match="labels"):
        mixup_cutmix(videos, labels + 3, 5)
