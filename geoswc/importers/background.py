"""Reading a background collection stored as HDF5: ``features`` (N, D) embeddings and ``labels`` (N, 2) positions.

This is the layout of ``back_coll_features.hdf5`` in the ICMR 2021 authors' release (their ``evaluation.py``
reads ``features[:, :].T`` and indexes its columns by row, so the file is (N, D); a (D, N) file is accepted too,
recognised by which side matches the labels). A file from elsewhere is checked before any of its data is read:
both datasets present and real numbers, shapes that agree, and storage that holds every byte the shapes declare
(a 2 KB file declaring a billion rows is refused, not read into memory). Data is then read in blocks of rows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

# Rows read from the file at a time.
BLOCK_ROWS = 1 << 14
FEATURE_DTYPES = ("float16", "float32", "float64")


class BackgroundFile:
    """An open background HDF5 whose datasets have been checked; use as a context manager.

    Attributes:
        path: the file.
        n_rows: photos in the file.
        dim: width of the embeddings.
        dtype: the embeddings' dtype as stored.
        transposed: the embeddings are stored (D, N).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._handle = _open_hdf5(self.path)
        try:
            self._features, self._labels = self._handle["features"], self._handle["labels"]
            self.n_rows, self.dim, self.transposed = _check_layout(self.path, self._features, self._labels)
            self.dtype = np.dtype(self._features.dtype)
        except BaseException:
            self._handle.close()
            raise

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "BackgroundFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def labels(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """``(lat, lon)`` in degrees of ``rows`` (ascending row numbers; default every row), as float64, each
        row of the file checked to lie within [-90, 90] x [-180, 180], read block by block.

        Raises:
            ValueError: a position out of range or not finite (the file and the row named).
        """
        wanted = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(wanted), 2), dtype=np.float64)
        for start, stop in _blocks(self.n_rows):
            block = np.asarray(self._labels[start:stop], dtype=np.float64)
            for col, name, limit in ((0, "latitude", 90.0), (1, "longitude", 180.0)):
                bad = np.flatnonzero(~(np.abs(block[:, col]) <= limit))
                if len(bad):
                    raise ValueError(
                        f"{self.path}: labels row {start + int(bad[0])} has {name} {float(block[bad[0], col])!r}, "
                        f"outside [-{limit:g}, {limit:g}] degrees"
                    )
            lo, hi = np.searchsorted(wanted, [start, stop])
            out[lo:hi] = block[wanted[lo:hi] - start]
        return out

    def feature_blocks(self) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row, (rows, D) float32 block)`` over the whole file, in file order.

        Raises:
            ValueError: an embedding holds NaN or infinite values (the file and the row named).
        """
        for start, stop in _blocks(self.n_rows):
            block = self._features[:, start:stop].T if self.transposed else self._features[start:stop]
            block = np.asarray(block, dtype=np.float32)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad = start + int(np.flatnonzero(~finite)[0])
                raise ValueError(
                    f"{self.path}: the background embedding of row {bad} holds NaN or infinite values"
                )
            yield start, block

    def copy_rows(self, rows: np.ndarray, target: Path, dtype: str, *, progress: bool = False) -> None:
        """Copy the embeddings of ``rows`` (ascending row numbers) into a ``(len(rows), D)`` ``.npy`` of ``dtype``,
        reading the file block by block (`feature_blocks`: every row of the file is checked to be finite)."""
        out = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=(len(rows), self.dim))
        blocks = tqdm(
            self.feature_blocks(),
            total=-(-self.n_rows // BLOCK_ROWS),
            desc="background",
            unit="block",
            disable=not progress,
        )
        for start, block in blocks:
            lo, hi = np.searchsorted(rows, [start, start + len(block)])
            out[lo:hi] = block[rows[lo:hi] - start]
        out.flush()
        del out


class RowsView:
    """A read-only (P, D) view of ``array`` whose row ``p`` is ``array[rows[p]]`` (what
    `geoswc.retrieval.index.BackgroundIndex.build` reads, chunk by chunk)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows), array.shape[1])
        self.ndim = 2
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        return self.array[self.rows[index]]


def _blocks(n: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, n, BLOCK_ROWS):
        yield start, min(start + BLOCK_ROWS, n)


def _open_hdf5(path: Path) -> Any:
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading the background HDF5 needs h5py: pip install h5py") from err
    if not path.is_file():
        raise FileNotFoundError(f"background file not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not an HDF5 file ({' '.join(str(err).split())})") from None
    try:
        for name in ("features", "labels"):
            if not isinstance(handle.get(name, getlink=False), h5py.Dataset):
                raise ValueError(
                    f"{path}: no dataset {name!r}; the authors' background file holds 'features' (embeddings) "
                    "and 'labels' (lat, lon per photo)"
                )
    except BaseException:
        handle.close()
        raise
    return handle


def _check_layout(path: Path, features: Any, labels: Any) -> Tuple[int, int, bool]:
    """``(rows, dim, transposed)`` of the two datasets, checked before any of their data is read."""
    f_shape, l_shape = tuple(features.shape), tuple(labels.shape)
    f_dtype, l_dtype = np.dtype(features.dtype), np.dtype(labels.dtype)
    if f_dtype.name not in FEATURE_DTYPES:
        raise ValueError(
            f"{path}: features are {f_dtype}; embeddings are real floating-point numbers "
            f"({', '.join(FEATURE_DTYPES)})"
        )
    if l_dtype.kind not in "fiu" or l_dtype.fields is not None:
        raise ValueError(f"{path}: labels are {l_dtype}; expected (lat, lon) as real numbers")
    if len(l_shape) != 2 or l_shape[1] != 2 or len(f_shape) != 2:
        raise ValueError(
            f"{path}: expected labels (N, 2) and features (N, D), got labels {l_shape} and features {f_shape}"
        )
    n = l_shape[0]
    if f_shape[0] == n:
        transposed = False
    elif f_shape[1] == n:
        transposed = True
    else:
        raise ValueError(f"{path}: features {f_shape} do not have one row per label ({n} labels)")
    if n == 0:
        raise ValueError(f"{path}: the background holds no photos (labels {l_shape})")
    dim = f_shape[0] if transposed else f_shape[1]
    if dim == 0:
        raise ValueError(f"{path}: features {f_shape} have no columns")
    for name, dataset in (("labels", labels), ("features", features)):
        _check_storage(path, name, dataset)
    return n, dim, transposed


def _check_storage(path: Path, name: str, dataset: Any) -> None:
    """The file stores every element the dataset's shape declares (no external or virtual storage): what is
    read is what is in the file, and a shape cannot promise more than the file holds."""
    if dataset.is_virtual or dataset.external:
        raise ValueError(
            f"{path}: dataset {name!r} keeps its data in other files; only data stored in {path.name} is read"
        )
    shape, declared = tuple(dataset.shape), int(dataset.nbytes)
    if dataset.chunks is None:
        stored = int(dataset.id.get_storage_size())
        if stored < declared:
            raise ValueError(
                f"{path}: dataset {name!r} declares shape {shape} ({declared} bytes) but the file stores "
                f"{stored} bytes of it; the file is truncated or not a background collection"
            )
        return
    needed = math.prod(math.ceil(s / c) for s, c in zip(shape, dataset.chunks))
    stored = int(dataset.id.get_num_chunks())
    if stored < needed:
        raise ValueError(
            f"{path}: dataset {name!r} declares shape {shape} in {needed} chunks but the file stores {stored}; "
            "the file is truncated or not a background collection"
        )
