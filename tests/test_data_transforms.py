import math

import numpy as np
import pytest
import torch
from PIL import Image

from geoswc.data.transforms import RandomResizedCrop, ResizeCenterCrop, ToNormalizedTensor, build_transform

CONFIG = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5), "interpolation": "bicubic"}


def _smooth(width=500, height=375):
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], axis=-1) * 200 + 20
    return rgb.astype(np.uint8)


def test_normalisation_by_hand():
    pixel = np.array([[[255, 0, 128]]], np.uint8)
    out = ToNormalizedTensor(CONFIG["mean"], CONFIG["std"])(pixel)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 1) and out.is_contiguous()
    # (255/255 - 0.5) / 0.2, (0 - 0.4) / 0.25, (128/255 - 0.3) / 0.5
    assert out.flatten().tolist() == pytest.approx([2.5, -1.6, (128 / 255 - 0.3) / 0.5], abs=1e-6)
    with pytest.raises(ValueError, match="std > 0"):
        ToNormalizedTensor((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


def test_random_resized_crop_draws_within_the_paper_ranges():
    torch.manual_seed(0)
    crop = RandomResizedCrop(300, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3))
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = crop.params(375, 500)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        areas.append(h * w / (375 * 500))
        ratios.append(w / h)
    # Rounding the sides to whole pixels moves the area and ratio by well under 1 %.
    assert min(areas) > 0.69 and max(areas) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 4 / 3 + 0.01
    assert min(areas) < 0.72 and max(areas) > 0.97  # the whole range is drawn
    # Nothing fits a 10 x 1000 strip: the central crop at the nearest allowed ratio, 4/3.
    assert crop.params(10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert crop(_smooth()).shape == (300, 300, 3)


def test_evaluation_transforms_match_pillow():
    photo = _smooth()
    transform = build_transform(CONFIG, train=False, size=300, eval_resize="longest")
    ours = transform(photo)
    assert ours.shape == (3, 225, 300)
    assert torch.equal(ours, transform(Image.fromarray(photo)))  # arrays and PIL images alike
    reference = np.asarray(Image.fromarray(photo).resize((300, 225), Image.Resampling.BICUBIC), np.float32)
    pixels = (ours.permute(1, 2, 0).numpy() * np.float32(CONFIG["std"]) + np.float32(CONFIG["mean"])) * 255
    assert np.abs(pixels - reference).mean() < 1.5

    # Decoding needs: the longest side for the paper's resize, the short side for the others.
    assert (transform.decode_target, transform.decode_side) == (300, "long")
    assert build_transform(CONFIG, train=False, size=300, eval_resize="fixed").decode_side == "short"
    assert build_transform(CONFIG, train=True, size=300).decode_side == "short"

    # fixed: short side 300 -> 400 x 300, then the central 300 x 300 starts 50 px from the left.
    square = ResizeCenterCrop(300, "bilinear")(photo)
    resized = np.asarray(Image.fromarray(photo).resize((400, 300), Image.Resampling.BILINEAR), np.float32)
    assert square.shape == (300, 300, 3)
    assert np.abs(square.astype(np.float32) - resized[:, 50:350]).mean() < 1.5


def test_train_transform_is_deterministic_under_a_seed():
    transform = build_transform(CONFIG, train=True, size=64)
    photo = _smooth()
    torch.manual_seed(7)
    first = [transform(photo) for _ in range(3)]
    torch.manual_seed(7)
    again = [transform(photo) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert all(math.isfinite(float(t.abs().max())) and t.shape == (3, 64, 64) for t in first)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        transform(np.zeros((10, 10), np.uint8))
