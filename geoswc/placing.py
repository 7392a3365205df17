"""How a `Geolocator` places photos from their backbone features (ICMR 2021, section 3.4): a head's cell
probabilities (optionally restricted to an area), the prediction density around its best cell, and the
background search that follows (Search within Cell, or the nearest background photo anywhere).

The functions take the model as their first argument and read only its parts (heads, retrieval module,
index, partition); `Geolocator.locate` strings them together and returns `Predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from geoswc.area_filter import restrict_to_area
from geoswc.data.sphere import haversine_km
from geoswc.swc import nearest_background, search_within_cell

MODES = ("swc", "cell", "rrm")
CONFIDENCE_RADIUS_KM = 25.0


@dataclass
class Predictions:
    """Predictions for N photos as arrays (``Geolocator.locate``); `to_records` gives one dict per photo.

    Attributes:
        latlon_deg: ``(N, 2)`` predicted positions.
        method: ``(N,)`` str: ``swc``, ``cell``, ``fallback`` (Search within Cell found no background photo in
            the cell, so the head's prediction is used) or ``rrm``.
        cell_idx: ``(N,)`` the head's best fine cell, in the head's own partition (-1 without a head).
        cell_prob: ``(N,)`` its probability.
        top_cells: ``(N, T)`` the head's T best fine cells, best first; ``top_probs`` their probabilities.
        confidence: ``(N,)`` probability mass of the fine cells whose centres lie within 25 km of the best
            cell's centre (the ICMR authors' "prediction density"); NaN without a head.
        neighbour_rows: ``(N, K)`` background index rows used, most similar first, -1 padding.
        neighbour_sims: ``(N, K)`` their similarities.
        neighbour_in_cluster: ``(N, K)`` bool, the neighbours that make up the prediction.
        head: the head used (None for ``rrm`` without heads); mode: the mode.
    """

    latlon_deg: np.ndarray
    method: np.ndarray
    cell_idx: np.ndarray
    cell_prob: np.ndarray
    top_cells: np.ndarray
    top_probs: np.ndarray
    confidence: np.ndarray
    neighbour_rows: np.ndarray
    neighbour_sims: np.ndarray
    neighbour_in_cluster: np.ndarray
    head: Optional[str]
    mode: str

    def __len__(self) -> int:
        return len(self.latlon_deg)

    def to_records(self, geolocator: Any) -> List[Dict[str, Any]]:
        """One JSON-ready dict per photo, with cell tokens and neighbour ids resolved."""
        tokens = geolocator.head_partition(self.head).tokens if self.head is not None else np.empty(0, str)
        index = geolocator.index
        index_latlon = np.asarray(index.latlon) if index is not None else None
        records = []
        for i in range(len(self)):
            cell = int(self.cell_idx[i])
            rows = self.neighbour_rows[i]
            keep = rows >= 0
            neighbours = [
                {
                    "id": str(index.ids[r]),
                    "similarity": float(s),
                    "lat": float(index_latlon[r, 0]),
                    "lon": float(index_latlon[r, 1]),
                    "in_cluster": bool(c),
                }
                for r, s, c in zip(
                    rows[keep], self.neighbour_sims[i][keep], self.neighbour_in_cluster[i][keep]
                )
            ]
            records.append(
                {
                    "lat": float(self.latlon_deg[i, 0]),
                    "lon": float(self.latlon_deg[i, 1]),
                    "method": str(self.method[i]),
                    "head": self.head,
                    "cell_idx": cell,
                    "cell_token": str(tokens[cell]) if cell >= 0 else None,
                    "cell_prob": float(self.cell_prob[i]),
                    "top_cells": [
                        {"cell_idx": int(c), "token": str(tokens[c]), "prob": float(p)}
                        for c, p in zip(self.top_cells[i], self.top_probs[i])
                        if c >= 0
                    ],
                    "confidence": float(self.confidence[i]),
                    "neighbours": neighbours,
                }
            )
        return records


def density_neighbour_table(centers_deg: np.ndarray) -> torch.Tensor:
    """``(n, M)`` cells whose centres lie within `CONFIDENCE_RADIUS_KM` of each cell's centre, -1 padded."""
    return near_cells(centers_deg, range(len(centers_deg)))


def near_cells(centers_deg: np.ndarray, cells: Sequence[int], known: Optional[dict] = None) -> torch.Tensor:
    """``(len(cells), M)`` the cells whose centres lie within `CONFIDENCE_RADIUS_KM` (great circle, haversine)
    of each of ``cells``' centres, ascending, -1 padded.

    Each asked cell is compared with every centre (numpy, no spatial index to build or library to load), so a
    batch costs what its softmax over the cells costs; ``known`` (cell -> its neighbours) keeps the answers
    between batches.
    """
    centers_deg = np.asarray(centers_deg, dtype=np.float64)
    known = {} if known is None else known
    cells = [int(c) for c in cells]
    for cell in dict.fromkeys(c for c in cells if c not in known):
        lat, lon = centers_deg[cell]
        dist_km = haversine_km(lat, lon, centers_deg[:, 0], centers_deg[:, 1])
        known[cell] = np.flatnonzero(dist_km <= CONFIDENCE_RADIUS_KM)
    width = max((len(known[c]) for c in cells), default=0)
    table = np.full((len(cells), width), -1, dtype=np.int64)
    for row, cell in enumerate(cells):
        table[row, : len(known[cell])] = known[cell]
    return torch.from_numpy(table)


def classify(
    model: Any,
    features: torch.Tensor,
    kind: str,
    n_top: int,
    area: Optional[Sequence[float]] = None,
) -> Dict[str, np.ndarray]:
    """Head ``kind``'s position, best cells and their probabilities, and the prediction density, per photo."""
    head = model.heads[kind]
    with torch.inference_mode(), model._autocast():
        outputs = head(model.head_features(features).to(model.device))
        log_probs = head.fine_log_probs(outputs).float()
        head_latlon = head.predict_latlon(outputs).double()
    # HC scores are products over the hierarchy, not a distribution over fine cells: normalise them.
    probs = torch.softmax(log_probs, dim=1).cpu()
    if area is not None:
        centers = np.asarray(model.head_partition(kind).centers_deg, dtype=np.float64)
        probs, n_inside = restrict_to_area(probs, centers, area)
        n_top = min(n_top, n_inside)
    n_top = min(n_top, probs.shape[1])
    top_probs, top_cells = probs.topk(n_top, dim=1)
    if area is not None:
        head_latlon = torch.from_numpy(centers[top_cells[:, 0].numpy()])
    neighbours = model.density_neighbours(model.head_partition(kind).name, top_cells[:, 0].tolist())
    near_mass = torch.where(neighbours >= 0, probs.gather(1, neighbours.clamp(min=0)), 0.0).sum(dim=1)
    return {
        "latlon": head_latlon.cpu().numpy(),
        "cell_idx": top_cells[:, 0].numpy().astype(np.int64),
        "cell_prob": top_probs[:, 0].numpy().astype(np.float64),
        "top_cells": top_cells.numpy().astype(np.int64),
        "top_probs": top_probs.numpy().astype(np.float64),
        "confidence": near_mass.numpy().astype(np.float64),
    }


def unclassified(n: int) -> Dict[str, np.ndarray]:
    """What `classify` gives for ``n`` photos when no head is used (``rrm`` on a model without heads)."""
    return {
        "latlon": np.full((n, 2), np.nan),
        "cell_idx": np.full(n, -1, np.int64),
        "cell_prob": np.full(n, np.nan),
        "top_cells": np.full((n, 0), -1, np.int64),
        "top_probs": np.full((n, 0), np.nan),
        "confidence": np.full(n, np.nan),
    }


def search_background(
    model: Any,
    features: torch.Tensor,
    cls: Dict[str, np.ndarray],
    *,
    kind: Optional[str],
    mode: str,
    k: int,
    eps_km: float,
    min_samples: int,
    top_cells: int,
    embeddings: Optional[torch.Tensor] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(latlon, method, rows, sims, in_cluster)`` of mode ``swc`` (within the head's ``top_cells`` best
    cells, falling back to ``cls``'s position) or ``rrm`` (the nearest background photo anywhere)."""
    n = len(features)
    if model.index is None:
        raise ValueError(f"mode {mode!r} needs a background index; this model has none, use mode='cell'")
    latlon = cls["latlon"].copy()
    method = np.full(n, "cell", dtype=object)
    emb = model.embed(features) if embeddings is None else embeddings
    if mode == "swc":
        cells = cls["top_cells"][:, :top_cells]
        # The head's cells are searched in its own partition (paper 4.1: HC's differ from CE's).
        own = model.head_partition(kind).name
        partition = None if own == model._index_partition() else own
        res = search_within_cell(
            emb, cells, model.index, k=k, eps_km=eps_km, min_samples=min_samples, partition=partition
        )
        latlon[res.found] = res.latlon_deg[res.found]
        method[:] = np.where(res.found, "swc", "fallback")
        return latlon, method, res.rows, res.similarities, res.members
    res = nearest_background(emb, model.index, k=1)
    latlon[res.found] = res.latlon_deg[res.found]
    method[:] = np.where(res.found, "rrm", "fallback")
    return latlon, method, res.rows, res.similarities, res.rows >= 0


__all__ = ["CONFIDENCE_RADIUS_KM", "MODES", "Predictions", "classify", "search_background", "unclassified"]
