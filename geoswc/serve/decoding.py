"""Uploaded photos to model inputs: `geoswc.data.images.decode_photo` on the upload's bytes, then the model's
evaluation transform, one photo at a time, each photo's bytes given back to the memory budget as soon as its
tensor is made.

Before a photo is decoded its decoded size is read from its header (`decoded_size`) and its cost
(`decode_cost_bytes`: `BYTES_PER_DECODED_PIXEL` per decoded pixel, the buffers decoding holds at its peak) is
reserved from the budget; photos that `decode_photo` refuses unread (decompression bombs, images over
`MAX_TARGET_PIXELS` for the model's input) cost nothing.
"""

from __future__ import annotations

import io
import logging
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from geoswc.data.exif import gps_from_bytes
from geoswc.data.images import (
    MAX_IMAGE_PIXELS,
    MAX_TARGET_PIXELS,
    PhotoError,
    decode_photo,
    jpeg_scale_denominator,
    photo_format,
)
from geoswc.serve.budget import Reservation
from geoswc.serve.uploads import Upload

logger = logging.getLogger(__name__)

__all__ = ["BYTES_PER_DECODED_PIXEL", "decode_cost_bytes", "decode_upload", "decoded_size", "upload_gps"]

# Peak bytes per decoded pixel while a photo becomes a tensor: a greyscale PNG holds its 1-byte pixels, a
# copy, the 3-byte RGB conversion and the array made from it (measured: a 7000x7000 greyscale PNG adds
# about 490 MB, 10 bytes per pixel).
BYTES_PER_DECODED_PIXEL = 10


def _transform_target(transform) -> Tuple[Optional[int], str]:
    return getattr(transform, "decode_target", None), getattr(transform, "decode_side", "short")


def decode_upload(data: bytes, transform) -> torch.Tensor:
    """An uploaded photo's bytes through the model's evaluation transform, with `load_photo`'s checks.

    The format is sniffed from the content; the decoded size is bounded by
    `geoswc.data.images.MAX_TARGET_PIXELS` before any pixel is decoded (decompression bombs).

    Raises:
        PhotoError: with the reason the photo cannot be used.
    """
    if not data:
        raise PhotoError("empty file")
    target, side = _transform_target(transform)
    array = decode_photo(
        bytes(data),
        target=target,
        target_side=side,
        as_array=True,
        max_target_pixels=MAX_TARGET_PIXELS,
        decoder=getattr(transform, "decoder", "auto"),
    )
    kind = photo_format(bytes(data[:64]))
    image = array if getattr(transform, "accepts_arrays", False) else Image.fromarray(array, "RGB")
    del array  # the transform's input is the only copy of the pixels left
    try:
        return transform(image)
    except Exception as err:  # a transform failing on an odd image is this photo's problem only
        raise PhotoError(f"{kind}: cannot transform ({type(err).__name__}: {err})") from None


def upload_gps(data: bytes) -> Optional[Tuple[float, float]]:
    """The GPS position (lat, lon degrees) in an upload's EXIF, read from its bytes in memory; None without
    one."""
    return gps_from_bytes(bytes(data))


def decoded_size(data: bytes, transform) -> Optional[Tuple[int, int]]:
    """(width, height) the photo will be decoded at for ``transform``, read from its header without decoding
    it; None when the header cannot be read or the photo will be refused before decoding."""
    if photo_format(bytes(data[:64])) is None:
        return None
    target, side = _transform_target(transform)
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            width, height, kind = image.width, image.height, image.format
    except Exception:  # unreadable: decode_photo names the reason, at no cost
        return None
    if width * height > MAX_IMAGE_PIXELS:
        return None
    decoded = (width, height)
    if kind == "JPEG" and target:
        denominator = jpeg_scale_denominator(width, height, target, side)
        decoded = (-(-width // denominator), -(-height // denominator))
    if target and decoded[0] * decoded[1] > MAX_TARGET_PIXELS:
        return None
    return decoded


def decode_cost_bytes(data: bytes, transform) -> int:
    """The memory decoding ``data`` holds at its peak (0 for a photo refused unread)."""
    size = decoded_size(data, transform)
    return 0 if size is None else size[0] * size[1] * BYTES_PER_DECODED_PIXEL


def decode_uploads(
    items: Sequence[Union[Upload, PhotoError]], transform, reservation: Reservation
) -> Tuple[List[Any], List[Optional[Tuple[float, float]]]]:
    """Each upload's tensor (or its `PhotoError`; an item that is a `PhotoError` already stays one) and EXIF
    GPS position, decoded one at a time; each upload's bytes are given back to ``reservation`` and dropped as
    soon as its tensor is made."""
    decoded: List[Any] = []
    positions: List[Optional[Tuple[float, float]]] = []
    for item in items:
        if isinstance(item, PhotoError):
            decoded.append(item)
            positions.append(None)
            continue
        try:
            decoded.append(decode_upload(item.data, transform))
        except PhotoError as err:
            decoded.append(err)
            positions.append(None)
        else:  # after decoding: a HEIC's opener is registered, a bomb was refused
            positions.append(upload_gps(item.data))
        reservation.give_back(len(item.data))
        item.data = bytearray()
    return decoded, positions
