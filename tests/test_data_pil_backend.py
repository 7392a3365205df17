"""``data_config["resize_backend"] = "pil"``: photos read as a torchvision evaluation transform reads them.

The reference is torchvision itself on a PIL image opened by Pillow, written out here as the ICMR authors'
inference transform (``Resize(300)``, ``ToTensor``, ``Normalize``), run on the same JPEG files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from geoswc.data.photos import PhotoDataset
from geoswc.data.transforms import build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIL_CONFIG = {"mean": MEAN, "std": STD, "interpolation": "bilinear", "resize_backend": "pil"}


def _torchvision_reference(size: int = 300):
    return T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def _jpeg(path, width: int, height: int, seed: int, orientation: int = 1) -> str:
    """A textured JPEG (smooth gradients plus noise, so resampling differences show) with 4:2:0 chroma."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif.tobytes())
    return str(path)


@pytest.mark.parametrize(
    "width, height",
    [(480, 360), (360, 480), (517, 301), (1001, 999), (200, 150)],
    ids=["landscape", "portrait", "odd", "near-square", "upscaled"],
)
def test_pil_backend_equals_torchvision_on_the_same_jpeg(tmp_path, width, height):
    path = _jpeg(tmp_path / "photo.jpg", width, height, seed=width * height)
    transform = build_transform(PIL_CONFIG, train=False, size=300, eval_resize="shortest")
    _, ours, error = PhotoDataset([path], transform)[0]
    assert error is None
    theirs = _torchvision_reference()(Image.open(path).convert("RGB"))
    assert ours.shape == theirs.shape and min(ours.shape[1:]) == 300
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), float((ours - theirs).abs().max())
    # the fast path (reduced-size turbo decode, OpenCV resize) gives other pixels on these photos
    fast = build_transform(dict(PIL_CONFIG, resize_backend="opencv"), train=False, eval_resize="shortest")
    _, quick, _ = PhotoDataset([path], fast)[0]
    assert quick.shape == theirs.shape and float((quick - theirs).abs().max()) > 1e-3


def test_pil_backend_turns_exif_rotated_photos_upright(tmp_path):
    path = _jpeg(tmp_path / "rotated.jpg", 480, 360, seed=3, orientation=6)
    transform = build_transform(PIL_CONFIG, train=False, size=300, eval_resize="shortest")
    _, ours, _ = PhotoDataset([path], transform)[0]
    theirs = _torchvision_reference()(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert ours.shape == (3, 400, 300)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_pil_backend_decodes_full_size_with_pillow_and_the_default_stays_fast():
    pil = build_transform(PIL_CONFIG, train=False, size=300, eval_resize="shortest")
    assert (pil.decode_target, pil.decoder) == (None, "pillow")
    default = build_transform({"mean": MEAN, "std": STD}, train=False, size=300, eval_resize="shortest")
    assert (default.decode_target, default.decode_side, default.decoder) == (300, "short", "auto")
    # training keeps its augmentation on the fast path whatever the backend
    train = build_transform(PIL_CONFIG, train=True, size=300)
    assert (train.decode_target, train.decoder) == (300, "auto")


@pytest.mark.parametrize("mode, shape", [("fixed", (3, 300, 300)), ("longest", (3, 225, 300))])
def test_pil_backend_other_eval_resizes(tmp_path, mode, shape):
    path = _jpeg(tmp_path / "photo.jpg", 640, 480, seed=1)
    transform = build_transform(PIL_CONFIG, train=False, size=300, eval_resize=mode)
    _, ours, _ = PhotoDataset([path], transform)[0]
    steps = [T.Resize(300), T.CenterCrop(300)] if mode == "fixed" else [T.Resize((225, 300))]
    theirs = T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])(Image.open(path).convert("RGB"))
    assert ours.shape == shape and torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_unknown_resize_backend_names_the_choices():
    with pytest.raises(ValueError, match="resize_backend.*opencv.*pil"):
        build_transform(dict(PIL_CONFIG, resize_backend="cv2"), train=False)


def test_visloc_import_records_the_pil_backend():
    from geoswc.importers.visloc import DATA_CONFIG

    transform = build_transform(DATA_CONFIG, train=False, size=300, eval_resize="shortest")
    assert DATA_CONFIG["resize_backend"] == "pil" and transform.decoder == "pillow"
