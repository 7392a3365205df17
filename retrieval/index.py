"""Background index for Search within Cell (ICMR 2021 sections 3.3.3 and 3.4) and global k-NN search.

Embeddings are stored sorted by fine cell: every cell's photos form one contiguous block of rows and
``offsets[c]:offsets[c + 1]`` locates cell ``c``. Searching within a cell therefore reads O(cell size) rows,
and the ``.npy`` file is memory-mapped on load so a background larger than RAM (4.7M x 1792 in float16 is
16.8 GB) only pages in the cells that are queried.

A model whose heads predict over different partitions (paper 4.1: CE and MvMF over ~32K cells, HC over
GeoEstimation's fine cells) searches one background through each: the rows are sorted by the cells of one
partition (``partition``), and every other partition adds a table of the rows sorted by its cells with its
own offsets (`add_partition`), so Search within Cell reads the rows of any head's cell.

Global search goes through FAISS when installed (flat inner product by default; IVF and the compact modes SQ8,
PQ and binary codes, the 1-bit-per-dimension sign codes of paper 000, as options) with a numpy brute-force
fallback for the exact and binary modes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from geoswc.data.validation import check_choice
from geoswc.retrieval.index_files import (
    FORMAT_VERSION,
    INDEX_DTYPES,
    INDEX_FILES,
    index_files,
    partition_files,
    read_cell_idx,
    read_embeddings,
    read_ids,
    read_index_meta,
    read_latlon,
    read_offsets,
    read_partition_table,
)
from geoswc.retrieval.topk import (
    FAISS_INSTALL,
    SEARCH_MODES,
    binary_topk,
    brute_force_topk,
    build_faiss_index,
    faiss_available,
    faiss_factory,
    faiss_missing,
    import_faiss,
    is_torch,
    merge_topk,
    recall_at_k,
    sign_codes,
)

__all__ = [
    "FAISS_INSTALL",
    "FORMAT_VERSION",
    "INDEX_DTYPES",
    "INDEX_FILES",
    "SEARCH_BACKENDS",
    "SEARCH_MODES",
    "BackgroundIndex",
    "import_faiss",
    "index_files",
    "partition_files",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

SEARCH_BACKENDS = ("auto", "faiss", "numpy")


class BackgroundIndex:
    """Cell-sorted, optionally memory-mapped store of background embeddings with their metadata.

    After `build` or `load` the index exposes, per row (rows are in cell order): ``embeddings`` (N, D),
    ``cell_idx`` (N,), ``latlon`` (N, 2) in degrees, ``ids`` (N,) and the table ``offsets`` (n_cells + 1,).

    Args:
        dtype: Storage dtype of the embeddings, ``"float16"`` (default) or ``"float32"``.
        chunk_size: Rows copied at a time while building or saving.
    """

    def __init__(self, *, dtype: str = "float16", chunk_size: int = 1 << 16) -> None:
        check_choice("index dtype", dtype, INDEX_DTYPES)
        self.dtype = dtype
        self.chunk_size = int(chunk_size)
        self.embeddings: Optional[np.ndarray] = None
        self.offsets: Optional[np.ndarray] = None
        self.cell_idx: Optional[np.ndarray] = None
        self.latlon: Optional[np.ndarray] = None
        self.ids: Optional[np.ndarray] = None
        self.fingerprint: Optional[str] = None
        self.partition: Optional[str] = None
        self.config: Dict[str, Any] = {}
        self._tables: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.source_rows: Optional[np.ndarray] = None
        self._directory: Optional[Path] = None
        self._searchers: Dict[Tuple, Any] = {}
        self._device_embeddings: Dict[str, Any] = {}

    # --- construction -------------------------------------------------------------------------------------

    def build(
        self,
        embeddings,
        *,
        cell_idx,
        latlon,
        ids: Sequence[str],
        n_cells: int,
        fingerprint: str,
        directory: Union[str, Path, None] = None,
        config: Optional[Dict[str, Any]] = None,
        partition: Optional[str] = None,
    ) -> "BackgroundIndex":
        """Sort the embeddings by cell and store them.

        Args:
            embeddings: (N, D) array (a memmap works: it is read chunk by chunk) or tensor; L2-normalised.
            cell_idx: Fine cell of every row (N,), in ``[0, n_cells)``.
            latlon: Coordinates (N, 2) in degrees.
            ids: Photo ids (N,).
            n_cells: Number of fine cells of the partition.
            fingerprint: The partition's fingerprint.
            directory: When given, the sorted embeddings are streamed into ``directory/embeddings.npy`` (and the
                index is saved there), so the background never has to fit in memory.
            config: Resolved configuration saved with the index.
            partition: Name of the partition ``cell_idx`` refers to (default: unnamed, the finest of the
                model's cells).
        """
        if is_torch(embeddings):
            embeddings = embeddings.detach().cpu().numpy()
        if getattr(embeddings, "ndim", None) != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {getattr(embeddings, 'shape', None)}")
        n, dim = embeddings.shape
        cell_idx = np.asarray(cell_idx, dtype=np.int64)
        latlon = np.asarray(latlon, dtype=np.float64)
        ids = np.asarray([str(i) for i in ids])
        if cell_idx.shape != (n,) or latlon.shape != (n, 2) or ids.shape != (n,):
            raise ValueError(
                f"expected cell_idx (N,), latlon (N, 2) and ids (N,) for N={n} embeddings, got "
                f"{cell_idx.shape}, {latlon.shape}, {ids.shape}"
            )
        n_cells = int(n_cells)
        if n and (cell_idx.min() < 0 or cell_idx.max() >= n_cells):
            bad = cell_idx[(cell_idx < 0) | (cell_idx >= n_cells)][0]
            raise ValueError(f"cell_idx {bad} out of range; valid cells are 0..{n_cells - 1}")

        order = np.argsort(cell_idx, kind="stable")
        if directory is not None:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
        self.embeddings = self._copy_in_order(embeddings, order, directory)
        # Input position of every row (rows are in cell order), to label the rows in other partitions.
        self.source_rows = order
        self.cell_idx = cell_idx[order]
        self.latlon = latlon[order]
        self.ids = ids[order]
        self.offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.cell_idx, minlength=n_cells), out=self.offsets[1:])
        self.fingerprint = str(fingerprint)
        self.config = dict(config or {})
        self.partition = None if partition is None else str(partition)
        self._tables = {}
        self._searchers.clear()
        self._device_embeddings.clear()
        if directory is not None:
            self._directory = directory
            self.save(directory)
        return self

    def _copy_in_order(self, embeddings, order: np.ndarray, directory: Optional[Path]) -> np.ndarray:
        """The rows ``embeddings[order]`` in this index's dtype, copied a chunk at a time into
        ``directory/embeddings.npy`` (memory-mapped) or into memory without a directory.

        Raises:
            ValueError: a row holds NaN or infinite values.
        """
        n, dim = embeddings.shape
        if directory is not None:
            out = np.lib.format.open_memmap(
                directory / "embeddings.npy", mode="w+", dtype=self.dtype, shape=(n, dim)
            )
        else:
            out = np.empty((n, dim), dtype=self.dtype)
        for start in tqdm(
            range(0, n, self.chunk_size), desc="index rows", unit="chunk", disable=n < 4 * self.chunk_size
        ):
            src = order[start : start + self.chunk_size]
            ascending = np.argsort(src)  # read the source in file order
            block = np.empty((len(src), dim), dtype=self.dtype)
            block[ascending] = np.asarray(embeddings[src[ascending]], dtype=np.float32)
            if not np.isfinite(block).all():
                raise ValueError("embeddings contain NaN or infinite values")
            out[start : start + len(src)] = block
        if isinstance(out, np.memmap):
            out.flush()
        return out

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])

    def cell_sizes(self, partition: Optional[str] = None) -> np.ndarray:
        """Number of background photos in every cell (n_cells,) of ``partition`` (default: the rows' own)."""
        return np.diff(self._table(partition)[1])

    @property
    def partitions(self) -> Dict[Optional[str], int]:
        """Number of cells of every partition the index can search within: the rows' own (``partition``,
        ``None`` when unnamed) first, then those added with `add_partition`."""
        out: Dict[Optional[str], int] = {self.partition: self.n_cells}
        out.update({name: len(offsets) - 1 for name, (_, offsets) in self._tables.items()})
        return out

    def has_partition(self, name: Optional[str]) -> bool:
        """Whether Search within Cell can use the cells of partition ``name`` (``None``: the rows' own)."""
        return name is None or name == self.partition or name in self._tables

    def add_partition(self, name: str, cell_idx, n_cells: int) -> "BackgroundIndex":
        """Make the cells of another partition searchable: ``cell_idx`` (N,) is every row's cell in it (-1 where
        none holds the row). Stores the rows sorted by those cells and their offsets; `save` writes them.

        Raises:
            ValueError: a name that is the rows' own partition or cannot name a file, a wrong shape, or a cell
                out of ``[-1, n_cells)``.
        """
        self._check_built()
        partition_files(name)
        if name == self.partition:
            raise ValueError(f"partition {name!r} is the one the rows are sorted by; it needs no table")
        cell_idx = np.asarray(cell_idx, dtype=np.int64)
        n_cells = int(n_cells)
        if n_cells < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        if cell_idx.shape != (len(self),):
            raise ValueError(
                f"cell_idx must give one cell per row ({len(self)},), got shape {cell_idx.shape}"
            )
        bad = (cell_idx < -1) | (cell_idx >= n_cells)
        if bad.any():
            raise ValueError(
                f"cell_idx {cell_idx[bad][0]} out of range for partition {name!r}; valid cells are "
                f"0..{n_cells - 1} or -1"
            )
        placed = np.flatnonzero(cell_idx >= 0)
        rows = placed[np.argsort(cell_idx[placed], kind="stable")].astype(np.int64)
        offsets = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.bincount(cell_idx[placed], minlength=n_cells), out=offsets[1:])
        self._tables[str(name)] = (rows, offsets)
        return self

    def _table(self, partition: Optional[str]) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """``(rows, offsets)`` of a partition; ``rows`` is None for the rows' own (a cell is a slice)."""
        self._check_built()
        if partition is None or partition == self.partition:
            return None, self.offsets
        if partition not in self._tables:
            known = ", ".join(str(p) for p in self.partitions)
            raise ValueError(
                f"the background index has no rows per cell of partition {partition!r}; it has: {known} "
                "(rebuild it with geoswc index build, which adds every partition of the cells)"
            )
        return self._tables[partition]

    def _check_built(self) -> None:
        if self.embeddings is None:
            raise ValueError("the index is empty: call build() or BackgroundIndex.load() first")

    def check_compatible(self, *, fingerprint: Optional[str] = None, dim: Optional[int] = None) -> None:
        """Raise ValueError when the index was built on another partition or with another embedding size."""
        self._check_built()
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(
                f"index was built on partition {self.fingerprint!r}, but the model uses partition {fingerprint!r}"
            )
        if dim is not None and int(dim) != self.dim:
            raise ValueError(f"index holds {self.dim}-dimensional embeddings, but got {dim}-dimensional ones")

    # --- persistence ---------------------------------------------------------------------------------------

    def save(self, directory: Union[str, Path]) -> None:
        """Write ``embeddings.npy``, ``offsets.npy``, ``cell_idx.npy``, ``latlon.npy``, ``ids.txt``, ``index.json``."""
        self._check_built()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "embeddings.npy"
        written_here = self._directory is not None and self._directory.resolve() == directory.resolve()
        if not (written_here and target.exists()):
            out = np.lib.format.open_memmap(
                target, mode="w+", dtype=self.embeddings.dtype, shape=self.embeddings.shape
            )
            for start in range(0, len(self), self.chunk_size):
                out[start : start + self.chunk_size] = self.embeddings[start : start + self.chunk_size]
            out.flush()
            del out
        np.save(directory / "offsets.npy", self.offsets)
        np.save(directory / "cell_idx.npy", self.cell_idx)
        np.save(directory / "latlon.npy", self.latlon)
        (directory / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids))
        for stale in directory.glob("partition_*.npy"):
            if stale.name not in {f for name in self._tables for f in partition_files(name)}:
                stale.unlink()
        for name, (rows, offsets) in self._tables.items():
            rows_file, offsets_file = partition_files(name)
            np.save(directory / rows_file, rows)
            np.save(directory / offsets_file, offsets)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "count": len(self),
            "n_cells": self.n_cells,
            "dtype": str(self.embeddings.dtype),
            "partition": self.partition,
            "partitions": {
                name: {"n_cells": len(offsets) - 1, "count": len(rows)}
                for name, (rows, offsets) in self._tables.items()
            },
            "config": self.config,
        }
        (directory / "index.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(
        cls, directory: Union[str, Path], *, mmap: bool = True, fingerprint: Optional[str] = None
    ) -> "BackgroundIndex":
        """Open an index folder; the embeddings are memory-mapped unless ``mmap=False``.

        Every file is checked against ``index.json`` and the others before the index is used: shapes and
        dtypes, offsets that start at 0, never decrease and end at the row count, per-row cells that match the
        offsets, coordinates that are finite degrees in range, one id per row. The embeddings themselves are
        not read (they may be larger than memory); a model folder checksums them.

        Raises:
            FileNotFoundError: the folder lacks one of its files.
            ValueError: a file is malformed or disagrees with the others (the message names the file and
                what is wrong), or ``fingerprint`` is given and differs from the index's partition.
        """
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no background index at {directory} (missing index.json)")
        meta = read_index_meta(meta_path)
        count, n_cells = meta["count"], meta["n_cells"]
        index = cls(dtype=meta["dtype"])
        embeddings = read_embeddings(directory, meta, mmap=mmap)
        offsets = read_offsets(directory, n_cells=n_cells, count=count)
        cell_idx = read_cell_idx(directory, offsets)
        latlon = read_latlon(directory, count)
        ids = read_ids(directory, count)

        index.embeddings = embeddings
        index.offsets = offsets
        index.cell_idx = cell_idx.astype(np.int64, copy=False)
        index.latlon = latlon.astype(np.float64, copy=False)
        index.ids = np.asarray(ids)
        index.fingerprint = meta["fingerprint"]
        index.config = meta.get("config") or {}
        index.partition = meta.get("partition")
        for name, entry in (meta.get("partitions") or {}).items():
            index._tables[name] = read_partition_table(directory, name, entry, count)
        index._directory = directory
        index.check_compatible(fingerprint=fingerprint)
        return index

    # --- search within cells -------------------------------------------------------------------------------

    def to(self, device) -> "BackgroundIndex":
        """Keep a copy of the embeddings on a torch device, used when queries arrive on that device."""
        self._check_built()
        device = torch.device(device)
        if device.type != "cpu":
            self._device_embeddings[str(device)] = torch.from_numpy(np.ascontiguousarray(self.embeddings)).to(
                device
            )
        return self

    def _check_queries(self, queries) -> None:
        self._check_built()
        if queries.ndim != 2:
            raise ValueError(f"queries must be (Q, D), got shape {tuple(queries.shape)}")
        self.check_compatible(dim=queries.shape[1])

    def search_cells(self, queries, cells, k: int, *, partition: Optional[str] = None):
        """Exact top-k inner-product search restricted to the given cell(s) of every query.

        Queries are grouped by cell, so every cell block is read once and scored with one matrix product.
        Runs with torch (on the queries' device) for tensors and with numpy for arrays.

        Args:
            queries: (Q, D) embeddings.
            cells: (Q,) fine ``cell_idx`` per query, or (Q, T) to search the union of T cells; -1 = no cell.
            k: Neighbours per query.
            partition: The partition ``cells`` refer to (a head's own); default: the one the rows are sorted by.

        Returns:
            ``(sims (Q, k), rows (Q, k))`` best first; rows index the index's per-row arrays. Where the cells
            hold fewer than k photos the tail is ``rows = -1``, ``sims = -inf`` (an empty cell is a normal case).
        """
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = int(k)
        self._check_queries(queries)
        table_rows, offsets = self._table(partition)
        n_cells = len(offsets) - 1
        torch_in = is_torch(queries)
        cells_np = np.asarray(cells.cpu() if is_torch(cells) else cells, dtype=np.int64)
        q = queries.shape[0]
        if cells_np.ndim == 1:
            cells_np = cells_np[:, None]
        if cells_np.ndim != 2 or cells_np.shape[0] != q:
            raise ValueError(f"cells must be (Q,) or (Q, T) with Q={q}, got shape {np.shape(cells)}")
        bad = (cells_np < -1) | (cells_np >= n_cells)
        if bad.any():
            raise ValueError(
                f"cell_idx {cells_np[bad][0]} out of range; valid cells are 0..{n_cells - 1} or -1"
            )
        t = cells_np.shape[1]
        if t > 1:
            # A cell listed twice for the same query would return its photos twice.
            srt = np.sort(cells_np, axis=1)
            dup = np.zeros_like(cells_np, dtype=bool)
            dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
            cells_np = np.where(dup, -1, srt)
        flat_cells = cells_np.reshape(-1)
        query_of = np.repeat(np.arange(q), t)
        groups = self._groups(flat_cells, offsets, table_rows)
        if torch_in:
            sims, rows = self._search_groups_torch(queries, query_of, len(flat_cells), groups, k)
        else:
            sims, rows = self._search_groups_numpy(
                np.asarray(queries, dtype=np.float32), query_of, len(flat_cells), groups, k
            )
        if t == 1:
            return sims, rows
        return merge_topk(sims.reshape(q, t * k), rows.reshape(q, t * k), k)

    def _groups(self, flat_cells: np.ndarray, offsets: np.ndarray, table_rows: Optional[np.ndarray]):
        """``(members, rows)`` per searched cell holding photos: the positions in ``flat_cells`` asking for it
        and its index rows (a slice of the rows' own partition, or an array of rows from a table)."""
        order = np.argsort(flat_cells, kind="stable")
        sorted_cells = flat_cells[order]
        uniq, starts = np.unique(sorted_cells, return_index=True)
        bounds = np.append(starts, len(order))
        for g, cell in enumerate(uniq):
            if cell < 0:
                continue
            lo, hi = int(offsets[cell]), int(offsets[cell + 1])
            if hi > lo:
                rows = slice(lo, hi) if table_rows is None else table_rows[lo:hi]
                yield order[bounds[g] : bounds[g + 1]], rows

    def _search_groups_numpy(self, queries, query_of, n, groups, k):
        sims = np.full((n, k), -np.inf, dtype=np.float32)
        rows = np.full((n, k), -1, dtype=np.int64)
        emb = self.embeddings
        for members, cell_rows in groups:
            scores = queries[query_of[members]] @ np.asarray(emb[cell_rows], dtype=np.float32).T
            size = scores.shape[1]
            kk = min(k, size)
            if kk < size:
                top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
                top_scores = np.take_along_axis(scores, top, axis=1)
            else:
                top, top_scores = np.broadcast_to(np.arange(kk), scores.shape), scores
            best = np.argsort(-top_scores, axis=1, kind="stable")
            sims[members, :kk] = np.take_along_axis(top_scores, best, axis=1)
            picked = np.take_along_axis(top, best, axis=1)
            rows[members, :kk] = (
                cell_rows.start + picked if isinstance(cell_rows, slice) else cell_rows[picked]
            )
        return sims, rows

    def _search_groups_torch(self, queries, query_of, n, groups, k):
        device = queries.device
        sims = torch.full((n, k), float("-inf"), device=device)
        rows = torch.full((n, k), -1, dtype=torch.long, device=device)
        on_device = self._device_embeddings.get(str(device))
        q32 = queries.float()
        query_of_t = torch.from_numpy(query_of).to(device)
        for members, cell_rows in groups:
            index_rows = None if isinstance(cell_rows, slice) else torch.from_numpy(cell_rows).to(device)
            if on_device is not None:
                block = (on_device[cell_rows] if index_rows is None else on_device[index_rows]).float()
            else:
                block = torch.from_numpy(np.asarray(self.embeddings[cell_rows], dtype=np.float32)).to(device)
            members_t = torch.from_numpy(members).to(device)
            scores = q32[query_of_t[members_t]] @ block.T
            kk = min(k, scores.shape[1])
            top_scores, top = torch.topk(scores, kk, dim=1)
            sims[members_t, :kk] = top_scores
            rows[members_t, :kk] = top + cell_rows.start if index_rows is None else index_rows[top]
        return sims, rows

    # --- global search ---------------------------------------------------------------------------------------

    def search(self, queries, k: int, *, mode: str = "flat", backend: str = "auto", **options):
        """Global top-k search over the whole background.

        Args:
            queries: (Q, D) embeddings (array or tensor).
            k: Neighbours per query.
            mode: ``flat`` (exact inner product), ``ivf`` (inverted lists, ``nlist``/``nprobe`` options), ``sq8``
                (8-bit scalar quantiser), ``pq`` (product quantiser, ``pq_m`` sub-quantisers of ``pq_bits`` bits) or
                ``binary`` (sign of every dimension, Hamming distance; sims are ``1 - 2 * hamming / D``).
            backend: ``faiss``, ``numpy`` (only ``flat`` and ``binary``) or ``auto`` (faiss when installed).

        Returns:
            ``(sims (Q, k), rows (Q, k))`` as numpy arrays, best first; -inf / -1 where fewer than k rows exist.
        """
        check_choice("search mode", mode, SEARCH_MODES)
        check_choice("backend", backend, SEARCH_BACKENDS)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if is_torch(queries):
            queries = queries.detach().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._check_queries(queries)
        if backend == "auto":
            backend = "faiss" if faiss_available() else "numpy"
        if backend == "numpy":
            if mode == "flat":
                return brute_force_topk(self.embeddings, queries, int(k), self.chunk_size)
            if mode == "binary":
                return binary_topk(self.binary_codes(), sign_codes(queries), int(k), self.dim)
            raise faiss_missing(f"search mode {mode!r}")
        searcher = self.faiss_index(mode, **options)
        if mode == "ivf":
            searcher.nprobe = int(options.get("nprobe", 16))
        if mode == "binary":
            dist, rows = searcher.search(sign_codes(queries), int(k))
            sims = np.where(rows >= 0, 1.0 - 2.0 * dist / self.dim, -np.inf).astype(np.float32)
        else:
            sims, rows = searcher.search(queries, int(k))
            sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        return sims, rows.astype(np.int64)

    def binary_codes(self) -> np.ndarray:
        """Sign codes of all rows, packed 8 dimensions per byte (N, ceil(D / 8)); cached."""
        key = ("codes",)
        if key not in self._searchers:
            parts = [
                sign_codes(np.asarray(self.embeddings[s : s + self.chunk_size], dtype=np.float32))
                for s in range(0, len(self), self.chunk_size)
            ]
            self._searchers[key] = (
                np.concatenate(parts) if parts else np.zeros((0, -(-self.dim // 8)), np.uint8)
            )
        return self._searchers[key]

    def faiss_index(
        self,
        mode: str = "flat",
        *,
        nlist: Optional[int] = None,
        pq_m: Optional[int] = None,
        pq_bits: int = 8,
        train_size: int = 100_000,
        seed: int = 0,
        **_,
    ):
        """The FAISS index of a global search mode, built on first use (training on a sample) and cached."""
        faiss = import_faiss()
        key = ("faiss", mode, nlist, pq_m, pq_bits)
        if key in self._searchers:
            return self._searchers[key]
        self._check_built()
        if mode == "binary":
            codes = self.binary_codes()
            index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
            index.add(codes)
        else:
            factory = faiss_factory(
                mode, len(self), self.dim, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, train_size=train_size
            )
            index = build_faiss_index(
                self.embeddings,
                factory,
                chunk_size=self.chunk_size,
                train_size=train_size,
                seed=seed,
                desc=f"faiss {mode}",
            )
        self._searchers[key] = index
        return index
