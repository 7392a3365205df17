"""Searching the database of a place-recognition split with the index modes of `geoswc.retrieval.index`.

Descriptors are L2-normalised, so the inner product ranks the database exactly as the L2 distance the
benchmark searches with; distances reported here are squared L2, ``2 - 2 * similarity``. ``nearest_crop`` and
``maj_voting`` search every crop of a query and merge the five lists (Berton et al., CVPR 2022, ``test.py``):
by distance with duplicates removed, after (for voting) lowering the distance of a database photo that several
crops retrieve among their first 1, 5 and 10 by ``weight * count / n``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from geoswc.data.validation import check_choice
from geoswc.retrieval.index import BackgroundIndex

INDEX_MODES = ("flat", "sq8", "pq", "bits")
_SEARCH_MODE = {"flat": "flat", "sq8": "sq8", "pq": "pq", "bits": "binary"}
MAJORITY_WEIGHT = 0.01


def check_index_mode(mode: str) -> str:
    check_choice("index mode", mode, INDEX_MODES)
    return mode


def database_index(descriptors: np.ndarray) -> BackgroundIndex:
    """An index over the database descriptors (one cell: the whole database)."""
    n = len(descriptors)
    return BackgroundIndex(dtype="float32").build(
        np.ascontiguousarray(descriptors, dtype=np.float32),
        cell_idx=np.zeros(n, np.int64),
        latlon=np.zeros((n, 2)),
        ids=[str(i) for i in range(n)],
        n_cells=1,
        fingerprint="vpr-database",
    )


def pq_options(n_database: int) -> Dict[str, int]:
    """Product-quantiser bits for a database of ``n_database`` photos: 8 bits (256 centroids per sub-vector)
    when there are the 39 training points per centroid faiss asks for, fewer on small databases."""
    bits = int(np.clip(np.floor(np.log2(max(n_database, 1) / 39)), 1, 8))
    return {"pq_bits": bits}


def bytes_per_photo(mode: str, dim: int, **options) -> float:
    """Bytes one database photo takes in the index of ``mode``."""
    if mode == "flat":
        return 4.0 * dim
    if mode == "sq8":
        return float(dim)
    if mode == "bits":
        return dim / 8.0
    from geoswc.retrieval.topk import default_pq_m

    return float(options.get("pq_m") or default_pq_m(dim)) * int(options.get("pq_bits", 8)) / 8.0


def search(
    index: BackgroundIndex, queries: np.ndarray, k: int, mode: str = "flat", **options
) -> Tuple[np.ndarray, np.ndarray]:
    """``(sq_dist (Q, k), rows (Q, k))`` nearest first, for descriptors ``(Q, D)``."""
    check_index_mode(mode)
    k = min(int(k), len(index))
    sims, rows = index.search(
        np.ascontiguousarray(queries, dtype=np.float32), k, mode=_SEARCH_MODE[mode], **options
    )
    return (2.0 - 2.0 * sims).astype(np.float32), rows


def _merge_unique(dist: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(dist, kind="stable")
    merged = rows[order]
    _, first = np.unique(merged, return_index=True)
    return merged[np.sort(first)][:k]


def _vote(rows: np.ndarray, dist: np.ndarray, weight: float) -> None:
    """Lower, in place, the distances of database photos that several crops retrieve among their first n."""
    for n in (1, 5, 10):
        top = rows[:, :n]
        values, counts = np.unique(top, return_counts=True)
        for value, count in zip(values[counts > 1], counts[counts > 1]):
            dist[:, :n][top == value] -= weight * count / n


def rank(
    index: BackgroundIndex,
    queries: np.ndarray,
    k: int,
    *,
    method: str = "hard_resize",
    mode: str = "flat",
    majority_weight: float = MAJORITY_WEIGHT,
    per_crop: Optional[int] = None,
    **options,
) -> np.ndarray:
    """``(Q, k)`` database rows for every query, best first.

    ``queries`` is ``(Q, D)``, or ``(Q, 5, D)`` for ``nearest_crop`` and ``maj_voting``: every crop is searched
    for ``per_crop`` rows (default ``k``; the benchmark searches max(recall values), 20) and the merged list
    keeps the first ``k`` distinct rows, ``-1`` where the crops found fewer.
    """
    if method not in ("nearest_crop", "maj_voting"):
        return search(index, queries, k, mode, **options)[1]
    q, crops, dim = queries.shape
    k = min(int(k), len(index))
    per_crop = min(int(per_crop or k), len(index))
    dist, rows = search(index, queries.reshape(q * crops, dim), per_crop, mode, **options)
    dist, rows = dist.reshape(q, crops, per_crop).copy(), rows.reshape(q, crops, per_crop)
    out = np.full((q, k), -1, np.int64)
    for i in range(q):
        if method == "maj_voting":
            _vote(rows[i], dist[i], majority_weight)
        merged = _merge_unique(dist[i].ravel(), rows[i].ravel(), k)
        out[i, : len(merged)] = merged
    return out


def rank_all_modes(
    index: BackgroundIndex, queries: np.ndarray, k: int, *, method: str, **options
) -> Dict[str, np.ndarray]:
    return {mode: rank(index, queries, k, method=method, mode=mode, **options) for mode in INDEX_MODES}
