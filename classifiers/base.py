"""What every classification head shares: the partition it predicts over and the common head API."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from geoswc.data.sphere import latlon_to_unit, unit_to_latlon

__all__ = ["GeoHead", "head_cells", "latlon_to_unit", "partition_names", "partition_sizes", "unit_to_latlon"]


def partition_sizes(geocells: Any) -> List[int]:
    """Number of cells of each granularity, coarse -> fine."""
    return [int(len(p.centers_deg)) for p in geocells.partitions]


def partition_names(geocells: Any) -> List[str]:
    """Names of the partitions, coarse -> fine (``g<index>`` for a partition without one)."""
    return [str(getattr(p, "name", f"g{g}")) for g, p in enumerate(geocells.partitions)]


def head_cells(geocells: Any, partitions: Optional[Sequence[str]] = None) -> Any:
    """The `Geocells` a head predicts over: ``geocells`` itself, or the named partitions of it.

    Raises:
        ValueError: a name that is not one of the partitions (the valid names listed).
    """
    if partitions is None:
        return geocells
    if isinstance(partitions, str) or not all(isinstance(n, str) for n in partitions):
        raise ValueError(f"partitions must be a list of partition names, got {partitions!r}")
    if list(partitions) == partition_names(geocells):
        return geocells
    return geocells.select(list(partitions))


class GeoHead(nn.Module):
    """Base of the heads: maps pooled backbone features to a dict of tensors.

    Subclasses implement ``forward``, ``loss`` and ``fine_log_probs``; the prediction is the centre of the
    best-scoring fine cell unless a subclass knows better.

    A model's cells may hold several partitions (paper 4.1: one of ~32K cells for CE and MvMF, GeoEstimation's
    three for HC). A head predicts over the partitions it names (``partitions``, coarse -> fine; by default
    all of them), its fine cells are those of the finest it names, and it reads its labels from the columns of
    those partitions in the label matrix of the whole cells (``Geocells.assign``).

    Args:
        in_features: width of the pooled backbone features.
        geocells: the model's `Geocells`.
        partitions: names of the partitions the head predicts over; ``None``: all of them.

    Attributes:
        kind: registry name (``ce``, ``hc``, ``mvmf``).
        fingerprint: the fingerprint of the ``Geocells`` the head was built for (all of its partitions).
        partitions: the names of the head's partitions, coarse -> fine; ``partition`` the finest.
        label_columns: their columns in the label matrix of ``geocells``.
        options: the keyword options of the head, saved with its weights.
    """

    kind = ""

    def __init__(self, in_features: int, geocells: Any, *, partitions: Optional[Sequence[str]] = None):
        super().__init__()
        if int(in_features) <= 0:
            raise ValueError(f"in_features must be positive, got {in_features!r}")
        self.in_features = int(in_features)
        self.fingerprint = str(geocells.fingerprint)
        view = head_cells(geocells, partitions)
        all_names = partition_names(geocells)
        self.partitions = partition_names(view)
        self.partition = self.partitions[-1]
        self.label_columns = [all_names.index(name) for name in self.partitions]
        self.cells = view
        self.sizes = partition_sizes(view)
        self.n_fine = self.sizes[-1]
        centers = np.asarray(view.fine.centers_deg, dtype=np.float64).reshape(-1, 2)
        # float64 so that predicted coordinates keep metre precision whatever dtype the head runs in.
        self.register_buffer("centers_deg", torch.from_numpy(centers.copy()), persistent=False)
        self.options: Dict[str, Any] = {}
        if partitions is not None:
            self.options["partitions"] = list(self.partitions)

    def fine_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) the fine cell_idx of the head's own partition, from the whole cells' labels (B, n_gran)."""
        return labels[:, self.label_columns[-1]]

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
