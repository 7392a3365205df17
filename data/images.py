"""Photos: finding them, recognising them by content, decoding and resizing them to upright RGB, fast.

Decoding is the first bottleneck when training at GPU speed (paper 4.2 trains on 4.7M MP16 photos). JPEGs go
through libjpeg-turbo (simplejpeg) with DCT-domain downscaling: when ``target`` is given the decoder skips the
detail that a later resize to ``target`` would throw away. Only the 1/1, 1/2, 1/4 and 1/8 scales are used: the
other M/8 scales run libjpeg-turbo's plain-C inverse DCT and decode *slower* than the full image (measured in
``docs/performance.md``). Everything else (PNG, GIF, CMYK or 12-bit JPEG, 16-bit TIFF, ...) goes through Pillow
with ``Image.draft`` for the same effect on JPEG-like formats. Both paths honour the EXIF orientation tag and
return RGB.

`decode_array` returns an ``(H, W, 3)`` uint8 array, the form the transforms work on; `resize_array` resizes
one with OpenCV (SIMD), several times faster than Pillow's resampling.

`load_photo(path, target=...)` reads and decodes one photo (`decode_photo` decodes bytes already read), raising
`PhotoError` with a one-line reason (empty, unreadable, not an image, corrupt, truncated, decompression bomb,
too large for its target, not a regular file, HEIC without pillow-heif). Finding the photos of a collection
(`discover`, `sniff`) is `geoswc.data.discovery`, re-exported here.

Hostile inputs: only regular files are ever opened. A FIFO would block the reader forever and a device such
as ``/dev/zero`` never ends, so folder walks and globs skip them (counted as not photos) and a path named
explicitly gives "not a regular file". Decoded size is bounded: with a ``target``, an image whose decoded form
would exceed `MAX_TARGET_PIXELS` is refused before any pixel is decoded (only JPEG can decode at reduced size;
a few hundred KB of PNG can declare 13,000 x 13,000 pixels, half a gigabyte per decode worker).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from geoswc.data.validation import check_choice

from .discovery import HEIF_BRANDS, PHOTO_EXTENSIONS, SNIFF_BYTES, Discovery, PhotoFile, discover, sniff
from .regular_files import NotRegularFile, open_regular

__all__ = [
    "Discovery",
    "HEIF_BRANDS",
    "ImageDecodeError",
    "ImageMissingError",
    "MAX_IMAGE_PIXELS",
    "MAX_TARGET_PIXELS",
    "PHOTO_EXTENSIONS",
    "PhotoError",
    "PhotoFile",
    "RESIZE_INTERPOLATIONS",
    "SNIFF_BYTES",
    "TARGET_SIDES",
    "decode_array",
    "decode_image",
    "decode_photo",
    "discover",
    "encode_jpeg",
    "flip_left_right",
    "image_path",
    "jpeg_scale_denominator",
    "load_photo",
    "photo_format",
    "read_bytes",
    "read_photo_bytes",
    "resize_array",
    "resize_short_side",
    "short_side_size",
    "sniff",
]

logger = logging.getLogger(__name__)

# Pillow's own error threshold (2 x Image.MAX_IMAGE_PIXELS); a 13,000 x 13,000 photo still decodes.
MAX_IMAGE_PIXELS = 178_956_970
# With a ``target`` (a model input of a few hundred pixels), the most pixels an image may decode to: 50 MP is
# 150 MB of RGB and about three times that at the peak of the conversion. JPEGs decode at 1/2, 1/4 or 1/8 scale
# and stay far below it; every other format decodes at full size, so this is their size limit. The default of
# the ``max_target_pixels`` arguments, read at call time.
MAX_TARGET_PIXELS = 50_000_000

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
    """Read a photo file, raising `ImageMissingError` when it is absent and `ImageDecodeError` when it is not a
    regular file (a FIFO, device or socket is never read)."""
    try:
        with open_regular(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ImageMissingError("file not found", source=str(path)) from None
    except IsADirectoryError:
        raise ImageMissingError("is a directory", source=str(path)) from None
    except NotRegularFile as err:
        raise ImageDecodeError(err.reason, source=str(path)) from None


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


# Orientation tag -> the array view that makes the photo upright (as ImageOps.exif_transpose applies it).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}

# DCT scale denominators with SIMD inverse DCTs in libjpeg-turbo (1/8 keeps the DC term only).
_FAST_DENOMINATORS = (8, 4, 2)


TARGET_SIDES = ("short", "long")
DECODERS = ("auto", "pillow")


def jpeg_scale_denominator(width: int, height: int, target: Optional[int], side: str = "short") -> int:
    """The largest of 8, 4, 2 (else 1) by which a ``width x height`` JPEG can be decoded keeping its ``side``
    (short or long) >= ``target``; libjpeg rounds each scaled side up."""
    if not target:
        return 1
    measure = min if side == "short" else max
    for denominator in _FAST_DENOMINATORS:
        if measure(-(-width // denominator), -(-height // denominator)) >= target:
            return denominator
    return 1


def _check_target_pixels(
    width: int, height: int, decoded: Tuple[int, int], target: Optional[int], max_target_pixels: int
) -> None:
    """Refuse, before decoding, an image whose decoded form (``decoded = (width, height)``) holds more than
    ``max_target_pixels`` pixels when a ``target`` size is given."""
    if not target or decoded[0] * decoded[1] <= max_target_pixels:
        return
    if decoded == (width, height):
        how = "decode at full size (only JPEG decodes at reduced size)"
    else:
        how = f"decode at {decoded[0]}x{decoded[1]}"
    raise ImageDecodeError(
        f"too large for a {target} px target: {width}x{height} pixels {how}, over the limit of "
        f"{max_target_pixels} pixels (max_target_pixels, default geoswc.data.images.MAX_TARGET_PIXELS)"
    )


def _decode_jpeg_turbo(
    data: bytes, target: Optional[int], side: str, max_pixels: int, max_target_pixels: int
) -> Optional[np.ndarray]:
    """libjpeg-turbo path; None when this JPEG needs Pillow (CMYK, 12-bit, arithmetic coding, ...)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("RGB", "YCbCr", "Gray"):
        return None
    if height * width > max_pixels:
        raise ImageDecodeError(f"decompression bomb: {width}x{height} pixels exceed {max_pixels}")
    # The smallest scale that meets both minimums is exactly 1/denominator (libjpeg offers only M/8 scales).
    denominator = jpeg_scale_denominator(width, height, target, side)
    decoded = (-(-width // denominator), -(-height // denominator))
    _check_target_pixels(width, height, decoded, target, max_target_pixels)
    try:
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            fastdct=True,
            fastupsample=True,
            strict=True,
            min_height=decoded[1],
            min_width=decoded[0],
        )
    except ValueError:
        # Damaged or exotic data: Pillow decides whether it is readable and says why not.
        return None
    upright = _UPRIGHT.get(_exif_orientation(data))
    return np.ascontiguousarray(upright(array)) if upright is not None else array


# Pixels converted at a time from a 16/32-bit greyscale image: the float64 scratch stays at 8 MB per block
# instead of 8 bytes for every pixel of the image.
_CONVERT_BLOCK_PIXELS = 1 << 20


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as a viewer shows it, instead of exposing hidden colour values.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the full range to 8 bits (Pillow's convert('L') would clip at 255).
        array = np.asarray(image)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.empty(array.shape, dtype=np.uint8)
        rows = max(1, _CONVERT_BLOCK_PIXELS // max(1, array.shape[1]))
        for start in range(0, array.shape[0], rows):
            block = array[start : start + rows].astype(np.float64)
            block *= 255.0 / top
            block += 0.5
            np.clip(block, 0, 255, out=block)
            grey[start : start + rows] = block
        del array
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def _decode_pillow(
    data: bytes, target: Optional[int], side: str, max_pixels: int, max_target_pixels: int
) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"decompression bomb: {width}x{height} pixels exceed {max_pixels}")
        if target and image.format == "JPEG":
            # draft keeps each side >= the requested size (scales 1/2, 1/4, 1/8); orientation-agnostic.
            if side == "short":
                request = (target, target)
            else:
                longest = max(width, height)
                request = (-(-target * width // longest), -(-target * height // longest))
            image.draft(image.mode if image.mode != "CMYK" else "RGB", request)
        # Checked on the size the decoder will produce (after draft), before a single pixel is allocated.
        _check_target_pixels(width, height, image.size, target, max_target_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names only the in-memory buffer it was given.
        raise ImageDecodeError("unreadable image (not a format Pillow recognises)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.UnidentifiedImageError) as err:
        raise ImageDecodeError(f"unreadable image ({type(err).__name__}: {err})") from None


def _decode(
    source: Source,
    target: Optional[int],
    side: str,
    max_pixels: int,
    max_target_pixels: Optional[int],
    decoder: str = "auto",
) -> Union[np.ndarray, Image.Image]:
    if target is not None and target <= 0:
        raise ValueError(f"target must be a positive side in pixels, got {target}")
    check_choice("target_side", side, TARGET_SIDES)
    check_choice("decoder", decoder, DECODERS)
    if max_target_pixels is None:
        max_target_pixels = MAX_TARGET_PIXELS
    if max_target_pixels <= 0:
        raise ValueError(f"max_target_pixels must be a positive number of pixels, got {max_target_pixels}")
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        data = read_bytes(source)
    else:
        data = bytes(source)
    if not data:
        raise ImageDecodeError("empty file", source=path)
    try:
        if data[:2] == b"\xff\xd8" and decoder == "auto":
            array = _decode_jpeg_turbo(data, target, side, max_pixels, max_target_pixels)
            if array is not None:
                return array
        return _decode_pillow(data, target, side, max_pixels, max_target_pixels)
    except ImageDecodeError as err:
        raise ImageDecodeError(err.reason, source=path) from None


def decode_image(
    source: Source,
    *,
    target: Optional[int] = None,
    target_side: str = "short",
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_target_pixels: Optional[int] = None,
    decoder: str = "auto",
) -> Image.Image:
    """Decode a photo to an upright RGB image, downscaled while decoding when ``target`` allows it.

    Args:
        source: encoded bytes, or a path to the file.
        target: smallest short side the caller needs (e.g. the training resolution). JPEGs are then decoded at
            the smallest of the scales 1/8, 1/4, 1/2 that keeps *both* sides >= ``target`` (else at full size),
            so the short side of the result is >= ``target`` (or the full image when it is smaller). The result
            is not resized further: the exact resize belongs to the transform. None decodes at full size.
        target_side: ``"short"`` (above) or ``"long"``: keep the long side >= ``target`` instead, enough for
            the paper's evaluation resize (longest side to ``target``).
        max_pixels: images with more pixels are refused before decoding (decompression-bomb guard).
        max_target_pixels: with a ``target``, images that would decode to more pixels (a JPEG at its reduced
            scale, any other format at full size) are refused before decoding; default `MAX_TARGET_PIXELS`.
            Without a ``target`` the full image is what was asked for and only ``max_pixels`` applies.
        decoder: ``"auto"`` (libjpeg-turbo through simplejpeg for JPEGs, Pillow for the rest) or ``"pillow"``
            (Pillow for every format: the pixels of ``Image.open(...).convert("RGB")``, turned upright).

    Returns:
        An RGB ``PIL.Image`` with the EXIF orientation applied.

    Raises:
        ImageMissingError: the path does not exist (also a ``FileNotFoundError``).
        ImageDecodeError: the data is not a readable image, is too large, or the path is not a regular file
            (a FIFO or device is never read); ``err.reason`` says which.
    """
    image = _decode(source, target, target_side, max_pixels, max_target_pixels, decoder)
    return Image.fromarray(image, "RGB") if isinstance(image, np.ndarray) else image


def decode_array(
    source: Source,
    *,
    target: Optional[int] = None,
    target_side: str = "short",
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_target_pixels: Optional[int] = None,
    decoder: str = "auto",
) -> np.ndarray:
    """`decode_image` as an ``(H, W, 3)`` uint8 RGB array (C-contiguous), the transforms' input.

    Same arguments, scaling rule and errors as `decode_image`; skips the PIL image for JPEGs.
    """
    image = _decode(source, target, target_side, max_pixels, max_target_pixels, decoder)
    return image if isinstance(image, np.ndarray) else np.asarray(image)


def encode_jpeg(image: Union[Image.Image, np.ndarray], *, quality: int = 90) -> bytes:
    """Encode an RGB image (PIL or ``(H, W, 3)`` uint8 array) as baseline JPEG bytes."""
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects an (H, W, 3) RGB image, got shape {array.shape}")
    return simplejpeg.encode_jpeg(array, quality=quality, colorspace="RGB", colorsubsampling="420")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (only ever down: smaller images are returned unchanged).

    Pillow's antialiased bilinear filter: meant for storage (``data shards --resize``), where quality matters
    more than speed; the training and evaluation transforms use `resize_array`.
    """
    if min(image.size) <= size:
        return image
    return image.resize(short_side_size(*image.size, size), Image.Resampling.BILINEAR, reducing_gap=None)


RESIZE_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# OpenCV's thread pool stays off: the images are small, DataLoader workers are the parallelism, and a pool
# started before a fork deadlocks the forked workers.
cv2.setNumThreads(0)


def resize_array(array: np.ndarray, size: Tuple[int, int], *, interpolation: str = "bilinear") -> np.ndarray:
    """Resize an ``(H, W, C)`` uint8 image to ``size = (width, height)`` with OpenCV.

    ``interpolation`` (bilinear, bicubic or nearest) is used for enlargements and for reductions down to half
    size, the range left after DCT-scaled decoding; a stronger reduction on either axis averages pixel areas
    instead, so that nothing aliases.
    """
    check_choice("interpolation", interpolation, RESIZE_INTERPOLATIONS)
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    if (array.shape[1], array.shape[0]) == (width, height):
        return array
    if width * 2 < array.shape[1] or height * 2 < array.shape[0]:
        flag = cv2.INTER_AREA
    else:
        flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[
            interpolation
        ]
    return cv2.resize(array, (width, height), interpolation=flag)


def flip_left_right(array: np.ndarray) -> np.ndarray:
    """A C-contiguous left-right mirror image of an ``(H, W, C)`` uint8 array."""
    return cv2.flip(np.ascontiguousarray(array), 1)


def short_side_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """``(width, height)`` scaled so the short side is ``size``, the long side rounded."""
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_path(root: Union[str, os.PathLike], img_id: str) -> Path:
    """The file of ``img_id`` (a relative path such as ``45/77/3228511372.jpg``) under ``root``."""
    return Path(root) / img_id


class PhotoError(Exception):
    """One photo that cannot be geotagged; ``str(err)`` is the one-line reason written in its error row."""


def _heif_opener():
    try:
        import pillow_heif
    except ImportError:
        return None
    return pillow_heif


def read_photo_bytes(path: str) -> bytes:
    """Read a photo's bytes, turning every failure into a `PhotoError` with the reason.

    Only a regular file is opened: a FIFO, device or socket is "not a regular file" (a FIFO would block the
    read forever, ``/dev/zero`` would never end).
    """
    try:
        with open_regular(path) as f:
            data = f.read()
    except IsADirectoryError:
        raise PhotoError("is a folder, not a photo") from None
    except NotRegularFile as err:
        raise PhotoError(err.reason) from None
    except FileNotFoundError:
        raise PhotoError("file not found") from None
    except PermissionError:
        raise PhotoError("unreadable: permission denied") from None
    except OSError as err:
        raise PhotoError(f"unreadable: {err.strerror or err}") from None
    if not data:
        raise PhotoError("empty file")
    return data


def photo_format(data: bytes) -> Optional[str]:
    """The format a photo's bytes announce (`sniff`), Pillow made able to open it: for HEIC/HEIF, pillow-heif's
    opener is registered when pillow-heif is installed. None when the bytes are no recognised image."""
    kind = sniff(data[:SNIFF_BYTES])
    if kind == "HEIF":
        heif = _heif_opener()
        if heif is not None:
            heif.register_heif_opener()
    return kind


def decode_photo(
    data: bytes,
    *,
    target: Optional[int] = None,
    target_side: str = "short",
    as_array: bool = False,
    max_target_pixels: Optional[int] = None,
    decoder: str = "auto",
):
    """Decode a photo's bytes (as `read_photo_bytes` returns them) to an upright RGB ``PIL.Image``.

    `load_photo` without the read, for a caller that uses the bytes for more than the pixels (e.g. its EXIF).
    Same arguments, result and errors as `load_photo`.

    Raises:
        PhotoError: with the reason the photo cannot be used.
    """
    kind = photo_format(data)
    if kind is None:
        raise PhotoError("not a recognised image (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC)")
    if kind == "HEIF" and _heif_opener() is None:
        raise PhotoError("HEIC/HEIF photo needs pillow-heif: pip install pillow-heif")
    try:
        return (decode_array if as_array else decode_image)(
            data,
            target=target,
            target_side=target_side,
            max_target_pixels=max_target_pixels,
            decoder=decoder,
        )
    except ImageDecodeError as err:
        raise PhotoError(f"{kind}: {err.reason}") from None


def load_photo(
    path: str,
    *,
    target: Optional[int] = None,
    target_side: str = "short",
    as_array: bool = False,
    max_target_pixels: Optional[int] = None,
    decoder: str = "auto",
):
    """Read and decode one photo to an upright RGB ``PIL.Image``.

    Args:
        path: the file (a regular file: FIFOs and devices are refused unopened).
        target: smallest short side needed afterwards; JPEGs are decoded at reduced size down to it.
        target_side: ``"long"`` makes ``target`` the smallest long side instead (a longest-side resize).
        as_array: return an ``(H, W, 3)`` uint8 array instead (the transforms' input, no PIL copy).
        max_target_pixels: with a ``target``, photos that would decode to more pixels are refused before
            decoding (see `decode_image`); default `MAX_TARGET_PIXELS`.
        decoder: ``"auto"`` or ``"pillow"`` (see `decode_image`).

    Raises:
        PhotoError: with the reason the photo cannot be used.
    """
    return decode_photo(
        read_photo_bytes(path),
        target=target,
        target_side=target_side,
        as_array=as_array,
        max_target_pixels=max_target_pixels,
        decoder=decoder,
    )
