"""What every classification head shares: the partition it predicts over and the common head API."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn


def partition_sizes(geocells: Any) -> List[int]:
    """Number of cells of each granularity, coarse -> fine."""
    return [int(len(p.centers_deg)) for p in geocells.partitions]


def latlon_to_unit(latlon_deg: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees -> (..., 3) unit vectors on the sphere."""
    lat_rad, lon_rad = torch.deg2rad(latlon_deg).unbind(-1)
    return torch.stack(
        (
            torch.cos(lat_rad) * torch.cos(lon_rad),
            torch.cos(lat_rad) * torch.sin(lon_rad),
            torch.sin(lat_rad),
        ),
        dim=-1,
    )


def unit_to_latlon(xyz: torch.Tensor) -> torch.Tensor:
    """(..., 3) vectors (any norm > 0) -> (..., 2) degrees."""
    x, y, z = xyz.unbind(-1)
    lat_rad = torch.atan2(z, torch.hypot(x, y))
    lon_rad = torch.atan2(y, x)
    return torch.rad2deg(torch.stack((lat_rad, lon_rad), dim=-1))


class GeoHead(nn.Module):
    """Base of the heads: maps pooled backbone features to a dict of tensors.

    Subclasses implement ``forward``, ``loss`` and ``fine_log_probs``; the prediction is the centre of the
    best-scoring fine cell unless a subclass knows better.

    Attributes:
        kind: registry name (``ce``, ``hc``, ``mvmf``).
        fingerprint: the fingerprint of the ``Geocells`` the head was built for.
        options: the keyword options of the head, saved with its weights.
    """

    kind = ""

    def __init__(self, in_features: int, geocells: Any):
        super().__init__()
        if int(in_features) <= 0:
            raise ValueError(f"in_features must be positive, got {in_features!r}")
        self.in_features = int(in_features)
        self.fingerprint = str(geocells.fingerprint)
        self.sizes = partition_sizes(geocells)
        self.n_fine = self.sizes[-1]
        centers = np.asarray(geocells.fine.centers_deg, dtype=np.float64).reshape(-1, 2)
        # float64 so that predicted coordinates keep metre precision whatever dtype the head runs in.
        self.register_buffer("centers_deg", torch.from_numpy(centers.copy()), persistent=False)
        self.options: Dict[str, Any] = {}

    def loss(
        self, outputs: Dict[str, torch.Tensor], labels: torch.Tensor, latlon: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def fine_log_probs(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def predict_cell(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) cell_idx of the best fine cell."""
        return self.fine_log_probs(outputs).argmax(dim=1)

    def predict_latlon(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) degrees: the centre of the best fine cell."""
        return self.centers_deg[self.predict_cell(outputs)]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not -1 (photos outside every cell); 0 if none is."""
    valid = target >= 0
    if not bool(valid.any()):
        return logits.float().sum() * 0.0
    return nn.functional.cross_entropy(logits[valid].float(), target[valid])
