"""Equirectangular panoramas cut into rectilinear (gnomonic) views, written in the place-recognition layout.

Street View panoramas are the database of the city-scale thesis (``002_…``, section 3.4). Every panorama is
cut into views by `geoswc.data.gnomonic` (its conventions: the centre column looks along azimuth 0, azimuth
grows clockwise, the top row is the zenith) and each view is written as
``ROOT/images/SPLIT/PART/@UTM_east@UTM_north@zone@letter@lat@lon@pano@tile@heading@pitch@...@.jpg``
(`geoswc.data.vpr`) with the panorama's position.

- The **heading** of a direction is its compass bearing, degrees clockwise from north: ``heading = h0 + a``,
  where ``a`` is its azimuth in the panorama and ``h0`` the panorama's own heading (the compass bearing of its
  centre column, as Street View's metadata gives it), 0 unless given.
- View ``k`` of ``n`` looks along heading ``360 k / n`` (view 0 north, whatever the panorama's heading), so it
  reads the panorama at azimuth ``360 k / n - h0``.
- A position comes from a CSV ``file,lat,lon[,heading]``, else from a name already in the layout, else from
  the file's EXIF GPS; the panorama's heading from the CSV's ``heading``, else the name's ``heading`` field, else
  the file's XMP ``GPano:PoseHeadingDegrees`` (Google's Photo Sphere metadata, written by 360 cameras).

Each panorama is decoded once and its views are computed one at a time.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .discovery import discover
from .exif import gps_from_exif
from .gnomonic import check_equirectangular, render_view, view_headings
from .images import MAX_IMAGE_PIXELS, PhotoError, encode_jpeg, load_photo
from .regular_files import NotRegularFile, open_regular
from .utm import latlon_to_utm
from .validation import check_choice
from .vpr import PARTS, SPLITS, format_name, parse_name

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
# UTM, which names every photo of the layout, covers these latitudes.
UTM_LAT_RANGE = (-80.0, 84.0)
MAX_VIEW_SIDE = 16384
CSV_COLUMNS = "file,lat,lon[,heading]"
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_POSE_HEADING = re.compile(
    r"""PoseHeadingDegrees\s*=\s*["']\s*([-+0-9.eE]+)\s*["']|PoseHeadingDegrees>\s*([-+0-9.eE]+)\s*<"""
)


# --- positions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panorama:
    """A panorama to cut: where it was taken and which way its centre column looks.

    Attributes:
        path: the file.
        pano_id: the ``pano`` field of its views' names (letters, digits, ``._-``).
        lat, lon: degrees.
        heading_deg: compass heading of its centre column (0 unless its CSV row, its name or its XMP gives it).
        source: where the position came from: ``csv``, ``name`` or ``exif``.
        width, height: its size in pixels (upright).
    """

    path: Path
    pano_id: str
    lat: float
    lon: float
    heading_deg: float
    source: str
    width: int
    height: int


@dataclass(frozen=True)
class _Row:
    lat: float
    lon: float
    heading_deg: Optional[float]


def _csv_number(text: str, what: str, where: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {what} {text!r} is not a number") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{where}: {what} {text!r} is outside {low:g}..{high:g}")
    return value


def read_positions_csv(path: PathLike) -> Dict[str, _Row]:
    """Positions from a CSV with the header ``file,lat,lon[,heading]``, keyed by ``file``.

    ``file`` is a panorama's path relative to the folder given on the command line, or its name; ``heading`` is
    the compass heading of its centre column (empty: 0).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, a value that is not a number or out of range, a file listed twice
            (one line naming the CSV and its line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"positions CSV not found: {path}")
    try:
        with open_regular(path) as raw:
            text = raw.read().decode("utf-8-sig")
    except NotRegularFile as err:
        raise ValueError(f"{path}: {err.reason}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (expected a CSV {CSV_COLUMNS})") from None
    reader = csv.reader(text.splitlines())
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [name for name in ("file", "lat", "lon") if name not in header]
    if missing:
        raise ValueError(
            f"{path}: needs the columns {CSV_COLUMNS}; missing {', '.join(missing)} (found: {', '.join(header)})"
        )
    col = {name: header.index(name) for name in ("file", "lat", "lon", "heading") if name in header}
    rows: Dict[str, _Row] = {}
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        where = f"{path} line {line}"
        if len(values) < len(header):
            raise ValueError(f"{where}: {len(values)} values where the header has {len(header)}")
        key = values[col["file"]].strip().replace("\\", "/").removeprefix("./")
        if not key:
            raise ValueError(f"{where}: empty file name")
        if key in rows:
            raise ValueError(f"{where}: {key} is listed twice")
        heading_text = values[col["heading"]].strip() if "heading" in col else ""
        rows[key] = _Row(
            lat=_csv_number(values[col["lat"]].strip(), "lat", where, -90.0, 90.0),
            lon=_csv_number(values[col["lon"]].strip(), "lon", where, -180.0, 180.0),
            heading_deg=_csv_number(heading_text, "heading", where, -360.0, 360.0) if heading_text else None,
        )
    return rows


def xmp_heading(xmp: Union[bytes, str, None]) -> Optional[float]:
    """The ``GPano:PoseHeadingDegrees`` of an XMP packet (Google's Photo Sphere metadata: the compass heading of
    the panorama's centre), or None."""
    if not xmp:
        return None
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else str(xmp)
    found = _POSE_HEADING.search(text)
    if found is None:
        return None
    try:
        value = float(found.group(1) or found.group(2))
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) <= 360 else None


def _header(path: str) -> Tuple[int, int, Optional[Tuple[float, float]], Optional[float]]:
    """Upright size, EXIF GPS position and XMP heading of an image, from its header alone."""
    try:
        with open_regular(path) as raw, Image.open(raw) as image:
            width, height = image.size
            exif = image.getexif()
            if exif.get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn the image a quarter turn
                width, height = height, width
            xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
            return width, height, gps_from_exif(exif), xmp_heading(xmp)
    except NotRegularFile as err:
        raise ValueError(f"{path}: {err.reason}") from None
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"panorama not found: {path}") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: more than {MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _pano_id(text: str) -> str:
    return _ID_UNSAFE.sub("_", text).strip("_.") or "pano"


def _from_name(path: str) -> Optional[Tuple[float, float, Optional[float], str]]:
    """Position, heading and pano id of a file already named in the layout, or None."""
    name = os.path.basename(path)
    if not name.startswith("@"):
        return None
    try:
        parsed = parse_name(name)
    except ValueError:
        return None
    if not (math.isfinite(parsed.lat) and math.isfinite(parsed.lon)):
        return None
    pano = parsed.extra[0] if parsed.extra else ""
    heading = None
    if len(parsed.extra) > 2 and parsed.extra[2]:
        try:
            heading = float(parsed.extra[2])
        except ValueError:
            heading = None
        heading = heading if heading is not None and math.isfinite(heading) else None
    return parsed.lat, parsed.lon, heading, _pano_id(pano or os.path.splitext(name)[0])


def locate_panoramas(inputs: Sequence[str], positions_csv: Optional[PathLike] = None) -> List[Panorama]:
    """Find the panoramas among ``inputs`` (files, folders, globs) and where each was taken.

    A position comes from the CSV's row for the file (its path relative to the folder given, or its name), else
    from its name when it already follows the layout (``@east@north@zone@letter@lat@lon@pano@tile@heading@…``),
    else from its EXIF GPS. Only image headers are read.

    Raises:
        FileNotFoundError: an input or the CSV does not exist.
        ValueError: no panorama found, a panorama without a position, one that is not 2:1, two with the same id,
            a position UTM cannot express (one line naming the file).
    """
    found = discover([os.fspath(item) for item in inputs])
    if not found.photos:
        raise ValueError(f"no panoramas (images) found in {', '.join(map(str, inputs))}")
    rows = read_positions_csv(positions_csv) if positions_csv is not None else {}
    panoramas: List[Panorama] = []
    ids: Dict[str, str] = {}
    for photo in found.photos:
        width, height, gps, pose_heading = _header(photo.path)
        check_equirectangular(width, height, photo.path)
        rel = photo.rel.replace(os.sep, "/")
        stem = os.path.splitext(rel)[0]
        row = next(
            (rows[k] for k in (rel, photo.path.replace(os.sep, "/"), os.path.basename(rel)) if k in rows),
            None,
        )
        named = _from_name(photo.path)
        pano_id = named[3] if named else _pano_id(stem.replace("/", "_"))
        headings = (row.heading_deg if row else None, named[2] if named else None, pose_heading, 0.0)
        heading = next(h for h in headings if h is not None)
        if row is not None:
            lat, lon, source = row.lat, row.lon, "csv"
        elif named is not None:
            lat, lon, source = named[0], named[1], "name"
        elif gps is not None:
            (lat, lon), source = gps, "exif"
        else:
            where = f"no row in {positions_csv}, " if positions_csv is not None else ""
            raise ValueError(
                f"{photo.path}: no position ({where}no @UTM_east@UTM_north@zone@letter@lat@lon@… name, no EXIF "
                f"GPS); give it in a CSV --csv positions.csv ({CSV_COLUMNS})"
            )
        if not UTM_LAT_RANGE[0] <= lat <= UTM_LAT_RANGE[1]:
            raise ValueError(
                f"{photo.path}: latitude {lat:g} is outside UTM's range -80..84, which the layout's names need"
            )
        if pano_id in ids:
            raise ValueError(
                f"{photo.path} and {ids[pano_id]} both get the panorama id {pano_id!r}; rename one of them"
            )
        ids[pano_id] = photo.path
        panoramas.append(
            Panorama(
                path=Path(photo.path),
                pano_id=pano_id,
                lat=float(lat),
                lon=float(lon),
                heading_deg=float(heading) % 360.0,
                source=source,
                width=width,
                height=height,
            )
        )
    return panoramas


# --- writing ---------------------------------------------------------------------------------------------


def _check_options(views: int, fov_deg: float, pitch_deg: float, size: Tuple[int, int]) -> None:
    if int(views) != views or views < 1:
        raise ValueError(f"views must be a whole number >= 1, got {views}")
    if not 0 < fov_deg < 180:
        raise ValueError(
            f"fov must be in (0, 180) degrees (a gnomonic view shows less than a hemisphere), got {fov_deg}"
        )
    if not -90 < pitch_deg < 90:
        raise ValueError(f"pitch must be in (-90, 90) degrees, got {pitch_deg}")
    if len(size) != 2 or not all(1 <= int(s) <= MAX_VIEW_SIDE for s in size):
        raise ValueError(f"size must be HEIGHT WIDTH, each 1..{MAX_VIEW_SIDE} pixels, got {tuple(size)}")


def _prepare_folder(root: Path, split: str, part: str) -> Tuple[Path, List[Path]]:
    """The folder ``ROOT/images/SPLIT`` (made as needed) for ``PART``, and the folders made for it.

    Refuses a symbolic link anywhere on the way (none was made here) and a ``PART`` folder that holds files.
    """
    made: List[Path] = []
    missing = [p for p in reversed(root.absolute().parents) if not os.path.lexists(p)]
    for folder in missing:
        folder.mkdir()
        made.append(folder)
    folder = root
    for step in (None, "images", split):
        folder = folder if step is None else folder / step
        if folder.is_symlink():
            raise ValueError(f"{folder} is a symbolic link; refused (choose an output folder without links)")
        if not folder.exists():
            folder.mkdir()
            made.append(folder)
        elif not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; choose another output folder")
    target = folder / part
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link; refused (choose an output folder without links)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{target} exists and is not empty; choose another output folder, --split or --part "
            f"({', '.join(f'{s}/{p}' for s in SPLITS for p in PARTS)})"
        )
    return folder, made


def _write_new(path: Path, data: bytes) -> None:
    """Write a new file; an existing file or link at ``path`` is an error, never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _decode(panorama: Panorama) -> np.ndarray:
    try:
        pixels = load_photo(str(panorama.path), as_array=True)
    except PhotoError as err:
        raise ValueError(f"{panorama.path}: {err}") from None
    check_equirectangular(pixels.shape[1], pixels.shape[0], panorama.path)
    return pixels


def view_name(panorama: Panorama, *, tile: int, heading_deg: float, pitch_deg: float) -> str:
    """The layout's file name of view ``tile`` of ``panorama``, looking along ``heading_deg``."""
    east, north, zone, letter = latlon_to_utm(panorama.lat, panorama.lon)
    return format_name(
        float(east),
        float(north),
        zone=zone,
        letter=letter,
        lat=panorama.lat,
        lon=panorama.lon,
        pano=panorama.pano_id,
        tile=str(tile),
        heading=f"{heading_deg % 360.0:.2f}",
        pitch=f"{pitch_deg:.2f}",
    )


def cut_panoramas(
    inputs: Sequence[PathLike],
    out_root: PathLike,
    *,
    views: int = 12,
    fov_deg: float = 60.0,
    pitch_deg: float = 0.0,
    size: Tuple[int, int] = (480, 640),
    split: str = "test",
    part: str = "database",
    positions_csv: Optional[PathLike] = None,
    quality: int = 92,
    progress: bool = False,
) -> dict:
    """Cut every panorama into ``views`` views and write them to ``OUT/images/SPLIT/PART/``.

    Every input is located and checked (positions, 2:1 size) before anything is written. The ``PART`` folder is
    built beside its final place (a hidden temporary folder made here) and moved in when complete; it must not
    exist yet or be empty, and no symbolic link is followed on the way. A failure leaves no output behind.

    Args:
        inputs: panorama files, folders (searched recursively), or globs.
        out_root: the dataset's root ``OUT``.
        views: views per panorama, at headings ``360 k / views`` (view 0 north).
        fov_deg: horizontal field of view of a view.
        pitch_deg: upward tilt of every view.
        size: ``(height, width)`` of a view in pixels.
        split, part: where in the layout the views go.
        positions_csv: CSV ``file,lat,lon[,heading]`` (see `read_positions_csv`).
        quality: JPEG quality.
        progress: show a progress bar over the panoramas.

    Returns:
        A summary: ``folder``, ``panoramas``, ``views``, and ``sources`` (how many positions came from the CSV,
        from names and from EXIF).
    """
    from tqdm.auto import tqdm

    check_choice("split", split, SPLITS)
    check_choice("part", part, PARTS)
    _check_options(views, fov_deg, pitch_deg, size)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    views, size = int(views), (int(size[0]), int(size[1]))
    panoramas = locate_panoramas([os.fspath(p) for p in inputs], positions_csv)
    parent, made = _prepare_folder(Path(out_root), split, part)
    target = parent / part
    tmp = Path(tempfile.mkdtemp(prefix=f".{part}.", dir=parent))
    written = 0
    try:
        for panorama in tqdm(panoramas, desc="panoramas", unit="pano", disable=not progress):
            pixels = _decode(panorama)
            for tile, heading in enumerate(view_headings(views)):
                view = render_view(
                    pixels,
                    azimuth_deg=heading - panorama.heading_deg,
                    fov_deg=fov_deg,
                    size=size,
                    pitch_deg=pitch_deg,
                )
                name = view_name(panorama, tile=tile, heading_deg=heading, pitch_deg=pitch_deg)
                _write_new(tmp / name, encode_jpeg(view, quality=quality))
                written += 1
            del pixels
        os.chmod(tmp, 0o777 & ~_umask())
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    sources = {kind: sum(p.source == kind for p in panoramas) for kind in ("csv", "name", "exif")}
    logger.info("cut %d panoramas into %d views in %s", len(panoramas), written, target)
    return {"folder": str(target), "panoramas": len(panoramas), "views": written, "sources": sources}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "Panorama",
    "cut_panoramas",
    "locate_panoramas",
    "read_positions_csv",
    "view_name",
]
