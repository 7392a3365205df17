"""The review page's figures as inline SVG: the map of the placed photos on the offline basemap and the
confidence histogram.

SVG written as text needs no plotting library, so a tag run never loads matplotlib (about a second and 100 MB
on its own, more to draw the basemap's 60,000 land vertices). The basemap (`geoswc.data.basemap`, Natural Earth
1:50m) is drawn at the map's resolution: its vertices snapped to the map's pixels (0.36 degree at the page's
1000-pixel width, what the PNG of earlier versions showed) and repeated pixels dropped. Decoding the TopoJSON
takes about a second, so the drawn basemap is kept in the cache folder (`geoswc.data.files.cache_dir`)
under a digest of the asset and of this drawing's settings: a later run reads about 280 kB instead, and takes
it only if it is nothing but path elements of the attributes drawn here.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

# Changes whenever the drawing below changes, so a cached basemap of an earlier drawing is not reused.
_BASEMAP_DRAWING = "svg-px-1"
LAND = "#e8e4d8"
COAST = "#8a8a8a"
BORDERS = "#999"
TEXT = 'font-family="sans-serif" font-size="12" fill="#333"'
# Map: 1000 x 500 pixels of plot in a frame with room for the axis labels.
MAP_W, MAP_H, MAP_LEFT, MAP_TOP = 1000, 500, 48, 10
# What a cached basemap may hold: path elements with these attributes, their values plain words and numbers.
_CACHED_BASEMAP = re.compile(
    r'(?:<path(?: (?:fill|fill-rule|stroke|stroke-width|stroke-linejoin|vector-effect|d)="[-#0-9A-Za-z. ]*")+/>)+'
)
MARKERS = (
    ("ok", "#d62728", "lat", "lon", "placed"),
    ("abstain", "#1f77b4", "guess_lat", "guess_lon", "abstained (best guess)"),
)


def _fmt(value: float) -> str:
    """A number in SVG text: at most 4 decimals, no trailing zeros."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _to_px(lonlat: np.ndarray) -> np.ndarray:
    """(lon, lat) degrees -> whole pixels of the map (x right from -180, y down from 90)."""
    x = (lonlat[:, 0] + 180.0) * (MAP_W / 360.0)
    y = (90.0 - lonlat[:, 1]) * (MAP_H / 180.0)
    return np.round(np.column_stack([x, y])).astype(np.int64)


def _path_data(lines: Iterable[np.ndarray], *, closed: bool) -> str:
    """SVG path data of lon/lat polylines on the map's pixel grid: repeated pixels dropped, each line as its
    first point and relative steps (``M x y l dx dy ...``), so the 1:50m basemap stays a few hundred kB."""
    parts: List[str] = []
    for line in lines:
        xy = _to_px(line)
        keep = np.ones(len(xy), dtype=bool)
        keep[1:] = np.any(xy[1:] != xy[:-1], axis=1)
        xy = xy[keep]
        if len(xy) < (3 if closed else 2):
            continue
        steps = np.diff(xy, axis=0).ravel().tolist()
        parts.append(f"M{xy[0, 0]} {xy[0, 1]}l{' '.join(map(str, steps))}{'z' if closed else ''}")
    return "".join(parts)


def _land_rings() -> List[np.ndarray]:
    """Every ring of the land polygons, with a copy a world away of those that run past the antimeridian."""
    from geoswc.data import basemap

    rings = []
    for polygon in basemap.land():
        lon = np.concatenate([ring[:, 0] for ring in polygon])
        for shift in (0.0, -360.0 if lon.max() > 180.0 else None, 360.0 if lon.min() < -180.0 else None):
            if shift is not None:
                rings.extend(ring + (shift, 0.0) for ring in polygon)
    return rings


def draw_basemap() -> str:
    """The basemap as SVG elements in the map's pixels: land filled (holes by the even-odd rule), then
    coastlines and country borders."""
    from geoswc.data import basemap

    land = _path_data(_land_rings(), closed=True)
    coast = _path_data(basemap.coastlines(), closed=False)
    borders = _path_data(basemap.border_lines(), closed=False)
    line = 'fill="none" vector-effect="non-scaling-stroke" stroke-linejoin="round"'
    return (
        f'<path fill="{LAND}" fill-rule="evenodd" d="{land}"/>'
        f'<path {line} stroke="{COAST}" stroke-width="0.6" d="{coast}"/>'
        f'<path {line} stroke="{BORDERS}" stroke-width="0.4" d="{borders}"/>'
    )


def basemap_svg() -> str:
    """`draw_basemap`, read from the cache folder when an earlier run drew it (drawn and stored otherwise).

    Raises:
        OSError, ValueError: the basemap asset cannot be read or decoded.
    """
    from geoswc.data import basemap
    from geoswc.data.files import cache_dir
    from geoswc.engines.graphs import read_bytes, write_atomically

    digest = hashlib.blake2b(basemap.topology_json(), digest_size=16)
    digest.update(f"{_BASEMAP_DRAWING}:{MAP_W}x{MAP_H}".encode())
    path = cache_dir() / "basemap" / f"{digest.hexdigest()}.svg"
    cached = (read_bytes(path) or b"").decode("utf-8", errors="replace")
    if _CACHED_BASEMAP.fullmatch(cached):
        return cached
    drawn = draw_basemap()
    if write_atomically(path, drawn.encode("utf-8")):
        logger.debug("basemap drawing stored in %s", path)
    return drawn


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def map_points(rows: Sequence[dict]) -> List[Tuple[str, str, List[Tuple[float, float]]]]:
    """``(colour, label, [(lat, lon), ...])`` of the placed photos and of the guesses of abstentions."""
    out = []
    for status, colour, lat_key, lon_key, label in MARKERS:
        points = [
            (float(r[lat_key]), float(r[lon_key]))
            for r in rows
            if r["status"] == status and _finite(r.get(lat_key)) and _finite(r.get(lon_key))
        ]
        if points:
            out.append((colour, f"{label} ({len(points)})", points))
    return out


def _ticks(values: Sequence[float], to_px, *, axis: str, length: int = 4) -> str:
    parts = []
    for v in values:
        p = to_px(v)
        label = _fmt(v)
        if axis == "x":
            parts.append(f'<line x1="{p:.1f}" x2="{p:.1f}" y1="0" y2="{length}" stroke="#333"/>')
            parts.append(f'<text x="{p:.1f}" y="{length + 13}" text-anchor="middle" {TEXT}>{label}</text>')
        else:
            parts.append(f'<line x1="{-length}" x2="0" y1="{p:.1f}" y2="{p:.1f}" stroke="#333"/>')
            parts.append(f'<text x="{-length - 3}" y="{p + 4:.1f}" text-anchor="end" {TEXT}>{label}</text>')
    return "".join(parts)


def _legend(entries: Sequence[Tuple[str, str]], x: float, y: float, *, dashed: bool = False) -> str:
    """A legend box at (x, y) (top left), one line per ``(colour, label)``."""
    if not entries:
        return ""
    width = 24 + 7 * max(len(label) for _, label in entries)
    parts = [
        f'<rect x="{x}" y="{y}" width="{width}" height="{8 + 16 * len(entries)}" fill="#fff" '
        'fill-opacity="0.8" stroke="#ccc"/>'
    ]
    for k, (colour, label) in enumerate(entries):
        cy = y + 12 + 16 * k
        if dashed:
            mark = (
                f'<line x1="{x + 4}" x2="{x + 16}" y1="{cy}" y2="{cy}" stroke="{colour}" '
                'stroke-dasharray="4 2" stroke-width="1.5"/>'
            )
        else:
            mark = f'<circle cx="{x + 10}" cy="{cy}" r="3" fill="{colour}"/>'
        parts.append(mark + f'<text x="{x + 20}" y="{cy + 4}" {TEXT}>{html.escape(label)}</text>')
    return "".join(parts)


def map_svg(rows: Sequence[dict]) -> Tuple[str, bool]:
    """The placed photos (red) and the guesses of abstentions (blue) on the basemap, as an ``<svg>`` element;
    whether the basemap was drawn (False when its asset cannot be read: the points alone)."""
    try:
        background, has_basemap = basemap_svg(), True
    except (OSError, ValueError) as err:
        logger.warning("basemap unavailable (%s); the map shows the points alone", err)
        background, has_basemap = "", False

    def x_px(lon: float) -> float:
        return (lon + 180.0) / 360.0 * MAP_W

    def y_px(lat: float) -> float:
        return (90.0 - lat) / 180.0 * MAP_H

    groups = map_points(rows)
    markers = []
    for colour, label, points in groups:
        circles = "".join(
            f'<circle cx="{x_px(lon):.2f}" cy="{y_px(lat):.2f}" r="2.2"/>' for lat, lon in points
        )
        markers.append(f'<g fill="{colour}" fill-opacity="0.7" class="photos">{circles}</g>')
    width, height = MAP_LEFT + MAP_W + 10, MAP_TOP + MAP_H + 40
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="map of the placed photos" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" style="max-width:100%;height:auto">'
        f'<g transform="translate({MAP_LEFT},{MAP_TOP})">'
        f'<svg width="{MAP_W}" height="{MAP_H}" viewBox="0 0 {MAP_W} {MAP_H}">'
        f'<rect width="{MAP_W}" height="{MAP_H}" fill="#fff"/>'
        f"{background}{''.join(markers)}</svg>"
        f'<rect width="{MAP_W}" height="{MAP_H}" fill="none" stroke="#333"/>'
        f'<g transform="translate(0,{MAP_H})">{_ticks(range(-180, 181, 60), x_px, axis="x")}</g>'
        f"{_ticks(range(-90, 91, 30), y_px, axis='y')}"
        f"{_legend([(colour, label) for colour, label, _ in groups], 8, MAP_H - 12 - 16 * len(groups))}"
        f'<text x="{MAP_W / 2}" y="{MAP_H + 34}" text-anchor="middle" {TEXT}>longitude (deg)</text>'
        f'<text transform="translate(-36,{MAP_H / 2}) rotate(-90)" text-anchor="middle" {TEXT}>'
        "latitude (deg)</text></g></svg>",
        has_basemap,
    )


def confidences(rows: Sequence[dict]) -> List[float]:
    """The finite confidences of the placed and abstained rows (what the histogram counts)."""
    return [
        r["confidence"]
        for r in rows
        if r["status"] in ("ok", "abstain")
        and isinstance(r.get("confidence"), float)
        and math.isfinite(r["confidence"])
    ]


def histogram_counts(values: Sequence[float], bins: int = 20) -> np.ndarray:
    """Photos per confidence bin over [0, 1] (the last bin closed, as numpy's histogram)."""
    return np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(0.0, 1.0))[0]


def histogram_svg(rows: Sequence[dict], min_confidence: Optional[float]) -> Optional[str]:
    """The histogram of the rows' confidence in 20 bins over [0, 1] as an ``<svg>`` element, ``--min-confidence``
    marked; None when no row has a confidence."""
    values = confidences(rows)
    if not values:
        return None
    counts = histogram_counts(values)
    plot_w, plot_h, left, top = 520, 220, 52, 10
    top_count = max(1, int(counts.max()))
    step = max(1, math.ceil(top_count / 5))
    y_max = step * math.ceil(top_count / step)

    def x_px(v: float) -> float:
        return v * plot_w

    def y_px(count: float) -> float:
        return plot_h - count / y_max * plot_h

    bar_w = plot_w / len(counts)
    bars = "".join(
        f'<rect x="{k * bar_w:.1f}" y="{y_px(c):.1f}" width="{bar_w:.1f}" height="{plot_h - y_px(c):.1f}" '
        f'data-count="{int(c)}"/>'
        for k, c in enumerate(counts.tolist())
        if c
    )
    marker = legend = ""
    if min_confidence is not None and 0.0 <= min_confidence <= 1.0:
        p = x_px(min_confidence)
        marker = (
            f'<line x1="{p:.1f}" x2="{p:.1f}" y1="0" y2="{plot_h}" stroke="#1f77b4" stroke-width="1.5" '
            'stroke-dasharray="4 2"/>'
        )
    if min_confidence is not None:
        legend = _legend([("#1f77b4", f"--min-confidence {min_confidence}")], 8, 8, dashed=True)
    width, height = left + plot_w + 16, top + plot_h + 42
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="confidence histogram" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" style="max-width:100%;height:auto">'
        f'<g transform="translate({left},{top})"><g fill="#555" class="bars">{bars}</g>{marker}'
        f'<rect width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>'
        f'<g transform="translate(0,{plot_h})">'
        f"{_ticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], x_px, axis='x')}</g>"
        f"{_ticks(range(0, y_max + 1, step), y_px, axis='y')}{legend}"
        f'<text x="{plot_w / 2}" y="{plot_h + 34}" text-anchor="middle" {TEXT}>'
        "confidence (prediction density within 25 km)</text>"
        f'<text transform="translate(-40,{plot_h / 2}) rotate(-90)" text-anchor="middle" {TEXT}>photos</text>'
        "</g></svg>"
    )
