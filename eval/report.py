"""The evaluation report: the paper's Table 1 layout (ICMR 2021, section 5) with curves, maps and provenance.

`write_report` writes ``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG, no
external assets, opens offline) plus the PNGs themselves. `write_results_json` / `read_results_json` store
``{mode: score_dict}`` as produced by :func:`geoswc.eval.metrics.score_predictions`.

matplotlib is imported inside the drawing functions so that ``import geoswc.eval`` stays light.
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from geoswc.data.files import read_json_object
from geoswc.eval.benchmarks import normalize_image_ids, standardize_locations
from geoswc.eval.metrics import EARTH_RADIUS_KM, RADII_KM, haversine_km, radius_key
from geoswc.eval.report_extras import draw_coverage, extra_sections

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOL", "write_report", "write_results_json", "read_results_json", "cell_statistics"]

PROTOCOL = (
    f"Distances are great-circle distances by the haversine formula on a sphere of radius R = {EARTH_RADIUS_KM:g} km "
    "(the convention of the published results this table is compared with). A photo is correct at radius r when "
    "its distance is <= r. Accuracy is the percentage of all ground-truth photos: a photo without a prediction "
    "is counted as missing and as wrong at every radius. Median and mean error are over the photos with a "
    "prediction."
)
_SCORE_KEYS = ("n_truth", "n_scored", "n_missing", "accuracy", "median_km", "mean_km")
_MAX_MAP_LINES = 300
PathLike = Union[str, os.PathLike]


def write_results_json(path: PathLike, results: Mapping[str, Mapping]) -> Path:
    """Writes ``{mode: score_dict}`` as JSON (indented, modes in the given order)."""
    for mode, res in results.items():
        _check_score(mode, res, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    return path


def read_results_json(path: PathLike) -> dict[str, dict]:
    """Reads a ``results.json`` written by :func:`write_results_json` (or by ``geoswc evaluate``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or a mode whose value is not a score dict.
    """
    path = Path(path)
    results = read_json_object(path, what="an object {mode: scores}")
    for mode, res in results.items():
        _check_score(mode, res, str(path))
    return results


def _check_score(mode, res, source: str) -> None:
    if not isinstance(res, Mapping) or any(k not in res for k in _SCORE_KEYS):
        raise ValueError(f"{source}: mode {mode!r} is not a score dict with keys {', '.join(_SCORE_KEYS)}")
    if not isinstance(res["accuracy"], Mapping):
        raise ValueError(f"{source}: mode {mode!r}: 'accuracy' must map radius (km) to percent")


def cell_statistics(geocells) -> list[dict]:
    """Per granularity: name, number of cells, photos, and min / median / max photos per cell."""
    stats = []
    for partition in geocells.partitions:
        counts = np.asarray(partition.counts)
        stats.append(
            {
                "name": str(partition.name),
                "cells": int(counts.size),
                "photos": int(counts.sum()),
                "min": int(counts.min()) if counts.size else 0,
                "median": float(np.median(counts)) if counts.size else 0.0,
                "max": int(counts.max()) if counts.size else 0,
            }
        )
    return stats


def write_report(
    out_dir: PathLike,
    results: Mapping[str, Mapping],
    *,
    predictions: Optional[Mapping[str, pd.DataFrame]] = None,
    truth: Optional[pd.DataFrame] = None,
    geocells=None,
    commands: Sequence[str] = (),
    config: Optional[Mapping] = None,
    title: str = "geoswc evaluation",
    benchmark: Optional[str] = None,
) -> dict[str, Path]:
    """Writes the evaluation report into ``out_dir``.

    Args:
        out_dir: folder for ``report.md``, ``report.html`` and the PNGs (created if needed).
        results: ``{mode: score_dict}``, e.g. ``{"hc": ..., "hc+rrm": ...}``, in table order.
        predictions: ``{mode: DataFrame IMG_ID, LAT, LON}``; with ``truth`` gives exact accuracy-versus-distance
            curves and the map of predictions against ground truth.
        truth: ground truth ``IMG_ID, LAT, LON``.
        geocells: an object with ``.partitions``, each with ``.centers_deg (n, 2)``, ``.counts`` and ``.name``;
            adds the cell map and the per-granularity statistics.
        commands: the exact command lines that produced the results.
        config: the resolved configuration (written as JSON).
        title: the report's heading.
        benchmark: a benchmark the paper reports (``im2gps``, ``im2gps3k``, ``yfcc4k``): its published rows
            are put beside the measured ones.

    Returns:
        ``{"markdown", "html", "curve", "map_predictions"?, "map_cells"?, "map_interactive"?}`` -> written paths.
    """
    if not results:
        raise ValueError("results is empty: nothing to report")
    for mode, res in results.items():
        _check_score(mode, res, "results")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = dict(predictions or {})
    unknown = [m for m in predictions if m not in results]
    if unknown:
        raise ValueError(f"predictions for modes without results: {unknown}; modes: {list(results)}")

    distances = {}
    if truth is not None and predictions:
        distances = _distances_by_mode(predictions, truth)

    written: dict[str, Path] = {}
    figures: list[tuple[str, str, str]] = []  # (key, file name, caption)
    written["curve"] = _save(_draw_curves(results, distances), out_dir / "accuracy_curve.png")
    figures.append(("curve", "accuracy_curve.png", "Accuracy versus distance (log scale) for every mode."))
    if distances:
        written["map_predictions"] = _save(_draw_prediction_map(distances), out_dir / "map_predictions.png")
        figures.append(
            (
                "map_predictions",
                "map_predictions.png",
                "Predictions against ground truth (equirectangular lon/lat): black = ground truth, coloured = "
                f"prediction by error; up to {_MAX_MAP_LINES} pairs joined by a line.",
            )
        )
    stats = []
    if geocells is not None:
        stats = cell_statistics(geocells)
        written["map_cells"] = _save(_draw_cell_map(geocells), out_dir / "map_cells.png")
        figures.append(
            ("map_cells", "map_cells.png", "Cell centres per granularity, coloured by photos per cell.")
        )
    coverage = draw_coverage(results)
    if coverage is not None:
        written["coverage"] = _save(coverage, out_dir / "coverage_curve.png")
        figures.append(
            (
                "coverage",
                "coverage_curve.png",
                "Selective prediction: accuracy as the least confident photos are set aside.",
            )
        )
    if distances and importlib.util.find_spec("folium") is not None:
        written["map_interactive"] = _write_folium_map(distances, out_dir / "map_interactive.html")

    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = _sections(results, stats, commands, config)
    sections["extra"] = extra_sections(results, benchmark)
    written["markdown"] = out_dir / "report.md"
    written["markdown"].write_text(_markdown(title, generated, sections, figures, written))
    written["html"] = out_dir / "report.html"
    written["html"].write_text(_html(title, generated, sections, figures, written))
    logger.info("wrote report to %s", written["html"])
    return written


# ---------------------------------------------------------------------------------------------------------------
# Content shared by the Markdown and the HTML versions.


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _sections(results, stats, commands, config) -> dict:
    radii = [radius_key(r) for r in RADII_KM]
    header = ["mode"] + [f"{r} km" for r in radii] + ["median km", "mean km", "n evaluated", "missing"]
    rows = []
    for mode, res in results.items():
        acc = res["accuracy"]
        rows.append(
            [str(mode)]
            + [_fmt(acc.get(r), ".1f") for r in radii]
            + [
                _fmt(res["median_km"], ".1f"),
                _fmt(res["mean_km"], ".1f"),
                str(res["n_scored"]),
                str(res["n_missing"]),
            ]
        )
    cell_rows = [
        [s["name"], str(s["cells"]), str(s["photos"]), str(s["min"]), f"{s['median']:g}", str(s["max"])]
        for s in stats
    ]
    return {
        "table": (header, rows),
        "n_truth": sorted({int(res["n_truth"]) for res in results.values()}),
        "cells": (["granularity", "cells", "photos", "min / cell", "median / cell", "max / cell"], cell_rows),
        "commands": list(commands),
        "config": None if config is None else json.dumps(config, indent=2, default=str, sort_keys=False),
    }


def _markdown(title, generated, sections, figures, written) -> str:
    def table(header, rows):
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    n_truth = ", ".join(map(str, sections["n_truth"]))
    parts = [
        f"# {title}",
        "",
        f"Generated {generated}. Ground-truth photos: {n_truth}.",
        "",
        "## Accuracy (%) at each radius",
        "",
        table(*sections["table"]),
        "",
    ]
    for heading, header, rows, note in sections.get("extra", []):
        parts += [f"## {heading}", "", table(header, rows), "", note, ""]
    parts += [
        "## Protocol",
        "",
        PROTOCOL,
        "",
    ]
    parts += ["## Figures", ""]
    for _, name, caption in figures:
        parts += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if "map_interactive" in written:
        parts += [
            "Interactive map (needs a network connection for its tiles): "
            f"[{written['map_interactive'].name}]({written['map_interactive'].name})",
            "",
        ]
    if sections["cells"][1]:
        parts += ["## Cells per granularity", "", table(*sections["cells"]), ""]
    parts += ["## Provenance", ""]
    if sections["commands"]:
        parts += ["Commands:", "", "```bash", *sections["commands"], "```", ""]
    if sections["config"] is not None:
        parts += ["Configuration:", "", "```json", sections["config"], "```", ""]
    if not sections["commands"] and sections["config"] is None:
        parts += ["No commands or configuration were recorded.", ""]
    return "\n".join(parts)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""


def html_table(header, rows) -> str:
    """An HTML table of text cells (escaped), the first column a label and the others numbers."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{'' if i == 0 else ' class=num'}>{esc(str(c))}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(title, generated, sections, figures, written) -> str:
    esc = html.escape
    table = html_table

    n_truth = ", ".join(map(str, sections["n_truth"]))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Generated {esc(generated)}. Ground-truth photos: {esc(n_truth)}.</p>",
        "<h2>Accuracy (%) at each radius</h2>",
        table(*sections["table"]),
    ]
    for heading, header, rows, note in sections.get("extra", []):
        parts += [f"<h2>{esc(heading)}</h2>", table(header, rows), f"<p>{esc(note)}</p>"]
    parts += [
        "<h2>Protocol</h2>",
        f"<p>{esc(PROTOCOL)}</p>",
        "<h2>Figures</h2>",
    ]
    for key, _, caption in figures:
        data = base64.b64encode(written[key].read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    if "map_interactive" in written:
        parts.append(
            f"<p>Interactive map (a separate file that loads map tiles online): "
            f"{esc(written['map_interactive'].name)}</p>"
        )
    if sections["cells"][1]:
        parts += ["<h2>Cells per granularity</h2>", table(*sections["cells"])]
    parts.append("<h2>Provenance</h2>")
    if sections["commands"]:
        parts.append("<p>Commands:</p><pre>" + esc("\n".join(sections["commands"])) + "</pre>")
    if sections["config"] is not None:
        parts.append("<p>Configuration:</p><pre>" + esc(sections["config"]) + "</pre>")
    if not sections["commands"] and sections["config"] is None:
        parts.append("<p>No commands or configuration were recorded.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Figures.


def _distances_by_mode(predictions, truth) -> dict[str, dict]:
    """Per mode: truth and predicted positions of matched photos, their error in km, and the truth count."""
    truth = standardize_locations(truth, source="ground truth")
    truth_keys = normalize_image_ids(truth["IMG_ID"])
    truth_pos = pd.DataFrame(
        {"LAT": truth["LAT"].to_numpy(), "LON": truth["LON"].to_numpy()}, index=truth_keys
    )
    out = {}
    for mode, pred in predictions.items():
        pred = standardize_locations(pred, source=f"predictions of {mode!r}", allow_empty=True)
        pred_pos = pd.DataFrame(
            {"LAT": pred["LAT"].to_numpy(), "LON": pred["LON"].to_numpy()},
            index=normalize_image_ids(pred["IMG_ID"]),
        )
        matched = pred_pos.reindex(truth_pos.index)
        ok = matched["LAT"].notna().to_numpy()
        t = truth_pos.to_numpy()[ok]
        p = matched.to_numpy()[ok]
        out[mode] = {
            "truth_deg": t,
            "pred_deg": p,
            "error_km": haversine_km(t[:, 0], t[:, 1], p[:, 0], p[:, 1]),
            "n_truth": len(truth_pos),
        }
    return out


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _figure(nrows: int, ncols: int, figsize):
    # A bare Figure renders through Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _draw_curves(results, distances):
    fig, axes = _figure(1, 1, (7.5, 4.5))
    ax = axes[0, 0]
    grid_km = np.logspace(-2, np.log10(20038.0), 400)  # up to half the circumference
    for mode, res in results.items():
        if mode in distances:
            d = distances[mode]
            curve = 100.0 * np.searchsorted(np.sort(d["error_km"]), grid_km, side="right") / d["n_truth"]
            (line,) = ax.plot(grid_km, curve, label=str(mode))
            color = line.get_color()
        else:
            color = None
        keys = [k for k in res["accuracy"]]
        x = np.array([float(k) for k in keys])
        y = np.array([res["accuracy"][k] for k in keys], dtype=float)
        order = np.argsort(x)
        ax.plot(
            x[order],
            y[order],
            "o" if mode in distances else "o-",
            color=color,
            ms=4,
            label=None if mode in distances else str(mode),
        )
    for r in RADII_KM:
        ax.axvline(r, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(0.05, 20038.0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("distance r (km, log scale)")
    ax.set_ylabel("photos within r (%)")
    ax.set_title(f"Accuracy versus distance (R = {EARTH_RADIUS_KM:g} km, correct when <= r)")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _world_axes(ax):
    """A plate carrée world map: the offline Natural Earth basemap (land, coastlines, borders) under a
    graticule."""
    from geoswc.data import basemap

    basemap.draw(ax, extent=(-180.0, 180.0, -90.0, 90.0), ocean="#eef4f8", zorder=0)
    ax.set_aspect("equal")
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.grid(color="0.75", lw=0.4, alpha=0.6)
    ax.tick_params(labelsize=7)


def _draw_prediction_map(distances):
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    modes = list(distances)
    ncols = 1 if len(modes) == 1 else 2
    nrows = -(-len(modes) // ncols)
    fig, axes = _figure(nrows, ncols, (7.5 * ncols, 4.0 * nrows))
    norm = LogNorm(vmin=0.1, vmax=20038.0)
    mappable = None
    for ax, mode in zip(axes.ravel(), modes):
        d = distances[mode]
        _world_axes(ax)
        t, p, err = d["truth_deg"], d["pred_deg"], np.maximum(d["error_km"], 0.1)
        # Segments that would cross the antimeridian are left out rather than drawn across the whole map.
        short = np.abs(t[:, 1] - p[:, 1]) <= 180.0
        # A few hundred connecting lines show the error pattern; thousands only grey the map out.
        if short.sum() > _MAX_MAP_LINES:
            keep = np.random.default_rng(0).choice(np.flatnonzero(short), _MAX_MAP_LINES, replace=False)
            short = np.zeros_like(short)
            short[keep] = True
        segments = np.stack([t[short][:, ::-1], p[short][:, ::-1]], axis=1)
        ax.add_collection(LineCollection(segments, colors="0.45", linewidths=0.3, alpha=0.25, zorder=1))
        ax.scatter(t[:, 1], t[:, 0], s=4, c="k", lw=0, zorder=2)
        mappable = ax.scatter(p[:, 1], p[:, 0], s=6, c=err, cmap="viridis_r", norm=norm, lw=0, zorder=3)
        ax.set_title(f"{mode}: {len(t)} of {d['n_truth']} photos predicted", fontsize=9)
    for ax in axes.ravel()[len(modes) :]:
        ax.axis("off")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="error (km)")
    return fig


def _draw_cell_map(geocells):
    from matplotlib.colors import LogNorm

    partitions = list(geocells.partitions)
    if not partitions:
        raise ValueError("geocells has no partitions to draw")
    fig, axes = _figure(len(partitions), 1, (7.5, 4.0 * len(partitions)))
    for ax, partition in zip(axes[:, 0], partitions):
        centers = np.asarray(partition.centers_deg, dtype=np.float64).reshape(-1, 2)
        counts = np.asarray(partition.counts, dtype=np.float64)
        _world_axes(ax)
        sc = ax.scatter(
            centers[:, 1],
            centers[:, 0],
            s=5,
            c=counts,
            cmap="plasma",
            norm=LogNorm(vmin=max(counts.min(initial=1.0), 1.0), vmax=max(counts.max(initial=1.0), 2.0)),
            lw=0,
            zorder=2,
        )
        fig.colorbar(sc, ax=ax, shrink=0.8, label="photos per cell")
        ax.set_title(f"{partition.name}: {len(centers)} cells", fontsize=9)
    return fig


def _write_folium_map(distances, path: Path) -> Path:
    import folium

    fmap = folium.Map(location=(20, 0), zoom_start=2)
    for mode, d in distances.items():
        group = folium.FeatureGroup(name=str(mode))
        for (tlat, tlon), (plat, plon), err in zip(d["truth_deg"], d["pred_deg"], d["error_km"]):
            folium.PolyLine([(tlat, tlon), (plat, plon)], weight=1, color="gray").add_to(group)
            folium.CircleMarker((plat, plon), radius=3, color="blue", tooltip=f"{mode}: {err:.1f} km").add_to(
                group
            )
            folium.CircleMarker((tlat, tlon), radius=2, color="black").add_to(group)
        group.add_to(fmap)
    folium.LayerControl().add_to(fmap)
    fmap.save(str(path))
    return path
