import io

import numpy as np
import piexif
import pytest
from PIL import Image, ImageOps

from geoswc.data.images import (
    ImageDecodeError,
    ImageMissingError,
    decode_image,
    encode_jpeg,
    resize_short_side,
)


def _photo(width=500, height=375, seed=0):
    """A smooth test picture with an asymmetric feature, so flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], axis=-1) * 200 + 20
    rgb[: height // 4, : width // 5] = [250, 10, 10]  # red block top-left
    rgb += rng.normal(0, 2, size=rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_jpeg_matches_pillow_decode():
    data = _jpeg(_photo())
    ours = decode_image(data)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert ours.mode == "RGB" and ours.size == (500, 375)
    assert _diff(ours, reference) < 1.5  # fast DCT / upsampling differ by rounding only


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_like_pillow_exif_transpose(orientation):
    exif = piexif.dump({"0th": {piexif.ImageIFD.Orientation: orientation}})
    data = _jpeg(_photo(240, 160), exif=exif)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    ours = decode_image(data)
    assert ours.size == reference.size
    assert ours.size == ((160, 240) if orientation >= 5 else (240, 160))
    assert _diff(ours, reference) < 1.5


def test_exif_orientation_with_reduced_decoding():
    exif = piexif.dump({"0th": {piexif.ImageIFD.Orientation: 6}})
    data = _jpeg(_photo(400, 300), exif=exif)
    ours = decode_image(data, target=100)
    # 6 = rotate 90 degrees clockwise: portrait, and the top-left red block ends at the top-right.
    assert ours.size[0] < ours.size[1] and min(ours.size) >= 100
    pixels = np.asarray(ours)
    assert pixels[5, -5, 0] > 200 and pixels[5, -5, 1] < 60


@pytest.mark.parametrize("target", [64, 100, 150, 300, 375])
def test_reduced_decoding_keeps_short_side_at_least_target(target):
    data = _jpeg(_photo())
    ours = decode_image(data, target=target)
    assert min(ours.size) >= target
    # libjpeg scales by N/8: the next smaller scale would drop below target.
    scale = ours.size[0] / 500
    assert scale == pytest.approx(round(scale * 8) / 8, abs=0.01)
    assert 375 * (round(scale * 8) - 1) / 8 < target or scale == 1
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize(ours.size, Image.Resampling.BOX)
    assert _diff(ours, reference) < 4


def test_modes_become_rgb(tmp_path):
    grey = Image.fromarray(np.full((30, 40), 77, np.uint8), "L")
    assert np.asarray(decode_image(_jpeg(grey)))[0, 0].tolist() == pytest.approx([77, 77, 77], abs=1)

    palette = Image.fromarray(np.full((30, 40, 3), (10, 200, 30), np.uint8), "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert np.asarray(decode_image(buf.getvalue()))[3, 3].tolist() == [10, 200, 30]

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 20:, 3] = 255  # left half fully transparent -> white, right half opaque red
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = np.asarray(decode_image(buf.getvalue()))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 39].tolist() == [255, 0, 0]

    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_jpeg(cmyk)))
    assert out[5, 5, 0] > 200 and out[5, 5, 1] < 60 and out[5, 5, 2] < 60

    deep = np.full((30, 40), 65535, np.uint16)
    deep[:, :20] = 32768
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    out = np.asarray(decode_image(path))
    assert out[0, 39].tolist() == [255, 255, 255] and out[0, 0].tolist() == [128, 128, 128]


def test_errors_name_the_reason(tmp_path):
    with pytest.raises(ImageMissingError) as missing:
        decode_image(tmp_path / "nope.jpg")
    assert isinstance(missing.value, FileNotFoundError) and "nope.jpg" in str(missing.value)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(b"this is not an image at all")
    data = _jpeg(_photo())
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, max_pixels=100_000)
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(buf.getvalue(), max_pixels=100_000)
    with pytest.raises(ValueError, match="target"):
        decode_image(data, target=0)


def test_encode_and_resize_short_side():
    image = _photo()
    data = encode_jpeg(image, quality=95)
    assert data[:2] == b"\xff\xd8"
    assert _diff(decode_image(data), image) < 2.5
    assert resize_short_side(image, 320).size == (427, 320)
    assert resize_short_side(image, 400).size == (500, 375)  # never upsamples
