"""The dataset layout of visual place recognition (Pitts30k, Tokyo 24/7, St Lucia, MSLS, SF-XL).

As converted by the ecosystem's downloader (Berton et al., CVPR 2022, ``datasets_ws.py``)::

    ROOT/images/{train,val,test}/{database,queries}/**/@UTM_east@UTM_north@zone@letter@lat@lon@pano@tile
        @heading@pitch@roll@height@timestamp@note@.jpg

The position of a photo is in its name: UTM easting and northing in metres (fields 1 and 2), then the zone
number and band letter, latitude and longitude in degrees, and fields that may be empty. Distances are metres,
Euclidean between UTM coordinates, as the field computes them; the positives of a query are the database photos
within 25 m (`VprSplit.positives`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from geoswc.data.utm import latlon_to_utm, utm_to_latlon

SPLITS = ("train", "val", "test")
PARTS = ("database", "queries")
POSITIVE_RADIUS_M = 25.0
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
NAME_FIELDS = (
    "utm_east",
    "utm_north",
    "zone",
    "letter",
    "lat",
    "lon",
    "pano",
    "tile",
    "heading",
    "pitch",
    "roll",
    "height",
    "timestamp",
    "note",
)
NAME_FORMAT = "@" + "@".join(NAME_FIELDS) + "@.jpg"


@dataclass(frozen=True)
class VprName:
    """The fields of a place-recognition file name (empty strings where the name leaves them empty)."""

    utm_east: float
    utm_north: float
    zone: Optional[int]
    letter: str
    lat: float
    lon: float
    extra: Tuple[str, ...] = ()


def _number(text: str, what: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"malformed place-recognition file name {name}: {what} {text!r} is not a number"
        ) from None
    if not np.isfinite(value):
        raise ValueError(f"malformed place-recognition file name {name}: {what} {text!r} is not finite")
    return value


def parse_name(path: Union[str, os.PathLike]) -> VprName:
    """Read the position out of a file name ``@UTM_east@UTM_north@zone@letter@lat@lon@...@.jpg``.

    Raises:
        ValueError: the name does not follow the format (one line naming the file and the format).
    """
    name = os.path.basename(os.fspath(path))
    parts = name.split("@")
    if len(parts) < 4 or parts[0] != "":
        raise ValueError(f"malformed place-recognition file name {name}: expected {NAME_FORMAT}")
    east = _number(parts[1], "UTM easting", name)
    north = _number(parts[2], "UTM northing", name)
    zone_text = parts[3] if len(parts) > 3 else ""
    letter = parts[4].upper() if len(parts) > 4 else ""
    zone = None
    if zone_text:
        zone = int(_number(zone_text, "UTM zone", name))
        if not 1 <= zone <= 60:
            raise ValueError(f"malformed place-recognition file name {name}: UTM zone {zone} is not 1..60")
    lat = _number(parts[5], "latitude", name) if len(parts) > 5 and parts[5] else float("nan")
    lon = _number(parts[6], "longitude", name) if len(parts) > 6 and parts[6] else float("nan")
    if np.isnan(lat) and zone is not None and letter:
        lat_a, lon_a = utm_to_latlon(east, north, zone, letter)
        lat, lon = float(lat_a), float(lon_a)
    return VprName(east, north, zone, letter, lat, lon, tuple(parts[7:-1]))


def format_name(
    utm_east: float,
    utm_north: float,
    *,
    zone: int,
    letter: str,
    lat: float,
    lon: float,
    pano: str = "",
    tile: str = "",
    heading: str = "",
    pitch: str = "",
    note: str = "",
    suffix: str = ".jpg",
) -> str:
    """The file name of a photo at a position, in the layout's format (fields not given are left empty)."""
    fields = [
        f"{utm_east:.2f}",
        f"{utm_north:.2f}",
        str(int(zone)),
        str(letter),
        f"{lat:.5f}",
        f"{lon:.5f}",
        pano,
        tile,
        heading,
        pitch,
        "",
        "",
        "",
        note,
    ]
    return "@" + "@".join(fields) + "@" + suffix


@dataclass
class VprSplit:
    """One split of a place-recognition dataset: database and query photos with their positions.

    Attributes:
        folder: ``ROOT/images/SPLIT``; ``database`` and ``queries`` are paths relative to it, sorted.
        database_utm, queries_utm: ``(N, 2)`` easting, northing in metres.
        database_latlon, queries_latlon: ``(N, 2)`` degrees (NaN where a name gives neither lat/lon nor zone).
    """

    root: Path
    split: str
    folder: Path
    database: List[str]
    queries: List[str]
    database_utm: np.ndarray
    queries_utm: np.ndarray
    database_latlon: np.ndarray
    queries_latlon: np.ndarray
    zone: Optional[int] = None
    letter: str = ""
    _positives: dict = field(default_factory=dict, repr=False)

    def positives(self, radius_m: float = POSITIVE_RADIUS_M) -> List[np.ndarray]:
        """Indices of the database photos within ``radius_m`` metres of every query (sorted)."""
        key = float(radius_m)
        if key not in self._positives:
            self._positives[key] = positives_within(self.queries_utm, self.database_utm, key)
        return self._positives[key]

    def distances_m(self, query_idx: np.ndarray, database_idx: np.ndarray) -> np.ndarray:
        """Metres between queries and database photos, elementwise (broadcast)."""
        diff = self.queries_utm[np.asarray(query_idx)] - self.database_utm[np.asarray(database_idx)]
        return np.sqrt((diff**2).sum(axis=-1))


def positives_within(queries_utm: np.ndarray, database_utm: np.ndarray, radius_m: float) -> List[np.ndarray]:
    """For every query, the sorted indices of the database points within ``radius_m`` (inclusive)."""
    from sklearn.neighbors import NearestNeighbors

    if len(database_utm) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(queries_utm))]
    knn = NearestNeighbors().fit(np.asarray(database_utm, dtype=np.float64))
    found = knn.radius_neighbors(
        np.asarray(queries_utm, dtype=np.float64), radius=float(radius_m), return_distance=False
    )
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in found]


def split_folder(root: Union[str, os.PathLike], split: str) -> Path:
    """``ROOT/images/SPLIT`` (``ROOT`` may also be the ``images`` folder itself)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"place-recognition dataset folder not found: {root}")
    for base in (root / "images", root):
        if (base / split / "database").is_dir() or (base / split / "queries").is_dir():
            return base / split
    raise FileNotFoundError(
        f"{root} does not have the place-recognition layout: no images/{split}/database and "
        f"images/{split}/queries folders (expected ROOT/images/{{train,val,test}}/{{database,queries}}/{NAME_FORMAT})"
    )


def _photos(folder: Path) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(PHOTO_SUFFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder.parent))
    return sorted(p.replace(os.sep, "/") for p in found)


def _positions(paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, List[VprName]]:
    names = [parse_name(p) for p in paths]
    utm = np.array([(n.utm_east, n.utm_north) for n in names], dtype=np.float64).reshape(-1, 2)
    latlon = np.array([(n.lat, n.lon) for n in names], dtype=np.float64).reshape(-1, 2)
    return utm, latlon, names


def read_split(
    root: Union[str, os.PathLike],
    split: str = "test",
    *,
    radius_m: float = POSITIVE_RADIUS_M,
    require_positives: bool = True,
) -> VprSplit:
    """Read one split of the layout and check that it can be evaluated.

    Raises:
        FileNotFoundError: ``root`` lacks the layout or one of the two folders of the split.
        ValueError: a malformed file name (named), an empty database or query folder, or (with
            ``require_positives``) no query having any database photo within ``radius_m``.
    """
    folder = split_folder(root, split)
    parts = {}
    for part in PARTS:
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder} has no {part} folder (expected {folder / part})")
        parts[part] = _photos(folder / part)
        if not parts[part]:
            raise ValueError(
                f"{folder / part} holds no photos ({', '.join(PHOTO_SUFFIXES)}); nothing to evaluate"
            )
    db_utm, db_latlon, db_names = _positions(parts["database"])
    q_utm, q_latlon, _ = _positions(parts["queries"])
    zone = next((n.zone for n in db_names if n.zone is not None), None)
    letter = next((n.letter for n in db_names if n.letter), "")
    out = VprSplit(
        root=Path(root),
        split=split,
        folder=folder,
        database=parts["database"],
        queries=parts["queries"],
        database_utm=db_utm,
        queries_utm=q_utm,
        database_latlon=db_latlon,
        queries_latlon=q_latlon,
        zone=zone,
        letter=letter,
    )
    if require_positives and not any(len(p) for p in out.positives(radius_m)):
        raise ValueError(
            f"no query of {folder / 'queries'} has a database photo within {radius_m:g} m: recall would be 0 "
            "by construction (wrong split, or database and queries from different places?)"
        )
    return out


def utm_of(latlon: np.ndarray, zone: Optional[int] = None) -> Tuple[np.ndarray, int, str]:
    """UTM ``(N, 2)`` metres of ``(N, 2)`` degrees in one zone (the first point's unless given)."""
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    east, north, zone, letter = latlon_to_utm(latlon[:, 0], latlon[:, 1], zone=zone)
    return np.stack([east, north], axis=1), zone, letter
