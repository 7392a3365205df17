"""Photo archives: finding the photos, recognising them by content, decoding them, geotagged copies.

The pieces `geoswc tag` runs over collections of millions of files (issue 6):

- `discover(inputs)` expands files, folders (recursive, hidden entries skipped, symlink cycles visited once),
  globs and ``@list.txt`` files into one deterministic list of `PhotoFile`.
- `sniff(head)` names the image format from the first bytes of a file (JPEG, PNG, WebP, BMP, TIFF, GIF,
  HEIC/HEIF), whatever the file's extension says.
- `load_photo(path, target=...)` reads and decodes one photo to an upright RGB image, raising `PhotoError`
  with a one-line reason (empty, unreadable, not an image, corrupt, truncated, decompression bomb, HEIC
  without pillow-heif).
- `round_latlon` applies the publication precisions and `write_gps_exif` writes a JPEG copy carrying the
  GPS position; originals are only ever opened for reading.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import os
import stat
from fractions import Fraction
from typing import Iterable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

# Extensions of the formats `sniff` recognises: a file with one of these is a photo candidate in a folder walk
# even when its content is damaged, so that a corrupt or empty ``IMG_0001.jpg`` becomes an error row.
PHOTO_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .dib .tif .tiff .gif .heic .heif .hif".split()
)
HEIF_BRANDS = frozenset([b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"])
SNIFF_BYTES = 32

# Decimal places kept by each publication precision; 1e-2 degree of latitude is ~1.1 km, 1e-1 ~11 km, 1 ~111 km.
PRECISION_DECIMALS = {"exact": None, "city": 2, "region": 1, "country": 0}


class PhotoError(Exception):
    """One photo that cannot be geotagged; ``str(err)`` is the one-line reason written in its error row."""


@dataclasses.dataclass(frozen=True)
class PhotoFile:
    """A photo found by `discover`.

    Attributes:
        path: the path as written in the output (the input's spelling, normalised).
        rel: the path relative to the common root of all inputs, used to lay out ``--write-exif`` copies.
        explicit: named on the command line or in a list file (not found by a folder walk or glob).
    """

    path: str
    rel: str
    explicit: bool


@dataclasses.dataclass
class Discovery:
    """The outcome of `discover`: the photos in order and what was passed over."""

    photos: List[PhotoFile]
    root: Optional[str] = None
    skipped_not_photo: int = 0
    skipped_hidden: int = 0
    unreadable_folders: List[str] = dataclasses.field(default_factory=list)


def sniff(head: bytes) -> Optional[str]:
    """The image format the first bytes of a file announce, or None.

    Returns one of ``JPEG``, ``PNG``, ``WEBP``, ``BMP``, ``TIFF``, ``GIF``, ``HEIF``.
    """
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "HEIF"
    return None


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern is anchored at (its longest prefix without wildcards)."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts:
        if _has_glob_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.curdir


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_photo_candidate(path: str) -> bool:
    """Folder walks keep files with a photo extension, or whose content `sniff` recognises."""
    if os.path.splitext(path)[1].lower() in PHOTO_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return sniff(f.read(SNIFF_BYTES)) is not None
    except OSError:
        # Cannot tell (no permission, vanished): keep it so its row says why instead of dropping it silently.
        return True


class _Walker:
    def __init__(self):
        self.found: List[Tuple[str, str, bool]] = []  # (path, root, explicit)
        self.seen_paths = set()
        self.seen_dirs = set()
        self.result = Discovery(photos=[])

    def add_file(self, path: str, root: str, explicit: bool):
        path = os.path.normpath(path)
        key = os.path.abspath(path)
        if key in self.seen_paths:
            return
        self.seen_paths.add(key)
        self.found.append((path, root, explicit))

    def walk(self, folder: str, root: str):
        try:
            info = os.stat(folder)
        except OSError as err:
            self._unreadable(folder, err)
            return
        # A folder reached twice (symlink cycle or two links to it) is walked once.
        ident = (info.st_dev, info.st_ino)
        if ident in self.seen_dirs:
            logger.debug("already walked %s", folder)
            return
        self.seen_dirs.add(ident)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            self._unreadable(folder, err)
            return
        for entry in entries:
            if _is_hidden(entry.name):
                self.result.skipped_hidden += 1
                continue
            path = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir, is_file = False, True
            if is_dir:
                self.walk(path, root)
            elif is_file:
                if _is_photo_candidate(path):
                    self.add_file(path, root, explicit=False)
                else:
                    self.result.skipped_not_photo += 1
            # Broken symlinks, sockets and devices are not photos.
            else:
                self.result.skipped_not_photo += 1

    def _unreadable(self, folder: str, err: OSError):
        logger.warning("cannot read folder %s: %s", folder, err.strerror or err)
        self.result.unreadable_folders.append(folder)

    def add_input(self, item: str, *, from_list: Optional[str] = None):
        if item.startswith("@") and from_list is None:
            self.add_list(item[1:])
        elif os.path.isdir(item):
            self.walk(item, item)
        elif os.path.lexists(item):
            self.add_file(item, os.path.dirname(item) or os.curdir, explicit=True)
        elif _has_glob_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                logger.warning("no file matches %s", item)
            root = _glob_root(item)
            for match in matches:
                if any(_is_hidden(part) for part in os.path.relpath(match, root).split(os.sep)):
                    self.result.skipped_hidden += 1
                elif os.path.isdir(match):
                    self.walk(match, root)
                elif _is_photo_candidate(match):
                    self.add_file(match, root, explicit=False)
                else:
                    self.result.skipped_not_photo += 1
        elif from_list is not None:
            # A listed file that is gone still gets its row: the list promised it.
            self.add_file(item, os.path.dirname(item) or os.curdir, explicit=True)
        else:
            raise FileNotFoundError(f"input {item!r} is not a file, folder, glob or @list")

    def add_list(self, list_path: str):
        try:
            with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError as err:
            raise FileNotFoundError(f"cannot read list file {list_path!r}: {err.strerror or err}") from None
        base = os.path.dirname(list_path)
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # Relative entries are relative to the list file, so a list travels with its archive.
            self.add_input(os.path.join(base, line), from_list=list_path)


def discover(inputs: Sequence[str]) -> Discovery:
    """Expand command-line inputs into the photos to tag, in a deterministic order.

    Args:
        inputs: files, folders, glob patterns, or ``@list.txt`` (one file, folder or glob per line; relative
            lines are relative to the list's folder; blank lines and ``#`` comments are ignored).

    Files named explicitly (directly or in a list) are always kept, so that a non-photo among them gets an
    error row. Folder walks and globs keep files with a photo extension or photo content and count the rest
    as skipped; hidden files and folders (name starting with ``.``) are skipped there.

    Raises:
        FileNotFoundError: an input is neither an existing path, a glob nor a readable list.
    """
    walker = _Walker()
    for item in inputs:
        walker.add_input(item)
    photos = []
    if walker.found:
        common = os.path.commonpath([os.path.abspath(root) for _, root, _ in walker.found])
        for path, _, explicit in walker.found:
            photos.append(PhotoFile(path=path, rel=os.path.relpath(os.path.abspath(path), common), explicit=explicit))
        walker.result.root = common
    walker.result.photos = photos
    return walker.result


def _heif_opener():
    try:
        import pillow_heif
    except ImportError:
        return None
    return pillow_heif


def read_photo_bytes(path: str) -> bytes:
    """Read a photo's bytes, turning every failure into a `PhotoError` with the reason."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise PhotoError("is a folder, not a photo")
        with open(path, "rb") as f:
            data = f.read()
    except PhotoError:
        raise
    except FileNotFoundError:
        raise PhotoError("file not found") from None
    except PermissionError:
        raise PhotoError("unreadable: permission denied") from None
    except OSError as err:
        raise PhotoError(f"unreadable: {err.strerror or err}") from None
    if not data:
        raise PhotoError("empty file")
    return data


def load_photo(path: str, *, target: Optional[int] = None, target_side: str = "short", as_array: bool = False):
    """Read and decode one photo to an upright RGB ``PIL.Image``.

    Args:
        path: the file.
        target: smallest short side needed afterwards; JPEGs are decoded at reduced size down to it.
        target_side: ``"long"`` makes ``target`` the smallest long side instead (a longest-side resize).
        as_array: return an ``(H, W, 3)`` uint8 array instead (the transforms' input, no PIL copy).

    Raises:
        PhotoError: with the reason the photo cannot be used.
    """
    from geoswc.data.images import ImageDecodeError, decode_array, decode_image

    data = read_photo_bytes(path)
    kind = sniff(data[:SNIFF_BYTES])
    if kind is None:
        raise PhotoError("not a recognised image (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC)")
    if kind == "HEIF":
        heif = _heif_opener()
        if heif is None:
            raise PhotoError("HEIC/HEIF photo needs pillow-heif: pip install pillow-heif")
        heif.register_heif_opener()
    try:
        return (decode_array if as_array else decode_image)(data, target=target, target_side=target_side)
    except ImageDecodeError as err:
        raise PhotoError(f"{kind}: {err.reason}") from None


def round_latlon(lat: float, lon: float, precision: str) -> Tuple[float, float]:
    """Round a position to a publication precision (``exact``, ``city``, ``region``, ``country``).

    Raises:
        ValueError: unknown precision.
    """
    if precision not in PRECISION_DECIMALS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISION_DECIMALS)}")
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


def dms_to_degrees(dms: Iterable[Tuple[int, int]], ref: str) -> float:
    """Decode an EXIF GPS degrees/minutes/seconds triple and its N/S/E/W reference to signed degrees."""
    (d, dd), (m, md), (s, sd) = dms
    value = d / dd + m / md / 60 + s / sd / 3600
    return -value if ref in ("S", "W") else value


def gps_ifd(lat: float, lon: float, *, precision: str = "exact") -> dict:
    """The EXIF GPS IFD (piexif tag -> value) for a position."""
    import piexif

    decimals = PRECISION_DECIMALS[precision]
    return {
        piexif.GPSIFD.GPSVersionID: (2, 3, 0, 0),
        piexif.GPSIFD.GPSLatitudeRef: b"N" if lat >= 0 else b"S",
        piexif.GPSIFD.GPSLatitude: _dms_rationals(lat, decimals),
        piexif.GPSIFD.GPSLongitudeRef: b"E" if lon >= 0 else b"W",
        piexif.GPSIFD.GPSLongitude: _dms_rationals(lon, decimals),
        piexif.GPSIFD.GPSMapDatum: b"WGS-84",
    }


def write_gps_exif(source: str, dest: str, lat: float, lon: float, *, precision: str = "exact") -> None:
    """Write a copy of the JPEG ``source`` to ``dest`` with its GPS EXIF set to ``(lat, lon)``.

    The image data is copied byte for byte (no re-encoding); other EXIF fields are kept. The copy is written
    to a temporary name and renamed, so ``dest`` is either absent or complete.

    Raises:
        PhotoError: the source is not a JPEG or its EXIF cannot be rewritten.
    """
    import piexif

    data = read_photo_bytes(source)
    if sniff(data[:SNIFF_BYTES]) != "JPEG":
        raise PhotoError("EXIF copies are written for JPEG photos only")
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
    os.makedirs(os.path.dirname(dest) or os.curdir, exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(out.getvalue())
    os.replace(tmp, dest)
