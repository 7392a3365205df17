"""The review page of a tag run (``OUT.html``): counts by status, the EXIF check, near-duplicates, a map of the
placed photos on the offline basemap and the confidence histogram, in one self-contained file.
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional, Sequence, Tuple

from geoswc.data.files import atomic_path
from geoswc.tagging.files import os_errors
from geoswc.tagging.output import STATUSES, Row


def html_path(output: str) -> str:
    """The review page of a run: ``OUT.html`` beside ``OUT``."""
    return f"{output}.html"


def _png_base64(fig) -> str:
    import base64

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _map_png(rows: Sequence[Row]) -> Tuple[str, bool]:
    """The placed photos (and the guesses of abstentions) on the offline basemap, as base64 PNG; whether the
    basemap was drawn."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2))
    try:
        from geoswc.data import basemap

        basemap.draw(ax, extent=(-180, 180, -90, 90))
        has_basemap = True
    except ImportError:
        has_basemap = False
    for status, colour, lat_key, lon_key in (
        ("ok", "#d62728", "lat", "lon"),
        ("abstain", "#1f77b4", "guess_lat", "guess_lon"),
    ):
        points = [
            (r[lat_key], r[lon_key]) for r in rows if r["status"] == status and r.get(lat_key) is not None
        ]
        if points:
            lat, lon = zip(*points)
            label = "placed" if status == "ok" else "abstained (best guess)"
            ax.scatter(lon, lat, s=6, c=colour, alpha=0.7, label=f"{label} ({len(points)})", zorder=5)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    data = _png_base64(fig)
    plt.close(fig)
    return data, has_basemap


def _histogram_png(rows: Sequence[Row], min_confidence: Optional[float]) -> Optional[str]:
    import matplotlib.pyplot as plt

    values = [
        r["confidence"]
        for r in rows
        if r["status"] in ("ok", "abstain")
        and isinstance(r.get("confidence"), float)
        and math.isfinite(r["confidence"])
    ]
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=20, range=(0.0, 1.0), color="#555")
    if min_confidence is not None:
        ax.axvline(
            min_confidence, color="#1f77b4", linestyle="--", label=f"--min-confidence {min_confidence}"
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("confidence (prediction density within 25 km)")
    ax.set_ylabel("photos")
    data = _png_base64(fig)
    plt.close(fig)
    return data


def write_html_report(path: str, rows: Sequence[Row], summary: dict, *, min_confidence=None) -> None:
    """A self-contained review page (``OUT.html``): counts by status, the EXIF check, near-duplicates, a map
    of the placed photos on the offline basemap (`geoswc.data.basemap`) and the confidence histogram, as
    PNGs embedded in the page. Written atomically.
    """
    import html

    import matplotlib

    matplotlib.use("Agg", force=False)
    counts = {status: 0 for status in STATUSES}
    for row in rows:
        counts[row["status"]] += 1
    map_png, has_basemap = _map_png(rows)
    hist_png = _histogram_png(rows, min_confidence)
    esc = html.escape
    table = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    facts = [f"{len(rows)} photos in {esc(os.path.basename(str(summary.get('output', ''))))}"]
    if summary.get("geotagged"):
        median = summary.get("exif_median_km")
        facts.append(
            f"{summary['geotagged']} photos carry EXIF GPS"
            + (f"; median distance to the prediction {median:.1f} km" if median is not None else "")
        )
    if summary.get("duplicates"):
        facts.append(f"{summary['duplicates']} photos in {summary['duplicate_groups']} near-duplicate groups")
    if not has_basemap:
        facts.append("basemap unavailable: the map shows the points alone")
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>geoswc tag: review</title>',
        "<style>body{font-family:sans-serif;margin:2em;max-width:64em}td{padding:0 1em}"
        "img{max-width:100%}</style></head><body>",
        "<h1>geoswc tag: review</h1>",
        "<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>",
        "<h2>Rows by status</h2><table>" + table + "</table>",
        "<h2>Map</h2>",
        f'<img alt="map of the placed photos" src="data:image/png;base64,{map_png}">',
    ]
    if hist_png:
        parts += [
            "<h2>Confidence</h2>",
            f'<img alt="confidence histogram" src="data:image/png;base64,{hist_png}">',
        ]
    parts.append("</body></html>\n")
    with os_errors("write", path), atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
