"""Search within Cell (ICMR 2021, section 3.4): retrieval restricted to the predicted cell, then clustering.

For each query the classification head names a cell (or its top-T cells); the K most similar background
photos inside it are retrieved from the `BackgroundIndex`, clustered with DBSCAN on their coordinates, and the
mean of the largest cluster is the prediction. Queries whose cells hold no background photo are reported as
not found so the caller can fall back to the head's own prediction. `nearest_background` is the paper's RRM
run: the location of the most similar background photo from a global search.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import numpy as np

from geoswc.swc.cluster import DEFAULT_AGGREGATION, aggregate

logger = logging.getLogger(__name__)


class SwcResult(NamedTuple):
    """Search within Cell output for Q queries and K neighbours.

    Attributes:
        latlon_deg: ``(Q, 2)`` predicted positions; NaN where ``found`` is False.
        found: ``(Q,)`` bool, False when the searched cells hold no background photo.
        rows: ``(Q, K)`` int64 index rows of the neighbours, most similar first; -1 pads missing ones.
        similarities: ``(Q, K)`` float32 similarities of the neighbours; -inf on padding.
        members: ``(Q, K)`` bool, the neighbours in the chosen cluster.
        cluster_size: ``(Q,)`` number of neighbours in the chosen cluster.
    """

    latlon_deg: np.ndarray
    found: np.ndarray
    rows: np.ndarray
    similarities: np.ndarray
    members: np.ndarray
    cluster_size: np.ndarray


class NearestResult(NamedTuple):
    """Global nearest-neighbour search (the RRM run).

    Attributes:
        latlon_deg: ``(Q, 2)`` position of the most similar background photo; NaN if the index is empty.
        found: ``(Q,)`` bool.
        rows: ``(Q, k)`` index rows, most similar first, -1 padding.
        similarities: ``(Q, k)`` similarities, -inf on padding.
    """

    latlon_deg: np.ndarray
    found: np.ndarray
    rows: np.ndarray
    similarities: np.ndarray


def _as_numpy(array: Any, dtype: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().float().numpy() if np.dtype(dtype).kind == "f" else array.cpu().numpy()
    return np.ascontiguousarray(np.asarray(array), dtype=dtype)


def search_within_cell(
    query_emb: Any,
    cells: Any,
    index: Any,
    *,
    k: int = 10,
    eps_km: float = 1.0,
    min_samples: int = 1,
    aggregation: str = DEFAULT_AGGREGATION,
    partition: Optional[str] = None,
) -> SwcResult:
    """Locate queries by Search within Cell.

    Args:
        query_emb: ``(Q, D)`` L2-normalised retrieval embeddings.
        cells: ``(Q,)`` predicted fine cell_idx, or ``(Q, T)`` top-T cells searched together; -1 = none.
        index: a `BackgroundIndex` (``search_cells`` and per-row ``latlon``).
        k: neighbours retrieved per query (paper: 10).
        eps_km: DBSCAN radius (paper: 1 km).
        min_samples: DBSCAN core-point threshold (paper: 1).
        aggregation: how the neighbours become one position, one of `geoswc.swc.cluster.AGGREGATIONS`
            (paper: ``largest-cluster-mean``).
        partition: the partition ``cells`` refer to, the head's own (``BackgroundIndex.search_cells``);
            default: the one the index rows are sorted by.

    Returns:
        A `SwcResult`; ``found`` is False where no background photo lies in the searched cells.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # Tensors stay on their device: the index scores cell blocks with torch there.
    sims, rows = (
        index.search_cells(query_emb, cells, k)
        if partition is None
        else index.search_cells(query_emb, cells, k, partition=partition)
    )
    sims, rows = _as_numpy(sims, np.float32), _as_numpy(rows, np.int64)
    sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
    valid = rows >= 0
    latlon = np.full(rows.shape + (2,), np.nan)
    if valid.any():
        latlon[valid] = np.asarray(index.latlon, dtype=np.float64)[rows[valid]]
    cluster = aggregate(
        latlon, valid, method=aggregation, eps_km=eps_km, min_samples=min_samples, similarity=sims
    )
    found = valid.any(axis=1)
    if not found.all():
        logger.debug(
            "%d of %d queries have no background photo in their cells", int((~found).sum()), len(found)
        )
    return SwcResult(
        latlon_deg=cluster.latlon_deg,
        found=found,
        rows=rows,
        similarities=sims,
        members=cluster.members,
        cluster_size=cluster.size,
    )


def nearest_background(query_emb: Any, index: Any, *, k: int = 1) -> NearestResult:
    """The RRM run: each query takes the position of its most similar background photo (global search)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims, rows = index.search(query_emb, k)
    sims, rows = _as_numpy(sims, np.float32), _as_numpy(rows, np.int64)
    sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
    found = rows[:, 0] >= 0
    latlon = np.full((len(rows), 2), np.nan)
    latlon[found] = np.asarray(index.latlon, dtype=np.float64)[rows[found, 0]]
    return NearestResult(latlon_deg=latlon, found=found, rows=rows, similarities=sims)
