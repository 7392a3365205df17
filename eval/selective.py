"""Selective prediction: how sure a classification head is, and what setting the unsure photos aside buys.

The prediction density of Kordopatis-Zilos et al. (the ICMR 2021 authors' released code, and their MMM 2022
follow-up on localizable photos) is the probability mass a head gives to the fine cells whose centres lie within
a scale (1, 25, 200, 750, 2500 km) of the centre of its best cell. A photo is *localizable* when its density at
25 km exceeds 0.2 (strictly, as the authors' evaluation script compares). `selective_split` scores both groups
and `coverage_curve` the accuracy as the least confident photos are set aside.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from geoswc.eval.metrics import RADII_KM, haversine_km, radius_key

logger = logging.getLogger(__name__)

__all__ = [
    "DENSITY_SCALES_KM",
    "LOCALIZABLE_SCALE_KM",
    "LOCALIZABLE_THRESHOLD",
    "COVERAGES",
    "prediction_density",
    "selective_split",
    "coverage_curve",
    "selective_summary",
]

DENSITY_SCALES_KM = (1, 25, 200, 750, 2500)
LOCALIZABLE_SCALE_KM = 25
LOCALIZABLE_THRESHOLD = 0.2
# Shares of the photos kept, most confident first, at which the coverage curve is reported.
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# Photos per block: (block, n_cells) float64 distance matrices.
_BLOCK = 256


def prediction_density(
    probs,
    centers_deg,
    *,
    scales_km: Sequence[float] = DENSITY_SCALES_KM,
    best=None,
) -> np.ndarray:
    """Probability mass within each scale of the best cell's centre, for every photo.

    Args:
        probs: ``(N, C)`` probabilities over the fine cells (rows sum to 1).
        centers_deg: ``(C, 2)`` the cells' centres ``(lat, lon)`` in degrees.
        scales_km: the radii (a cell counts when its centre's distance is ``<= scale``).
        best: ``(N,)`` the best cell of every photo; default the argmax of ``probs``.

    Returns:
        ``(N, len(scales_km))`` float64 densities in [0, 1].
    """
    probs = np.asarray(probs, dtype=np.float64)
    centers = np.asarray(centers_deg, dtype=np.float64)
    if probs.ndim != 2 or centers.shape != (probs.shape[1], 2):
        raise ValueError(
            f"probs must be (N, C) and centers_deg (C, 2), got {probs.shape} and {centers.shape}"
        )
    best = np.argmax(probs, axis=1) if best is None else np.asarray(best, dtype=np.int64)
    scales = np.asarray(scales_km, dtype=np.float64)
    out = np.zeros((len(probs), len(scales)))
    for start in range(0, len(probs), _BLOCK):
        stop = start + _BLOCK
        origin = centers[best[start:stop]]
        dist_km = haversine_km(
            origin[:, None, 0], origin[:, None, 1], centers[None, :, 0], centers[None, :, 1]
        )
        block = probs[start:stop]
        for j, scale in enumerate(scales):
            out[start:stop, j] = np.where(dist_km <= scale, block, 0.0).sum(axis=1)
    return out


def _group_scores(dist_km: np.ndarray, radii: Sequence[float]) -> dict:
    n = len(dist_km)
    return {
        "n": int(n),
        "accuracy": {radius_key(r): 100.0 * float(np.mean(dist_km <= r)) if n else None for r in radii},
        "median_km": float(np.median(dist_km)) if n else None,
    }


def selective_split(
    dist_km,
    density,
    *,
    threshold: float = LOCALIZABLE_THRESHOLD,
    radii: Sequence[float] = RADII_KM,
) -> Dict[str, dict]:
    """Scores of the localizable photos (``density > threshold``) and of the others.

    Args:
        dist_km: ``(N,)`` errors of the photos with a prediction and a density.
        density: ``(N,)`` their prediction density at the chosen scale.
        threshold: the localizable threshold (the authors': 0.2 at 25 km).
        radii: the radii of the accuracies.

    Returns:
        ``{"threshold", "localizable": group, "non_localizable": group}`` where a group is ``{"n", "share"
        (% of N), "accuracy": {radius: %}, "median_km"}``.
    """
    dist_km = np.asarray(dist_km, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    if dist_km.shape != density.shape or dist_km.ndim != 1:
        raise ValueError(f"dist_km and density must be (N,) arrays, got {dist_km.shape} and {density.shape}")
    sure = density > threshold
    out: Dict[str, object] = {"threshold": float(threshold)}
    for name, mask in (("localizable", sure), ("non_localizable", ~sure)):
        group = _group_scores(dist_km[mask], radii)
        group["share"] = 100.0 * float(mask.mean()) if len(mask) else None
        out[name] = group
    return out


def coverage_curve(
    dist_km,
    confidence,
    *,
    coverages: Sequence[float] = COVERAGES,
    radii: Sequence[float] = (1, 25),
) -> list:
    """Accuracy of the most confident photos as the least confident are set aside.

    At coverage c the ``round(c * N)`` photos with the highest confidence are kept (ties broken by the order
    given, so the curve is deterministic) and scored.

    Args:
        dist_km: ``(N,)`` errors of the photos with a prediction.
        confidence: ``(N,)`` their confidence (prediction density).
        coverages: the shares of photos kept, each in (0, 1].
        radii: the radii of the accuracies.

    Returns:
        One dict per coverage: ``{"coverage": %, "n": photos kept, "min_confidence": lowest kept,
        "accuracy": {radius: %}}``.
    """
    dist_km = np.asarray(dist_km, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if dist_km.shape != confidence.shape or dist_km.ndim != 1:
        raise ValueError(
            f"dist_km and confidence must be (N,) arrays, got {dist_km.shape} and {confidence.shape}"
        )
    bad = [c for c in coverages if not 0 < float(c) <= 1]
    if bad:
        raise ValueError(f"coverages must lie in (0, 1], got {bad}")
    order = np.argsort(-confidence, kind="stable")
    curve = []
    for c in coverages:
        n = int(round(float(c) * len(order)))
        kept = order[:n]
        curve.append(
            {
                "coverage": 100.0 * float(c),
                "n": n,
                "min_confidence": float(confidence[kept].min()) if n else None,
                "accuracy": {
                    radius_key(r): 100.0 * float(np.mean(dist_km[kept] <= r)) if n else None for r in radii
                },
            }
        )
    return curve


def selective_summary(
    dist_km,
    densities,
    *,
    scales_km: Sequence[float] = DENSITY_SCALES_KM,
    scale_km: float = LOCALIZABLE_SCALE_KM,
    threshold: float = LOCALIZABLE_THRESHOLD,
    head: Optional[str] = None,
) -> dict:
    """The selective-prediction entry of one mode in ``results.json``.

    Args:
        dist_km: ``(N,)`` errors of the photos with a prediction.
        densities: ``(N, len(scales_km))`` their prediction densities.
        scales_km: the scales of ``densities``' columns.
        scale_km, threshold: the localizable rule (density at ``scale_km`` > ``threshold``).
        head: the head whose densities these are.

    Returns:
        ``{"head", "scale_km", "threshold", "mean_density": {scale: mean}, "localizable", "non_localizable",
        "curve"}``.
    """
    densities = np.asarray(densities, dtype=np.float64)
    scales = [float(s) for s in scales_km]
    if float(scale_km) not in scales:
        raise ValueError(f"scale_km {scale_km} is not among the density scales {scales}")
    column = densities[:, scales.index(float(scale_km))]
    split = selective_split(dist_km, column, threshold=threshold)
    return {
        "head": head,
        "scale_km": float(scale_km),
        "threshold": float(threshold),
        "mean_density": {
            radius_key(s): float(densities[:, j].mean()) if len(densities) else None
            for j, s in enumerate(scales)
        },
        "localizable": split["localizable"],
        "non_localizable": split["non_localizable"],
        "curve": coverage_curve(dist_km, column),
    }
