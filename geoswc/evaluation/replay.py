"""Replaying the stages after the networks from an `EvalStore`: retrieval within the predicted cells (or
anywhere), clustering and aggregation under one `Setting`, on an exact or a compressed index (SQ8, PQ, and the
1-bit codes of McAleese, "Learning Global Features for Fast Visual Localisation"). `geoswc evaluate` places
its photos this way, and ``geoswc sweep`` runs a grid of settings the same way.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from geoswc.data.validation import check_choice
from geoswc.evaluation.store import LOCATE_CHUNK, EvalStore
from geoswc.swc import AGGREGATIONS, aggregate, search_within_cell
from geoswc.swc.cluster import DEFAULT_AGGREGATION

INDEX_MODES = ("exact", "sq8", "pq", "binary")
_FAISS_MODE = {"exact": "flat", "sq8": "sq8", "pq": "pq", "binary": "binary"}
SCOPE_HELP = "cell (the head's best cell), top<n> (its n best cells, e.g. top3) or global (the whole index)"


@dataclass(frozen=True)
class Setting:
    """One setting of the stages after the networks.

    Attributes:
        head: the head whose cells are searched (and whose prediction is the fallback); None for pure
            retrieval (scope ``global``).
        k: neighbours retrieved; eps_km, min_samples: DBSCAN; aggregation: one of `AGGREGATIONS`.
        scope: ``cell``, ``top<n>`` or ``global``; index_mode: one of `INDEX_MODES`.
    """

    head: Optional[str]
    k: int = 10
    eps_km: float = 1.0
    min_samples: int = 1
    aggregation: str = DEFAULT_AGGREGATION
    scope: str = "cell"
    index_mode: str = "exact"

    def check(self) -> "Setting":
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.eps_km < 0:
            raise ValueError(f"eps_km must be >= 0, got {self.eps_km}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("index mode", self.index_mode, INDEX_MODES)
        scope_cells(self.scope)
        if self.head is None and self.scope != "global":
            raise ValueError(
                f"scope {self.scope!r} needs a head to name the cells; without one use scope global"
            )
        return self


def scope_cells(scope: str) -> Optional[int]:
    """Cells searched per photo for a scope: ``cell`` -> 1, ``top3`` -> 3, ``global`` -> None."""
    if scope == "cell":
        return 1
    if scope == "global":
        return None
    match = re.fullmatch(r"top(\d+)", str(scope))
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown scope {scope!r}; choose {SCOPE_HELP}")
    return int(match.group(1))


def scope_name(top_cells: int) -> str:
    """The scope of a ``top_cells`` setting: 1 -> ``cell``, n -> ``top<n>``."""
    return "cell" if int(top_cells) == 1 else f"top{int(top_cells)}"


@dataclass
class Replayed:
    """Positions of the evaluated photos under one setting.

    Attributes:
        latlon_deg: ``(n, 2)``; method: ``(n,)`` ``swc``, ``rrm``, ``fallback`` (no background photo where
            searched: the head's prediction) or ``cell``; rows, sims: ``(n, K)`` neighbours; seconds: time taken.
    """

    latlon_deg: np.ndarray
    method: np.ndarray
    rows: np.ndarray
    sims: np.ndarray
    seconds: float


class Replayer:
    """Runs `Setting`s on an `EvalStore` and a background index (compressed indexes are built once)."""

    def __init__(self, store: EvalStore, index: Any = None):
        self.store = store
        self.index = index
        self._decoded: Dict[str, Any] = {}

    def fallback(self, head: Optional[str]) -> np.ndarray:
        """The positions used where retrieval finds nothing: the head's, or NaN without a head."""
        n = int(self.store.evaluated.sum())
        if head is None:
            head = self.store.meta.get("preferred_head")
        if head is None or head not in self.store.heads:
            return np.full((n, 2), np.nan)
        return self.store.heads[head].latlon_deg.astype(np.float64).copy()

    def head_only(self, head: str) -> Replayed:
        """The head's own prediction (the ``ce``/``hc``/``mvmf`` rows of Table 1)."""
        self._check_head(head)
        latlon = self.store.heads[head].latlon_deg.astype(np.float64).copy()
        n = len(latlon)
        return Replayed(
            latlon, np.full(n, "cell", dtype=object), np.zeros((n, 0), np.int64), np.zeros((n, 0)), 0.0
        )

    def _check_head(self, head: Optional[str]) -> None:
        if head is not None and head not in self.store.heads:
            raise ValueError(
                f"head {head!r} is not in the store; it has: {', '.join(self.store.heads) or 'none'}"
            )

    def _searchable(self, mode: str):
        """The index whose embeddings are what ``mode`` stores (decoded), for exact search within cells."""
        if mode == "exact":
            return self.index
        if mode not in self._decoded:
            index = self.index
            if mode == "binary":
                parts = [
                    np.where(
                        np.asarray(index.embeddings[s : s + index.chunk_size], np.float32) > 0, 1.0, -1.0
                    )
                    for s in range(0, len(index), index.chunk_size)
                ]
                decoded = (
                    np.concatenate(parts).astype(np.float32)
                    if parts
                    else np.zeros((0, index.dim), np.float32)
                )
            else:
                decoded = index.faiss_index(_FAISS_MODE[mode]).reconstruct_n(0, len(index))
            proxy = copy.copy(index)
            proxy.embeddings = np.ascontiguousarray(decoded, dtype=np.float32)
            proxy.dtype = "float32"
            proxy._searchers = {}
            proxy._device_embeddings = {}
            self._decoded[mode] = proxy
        return self._decoded[mode]

    def run(self, setting: Setting) -> Replayed:
        """Place the evaluated photos under ``setting``."""
        setting.check()
        self._check_head(setting.head)
        store = self.store
        if store.embeddings is None or self.index is None:
            raise ValueError(
                "this store has no retrieval embeddings or no background index; only heads can run"
            )
        started = time.perf_counter()
        n = len(store.embeddings)
        latlon = self.fallback(setting.head)
        method = np.full(n, "fallback", dtype=object)
        emb = store.embeddings
        top = scope_cells(setting.scope)
        if setting.index_mode != "exact":
            self._searchable(setting.index_mode)  # built (and trained) outside the timed part
            started = time.perf_counter()
        if top is None:
            rows_parts, sims_parts = [], []
            for start in range(0, n, LOCATE_CHUNK):
                sims, rows = self.index.search(
                    emb[start : start + LOCATE_CHUNK], setting.k, mode=_FAISS_MODE[setting.index_mode]
                )
                rows_parts.append(rows)
                sims_parts.append(np.where(rows >= 0, sims, -np.inf).astype(np.float32))
            rows = np.concatenate(rows_parts) if rows_parts else np.zeros((0, setting.k), np.int64)
            sims = np.concatenate(sims_parts) if sims_parts else np.zeros((0, setting.k), np.float32)
            valid = rows >= 0
            coords = np.full(rows.shape + (2,), np.nan)
            coords[valid] = np.asarray(self.index.latlon, dtype=np.float64)[rows[valid]]
            result = aggregate(
                coords,
                valid,
                method=setting.aggregation,
                eps_km=setting.eps_km,
                min_samples=setting.min_samples,
                similarity=sims,
            )
            found = valid.any(axis=1)
            latlon[found] = result.latlon_deg[found]
            method[found] = "rrm"
        else:
            cells = store.heads[setting.head].top_cells
            if top > cells.shape[1]:
                raise ValueError(
                    f"scope {setting.scope!r} needs {top} cells per photo; the store keeps {cells.shape[1]}"
                )
            index = self._searchable(setting.index_mode)
            binary = setting.index_mode == "binary"
            partition = (store.meta.get("search_partitions") or {}).get(setting.head)
            options = {} if partition is None else {"partition": partition}
            rows_parts, sims_parts = [], []
            for start in range(0, n, LOCATE_CHUNK):
                stop = start + LOCATE_CHUNK
                queries = torch.from_numpy(np.ascontiguousarray(emb[start:stop]))
                if binary:
                    queries = torch.where(queries > 0, 1.0, -1.0)
                res = search_within_cell(
                    queries,
                    cells[start:stop, :top],
                    index,
                    k=setting.k,
                    eps_km=setting.eps_km,
                    min_samples=setting.min_samples,
                    aggregation=setting.aggregation,
                    **options,
                )
                chunk_latlon = latlon[start:stop]
                chunk_latlon[res.found] = res.latlon_deg[res.found]
                method[start:stop] = np.where(res.found, "swc", "fallback")
                rows_parts.append(res.rows)
                sims_parts.append(res.similarities / index.dim if binary else res.similarities)
            rows = np.concatenate(rows_parts) if rows_parts else np.zeros((0, setting.k), np.int64)
            sims = np.concatenate(sims_parts) if sims_parts else np.zeros((0, setting.k), np.float32)
        return Replayed(latlon, method, rows, sims, time.perf_counter() - started)


def model_setting(store: EvalStore, head: Optional[str]) -> Setting:
    """The setting `geoswc evaluate` used for ``head+rrm`` (``rrm`` when ``head`` is None)."""
    if head is None:
        return Setting(head=None, k=1, aggregation="top1", scope="global")
    cfg = store.meta.get("settings", {})
    return Setting(
        head=head,
        k=int(cfg.get("k", 10)),
        eps_km=float(cfg.get("eps_km", 1.0)),
        min_samples=int(cfg.get("min_samples", 1)),
        scope=scope_name(int(cfg.get("top_cells", 1))),
    )
