"""The evaluation protocol of the paper (Kordopatis-Zilos et al., ICMR 2021, sections 4.3 and 5).

A photo is located correctly at radius r when the great-circle distance between its predicted and its true
position is at most r. Distances use the haversine formula on a sphere of radius R = 6371 km, the convention of
the published peers (Im2GPS, PlaNet, CPlaNet, Müller-Budack et al.), so numbers are comparable with theirs.

Accuracy is reported at 0.1, 1, 5, 10, 25, 200, 750 and 2500 km (the paper's table adds 0.1/5/10 km to the
usual street/city/region/country/continent scales). The denominator is always the number of ground-truth
photos: a photo without a prediction is counted in ``n_missing`` and is wrong at every radius. Median and mean
error are taken over the photos that have a prediction (``n_scored``); with none scored they are ``None``.

Beyond the paper's table, the measures other systems report: the GeoGuessr score
``5000 exp(-d / 1492.7 km)`` as osv5m computes it (a missing photo scores 0), accuracy by country and continent
and the share placed in the right country (`geographic_breakdown`, offline through `geoswc.data.places`), and
for the retrieval module recall@N and mAP of same-cell neighbours (`retrieval_metrics`, the measures of
NetVLAD, Arandjelović et al., CVPR 2016).

Training validates at the five usual scales only (`VALIDATION_RADII_KM`, `accuracy_at`), on aligned arrays of
predicted and true positions, as fractions.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from geoswc.data.metadata import normalize_photo_ids, standardize_locations
from geoswc.data.sphere import EARTH_RADIUS_KM, haversine_km

logger = logging.getLogger(__name__)

RADII_KM = (0.1, 1, 5, 10, 25, 200, 750, 2500)
# osv5m's GeoGuessr score: 5000 points at distance 0, divided by e every 1492.7 km.
GEOGUESSR_MAX_POINTS = 5000.0
GEOGUESSR_SCALE_KM = 1492.7
# Street, city, region, country and continent: the radii of the validation metrics during training.
VALIDATION_RADII_KM = (1, 25, 200, 750, 2500)

__all__ = [
    "EARTH_RADIUS_KM",
    "RADII_KM",
    "VALIDATION_RADII_KM",
    "haversine_km",
    "score_predictions",
    "accuracy_at",
    "radius_key",
    "format_table",
    "geoguessr_points",
    "geographic_breakdown",
    "breakdown_by_group",
    "retrieval_metrics",
    "country_scores",
]


def radius_key(radius_km: float) -> str:
    """The JSON key of a radius: ``0.1 -> "0.1"``, ``1 -> "1"``, ``2500.0 -> "2500"``."""
    return f"{float(radius_km):g}"


def _checked_radii(radii_km: Sequence[float]) -> list:
    radii = [float(r) for r in radii_km]
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii):
        raise ValueError(f"radii must be non-negative finite numbers in km, got {list(radii_km)}")
    return radii


def accuracy_at(pred_deg, true_deg, radii_km: Sequence[float] = VALIDATION_RADII_KM) -> Dict[str, float]:
    """Share of photos within each radius of their true position, and the median error.

    The validation metric of training: rows of two aligned arrays are compared one to one (no ID matching,
    no missing photos), distances by `haversine_km`, and a photo exactly at distance r is correct at r.

    Args:
        pred_deg: ``(N, 2)`` predicted ``(lat, lon)`` in degrees.
        true_deg: ``(N, 2)`` true ``(lat, lon)`` in degrees, row ``i`` the same photo as in ``pred_deg``.
        radii_km: the radii in km.

    Returns:
        ``{"acc_1km": fraction, "acc_25km": ..., "median_km": km}``: one ``acc_<r>km`` key per radius in the
        given order (``r`` written by `radius_key`), fractions in [0, 1], then the median error. Every value
        is NaN when N is 0.

    Raises:
        ValueError: the arrays are not both ``(N, 2)`` with the same N, or a radius is negative or not finite.
    """
    radii = _checked_radii(radii_km)
    pred, true = np.asarray(pred_deg, dtype=np.float64), np.asarray(true_deg, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != true.shape:
        raise ValueError(
            f"pred_deg and true_deg must both be (N, 2) (lat, lon) arrays, got {pred.shape} and {true.shape}"
        )
    keys = [f"acc_{radius_key(r)}km" for r in radii] + ["median_km"]
    if len(pred) == 0:
        return dict.fromkeys(keys, float("nan"))
    dist_km = haversine_km(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])
    values = [float(np.mean(dist_km <= r)) for r in radii] + [float(np.median(dist_km))]
    return dict(zip(keys, values))


def score_predictions(
    pred_df: pd.DataFrame,
    truth_df: pd.DataFrame,
    *,
    radii: Sequence[float] = RADII_KM,
) -> dict:
    """Scores predicted positions against ground truth under the protocol of this module.

    Photos are matched by :func:`geoswc.eval.benchmarks.normalize_image_id`, so a prediction keyed by bare
    photo id, file name or relative path finds its ground truth. Predictions for photos that are not in the
    ground truth are ignored (and logged).

    Args:
        pred_df: predictions with columns ``IMG_ID, LAT, LON`` (names matched case-insensitively; ``latitude``,
            ``lon``, ``long``, ``longitude`` accepted).
        truth_df: ground truth with the same columns; other columns are ignored.
        radii: the radii in km at which accuracy is reported.

    Returns:
        ``{"n_truth", "n_scored", "n_missing", "accuracy": {"0.1": %, "1": %, ...}, "median_km", "mean_km",
        "geoguessr_score"}`` with accuracies in percent of ``n_truth``, ``median_km``/``mean_km`` over scored
        photos (``None`` when no photo is scored) and the mean GeoGuessr score over ``n_truth`` (missing
        photos score 0).

    Raises:
        ValueError: on missing columns, bad coordinates, duplicate IDs, an empty ground truth or bad radii.
    """
    radii = _checked_radii(radii)
    truth = standardize_locations(truth_df, source="ground truth")
    pred = standardize_locations(pred_df, source="predictions", allow_empty=True)
    if len(truth) == 0:
        raise ValueError("ground truth is empty: nothing to score against")
    truth_keys = normalize_photo_ids(truth["IMG_ID"])
    pred_keys = normalize_photo_ids(pred["IMG_ID"])

    truth_pos = pd.DataFrame(
        {"LAT": truth["LAT"].to_numpy(), "LON": truth["LON"].to_numpy()}, index=truth_keys
    )
    pred_pos = pd.DataFrame({"LAT": pred["LAT"].to_numpy(), "LON": pred["LON"].to_numpy()}, index=pred_keys)
    unmatched = ~pred_pos.index.isin(truth_pos.index)
    if unmatched.any():
        examples = ", ".join(map(str, pred["IMG_ID"][unmatched].iloc[:3]))
        logger.warning(
            "%d predictions have no ground truth and are ignored (e.g. %s)", int(unmatched.sum()), examples
        )
    matched = pred_pos.reindex(truth_pos.index)
    has_pred = matched["LAT"].notna().to_numpy()

    n_truth = len(truth_pos)
    n_scored = int(has_pred.sum())
    dist_km = haversine_km(
        truth_pos["LAT"].to_numpy()[has_pred],
        truth_pos["LON"].to_numpy()[has_pred],
        matched["LAT"].to_numpy()[has_pred],
        matched["LON"].to_numpy()[has_pred],
    )
    if n_scored < n_truth:
        logger.warning(
            "%d of %d ground-truth photos have no prediction; counted as wrong", n_truth - n_scored, n_truth
        )
    accuracy = {radius_key(r): 100.0 * float(np.count_nonzero(dist_km <= r)) / n_truth for r in radii}
    return {
        "n_truth": n_truth,
        "n_scored": n_scored,
        "n_missing": n_truth - n_scored,
        "accuracy": accuracy,
        "median_km": float(np.median(dist_km)) if n_scored else None,
        "mean_km": float(np.mean(dist_km)) if n_scored else None,
        "geoguessr_score": float(geoguessr_points(dist_km).sum()) / n_truth,
    }


def format_table(results: Mapping[str, Mapping], *, decimals: int = 1) -> str:
    """A Table-1-style text table: one row per method, accuracy (%) per radius, median error, counts.

    Args:
        results: ``{name: score_dict}`` as returned by :func:`score_predictions`.
        decimals: decimals of the accuracy columns.

    Returns:
        The table as text, columns aligned, radii taken from the first result.
    """
    if not results:
        raise ValueError("no results to format")
    first = next(iter(results.values()))
    keys = list(first["accuracy"])
    header = ["method"] + [f"{k} km" for k in keys] + ["median km", "n", "missing"]
    rows = []
    for name, res in results.items():
        acc = res["accuracy"]
        median = res.get("median_km")
        rows.append(
            [str(name)]
            + [f"{acc[k]:.{decimals}f}" if k in acc else "-" for k in keys]
            + ["-" if median is None else f"{median:.1f}", str(res["n_scored"]), str(res["n_missing"])]
        )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def geoguessr_points(dist_km) -> np.ndarray:
    """GeoGuessr points of each error: ``5000 * exp(-d / 1492.7 km)`` (osv5m's definition), float64."""
    dist_km = np.asarray(dist_km, dtype=np.float64)
    return GEOGUESSR_MAX_POINTS * np.exp(-dist_km / GEOGUESSR_SCALE_KM)


def _matched(pred_df: pd.DataFrame, truth_df: pd.DataFrame):
    """Truth positions ``(N, 2)`` and the matched predictions ``(N, 2)`` (NaN where a photo has none)."""
    truth = standardize_locations(truth_df, source="ground truth")
    pred = standardize_locations(pred_df, source="predictions", allow_empty=True)
    truth_pos = pd.DataFrame(
        {"LAT": truth["LAT"].to_numpy(), "LON": truth["LON"].to_numpy()},
        index=normalize_photo_ids(truth["IMG_ID"]),
    )
    pred_pos = pd.DataFrame(
        {"LAT": pred["LAT"].to_numpy(), "LON": pred["LON"].to_numpy()},
        index=normalize_photo_ids(pred["IMG_ID"]),
    )
    matched = pred_pos.reindex(truth_pos.index)
    return truth_pos.to_numpy(dtype=np.float64), matched.to_numpy(dtype=np.float64)


def breakdown_by_group(
    groups: Sequence[str], dist_km, *, radii: Sequence[float] = RADII_KM, skip: Sequence[str] = ("",)
) -> Dict[str, dict]:
    """Accuracy per group of photos (a country, a continent).

    Args:
        groups: ``(N,)`` the group of every ground-truth photo.
        dist_km: ``(N,)`` errors in km, NaN for a photo without a prediction (wrong at every radius).
        radii: the radii in km.
        skip: group names left out (``""``: photos in no country).

    Returns:
        ``{group: {"n": photos, "accuracy": {radius: %}, "median_km"}}``, largest groups first (then by name);
        ``median_km`` over the group's photos with a prediction, ``None`` without any.
    """
    radii = _checked_radii(radii)
    groups = np.asarray(groups).astype(str)
    dist_km = np.asarray(dist_km, dtype=np.float64)
    if groups.shape != dist_km.shape:
        raise ValueError(
            f"groups and dist_km must have the same shape, got {groups.shape} and {dist_km.shape}"
        )
    names, counts = np.unique(groups, return_counts=True)
    out = {}
    for name, count in sorted(zip(names.tolist(), counts.tolist()), key=lambda x: (-x[1], x[0])):
        if name in skip:
            continue
        d = dist_km[groups == name]
        scored = d[~np.isnan(d)]
        out[name] = {
            "n": int(count),
            "accuracy": {radius_key(r): 100.0 * float(np.count_nonzero(scored <= r)) / count for r in radii},
            "median_km": float(np.median(scored)) if len(scored) else None,
        }
    return out


def geographic_breakdown(
    pred_df: pd.DataFrame,
    truth_df: pd.DataFrame,
    *,
    radii: Sequence[float] = RADII_KM,
    truth_countries: Optional[np.ndarray] = None,
) -> dict:
    """Country-level accuracy and accuracy by country and by continent, offline (`geoswc.data.places`).

    A photo is placed in the right country when the country of its predicted position is the country of its
    true position. The share is over the ground-truth photos that lie in a country (photos at sea are left
    out); a photo without a prediction counts as wrong.

    Args:
        pred_df, truth_df: as `score_predictions`.
        radii: the radii in km of the per-group accuracies.
        truth_countries: the ISO codes of the ground truth in ``truth_df`` order, when already known.

    Returns:
        ``{"country_accuracy": %, "n_in_country": photos, "by_country": {code: group}, "by_continent":
        {code: group}}`` (groups as in `breakdown_by_group`); ``country_accuracy`` is ``None`` when no
        photo lies in a country.
    """
    from geoswc.data import places

    truth, pred = _matched(pred_df, truth_df)
    has_pred = ~np.isnan(pred[:, 0])
    true_codes = (
        np.asarray(places.country_codes(truth)).astype(str)
        if truth_countries is None
        else np.asarray(truth_countries).astype(str)
    )
    pred_codes = np.full(len(truth), "", dtype=object)
    if has_pred.any():
        pred_codes[has_pred] = np.asarray(places.country_codes(pred[has_pred])).astype(str)
    pred_codes = pred_codes.astype(str)
    dist_km = np.full(len(truth), np.nan)
    dist_km[has_pred] = haversine_km(
        truth[has_pred, 0], truth[has_pred, 1], pred[has_pred, 0], pred[has_pred, 1]
    )
    return country_scores(true_codes, pred_codes, dist_km, places.continent_of(true_codes), radii=radii)


def country_scores(
    true_codes, pred_codes, dist_km, true_continents, *, radii: Sequence[float] = RADII_KM
) -> dict:
    """`geographic_breakdown` from the codes themselves (``""`` = no country / no prediction)."""
    true_codes = np.asarray(true_codes).astype(str)
    pred_codes = np.asarray(pred_codes).astype(str)
    in_country = true_codes != ""
    n_in = int(in_country.sum())
    right = in_country & (pred_codes == true_codes)
    return {
        "country_accuracy": 100.0 * int(right.sum()) / n_in if n_in else None,
        "n_in_country": n_in,
        "by_country": breakdown_by_group(true_codes, dist_km, radii=radii),
        "by_continent": breakdown_by_group(np.asarray(true_continents).astype(str), dist_km, radii=radii),
    }


def retrieval_metrics(
    neighbour_cells, query_cells, relevant_counts=None, *, ns: Sequence[int] = (1, 5, 10)
) -> dict:
    """Recall@N and mAP@N of same-cell neighbours (NetVLAD's place-recognition measures).

    A retrieved background photo is relevant when it lies in the query's true fine cell. Recall@N is the share
    of queries with at least one relevant photo among their N best neighbours; AP@N of a query is
    ``sum_i P(i) rel(i) / min(R, N)`` over its N best neighbours, with ``R`` the relevant photos in the whole
    background (the number retrieved when ``relevant_counts`` is not given); mAP@N averages it over queries
    (a query with ``R = 0`` scores 0).

    Args:
        neighbour_cells: ``(Q, K)`` fine cell of each neighbour, best first; -1 pads.
        query_cells: ``(Q,)`` the true fine cell of each query; -1 (outside every cell) is never matched.
        relevant_counts: ``(Q,)`` background photos in each query's true cell.
        ns: the N values (each at most K).

    Returns:
        ``{"recall": {"1": %, ...}, "map": {"1": %, ...}, "n_queries"}``, in percent.
    """
    cells = np.asarray(neighbour_cells, dtype=np.int64)
    query = np.asarray(query_cells, dtype=np.int64)
    if cells.ndim != 2 or query.shape != (len(cells),):
        raise ValueError(
            f"neighbour_cells must be (Q, K) and query_cells (Q,), got {cells.shape} and {query.shape}"
        )
    k = cells.shape[1]
    bad = [n for n in ns if not 1 <= int(n) <= k]
    if bad:
        raise ValueError(f"N must be between 1 and K = {k}, got {bad}")
    rel = (cells == query[:, None]) & (query[:, None] >= 0) & (cells >= 0)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, k + 1)[None, :]
    recall, average = {}, {}
    for n in ns:
        n = int(n)
        total = hits[:, n - 1] if relevant_counts is None else np.asarray(relevant_counts, dtype=np.int64)
        denom = np.minimum(total, n)
        ap = np.where(denom > 0, (precision[:, :n] * rel[:, :n]).sum(axis=1) / np.maximum(denom, 1), 0.0)
        recall[str(n)] = 100.0 * float(rel[:, :n].any(axis=1).mean()) if len(rel) else float("nan")
        average[str(n)] = 100.0 * float(ap.mean()) if len(rel) else float("nan")
    return {"recall": recall, "map": average, "n_queries": int(len(rel))}
