"""WGS84 latitude/longitude <-> UTM (Universal Transverse Mercator), in metres.

The place-recognition datasets (Pitts30k, Tokyo 24/7, St Lucia, MSLS, SF-XL) name every photo by its UTM
easting and northing, and measure distances in metres as Euclidean distances between those coordinates. The
projection is the transverse Mercator series of Snyder, "Map Projections: A Working Manual" (USGS 1987,
pp. 61-64), on the WGS84 ellipsoid with scale factor 0.9996, false easting 500 km and false northing 10,000 km
south of the equator; zones are 6 degrees wide with the Norway and Svalbard exceptions.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

_A = 6378137.0
_E2 = 0.00669437999014  # first eccentricity squared of WGS84
_EP2 = _E2 / (1.0 - _E2)
_K0 = 0.9996
_LETTERS = "CDEFGHJKLMNPQRSTUVWXX"
_M1 = 1 - _E2 / 4 - 3 * _E2**2 / 64 - 5 * _E2**3 / 256
_M2 = 3 * _E2 / 8 + 3 * _E2**2 / 32 + 45 * _E2**3 / 1024
_M3 = 15 * _E2**2 / 256 + 45 * _E2**3 / 1024
_M4 = 35 * _E2**3 / 3072


def zone_number(lat: float, lon: float) -> int:
    """UTM zone of a point (1..60), with the exceptions of south-western Norway and Svalbard."""
    if not (-80.0 <= lat <= 84.0):
        raise ValueError(f"latitude {lat} is outside UTM's range -80..84 degrees")
    lon = ((lon + 180.0) % 360.0) - 180.0
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        return 32
    if 72.0 <= lat <= 84.0 and lon >= 0.0:
        for limit, zone in ((9.0, 31), (21.0, 33), (33.0, 35), (42.0, 37)):
            if lon < limit:
                return zone
    return int((lon + 180.0) // 6.0) % 60 + 1


def zone_letter(lat: float) -> str:
    """Latitude band letter (C..X, 8 degrees each; X spans 72..84)."""
    if not (-80.0 <= lat <= 84.0):
        raise ValueError(f"latitude {lat} is outside UTM's range -80..84 degrees")
    return _LETTERS[int((lat + 80.0) // 8.0)]


def _central_lon(zone: int) -> float:
    return (int(zone) - 1) * 6.0 - 180.0 + 3.0


def _meridian_arc(phi: np.ndarray) -> np.ndarray:
    return _A * (_M1 * phi - _M2 * np.sin(2 * phi) + _M3 * np.sin(4 * phi) - _M4 * np.sin(6 * phi))


def latlon_to_utm(lat, lon, *, zone: int | None = None) -> Tuple[np.ndarray, np.ndarray, int, str]:
    """Project degrees to UTM metres.

    Args:
        lat, lon: degrees (scalars or arrays of one shape).
        zone: force every point into this zone (e.g. a city that straddles two); default the first point's.

    Returns:
        ``(easting_m, northing_m, zone, letter)``; the letter is the first point's band.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    first_lat, first_lon = float(lat.flat[0]), float(lon.flat[0])
    zone = zone_number(first_lat, first_lon) if zone is None else int(zone)
    phi = np.radians(lat)
    dlam = np.radians(((lon - _central_lon(zone) + 180.0) % 360.0) - 180.0)
    sin, cos, tan = np.sin(phi), np.cos(phi), np.tan(phi)
    n = _A / np.sqrt(1 - _E2 * sin**2)
    t = tan**2
    c = _EP2 * cos**2
    a = cos * dlam
    east = _K0 * n * (a + (1 - t + c) * a**3 / 6 + (5 - 18 * t + t**2 + 72 * c - 58 * _EP2) * a**5 / 120)
    north = _K0 * (
        _meridian_arc(phi)
        + n
        * tan
        * (
            a**2 / 2
            + (5 - t + 9 * c + 4 * c**2) * a**4 / 24
            + (61 - 58 * t + t**2 + 600 * c - 330 * _EP2) * a**6 / 720
        )
    )
    north = np.where(lat < 0, north + 10_000_000.0, north)
    return east + 500_000.0, north, zone, zone_letter(first_lat)


def utm_to_latlon(east, north, zone: int, letter: str) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse projection: UTM metres of ``zone`` and band ``letter`` -> ``(lat, lon)`` in degrees."""
    letter = str(letter).upper()
    if not (1 <= int(zone) <= 60) or len(letter) != 1 or letter not in _LETTERS:
        raise ValueError(f"invalid UTM zone {zone!r}{letter!r}: zone 1..60, letter one of {_LETTERS[:-1]}")
    x = np.asarray(east, dtype=np.float64) - 500_000.0
    y = np.asarray(north, dtype=np.float64)
    if letter < "N":
        y = y - 10_000_000.0
    mu = y / _K0 / (_A * _M1)
    e1 = (1 - math.sqrt(1 - _E2)) / (1 + math.sqrt(1 - _E2))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * np.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * np.sin(4 * mu)
        + (151 * e1**3 / 96) * np.sin(6 * mu)
        + (1097 * e1**4 / 512) * np.sin(8 * mu)
    )
    sin, cos, tan = np.sin(phi1), np.cos(phi1), np.tan(phi1)
    n1 = _A / np.sqrt(1 - _E2 * sin**2)
    t1 = tan**2
    c1 = _EP2 * cos**2
    r1 = _A * (1 - _E2) / (1 - _E2 * sin**2) ** 1.5
    d = x / (n1 * _K0)
    phi = phi1 - (n1 * tan / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * _EP2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * _EP2 - 3 * c1**2) * d**6 / 720
    )
    lam = (
        d
        - (1 + 2 * t1 + c1) * d**3 / 6
        + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * _EP2 + 24 * t1**2) * d**5 / 120
    ) / cos
    return np.degrees(phi), _central_lon(int(zone)) + np.degrees(lam)
