"""Search within Cell: retrieval inside the predicted cell plus spatial clustering (paper section 3.4)."""

from geoswc.swc.cluster import (
    AGGREGATIONS,
    ClusterResult,
    aggregate,
    dbscan_labels,
    largest_cluster_mean,
    spherical_mean,
)
from geoswc.swc.search import (
    NearestResult,
    SwcResult,
    nearest_background,
    search_within_cell,
)

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "ClusterResult",
    "NearestResult",
    "SwcResult",
    "dbscan_labels",
    "largest_cluster_mean",
    "nearest_background",
    "search_within_cell",
    "spherical_mean",
]
