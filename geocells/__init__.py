"""Adaptive S2 partitions of the Earth into geographic cells (paper section 3.1)."""

from geoswc.geocells.partition import Geocells, Partition
from geoswc.geocells.partitioner import S2Partitioner
from geoswc.geocells.s2 import (
    cell_id_children,
    cell_id_level,
    cell_id_parent,
    cell_id_range,
    cell_id_to_token,
    latlng_to_cell_id,
    token_to_cell_id,
)

__all__ = [
    "Geocells",
    "Partition",
    "S2Partitioner",
    "cell_id_children",
    "cell_id_level",
    "cell_id_parent",
    "cell_id_range",
    "cell_id_to_token",
    "latlng_to_cell_id",
    "token_to_cell_id",
]
