"""Offline world basemap: Natural Earth 1:50m countries, land, coastlines and borders.

The geometry is Natural Earth's Admin 0 boundaries (version 4.1.0, public domain) as redistributed by the npm
package ``world-atlas@2.0.2`` (``countries-50m.json``, ISC licence, ``assets/countries-50m.LICENSE``). It is a
TopoJSON topology: every shared boundary is stored once as an *arc* (delta-encoded integer positions on a
quantisation grid) and each polygon ring lists the arcs it follows, ``~i`` meaning arc ``i`` reversed. This module
decodes it with numpy (no GIS dependency) for matplotlib maps; the web app (``geoswc.serve``) hands the same
file to the browser.

Public API: :func:`countries` (name, ISO 3166-1 numeric code and rings of every country), :func:`land` (the
merged land polygons with their holes), :func:`border_lines` (boundaries shared by two countries),
:func:`coastlines` and :func:`draw` (all of them on a matplotlib axes in lon/lat degrees).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ASSET", "border_lines", "coastlines", "countries", "draw", "land", "topology_json"]

#: The TopoJSON file inside ``geoswc.data``'s package data.
ASSET = "assets/countries-50m.json"

_WORLD_EXTENT_DEG = (-180.0, 180.0, -90.0, 90.0)
# Natural Earth closes Antarctica along latitude -89.999; that edge is not a coast.
_POLAR_EDGE_LAT_DEG = 89.99

Ring = np.ndarray  # (M, 2) lon/lat degrees, closed (first point == last point)
Polygon = List[Ring]  # exterior ring first, then its holes


def topology_json() -> bytes:
    """The raw TopoJSON file (what the web app serves to the browser)."""
    return resources.files("geoswc.data").joinpath(ASSET).read_bytes()


@lru_cache(maxsize=1)
def _topology() -> Tuple[dict, Tuple[np.ndarray, ...]]:
    topo = json.loads(topology_json())
    if topo.get("type") != "Topology":
        raise ValueError(f"{ASSET} is not a TopoJSON topology (type {topo.get('type')!r})")
    transform = topo.get("transform")
    arcs = []
    for arc in topo["arcs"]:
        xy = np.asarray(arc, dtype=np.float64).reshape(-1, 2)
        if transform is not None:
            # Quantised topologies store the first position absolutely and the rest as deltas.
            xy = np.cumsum(xy, axis=0) * np.asarray(transform["scale"]) + np.asarray(transform["translate"])
        xy.setflags(write=False)
        arcs.append(xy)
    return topo, tuple(arcs)


def _arc(arcs: Sequence[np.ndarray], index: int) -> np.ndarray:
    return arcs[index] if index >= 0 else arcs[~index][::-1]


def _ring(arcs: Sequence[np.ndarray], indices: Sequence[int]) -> Ring:
    # Consecutive arcs share their junction point; keep it once.
    parts = [_arc(arcs, i) if k == 0 else _arc(arcs, i)[1:] for k, i in enumerate(indices)]
    ring = np.concatenate(parts, axis=0)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    return ring


def _continuous(ring: Ring) -> Ring:
    """The ring with longitudes unwrapped so no step exceeds 180 degrees.

    Natural Earth rings that cross the antimeridian (Russia's Chukotka, Fiji) jump from 180 to -180; unwrapped
    they run past 180 instead and stay one planar polygon. A ring that goes once around the pole (Antarctica)
    cannot close that way: it is closed along the pole's parallel.
    """
    step = np.diff(ring[:, 0])
    if not (np.abs(step) > 180.0).any():
        return ring
    lon = ring[0, 0] + np.concatenate([[0.0], np.cumsum((step + 180.0) % 360.0 - 180.0)])
    # Where the ring starts is arbitrary: put the middle of its span within [-180, 180].
    lon = lon - 360.0 * round((lon.min() + lon.max()) / 720.0)
    out = np.column_stack([lon, ring[:, 1]])
    if abs(lon[-1] - lon[0]) > 180.0:
        pole_lat = -90.0 if ring[:, 1].mean() < 0 else 90.0
        out = np.vstack([out, [[lon[-1], pole_lat], [lon[0], pole_lat], out[0]]])
    return out


def _polygons(geometry: dict, arcs: Sequence[np.ndarray], continuous: bool = True) -> List[Polygon]:
    kind = geometry.get("type")
    fix = _continuous if continuous else (lambda ring: ring)
    if kind == "Polygon":
        return [[fix(_ring(arcs, r)) for r in geometry["arcs"]]]
    if kind == "MultiPolygon":
        return [[fix(_ring(arcs, r)) for r in polygon] for polygon in geometry["arcs"]]
    if kind is None:  # a null geometry (a feature without shape)
        return []
    raise ValueError(f"unsupported TopoJSON geometry {kind!r}; expected Polygon or MultiPolygon")


@lru_cache(maxsize=1)
def _countries() -> Tuple[Tuple[str, str, Tuple[Polygon, ...]], ...]:
    topo, arcs = _topology()
    out = []
    for geometry in topo["objects"]["countries"]["geometries"]:
        name = str(geometry.get("properties", {}).get("name", ""))
        out.append((name, str(geometry.get("id", "")), tuple(_polygons(geometry, arcs))))
    return tuple(out)


def countries() -> List[Tuple[str, str, List[np.ndarray]]]:
    """Every country of Natural Earth 1:50m (241, including dependencies and disputed areas).

    Returns:
        ``(name, iso_n3, rings)`` per country: the English name, the three-digit ISO 3166-1 numeric code as a
        string (``"528"``; empty for the few areas without one), and its rings as ``(M, 2)`` arrays of
        ``(lon, lat)`` degrees, closed (first point repeated last). Exterior rings and holes are listed
        together; use :func:`land` for polygons with their holes attached.
    """
    return [(name, iso, [ring for polygon in polys for ring in polygon]) for name, iso, polys in _countries()]


@lru_cache(maxsize=2)
def _land(continuous: bool = True) -> Tuple[Polygon, ...]:
    topo, arcs = _topology()
    out: List[Polygon] = []
    for geometry in topo["objects"]["land"]["geometries"]:
        out.extend(_polygons(geometry, arcs, continuous))
    return tuple(out)


def land() -> List[List[np.ndarray]]:
    """The land of the world as polygons: each a list of rings, the exterior first, then its holes (lakes
    and enclosed seas such as the Caspian), ``(M, 2)`` arrays of ``(lon, lat)`` degrees, continuous as in
    :func:`countries`."""
    return [list(polygon) for polygon in _land()]


def _split(line: np.ndarray) -> List[np.ndarray]:
    """Pieces of a polyline without its steps across the antimeridian and its runs along a pole's parallel
    (edges of the data, not of the land)."""
    step_ok = np.abs(np.diff(line[:, 0])) <= 180.0
    polar = np.abs(line[:, 1]) >= _POLAR_EDGE_LAT_DEG
    keep = step_ok & ~(polar[:-1] & polar[1:])
    pieces, start = [], 0
    for cut in np.flatnonzero(~keep):
        if cut + 1 - start >= 2:
            pieces.append(line[start : cut + 1])
        start = cut + 1
    if len(line) - start >= 2:
        pieces.append(line[start:])
    return pieces


def coastlines() -> List[np.ndarray]:
    """Every coastline as ``(M, 2)`` lon/lat polylines within [-180, 180] (cut at the antimeridian)."""
    return [piece for polygon in _land(False) for ring in polygon for piece in _split(ring)]


@lru_cache(maxsize=1)
def _border_arcs() -> Tuple[int, ...]:
    topo, _ = _topology()
    users: dict = {}
    for k, geometry in enumerate(topo["objects"]["countries"]["geometries"]):
        rings: Any = geometry.get("arcs", [])
        if geometry.get("type") == "Polygon":
            rings = [rings]
        for polygon in rings:
            for ring in polygon:
                for index in ring:
                    users.setdefault(index if index >= 0 else ~index, set()).add(k)
    # An arc followed by two different countries is the boundary between them; one used by a single country
    # is coast.
    return tuple(sorted(i for i, who in users.items() if len(who) > 1))


def border_lines() -> List[np.ndarray]:
    """Land boundaries between countries, as ``(M, 2)`` lon/lat polylines (each shared boundary once)."""
    _, arcs = _topology()
    return [piece for i in _border_arcs() for piece in _split(arcs[i])]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def draw(
    ax: Any,
    *,
    extent: Optional[Sequence[float]] = None,
    land: str = "#e8e4d8",
    borders: str = "#999",
    coast: str = "#8a8a8a",
    ocean: Optional[str] = None,
    zorder: float = 0.0,
) -> None:
    """Draw land, coastlines and country borders on a matplotlib axes whose x is longitude, y latitude.

    Args:
        ax: A matplotlib ``Axes`` in plain lon/lat degrees (equirectangular).
        extent: ``(lon_min, lon_max, lat_min, lat_max)`` degrees to show. ``None`` keeps the limits of what the
            axes already holds, or the whole world when it holds nothing yet.
        land: Fill colour of land; ``"none"`` draws only the lines.
        borders: Colour of the borders between countries; ``"none"`` leaves them out.
        coast: Colour of the coastlines; ``"none"`` leaves them out.
        ocean: Background colour of the axes, or ``None`` to leave it as it is.
        zorder: Drawing order of the basemap; the default keeps it below markers and lines drawn later or
            before.

    Raises:
        ValueError: If ``extent`` is not four numbers with ``lon_min < lon_max`` and ``lat_min < lat_max``.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path

    if extent is not None:
        extent = tuple(float(v) for v in extent)
        if len(extent) != 4 or not (extent[0] < extent[1] and extent[2] < extent[3]):
            raise ValueError(
                f"extent must be (lon_min, lon_max, lat_min, lat_max) with min < max, got {extent!r}"
            )
    elif ax.has_data():
        extent = (*ax.get_xlim(), *ax.get_ylim())
    else:
        extent = _WORLD_EXTENT_DEG

    if land != "none":
        vertices, codes = [], []
        polygons = []
        for polygon in _land():
            # Rings that run past the antimeridian are drawn again a world away, so both halves show.
            lon = np.concatenate([ring[:, 0] for ring in polygon])
            polygons.append(polygon)
            if lon.max() > 180.0:
                polygons.append([ring - (360.0, 0.0) for ring in polygon])
            if lon.min() < -180.0:
                polygons.append([ring + (360.0, 0.0) for ring in polygon])
        for polygon in polygons:
            for k, ring in enumerate(polygon):
                # matplotlib fills with the non-zero rule: holes must turn the other way from their exterior.
                clockwise = _signed_area(ring) < 0
                if clockwise != (k > 0):
                    ring = ring[::-1]
                vertices.append(ring)
                ring_codes = np.full(len(ring), Path.LINETO, dtype=Path.code_type)
                ring_codes[0], ring_codes[-1] = Path.MOVETO, Path.CLOSEPOLY
                codes.append(ring_codes)
        path = Path(np.concatenate(vertices), np.concatenate(codes))
        # add_artist, not add_patch: the limits are set below, and measuring 75k vertices for autoscaling
        # takes seconds.
        ax.add_artist(PathPatch(path, facecolor=land, edgecolor="none", zorder=zorder))
    for lines, colour, width, z in ((coastlines(), coast, 0.4, 0.01), (border_lines(), borders, 0.3, 0.02)):
        if colour == "none":
            continue
        shifted = list(lines)
        for shift_deg, beyond in ((360.0, extent[1] > 180.0), (-360.0, extent[0] < -180.0)):
            if beyond:
                shifted += [line + (shift_deg, 0.0) for line in lines]
        ax.add_collection(
            LineCollection(shifted, colors=colour, linewidths=width, zorder=zorder + z), autolim=False
        )
    if ocean is not None:
        ax.set_facecolor(ocean)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
