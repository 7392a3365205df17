"""Evaluation protocol: great-circle accuracy at fixed radii, median error, benchmark loaders, reports.

Kordopatis-Zilos et al., ICMR 2021, sections 4.3 and 5. ``geoswc.eval.report`` (matplotlib) is imported on
demand so that importing this package stays light.
"""

from geoswc.eval.benchmarks import (
    BENCHMARKS,
    load_benchmark,
    normalize_image_id,
    read_locations,
    read_peer_predictions,
)
from geoswc.eval.metrics import (
    EARTH_RADIUS_KM,
    RADII_KM,
    VALIDATION_RADII_KM,
    accuracy_at,
    format_table,
    haversine_km,
    score_predictions,
)

__all__ = [
    "EARTH_RADIUS_KM",
    "RADII_KM",
    "VALIDATION_RADII_KM",
    "BENCHMARKS",
    "haversine_km",
    "score_predictions",
    "accuracy_at",
    "format_table",
    "load_benchmark",
    "normalize_image_id",
    "read_locations",
    "read_peer_predictions",
]
