"""The place-recognition report: ``report.md`` and a self-contained ``report.html`` in the style of the
evaluation report (`geoswc.eval.report`), with a recall@N curve and example queries beside their first
matches (green: within the positive radius, red: not)."""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from geoswc.data.images import decode_array
from geoswc.eval.report import _CSS, _figure, html_table

THUMB = (128, 96)
_GREEN, _RED, _GREY = (30, 150, 60), (200, 40, 40), (120, 120, 120)


def recall_curve_png(curve: Mapping[int, float], path: Path) -> Path:
    fig, axes = _figure(1, 1, (6.5, 4.0))
    ax = axes[0, 0]
    ns = sorted(curve)
    ax.plot(ns, [curve[n] for n in ns], marker="o", markersize=3)
    ax.set_xlabel("N (first N database photos)")
    ax.set_ylabel("recall@N (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _thumb(path: Path, colour) -> Image.Image:
    image = Image.fromarray(decode_array(path, target=THUMB[1])).convert("RGB")
    image.thumbnail(THUMB)
    canvas = Image.new("RGB", (THUMB[0] + 8, THUMB[1] + 8), colour)
    canvas.paste(image, (4 + (THUMB[0] - image.width) // 2, 4 + (THUMB[1] - image.height) // 2))
    return canvas


def examples_png(
    folder: Path,
    queries: Sequence[str],
    database: Sequence[str],
    predictions: np.ndarray,
    correct: np.ndarray,
    path: Path,
    *,
    per_side: int = 3,
    matches: int = 4,
) -> Path:
    """Rows of a query (grey frame) and its first ``matches`` results, for some right and wrong queries."""
    right = np.flatnonzero(correct[:, 0])[:per_side]
    wrong = np.flatnonzero(~correct[:, 0])[:per_side]
    rows = list(right) + list(wrong)
    cell_w, cell_h = THUMB[0] + 12, THUMB[1] + 12
    sheet = Image.new("RGB", (cell_w * (matches + 1), max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, q in enumerate(rows):
        sheet.paste(_thumb(folder / queries[q], _GREY), (0, r * cell_h))
        for m in range(min(matches, predictions.shape[1])):
            colour = _GREEN if correct[q, m] else _RED
            sheet.paste(_thumb(folder / database[predictions[q, m]], colour), ((m + 1) * cell_w, r * cell_h))
        draw.text((2, r * cell_h + THUMB[1] - 4), f"q{q}", fill=(255, 255, 255))
    sheet.save(path)
    return path


def _embed(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_vpr_report(
    out: Path, results: Mapping, figures: Mapping[str, Path], compact: Sequence[Mapping]
) -> None:
    """``report.md`` and ``report.html`` of ``results`` (the content of ``results.json``)."""
    esc = html.escape
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    recall_keys = [k for k in results if k.startswith("recall@")]
    title = f"Place recognition: {results['split']} split"
    header = ["measure", "value"]
    rows = [[k, f"{results[k]:.1f}"] for k in recall_keys]
    rows.append(["median distance of the first result (m)", f"{results['median_top1_m']:.1f}"])
    best = results["median_best_of_k_m"]
    for k in ("1", "5", "10", "20", "30"):
        if k in best:
            rows.append([f"median best-of-{k} distance (m)", f"{best[k]:.1f}"])
    compact_rows = [[c["mode"], f"{c['bytes_per_photo']:g}", f"{c['recall@1']:.1f}"] for c in compact]
    protocol = (
        f"Database photos: {results['n_database']}; queries: {results['n_queries']}. A query is right at N when "
        f"one of its first N database photos lies within {results['positive_radius_m']:g} m (UTM metres from the "
        "file names); queries without any such photo count as wrong. Test method: "
        f"{results['settings']['test_method']}."
    )
    md = [f"# {title}", "", f"Generated {generated}.", "", protocol, "", "| measure | value |", "|---|---|"]
    md += [f"| {a} | {b} |" for a, b in rows]
    if compact_rows:
        md += ["", "## Compact database codes", "", "| index | bytes per photo | recall@1 |", "|---|---|---|"]
        md += [f"| {a} | {b} | {c} |" for a, b, c in compact_rows]
    md += ["", "Figures: " + ", ".join(p.name for p in figures.values()), ""]
    (out / "report.md").write_text("\n".join(md))

    table = html_table

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Generated {esc(generated)}.</p>",
        "<h2>Recall and distances</h2>",
        table(header, rows),
    ]
    if compact_rows:
        parts += [
            "<h2>Compact database codes</h2>",
            table(["index", "bytes per photo", "recall@1"], compact_rows),
        ]
    parts += ["<h2>Protocol</h2>", f"<p>{esc(protocol)}</p>", "<h2>Figures</h2>"]
    captions = {
        "recall_curve": "recall@N against N",
        "examples": "queries (grey) and their first matches: green within the radius, red not",
    }
    for key, path in figures.items():
        caption = captions.get(key, key)
        parts.append(
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{_embed(path)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    parts += [
        "<h2>Settings</h2>",
        "<pre>" + esc(_settings_text(results["settings"])) + "</pre>",
        "</body></html>",
    ]
    (out / "report.html").write_text("\n".join(parts) + "\n")


def _settings_text(settings: Mapping) -> str:
    buf = io.StringIO()
    for key, value in settings.items():
        buf.write(f"{key}: {value}\n")
    return buf.getvalue()
