"""S2 cell outlines for the map: the four edges of a cell as lat/lon polylines.

An S2 cell's edges are great-circle arcs between its four vertices (s2geometry ``S2Cell.GetVertex``); drawn as
straight lines in lon/lat they would cut corners on the large cells of a coarse partition, so each edge is
sampled along its great circle. Longitudes are unwrapped along the outline, so a cell that crosses the
antimeridian is one continuous polygon (Leaflet draws longitudes past 180 where they belong).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np

from geoswc.data.sphere import slerp_arc, unit_to_latlon

__all__ = ["cell_polygon"]

# Points per edge, the first vertex included: enough for a level-2 cell (about 2,500 km across) to bend
# smoothly, cheap for the small cells of a fine partition.
EDGE_POINTS = 8


@lru_cache(maxsize=4096)
def cell_polygon(token: str, edge_points: int = EDGE_POINTS) -> Tuple[Tuple[float, float], ...]:
    """The outline of the S2 cell ``token`` as ``(lat, lon)`` degrees, counter-clockwise, not closed.

    Args:
        token: an S2 cell token (``"47a1"``).
        edge_points: points per edge (each edge sampled along its great circle).

    Raises:
        ValueError: ``token`` is not a valid S2 cell token.
    """
    import s2geometry as s2

    cell_id = s2.S2CellId.FromToken(str(token))
    if not cell_id.is_valid():
        raise ValueError(f"not a valid S2 cell token: {token!r}")
    cell = s2.S2Cell(cell_id)
    vertices = []
    for k in range(4):
        v = cell.GetVertex(k)
        vertices.append(np.array([v.x(), v.y(), v.z()]) / np.sqrt(v.x() ** 2 + v.y() ** 2 + v.z() ** 2))
    points = np.concatenate([slerp_arc(vertices[k], vertices[(k + 1) % 4], edge_points) for k in range(4)])
    lat, lon = unit_to_latlon(points, assume_unit=True).T
    # Unwrap so the outline never jumps by a whole turn.
    lon = lon[0] + np.concatenate([[0.0], np.cumsum((np.diff(lon) + 180.0) % 360.0 - 180.0)])
    out: List[Tuple[float, float]] = [(round(float(a), 6), round(float(b), 6)) for a, b in zip(lat, lon)]
    return tuple(out)
