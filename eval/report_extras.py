"""The report's sections beyond Table 1: errors and GeoGuessr score, the paper's published rows, selective
prediction, accuracy by continent and country, and same-cell retrieval.

Each section is ``(title, header, rows, note)`` with text cells, rendered by `geoswc.eval.report` in both the
Markdown and the HTML report; `draw_coverage` is the coverage-versus-accuracy figure of selective prediction.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

from geoswc.eval.benchmarks import PUBLISHED, published_results
from geoswc.eval.metrics import RADII_KM, radius_key

__all__ = ["extra_sections", "draw_coverage", "Section"]

Section = Tuple[str, List[str], List[List[str]], str]
# Countries listed in the report (results.json holds them all).
MAX_COUNTRIES = 15


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def extra_sections(results: Mapping[str, Mapping], benchmark: Optional[str] = None) -> List[Section]:
    """The extra sections for the results of `geoswc evaluate` (those whose figures are present)."""
    sections: List[Section] = []
    _error_sections(results, sections)
    _paper_sections(results, benchmark, sections)
    _selective_sections(results, sections)
    _geography_sections(results, sections)
    _retrieval_sections(results, sections)
    return sections


def _error_sections(results: Mapping[str, Mapping], sections: List[Section]) -> None:
    """Mean and median error, GeoGuessr score and right country, one row per mode."""
    rows = []
    for mode, res in results.items():
        geo = res.get("geography") or {}
        rows.append(
            [
                str(mode),
                _fmt(res.get("mean_km")),
                _fmt(res.get("median_km")),
                _fmt(res.get("geoguessr_score"), ".0f"),
                _fmt(geo.get("country_accuracy")),
            ]
        )
    sections.append(
        (
            "Error, GeoGuessr score and country",
            ["mode", "mean km", "median km", "GeoGuessr score", "right country (%)"],
            rows,
            "GeoGuessr score: mean of 5000 exp(-d / 1492.7 km) over all ground-truth photos (a missing photo "
            "scores 0), as osv5m reports it. Right country: the predicted position lies in the country of the "
            "true one, over the photos whose true position lies in a country (offline boundaries, "
            "geoswc.data.places).",
        )
    )


def _paper_sections(
    results: Mapping[str, Mapping], benchmark: Optional[str], sections: List[Section]
) -> None:
    """The measured accuracies beside the paper's Table 1, when ``benchmark`` is one it reports."""
    radii = [radius_key(r) for r in RADII_KM]
    if benchmark and str(benchmark).lower() in PUBLISHED:
        published = published_results(benchmark)
        rows = []
        for mode, res in results.items():
            if mode not in published:
                continue
            rows.append([f"{mode} (measured)"] + [_fmt(res["accuracy"].get(r)) for r in radii])
            rows.append([f"{mode} (paper)"] + [_fmt(published[mode].get(r)) for r in radii])
        if rows:
            sections.append(
                (
                    f"Measured beside the paper's Table 1 ({benchmark})",
                    ["mode"] + [f"{r} km" for r in radii],
                    rows,
                    "Paper: Kordopatis-Zilos et al., ICMR 2021, Table 1 (EfficientNet-B4 trained on MP16; ce is "
                    "their PlaNet re-implementation).",
                )
            )


def _selective_sections(results: Mapping[str, Mapping], sections: List[Section]) -> None:
    """Localizable versus non-localizable photos, and the coverage-accuracy curve."""
    selective = [(mode, res["selective"]) for mode, res in results.items() if res.get("selective")]
    if selective:
        rows = []
        for mode, sel in selective:
            for group in ("localizable", "non_localizable"):
                g = sel[group]
                rows.append(
                    [str(mode), group.replace("_", "-"), str(g["n"]), _fmt(g["share"])]
                    + [_fmt(g["accuracy"].get(r)) for r in ("1", "25", "200", "750", "2500")]
                    + [_fmt(g["median_km"])]
                )
        first = selective[0][1]
        sections.append(
            (
                "Selective prediction",
                [
                    "mode",
                    "group",
                    "photos",
                    "share %",
                    "1 km",
                    "25 km",
                    "200 km",
                    "750 km",
                    "2500 km",
                    "median km",
                ],
                rows,
                f"Localizable: prediction density at {first['scale_km']:g} km above {first['threshold']:g} (the "
                "probability mass of the fine cells whose centres lie within that distance of the head's best "
                "cell; Kordopatis-Zilos et al.). Accuracy within each group, over the photos evaluated.",
            )
        )
        coverages = [point["coverage"] for point in first["curve"]]
        rows = []
        for mode, sel in selective:
            for radius in ("1", "25"):
                rows.append(
                    [str(mode), f"{radius} km"]
                    + [_fmt(point["accuracy"].get(radius)) for point in sel["curve"]]
                )
        sections.append(
            (
                "Coverage versus accuracy",
                ["mode", "radius"] + [f"{c:.0f}%" for c in coverages],
                rows,
                "Accuracy (%) of the photos kept when only the given share of them, the most confident (highest "
                "prediction density at 25 km), is kept; the least confident are set aside first.",
            )
        )


def _geography_sections(results: Mapping[str, Mapping], sections: List[Section]) -> None:
    """Accuracy by continent and by country of the true position."""
    geo_modes = [(mode, res["geography"]) for mode, res in results.items() if res.get("geography")]
    if geo_modes:
        continents = []
        for _, geo in geo_modes:
            continents += [c for c in geo["by_continent"] if c not in continents]
        rows = []
        for mode, geo in geo_modes:
            for continent in continents:
                g = geo["by_continent"].get(continent)
                if g:
                    rows.append(
                        [str(mode), continent, str(g["n"])]
                        + [_fmt(g["accuracy"].get(r)) for r in ("1", "25", "200", "750", "2500")]
                    )
        sections.append(
            (
                "Accuracy by continent",
                ["mode", "continent", "photos", "1 km", "25 km", "200 km", "750 km", "2500 km"],
                rows,
                "Continent of the true position; a photo without a prediction counts as wrong.",
            )
        )
        rows = []
        for mode, geo in geo_modes:
            for code, g in list(geo["by_country"].items())[:MAX_COUNTRIES]:
                rows.append(
                    [str(mode), code, str(g["n"])]
                    + [_fmt(g["accuracy"].get(r)) for r in ("1", "25", "200", "750", "2500")]
                )
        sections.append(
            (
                f"Accuracy by country (the {MAX_COUNTRIES} with the most photos; all in results.json)",
                ["mode", "country", "photos", "1 km", "25 km", "200 km", "750 km", "2500 km"],
                rows,
                "Country (ISO 3166 alpha-2) of the true position.",
            )
        )


def _retrieval_sections(results: Mapping[str, Mapping], sections: List[Section]) -> None:
    """Recall and mAP of same-cell neighbours."""
    retrieval = [(mode, res["retrieval"]) for mode, res in results.items() if res.get("retrieval")]
    if retrieval:
        ns = list(retrieval[0][1]["recall"])
        rows = [
            [str(mode)]
            + [_fmt(r["recall"].get(n)) for n in ns]
            + [_fmt(r["map"].get(n)) for n in ns]
            + [str(r["n_queries"])]
            for mode, r in retrieval
        ]
        sections.append(
            (
                "Retrieval: same-cell neighbours",
                ["mode"] + [f"recall@{n}" for n in ns] + [f"mAP@{n}" for n in ns] + ["queries"],
                rows,
                "A background photo is relevant when it lies in the query's true fine cell (global exact "
                "search). recall@N: queries with a relevant photo among the N best (%); mAP@N: mean average "
                "precision over the N best, normalised by min(relevant photos in the background, N).",
            )
        )


def draw_coverage(results: Mapping[str, Mapping]):
    """Accuracy at 1 and 25 km against coverage for every mode with selective prediction (None without)."""
    selective = [(mode, res["selective"]) for mode, res in results.items() if res.get("selective")]
    if not selective:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, radius in zip(axes, ("1", "25")):
        for mode, sel in selective:
            x = [p["coverage"] for p in sel["curve"] if p["n"]]
            y = [p["accuracy"][radius] for p in sel["curve"] if p["n"]]
            ax.plot(x, y, "o-", ms=3, label=str(mode))
        ax.set_xlim(100, 0)
        ax.set_xlabel("coverage (% of photos kept, most confident first)")
        ax.set_title(f"accuracy at {radius} km", fontsize=9)
    axes[0].set_ylabel("photos within r (%)")
    axes[0].legend(fontsize=7)
    return fig
