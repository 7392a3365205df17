"""Image decoding: any photo to an upright RGB PIL image, fast.

Decoding is the first bottleneck when training at GPU speed (paper 4.2 trains on 4.7M MP16 photos). JPEGs go
through libjpeg-turbo (simplejpeg) with DCT-domain downscaling: when ``target`` is given the decoder skips the
detail that a later resize to ``target`` would throw away. Everything else (PNG, GIF, CMYK or 12-bit JPEG,
16-bit TIFF, ...) goes through Pillow with ``Image.draft`` for the same effect on JPEG-like formats. Both paths
honour the EXIF orientation tag and return RGB.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Pillow's own error threshold (2 x Image.MAX_IMAGE_PIXELS); a 13,000 x 13,000 photo still decodes.
MAX_IMAGE_PIXELS = 178_956_970

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]


class ImageDecodeError(ValueError):
    """A photo that cannot be turned into an RGB image; ``reason`` says why in a few words."""

    def __init__(self, reason: str, *, source: Optional[str] = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


class ImageMissingError(ImageDecodeError, FileNotFoundError):
    """The photo's file does not exist (counted apart from corrupt files by the shard writer)."""


def read_bytes(path: Union[str, os.PathLike]) -> bytes:
    """Read a photo file, raising `ImageMissingError` when it is absent."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageMissingError("file not found", source=str(path)) from None
    except IsADirectoryError:
        raise ImageMissingError("is a directory", source=str(path)) from None


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG read from its APP1 segment without decoding; 1 when absent."""
    pos, end = 2, min(len(data), 1 << 20)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan: no metadata after this point
            return 1
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == 0x0112 and kind == 3:
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


# Orientation tag -> PIL transpose (as ImageOps.exif_transpose applies it).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _decode_jpeg_turbo(data: bytes, target: Optional[int], max_pixels: int) -> Optional[Image.Image]:
    """libjpeg-turbo path; None when this JPEG needs Pillow (CMYK, 12-bit, arithmetic coding, ...)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("RGB", "YCbCr", "Gray"):
        return None
    if height * width > max_pixels:
        raise ImageDecodeError(f"decompression bomb: {width}x{height} pixels exceed {max_pixels}")
    # min_height = min_width = target keeps the short side >= target whatever the orientation.
    side = target or 0
    try:
        array = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=True, fastupsample=True, min_height=side, min_width=side, strict=True
        )
    except ValueError:
        # Damaged or exotic data: Pillow decides whether it is readable and says why not.
        return None
    image = Image.fromarray(array, "RGB")
    transpose = _TRANSPOSE.get(_exif_orientation(data))
    return image.transpose(transpose) if transpose is not None else image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as a viewer shows it, instead of exposing hidden colour values.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the full range to 8 bits (Pillow's convert('L') would clip at 255).
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def _decode_pillow(data: bytes, target: Optional[int], max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"decompression bomb: {width}x{height} pixels exceed {max_pixels}")
        if target and image.format == "JPEG":
            # draft keeps each side >= the requested size (scales 1/2, 1/4, 1/8); orientation-agnostic.
            image.draft(image.mode if image.mode != "CMYK" else "RGB", (target, target))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.UnidentifiedImageError) as err:
        raise ImageDecodeError(f"unreadable image ({type(err).__name__}: {err})") from None


def decode_image(source: Source, *, target: Optional[int] = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a photo to an upright RGB image, downscaled while decoding when ``target`` allows it.

    Args:
        source: encoded bytes, or a path to the file.
        target: smallest short side the caller needs (e.g. the training resolution). JPEGs are then decoded at
            the smallest libjpeg scale (N/8) that keeps *both* sides >= ``target``, so the short side of the
            result is >= ``target`` (or the full image when it is smaller). The result is not resized further:
            the exact resize belongs to the transform. None decodes at full size.
        max_pixels: images with more pixels are refused before decoding (decompression-bomb guard).

    Returns:
        An RGB ``PIL.Image`` with the EXIF orientation applied.

    Raises:
        ImageMissingError: the path does not exist (also a ``FileNotFoundError``).
        ImageDecodeError: the data is not a readable image, or is too large; ``err.reason`` says which.
    """
    if target is not None and target <= 0:
        raise ValueError(f"target must be a positive short side in pixels, got {target}")
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        data = read_bytes(source)
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError("empty file", source=path)
    try:
        if data[:2] == b"\xff\xd8":
            image = _decode_jpeg_turbo(data, target, max_pixels)
            if image is not None:
                return image
        return _decode_pillow(data, target, max_pixels)
    except ImageDecodeError as err:
        raise ImageDecodeError(err.reason, source=path) from None


def encode_jpeg(image: Union[Image.Image, np.ndarray], *, quality: int = 90) -> bytes:
    """Encode an RGB image (PIL or ``(H, W, 3)`` uint8 array) as baseline JPEG bytes."""
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects an (H, W, 3) RGB image, got shape {array.shape}")
    return simplejpeg.encode_jpeg(array, quality=quality, colorspace="RGB", colorsubsampling="420")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (only ever down: smaller images are returned unchanged)."""
    width, height = image.size
    short = min(width, height)
    if short <= size:
        return image
    scale = size / short
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)


def image_path(root: Union[str, os.PathLike], img_id: str) -> Path:
    """The file of ``img_id`` (a relative path such as ``45/77/3228511372.jpg``) under ``root``."""
    return Path(root) / img_id
