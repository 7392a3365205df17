"""Spatial clustering of retrieved neighbours: DBSCAN on great-circle distance (ICMR 2021, section 3.4).

Search within Cell retrieves the K most similar background photos of a query and keeps the mean position of
the largest DBSCAN cluster of their coordinates. K is small (10 in the paper) and queries are many, so DBSCAN
runs for all queries at once on ``(Q, K, K)`` distance matrices instead of once per query: core points are
those with at least ``min_samples`` neighbours within ``eps`` (themselves included), clusters are the connected
components of core points (found by propagating the smallest member index along core-core edges), and a border
point joins the cluster of its first core neighbour, which is the cluster scikit-learn's DBSCAN gives it.

`aggregate` offers the alternatives the paper's Table 6 compares (and a few more) for ablations; the paper's
largest-cluster mean stays the default everywhere.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from geoswc.data.sphere import (
    EARTH_RADIUS_KM,
    latlon_to_unit,
    pairwise_haversine_km,
    unit_to_latlon,
)
from geoswc.data.validation import check_choice

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_AGGREGATION",
    "EARTH_RADIUS_KM",
    "ClusterResult",
    "aggregate",
    "dbscan_labels",
    "largest_cluster_mean",
    "pairwise_haversine_km",
    "spherical_mean",
]

# Rows per block: (rows, K, K) float64 work arrays stay around 100 MB for K = 10.
_BLOCK_ROWS = 65536


class ClusterResult(NamedTuple):
    """The chosen cluster of every query.

    Attributes:
        latlon_deg: ``(Q, 2)`` spherical mean of the cluster's coordinates; NaN where a query has no valid
            neighbour.
        size: ``(Q,)`` number of neighbours in the chosen cluster (0 where none is valid).
        members: ``(Q, K)`` bool, the neighbours that make up the chosen cluster.
    """

    latlon_deg: np.ndarray
    size: np.ndarray
    members: np.ndarray


def dbscan_labels(
    latlon_deg: np.ndarray, valid: np.ndarray, *, eps_km: float = 1.0, min_samples: int = 1
) -> np.ndarray:
    """DBSCAN labels of the K points of every row, all rows at once.

    Args:
        latlon_deg: ``(Q, K, 2)`` coordinates in degrees.
        valid: ``(Q, K)`` bool; invalid points (padding) take no part and get label -1.
        eps_km: neighbourhood radius (a point is a neighbour when its distance is ``<= eps_km``).
        min_samples: neighbours within ``eps_km``, the point itself included, that make a core point.

    Returns:
        ``(Q, K)`` int64 labels: a cluster is labelled by the smallest index of its core points, noise is -1.
        Up to renumbering these are the labels of ``sklearn.cluster.DBSCAN(metric="haversine")``.
    """
    latlon_deg = np.asarray(latlon_deg, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    _check_shapes(latlon_deg, valid)
    if eps_km < 0:
        raise ValueError(f"eps_km must be >= 0, got {eps_km}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    n_rows, k = valid.shape
    labels = np.full((n_rows, k), -1, dtype=np.int64)
    for start in range(0, n_rows, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n_rows)
        labels[start:stop] = _dbscan_block(latlon_deg[start:stop], valid[start:stop], eps_km, min_samples)
    return labels


def _dbscan_block(latlon_deg: np.ndarray, valid: np.ndarray, eps_km: float, min_samples: int) -> np.ndarray:
    n_rows, k = valid.shape
    pair_valid = valid[:, :, None] & valid[:, None, :]
    # NaN coordinates of padding compare False, so the validity mask alone decides.
    with np.errstate(invalid="ignore"):
        adjacent = (pairwise_haversine_km(latlon_deg) <= eps_km) & pair_valid
    core = valid & (adjacent.sum(axis=2) >= min_samples)
    core_edges = adjacent & core[:, :, None] & core[:, None, :]

    index = np.arange(k, dtype=np.int64)
    none = np.int64(k)
    labels = np.where(core, index[None, :], none)
    # Each pass lets the smallest index travel one more edge; a component's diameter is below K.
    for _ in range(k):
        spread = np.where(core_edges, labels[:, None, :], none).min(axis=2)
        updated = np.where(core, np.minimum(labels, spread), none)
        if np.array_equal(updated, labels):
            break
        labels = updated

    # Border points: the first cluster to reach them, i.e. the smallest label among their core neighbours.
    core_neighbour_labels = np.where(adjacent & core[:, None, :], labels[:, None, :], none).min(axis=2)
    labels = np.where(core, labels, core_neighbour_labels)
    return np.where(labels == none, -1, labels)


def largest_cluster_mean(
    latlon_deg: np.ndarray,
    valid: np.ndarray,
    *,
    eps_km: float = 1.0,
    min_samples: int = 1,
    similarity: Optional[np.ndarray] = None,
) -> ClusterResult:
    """Mean position of the largest DBSCAN cluster among each query's neighbours (Search within Cell).

    Args:
        latlon_deg: ``(Q, K, 2)`` neighbour coordinates in degrees.
        valid: ``(Q, K)`` bool; False marks padding (fewer than K neighbours were found).
        eps_km: DBSCAN radius on the great-circle distance (paper: 1 km).
        min_samples: DBSCAN core-point threshold, the point itself included (paper: 1, every point is core).
        similarity: optional ``(Q, K)`` similarities to the query. Ties between clusters of equal size go to
            the cluster holding the most similar photo; without it neighbours are taken as sorted by
            similarity, so the cluster holding the lowest index wins.

    Returns:
        A `ClusterResult`. Where DBSCAN finds only noise (possible when ``min_samples > 1``), every point is
        its own cluster of one and the most similar photo is chosen.
    """
    latlon_deg = np.asarray(latlon_deg, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    labels = dbscan_labels(latlon_deg, valid, eps_km=eps_km, min_samples=min_samples)
    n_rows, k = valid.shape
    rank = _similarity_rank(similarity, valid)

    clustered = labels >= 0
    same = (labels[:, :, None] == labels[:, None, :]) & clustered[:, :, None]
    cluster_size = np.where(clustered, same.sum(axis=2), 0)
    # Noise-only rows: each valid point counts as a singleton.
    only_noise = ~clustered.any(axis=1)
    cluster_size = np.where(only_noise[:, None] & valid, 1, cluster_size)

    # The representative is the most similar photo among those in a largest cluster; np.lexsort's last key
    # is primary, and argmax of the sorted position picks the best (stable, so the lowest index on equal rank).
    masked_rank = np.where(cluster_size > 0, rank, -np.inf)
    order = np.lexsort((-np.arange(k)[None, :].repeat(n_rows, 0), masked_rank, cluster_size), axis=1)
    best = order[:, -1]
    rows = np.arange(n_rows)
    best_label = labels[rows, best]
    members = np.where(
        only_noise[:, None],
        np.arange(k)[None, :] == best[:, None],
        labels == best_label[:, None],
    )
    members &= valid
    size = members.sum(axis=1)

    latlon_out = spherical_mean(latlon_deg, members)
    return ClusterResult(latlon_deg=latlon_out, size=size, members=members)


def spherical_mean(latlon_deg: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean position on the sphere (normalised mean of unit vectors) of every row's weighted points.

    Args:
        latlon_deg: ``(Q, K, 2)`` coordinates in degrees.
        weights: ``(Q, K)`` non-negative weights (a bool mask selects points).

    Returns:
        ``(Q, 2)`` degrees; NaN where a row has zero total weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        xyz = latlon_to_unit(latlon_deg)
        total = np.where(w[..., None] > 0, xyz * w[..., None], 0.0).sum(axis=1)
    norm = np.linalg.norm(total, axis=1)
    out = np.full((len(total), 2), np.nan)
    ok = norm > 0
    unit = total[ok] / norm[ok, None]
    out[ok] = unit_to_latlon(unit, assume_unit=True)
    return out


def _similarity_rank(similarity: Optional[np.ndarray], valid: np.ndarray) -> np.ndarray:
    """``(Q, K)`` float64 scores ranking each row's neighbours, higher first: ``similarity`` when given, else
    the descending rank (earlier neighbours are more similar)."""
    n_rows, k = valid.shape
    if similarity is None:
        return np.broadcast_to(-np.arange(k, dtype=np.float64), (n_rows, k))
    rank = np.asarray(similarity, dtype=np.float64)
    if rank.shape != valid.shape:
        raise ValueError(f"similarity must have shape {valid.shape}, got {rank.shape}")
    return rank


def _check_shapes(latlon_deg: np.ndarray, valid: np.ndarray) -> None:
    if latlon_deg.ndim != 3 or latlon_deg.shape[2] != 2:
        raise ValueError(f"latlon must have shape (Q, K, 2), got {latlon_deg.shape}")
    if valid.shape != latlon_deg.shape[:2]:
        raise ValueError(f"valid must have shape {latlon_deg.shape[:2]}, got {valid.shape}")


# Ways to turn a query's K neighbours into one position; the first is the paper's (section 3.4, Table 6).
AGGREGATIONS = ("largest-cluster-mean", "weighted-mean", "medoid", "top1", "mean-all", "kde-peak")
DEFAULT_AGGREGATION = AGGREGATIONS[0]


def aggregate(
    latlon_deg: np.ndarray,
    valid: np.ndarray,
    *,
    method: str = DEFAULT_AGGREGATION,
    eps_km: float = 1.0,
    min_samples: int = 1,
    similarity: Optional[np.ndarray] = None,
) -> ClusterResult:
    """One position per query from its neighbours, by one of the `AGGREGATIONS`.

    - ``largest-cluster-mean`` (the paper): `largest_cluster_mean`.
    - ``weighted-mean``: the largest cluster as in the paper, its members' spherical mean weighted by their
      similarity to the query (the authors' ``spatial_clustering`` with exponent ``a = 1``; similarities below
      zero count as zero, and a cluster whose weights are all zero falls back to the plain mean).
    - ``medoid``: the member of the largest cluster with the smallest summed great-circle distance to the
      other members (ties: the most similar one).
    - ``top1``: the most similar neighbour.
    - ``mean-all``: the spherical mean of every valid neighbour (the "Average" row of the paper's Table 6).
    - ``kde-peak``: the neighbour at the highest point of a Gaussian kernel density over all valid
      neighbours with bandwidth ``eps_km`` (the KDE of Vo et al., ICCV 2017, as compared in Table 6; ties:
      the most similar one).

    Args:
        latlon_deg: ``(Q, K, 2)`` neighbour coordinates in degrees.
        valid: ``(Q, K)`` bool; False marks padding.
        method: one of `AGGREGATIONS`.
        eps_km: DBSCAN radius for the cluster methods, kernel bandwidth for ``kde-peak``.
        min_samples: DBSCAN core-point threshold for the cluster methods.
        similarity: ``(Q, K)`` similarities to the query; without it neighbours are taken as sorted best first.

    Returns:
        A `ClusterResult`: ``members`` are the neighbours the position is made of (one for ``top1``,
        ``medoid`` and ``kde-peak``).
    """
    check_choice("aggregation", method, AGGREGATIONS)
    latlon_deg = np.asarray(latlon_deg, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    _check_shapes(latlon_deg, valid)
    if method == "largest-cluster-mean":
        return largest_cluster_mean(
            latlon_deg, valid, eps_km=eps_km, min_samples=min_samples, similarity=similarity
        )
    n_rows, k = valid.shape
    rank = np.where(valid, _similarity_rank(similarity, valid), -np.inf)
    if method in ("weighted-mean", "medoid"):
        cluster = largest_cluster_mean(
            latlon_deg, valid, eps_km=eps_km, min_samples=min_samples, similarity=similarity
        )
        if method == "weighted-mean":
            weights = np.where(cluster.members, np.clip(rank, 0.0, None), 0.0)
            no_weight = weights.sum(axis=1) <= 0
            weights[no_weight] = cluster.members[no_weight]
            return ClusterResult(spherical_mean(latlon_deg, weights), cluster.size, cluster.members)
        with np.errstate(invalid="ignore"):
            dist_km = pairwise_haversine_km(latlon_deg)
        pair = cluster.members[:, :, None] & cluster.members[:, None, :]
        total_km = np.where(pair, dist_km, 0.0).sum(axis=2)
        pick = _best(np.where(cluster.members, -total_km, -np.inf), rank)
    elif method == "top1":
        pick = _best(np.where(valid, 0.0, -np.inf), rank)
    elif method == "mean-all":
        return ClusterResult(spherical_mean(latlon_deg, valid), valid.sum(axis=1), valid.copy())
    else:
        if eps_km <= 0:
            raise ValueError(f"kde-peak needs a bandwidth eps_km > 0, got {eps_km}")
        with np.errstate(invalid="ignore"):
            dist_km = pairwise_haversine_km(latlon_deg)
        pair = valid[:, :, None] & valid[:, None, :]
        density = np.where(pair, np.exp(-0.5 * (np.nan_to_num(dist_km) / eps_km) ** 2), 0.0).sum(axis=2)
        pick = _best(np.where(valid, density, -np.inf), rank)
    members = (np.arange(k)[None, :] == pick[:, None]) & valid
    latlon_out = np.full((n_rows, 2), np.nan)
    rows = np.flatnonzero(members.any(axis=1))
    latlon_out[rows] = latlon_deg[rows, pick[rows]]
    return ClusterResult(latlon_out, members.sum(axis=1), members)


def _best(score: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per row, the column with the highest ``score``; ties go to the highest ``rank``, then the lowest index."""
    n_rows, k = score.shape
    order = np.lexsort((-np.arange(k)[None, :].repeat(n_rows, 0), rank, score), axis=1)
    return order[:, -1]
