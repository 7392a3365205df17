"""The review page of a tag run (``OUT.html``): counts by status, the EXIF check, near-duplicates, a map of the
placed photos on the offline basemap and the confidence histogram, in one self-contained file (the figures as
inline SVG, `geoswc.tagging.figures`).
"""

from __future__ import annotations

import os
from typing import Sequence

from geoswc.data.files import atomic_path
from geoswc.tagging.figures import histogram_svg, map_svg
from geoswc.tagging.files import os_errors
from geoswc.tagging.output import STATUSES, Row


def html_path(output: str) -> str:
    """The review page of a run: ``OUT.html`` beside ``OUT``."""
    return f"{output}.html"


def write_html_report(path: str, rows: Sequence[Row], summary: dict, *, min_confidence=None) -> None:
    """A self-contained review page (``OUT.html``): counts by status, the EXIF check, near-duplicates, a map
    of the placed photos on the offline basemap (`geoswc.data.basemap`) and the confidence histogram, as SVG
    in the page (no script, no file beside it). Written atomically.
    """
    import html

    counts = {status: 0 for status in STATUSES}
    for row in rows:
        counts[row["status"]] += 1
    map_figure, has_basemap = map_svg(rows)
    hist_figure = histogram_svg(rows, min_confidence)
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
        "svg{display:block}</style></head><body>",
        "<h1>geoswc tag: review</h1>",
        "<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>",
        "<h2>Rows by status</h2><table>" + table + "</table>",
        "<h2>Map</h2>",
        map_figure,
    ]
    if hist_figure:
        parts += ["<h2>Confidence</h2>", hist_figure]
    parts.append("</body></html>\n")
    with os_errors("write", path), atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
