"""GPS positions already recorded in photos' EXIF (the GPS IFD of JPEG, TIFF, WebP and HEIF files).

The position is the EXIF 2.3 GPS triple of degrees, minutes and seconds (rationals) with its N/S or E/W
reference, as `geoswc.tagging.exif_copies.write_gps_exif` writes it. Only the file's header is read (Pillow opens
images lazily), so checking a photo costs far less than decoding it. A photo whose GPS block is absent,
incomplete, out of range or unreadable has no position: the answer is ``None``, never an error.
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import Optional, Sequence, Tuple

from PIL import Image

logger = logging.getLogger(__name__)

# EXIF tags (EXIF 2.3, table 15): the GPS IFD pointer and the fields of a position.
_GPS_IFD = 0x8825
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4


def _rational(value) -> float:
    """A TIFF rational as Pillow gives it (IFDRational, a (num, den) pair or a number)."""
    if isinstance(value, tuple):
        num, den = value
        return num / den
    return float(value)


def dms_to_degrees(dms: Sequence, ref) -> float:
    """Signed degrees of an EXIF GPS degrees/minutes/seconds triple and its reference.

    Args:
        dms: three TIFF rationals, as Pillow (``IFDRational``) or piexif (``(num, den)`` pairs) gives them.
        ref: ``N``, ``S``, ``E`` or ``W`` (str or bytes, NUL-padded or lower case accepted); S and W are
            negative.

    Raises:
        ValueError: a reference other than N, S, E, W, or not three parts.
        ZeroDivisionError: a rational with a zero denominator.
    """
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = str(ref).strip("\x00 ").upper()
    if ref not in ("N", "S", "E", "W") or len(dms) != 3:
        raise ValueError(f"not an EXIF GPS position: {tuple(dms)!r} {ref!r}")
    d, m, s = (_rational(part) for part in dms)
    value = d + m / 60 + s / 3600
    return -value if ref in ("S", "W") else value


def gps_from_exif(exif: Image.Exif) -> Optional[Tuple[float, float]]:
    """The ``(lat, lon)`` degrees in a Pillow ``Image.Exif``, or None."""
    try:
        gps = exif.get_ifd(_GPS_IFD)
        lat = dms_to_degrees(gps[_LAT], gps[_LAT_REF])
        lon = dms_to_degrees(gps[_LON], gps[_LON_REF])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    if abs(lat) > 90 or abs(lon) > 180:
        return None
    return lat, lon


def _open_gps(source, name: object) -> Optional[Tuple[float, float]]:
    try:
        with Image.open(source) as image:
            return gps_from_exif(image.getexif())
    except Exception as err:  # Pillow raises many types on damaged headers; a missing position is the answer
        logger.debug("no EXIF GPS read from %s: %s", name, err)
        return None


def read_gps(path: "str | os.PathLike") -> Optional[Tuple[float, float]]:
    """The GPS position ``(lat, lon)`` in degrees recorded in a photo's EXIF, or None when it has none.

    Unreadable files and damaged EXIF also give None (the photo's own row reports decoding errors).
    """
    return _open_gps(path, path)


def gps_from_bytes(data: bytes) -> Optional[Tuple[float, float]]:
    """`read_gps` of a photo file's bytes already in memory (a decode worker's), read from them alone.

    The same answer as `read_gps` on the file holding ``data``, for every format Pillow can open (HEIC/HEIF
    once pillow-heif's opener is registered, as `geoswc.data.images.photo_format` does).
    """
    return _open_gps(io.BytesIO(data), "photo bytes")
