"""Published positions: the precisions a tag run may round to, and JPEG copies carrying the GPS position in
their EXIF (`write_gps_exif`); originals are only ever opened for reading, and an existing file is replaced
only when asked. Finding and decoding the photos is `geoswc.data.images`.

A run's copies (`ExifCopies`, ``geoswc tag --write-exif DIR``) go under one folder laid out like the inputs,
which may not be, contain or lie inside an input folder (`check_exif_folder`), so no copy can replace an
original.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import tempfile
from fractions import Fraction
from typing import Any, List, Optional, Sequence, Tuple

import piexif

from geoswc.data.validation import check_choice
from geoswc.data.exif import dms_to_degrees  # noqa: F401  (importable from here as before)
from geoswc.data.images import SNIFF_BYTES, PhotoError, read_photo_bytes, sniff
from geoswc.tagging.files import os_errors, output_error

logger = logging.getLogger(__name__)

# Decimal places kept by each publication precision; 1e-2 degree of latitude is ~1.1 km, 1e-1 ~11 km, 1 ~111 km.
PRECISION_DECIMALS = {"exact": None, "city": 2, "region": 1, "country": 0}


def round_latlon(lat: float, lon: float, precision: str) -> Tuple[float, float]:
    """Round a position to a publication precision (``exact``, ``city``, ``region``, ``country``).

    Raises:
        ValueError: unknown precision.
    """
    check_choice("precision", precision, PRECISION_DECIMALS)
    decimals = PRECISION_DECIMALS[precision]
    if decimals is None:
        return float(lat), float(lon)
    lat, lon = round(float(lat), decimals), round(float(lon), decimals)
    # -0.0 reads as a southern/western position to a human; keep the sign of real values only.
    return lat + 0.0, lon + 0.0


def _dms_rationals(value_deg: float, decimals: Optional[int]) -> Tuple[Tuple[int, int], ...]:
    """Degrees, minutes, seconds as EXIF rationals, exact enough to give back the (rounded) value.

    Seconds are kept to 1/100 s (~0.3 m), finer than any precision, so the rounded value round-trips.
    """
    value = Fraction(abs(value_deg)).limit_denominator(10**9)
    if decimals is not None:
        value = Fraction(round(value * 10**decimals), 10**decimals)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - Fraction(minutes, 60)) * 3600
    seconds_cs = round(seconds * 100)
    if seconds_cs >= 6000:  # rounding carried into the next minute
        seconds_cs -= 6000
        minutes += 1
        if minutes == 60:
            minutes, degrees = 0, degrees + 1
    return (degrees, 1), (minutes, 1), (seconds_cs, 100)


def gps_ifd(lat: float, lon: float, *, precision: str = "exact") -> dict:
    """The EXIF GPS IFD (piexif tag -> value) for a position."""
    decimals = PRECISION_DECIMALS[precision]
    return {
        piexif.GPSIFD.GPSVersionID: (2, 3, 0, 0),
        piexif.GPSIFD.GPSLatitudeRef: b"N" if lat >= 0 else b"S",
        piexif.GPSIFD.GPSLatitude: _dms_rationals(lat, decimals),
        piexif.GPSIFD.GPSLongitudeRef: b"E" if lon >= 0 else b"W",
        piexif.GPSIFD.GPSLongitude: _dms_rationals(lon, decimals),
        piexif.GPSIFD.GPSMapDatum: b"WGS-84",
    }


def write_gps_exif(
    source: str, dest: str, lat: float, lon: float, *, precision: str = "exact", overwrite: bool = False
) -> bool:
    """Write a copy of the JPEG ``source`` to ``dest`` with its GPS EXIF set to ``(lat, lon)``.

    The image data is copied byte for byte (no re-encoding); other EXIF fields are kept, and so is the file
    mode of ``source``. The copy is written to a temporary file of an unpredictable name in ``dest``'s folder
    (removed on any failure) and then put in place, so ``dest`` is either absent or complete. An existing
    ``dest`` (a file, or a symlink, which is never followed) is kept unless ``overwrite``.

    Returns:
        True when the copy was written, False when ``dest`` existed and was kept.

    Raises:
        PhotoError: the source is not a readable JPEG or its EXIF cannot be rewritten.
        OSError: the copy cannot be written (``filename`` is the file concerned).
    """
    data = read_photo_bytes(source)
    if sniff(data[:SNIFF_BYTES]) != "JPEG":
        raise PhotoError("EXIF copies are written for JPEG photos only")
    try:
        mode = stat.S_IMODE(os.stat(source).st_mode) & 0o777
    except OSError as err:
        raise PhotoError(f"unreadable: {err.strerror or err}") from None
    try:
        exif = piexif.load(data)
    except Exception:  # piexif raises bare ValueError/struct.error/... on damaged EXIF; start afresh then
        logger.debug("unreadable EXIF in %s; writing a fresh EXIF block", source)
        exif = {"0th": {}, "Exif": {}, "GPS": {}, "1st": {}, "thumbnail": None}
    exif["GPS"] = gps_ifd(lat, lon, precision=precision)
    try:
        blob = piexif.dump(exif)
    except Exception:
        # Some camera EXIF holds values piexif cannot write back; GPS alone is what this copy is for.
        blob = piexif.dump({"0th": {}, "Exif": {}, "GPS": exif["GPS"], "1st": {}, "thumbnail": None})
    out = io.BytesIO()
    try:
        piexif.insert(blob, data, out)
    except Exception as err:
        raise PhotoError(f"cannot write EXIF: {err}") from None
    if not overwrite and os.path.lexists(dest):
        return False
    folder = os.path.dirname(dest) or os.curdir
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out.getvalue())
        os.chmod(tmp, mode)
        return _put_in_place(tmp, dest, overwrite=overwrite)
    except OSError as err:
        if err.filename is None or err.filename == tmp:
            err.filename = dest  # the temporary name means nothing to the user
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _put_in_place(tmp: str, dest: str, *, overwrite: bool) -> bool:
    """Rename ``tmp`` to ``dest``; without ``overwrite`` an existing ``dest`` is kept (False)."""
    if overwrite:
        os.replace(tmp, dest)
        return True
    try:
        os.link(tmp, dest)  # fails, atomically, when dest exists
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    # A file system without hard links: check, then rename.
    if os.path.lexists(dest):
        return False
    os.replace(tmp, dest)
    return True


# --------------------------------------------------------------------------------------------- a run's copies


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _within(path: str, folders: set) -> Optional[str]:
    """The folder of ``folders`` that ``path`` is or lies inside (all absolute and resolved), or None."""
    while path not in folders:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _input_folders(paths: Sequence[str]) -> List[str]:
    """The folders the inputs name, as `geoswc.data.images.discover` reads them: a folder itself, the folder
    of a file, the fixed part of a glob; the lines of ``@list`` files the same way."""
    folders = []

    def add(item: str) -> None:
        if os.path.isdir(item):
            folders.append(item)
        elif any(ch in item for ch in "*?[") and not os.path.lexists(item):
            fixed = []
            for part in item.split(os.sep):
                if any(ch in part for ch in "*?["):
                    break
                fixed.append(part)
            folders.append(os.sep.join(fixed) or os.curdir)
        else:
            folders.append(os.path.dirname(item) or os.curdir)

    for item in paths:
        if item.startswith("@"):
            with open(item[1:], encoding="utf-8", errors="surrogateescape") as f:
                lines = [line.strip() for line in f.read().splitlines()]
            for line in lines:
                if line and not line.startswith("#"):
                    add(os.path.join(os.path.dirname(item[1:]), line))
        else:
            add(item)
    return folders


def protected_folders(paths: Sequence[str], photos) -> set:
    """The real paths of the input folders and of every photo's folder: no EXIF copy may go into them."""
    folders = set(_input_folders(paths))
    folders.update(os.path.dirname(os.path.abspath(photo.path)) for photo in photos)
    return {os.path.realpath(folder) for folder in folders}


def check_exif_folder(write_exif: str, protected: set) -> None:
    """Refuse an EXIF folder that is, contains or lies inside an input folder (after resolving symlinks).

    Raises:
        ValueError: naming the input folder.
    """
    real = os.path.realpath(write_exif)
    folder = _within(real, protected)
    relation = "is" if folder == real else "lies inside"
    if folder is None:
        folder, relation = next((f for f in sorted(protected) if _inside(f, real)), None), "contains"
    if folder is not None:
        raise ValueError(
            f"--write-exif {write_exif} {relation} the input folder {folder}; the copies could replace "
            "the originals: choose a folder outside every input"
        )


def check_writable(folder: str) -> None:
    """Check that the copies can go into ``folder``: it, or the nearest folder above it that exists (where the
    first copy would create it), is a folder this process may write. Nothing is created, so a run refused
    later (another run's output, other settings) leaves no trace.

    Raises:
        OutputError: naming ``folder`` and the reason (permission denied or a read-only file system, a file in
            the way).
    """
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    with os_errors("write EXIF copies into", folder):
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)


class ExifCopies:
    """Writes the EXIF copies of a run under its folder, never into an input folder (a folder of the copies
    may be a symlink) and never over an existing file unless ``overwrite``."""

    def __init__(self, folder: str, *, protected: set, precision: str, overwrite: bool):
        self.folder, self.protected = folder, protected
        self.precision, self.overwrite = precision, overwrite
        self._checked: set = set()

    def _check_folder(self, dest: str) -> None:
        folder = os.path.dirname(dest)
        if folder in self._checked:
            return
        protected = _within(os.path.realpath(folder), self.protected)
        if protected is not None:
            raise ValueError(
                f"--write-exif: {folder} leads into the input folder {protected}; the copies could "
                "replace the originals"
            )
        self._checked.add(folder)

    def write(self, photo, lat: float, lon: float, summary: Any) -> None:
        dest = os.path.join(self.folder, photo.rel)
        self._check_folder(dest)
        try:
            written = write_gps_exif(
                photo.path, dest, lat, lon, precision=self.precision, overwrite=self.overwrite
            )
        except PhotoError as err:
            logger.debug("no EXIF copy of %s: %s", photo.path, err)
            summary.exif_skipped += 1
            return
        except OSError as err:
            raise output_error("write the EXIF copy", err.filename or dest, err) from err
        if written:
            summary.exif_written += 1
        else:
            logger.info("kept the existing %s (--overwrite replaces it)", dest)
            summary.exif_skipped += 1
            summary.exif_existing += 1
