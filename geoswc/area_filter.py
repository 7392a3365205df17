"""The area filter (thesis 4.2.10.4): only the cells whose centre lies in a lat/lon box compete; their
probabilities are renormalised and a head's position becomes the best one's centre."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch


def cells_in_area(centers_deg: np.ndarray, area: Sequence[float]) -> np.ndarray:
    """Which cells have their centre in a lat/lon box.

    Args:
        centers_deg: ``(n, 2)`` cell centres, (lat, lon) degrees.
        area: ``(south, west, north, east)`` degrees, edges included; ``west > east`` is a box that crosses
            the antimeridian.

    Returns:
        ``(n,)`` bool.

    Raises:
        ValueError: ``area`` is not four finite numbers with -90 <= south <= north <= 90 and longitudes in
            [-180, 180], or no cell centre lies in it.
    """
    values = [float(v) for v in area]
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(
            f"area must be four numbers (south, west, north, east) in degrees, got {list(area)!r}"
        )
    south, west, north, east = values
    if not (-90.0 <= south <= north <= 90.0) or not all(-180.0 <= v <= 180.0 for v in (west, east)):
        raise ValueError(
            f"area must be (south, west, north, east) with -90 <= south <= north <= 90 and longitudes in "
            f"[-180, 180], got {values}"
        )
    lat, lon = centers_deg[:, 0], centers_deg[:, 1]
    in_lon = (lon >= west) & (lon <= east) if west <= east else (lon >= west) | (lon <= east)
    inside = (lat >= south) & (lat <= north) & in_lon
    if not inside.any():
        raise ValueError(f"no cell of the model has its centre inside the area {values}; draw a larger one")
    return inside


def restrict_to_area(
    probs: torch.Tensor, centers_deg: np.ndarray, area: Sequence[float]
) -> Tuple[torch.Tensor, int]:
    """``(B, n)`` cell probabilities with the cells outside ``area`` set to 0 and each row renormalised, and
    how many cells are inside (`cells_in_area` raises when none is)."""
    inside = torch.from_numpy(cells_in_area(centers_deg, area))
    probs = torch.where(inside, probs, 0.0)
    probs = probs / probs.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return probs, int(inside.sum())
