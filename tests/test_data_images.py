import io

import numpy as np
import piexif
import pytest
from PIL import Image, ImageOps

from geoswc.data.images import (
    ImageDecodeError,
    ImageMissingError,
    decode_array,
    decode_image,
    encode_jpeg,
    jpeg_scale_denominator,
    resize_array,
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


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
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


@pytest.mark.parametrize("target", [40, 64, 100, 150, 300, 375])
def test_reduced_decoding_keeps_short_side_at_least_target(target):
    data = _jpeg(_photo())
    ours = decode_image(data, target=target)
    assert min(ours.size) >= target
    # Only the SIMD scales 1, 1/2, 1/4, 1/8 are used, and the next one would drop below target.
    denominator = round(500 / ours.size[0])
    assert denominator in (1, 2, 4, 8) and ours.size == (-(-500 // denominator), -(-375 // denominator))
    assert denominator == 8 or -(-375 // (2 * denominator)) < target
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize(ours.size, Image.Resampling.BOX)
    assert _diff(ours, reference) < 4


@pytest.mark.parametrize(
    ("width", "height", "target", "denominator"),
    [
        (500, 375, 300, 1),
        (500, 375, 188, 2),
        (500, 375, 189, 1),
        (500, 375, 94, 4),
        (500, 375, 47, 8),
        (375, 500, 94, 4),
        (4000, 3000, 300, 8),
        (4000, 3000, None, 1),
        (100, 80, 300, 1),
    ],
)
def test_jpeg_scale_denominator(width, height, target, denominator):
    # libjpeg rounds scaled sides up: 375 / 2 -> 188, 375 / 4 -> 94, 375 / 8 -> 47.
    assert jpeg_scale_denominator(width, height, target) == denominator


def test_long_side_target_for_the_longest_side_resize():
    # Longest side 224 from 500 x 375 needs only the 1/2 scale (250 x 188), not the full image.
    assert jpeg_scale_denominator(500, 375, 224, "long") == 2
    assert jpeg_scale_denominator(500, 375, 251, "long") == 1
    assert jpeg_scale_denominator(375, 500, 63, "long") == 8  # 500 / 8 -> 63
    data = _jpeg(_photo())
    assert decode_image(data, target=224, target_side="long").size == (250, 188)
    assert decode_array(data, target=224, target_side="long").shape == (188, 250, 3)
    cmyk = _jpeg(_photo().convert("CMYK"))  # the Pillow path: draft honours the long side too
    assert max(decode_image(cmyk, target=224, target_side="long").size) >= 224
    assert max(decode_image(cmyk, target=100, target_side="long").size) < 500
    with pytest.raises(ValueError, match="choose one of: short, long"):
        decode_image(data, target=224, target_side="width")


def test_decode_array_is_decode_image_as_an_array():
    exif = piexif.dump({"0th": {piexif.ImageIFD.Orientation: 6}})
    for data in (_jpeg(_photo(), exif=exif), _png(_photo(60, 40))):
        array = decode_array(data, target=100)
        assert array.dtype == np.uint8 and array.flags.c_contiguous
        assert np.array_equal(array, np.asarray(decode_image(data, target=100)))


def test_resize_array_matches_pillow_antialiased_resize():
    photo = np.asarray(_photo())
    # Down to 0.8 (what is left after DCT-scaled decoding of an MP16 photo for 300 px): interpolation.
    for interpolation, pil in (
        ("bilinear", Image.Resampling.BILINEAR),
        ("bicubic", Image.Resampling.BICUBIC),
    ):
        ours = resize_array(photo, (400, 300), interpolation=interpolation)
        assert ours.shape == (300, 400, 3)
        assert _diff(ours, Image.fromarray(photo).resize((400, 300), pil)) < 1.5
    # Below half size, pixel areas are averaged: the result matches a box filter, not a sparse sampling.
    ours = resize_array(photo, (100, 75))
    assert _diff(ours, Image.fromarray(photo).resize((100, 75), Image.Resampling.BOX)) < 1.0
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    assert np.all(np.abs(resize_array(stripes, (16, 16)).astype(int) - 128) <= 1)  # no aliasing into 0 or 255
    assert resize_array(photo, (500, 375)) is photo
    assert resize_array(photo, (1000, 750), interpolation="nearest")[::2, ::2].tolist() == photo.tolist()
    with pytest.raises(ValueError, match="choose one of: bilinear, bicubic, nearest"):
        resize_array(photo, (10, 10), interpolation="lanczos")
    with pytest.raises(ValueError, match="positive"):
        resize_array(photo, (0, 10))


def test_modes_become_rgb(tmp_path):
    grey = Image.fromarray(np.full((30, 40), 77, np.uint8), "L")
    assert np.asarray(decode_image(_jpeg(grey)))[0, 0].tolist() == pytest.approx([77, 77, 77], abs=1)

    palette = Image.fromarray(np.full((30, 40, 3), (10, 200, 30), np.uint8), "RGB").convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
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
    with pytest.raises(ImageDecodeError, match="unreadable") as unknown:
        decode_image(b"this is not an image at all")
    assert "BytesIO" not in str(unknown.value)
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
