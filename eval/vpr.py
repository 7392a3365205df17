"""Scores of visual place recognition.

- recall@N (NetVLAD, CVPR 2016 section 5.1; the benchmark of Berton et al., CVPR 2022, ``test.py``): the
  percentage of queries for which at least one of the first N retrieved database photos is a positive (within
  25 m). Queries without any positive count in the denominator, as in the benchmark.
- The median distance in metres between a query and its first result, and the median of the best-of-k distance
  (the nearest of the first k results), k = 1..30: the measures of the compact-features paper (000).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

DEFAULT_RECALLS = (1, 5, 10, 20)
BEST_OF_K = 30


def recall_at(
    predictions: np.ndarray, positives: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_RECALLS
) -> Dict[int, float]:
    """recall@N in percent for every N of ``ns``.

    Args:
        predictions: ``(Q, K)`` database indices, best first (``-1`` where a query has fewer results).
        positives: for every query, the database indices that are correct.
        ns: the Ns (each <= K).
    """
    predictions = np.asarray(predictions)
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"recall values must be >= 1, got {list(ns)}")
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    if len(predictions) == 0:
        raise ValueError("no queries to score")
    hits = np.zeros(len(ns))
    for row, pos in zip(predictions, positives):
        correct = np.isin(row, np.asarray(pos))
        first = np.flatnonzero(correct)
        if len(first):
            hits += np.asarray(ns) > first[0]
    return {n: float(h) / len(predictions) * 100.0 for n, h in zip(ns, hits)}


def median_top1_m(distances_m: np.ndarray) -> float:
    """Median over queries of the distance (metres) to the first result; ``distances_m`` is ``(Q, K)``."""
    return float(np.median(np.asarray(distances_m, dtype=np.float64)[:, 0]))


def median_best_of_k_m(distances_m: np.ndarray, k_max: int = BEST_OF_K) -> List[float]:
    """Median over queries of the nearest of the first k results, for k = 1..``k_max`` (metres).

    Beyond the results a query has (``K`` columns), the best-of-K value is repeated.
    """
    d = np.asarray(distances_m, dtype=np.float64)
    best = np.minimum.accumulate(np.where(np.isfinite(d), d, np.inf), axis=1)
    cols = [best[:, min(k, d.shape[1]) - 1] for k in range(1, int(k_max) + 1)]
    return [float(np.median(c)) for c in cols]
