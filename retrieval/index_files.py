"""The files of a background index folder: their names, the format version and the checked readers.

`BackgroundIndex.save` writes ``index.json`` and one ``.npy`` array per column (plus two per extra
partition); `BackgroundIndex.load` reads them back through the functions here, each of which checks its file
against ``index.json`` and the others and names the file in every error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from geoswc.data.files import read_json_object
from geoswc.data.validation import choose_one_of

INDEX_DTYPES = ("float16", "float32")
# 2: index.json names the partition the rows are sorted by and the tables of other partitions (optional).
FORMAT_VERSION = 2
# The files of an index folder (`BackgroundIndex.save`), what a model folder checksums; each extra partition
# adds two (`partition_files`, `index_files`).
INDEX_FILES = ("index.json", "embeddings.npy", "offsets.npy", "cell_idx.npy", "latlon.npy", "ids.txt")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def partition_files(name: str) -> Tuple[str, str]:
    """The files of an extra partition's table: rows sorted by its cells, and its offsets.

    Raises:
        ValueError: a name that cannot be a file name inside the index folder.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"partition name {name!r} cannot name an index file; use letters, digits, '_', '-' and '.' "
            "(not '..'), starting with a letter or digit"
        )
    return f"partition_{name}_rows.npy", f"partition_{name}_offsets.npy"


def index_files(directory: Union[str, Path]) -> list:
    """Every file of a saved index folder, as its validated ``index.json`` names them (relative names)."""
    meta = read_index_meta(Path(directory) / "index.json")
    files = list(INDEX_FILES)
    for name in meta.get("partitions") or {}:
        files += list(partition_files(name))
    return files


def read_index_meta(path: Path) -> Dict[str, Any]:
    """``index.json``, checked: ``dtype`` one of `INDEX_DTYPES`, ``count``/``dim``/``n_cells`` integers
    (``dim`` and ``n_cells`` >= 1), ``fingerprint`` a string."""
    meta = read_json_object(path)
    if meta.get("dtype") not in INDEX_DTYPES:
        raise ValueError(f"{path}: dtype {meta.get('dtype')!r}; {choose_one_of(INDEX_DTYPES)}")
    for key, least in (("count", 0), ("dim", 1), ("n_cells", 1)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{path}: {key} must be an integer >= {least}, got {value!r}")
    if not isinstance(meta.get("fingerprint"), str):
        raise ValueError(f"{path}: fingerprint must be a string, got {meta.get('fingerprint')!r}")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise ValueError(f"{path}: config must be an object, got {meta['config']!r}")
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r}; this geoswc reads index folders up to version {FORMAT_VERSION}"
        )
    if meta.get("partition") is not None and not isinstance(meta["partition"], str):
        raise ValueError(f"{path}: partition must be a partition name or null, got {meta['partition']!r}")
    tables = meta.get("partitions") or {}
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: partitions must map partition names to tables, got {tables!r}")
    for name, entry in tables.items():
        try:
            partition_files(name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if name == meta.get("partition"):
            raise ValueError(f"{path}: partition {name!r} is the rows' own and cannot also have a table")
        for key, least in (("n_cells", 1), ("count", 0)):
            value = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(
                    f"{path}: partitions[{name!r}].{key} must be an integer >= {least}, got {value!r}"
                )
    return meta


def read_partition_table(
    directory: Path, name: str, entry: Dict[str, int], count: int
) -> Tuple[np.ndarray, np.ndarray]:
    """An extra partition's rows and offsets, checked: offsets from 0, non-decreasing, ending at the table's
    length; every row an index row, none twice."""
    rows_file, offsets_file = partition_files(name)
    rows, offsets = read_npy(directory / rows_file), read_npy(directory / offsets_file)
    n_cells = entry["n_cells"]
    for path, array, shape in (
        (directory / rows_file, rows, (entry["count"],)),
        (directory / offsets_file, offsets, (n_cells + 1,)),
    ):
        if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"{path}: expected integers of shape {shape} (index.json), got {array.dtype} of shape {array.shape}"
            )
    rows, offsets = rows.astype(np.int64), offsets.astype(np.int64)
    path = directory / offsets_file
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(rows):
        raise ValueError(
            f"{path}: offsets must start at 0, never decrease and end at the table's {len(rows)} rows"
        )
    path = directory / rows_file
    if len(rows) and (rows.min() < 0 or rows.max() >= count):
        raise ValueError(f"{path}: rows must be index rows 0..{count - 1}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError(f"{path}: a row is listed twice; each background photo is in at most one cell")
    return rows, offsets


def read_npy(path: Path, *, mmap_mode: Optional[str] = None) -> np.ndarray:
    """A ``.npy`` array (never pickled objects), or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"background index {path.parent} has no {path.name}")
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: not a single .npy array")
    return array


def read_embeddings(directory: Path, meta: Dict[str, Any], *, mmap: bool) -> np.ndarray:
    """``embeddings.npy`` (memory-mapped unless ``mmap=False``), checked against ``index.json``'s count, dim
    and dtype; the values themselves are not read (they may be larger than memory)."""
    meta_path, path = directory / "index.json", directory / "embeddings.npy"
    count, dim = meta["count"], meta["dim"]
    embeddings = read_npy(path, mmap_mode="r" if mmap else None)
    if embeddings.ndim != 2 or embeddings.shape[0] != count or embeddings.shape[1] != dim:
        raise ValueError(
            f"{path}: shape {embeddings.shape}, but {meta_path} records {count} rows of dim {dim}"
        )
    if str(embeddings.dtype) != meta["dtype"]:
        raise ValueError(f"{path}: dtype {embeddings.dtype}, but {meta_path} records {meta['dtype']}")
    return embeddings


def read_offsets(directory: Path, *, n_cells: int, count: int) -> np.ndarray:
    """``offsets.npy`` as int64, checked: ``n_cells + 1`` integers that start at 0, never decrease and end at
    the row count."""
    meta_path, path = directory / "index.json", directory / "offsets.npy"
    offsets = read_npy(path)
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(
            f"{path}: expected a 1-D integer array, got {offsets.dtype} of shape {offsets.shape}"
        )
    if len(offsets) != n_cells + 1:
        raise ValueError(
            f"{path}: {len(offsets)} entries, but an index of {n_cells} cells ({meta_path}) needs {n_cells + 1}"
        )
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0:
        raise ValueError(f"{path}: offsets must start at 0, got {int(offsets[0])}")
    drops = np.flatnonzero(np.diff(offsets) < 0)
    if len(drops):
        c = int(drops[0])
        raise ValueError(
            f"{path}: offsets must be non-decreasing, but cell {c} starts at row {int(offsets[c])} and "
            f"ends at row {int(offsets[c + 1])}"
        )
    if offsets[-1] != count:
        raise ValueError(
            f"{path}: offsets end at row {int(offsets[-1])}, but they must end at the row count {count}"
        )
    return offsets


def read_cell_idx(directory: Path, offsets: np.ndarray) -> np.ndarray:
    """``cell_idx.npy``, checked: one integer cell per row, equal to the cell the offsets put the row in."""
    path = directory / "cell_idx.npy"
    count, n_cells = int(offsets[-1]), len(offsets) - 1
    cell_idx = read_npy(path)
    if cell_idx.shape != (count,) or not np.issubdtype(cell_idx.dtype, np.integer):
        raise ValueError(
            f"{path}: expected {count} integer cells (one per row), got {cell_idx.dtype} of shape {cell_idx.shape}"
        )
    expected = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(offsets))
    wrong = np.flatnonzero(cell_idx != expected)
    if len(wrong):
        r = int(wrong[0])
        raise ValueError(
            f"{path}: row {r} is in cell {int(cell_idx[r])}, but offsets.npy puts it in cell {int(expected[r])}; "
            "the rows must be sorted by cell as the offsets say"
        )
    return cell_idx


def read_latlon(directory: Path, count: int) -> np.ndarray:
    """``latlon.npy``, checked: ``(count, 2)`` floats, finite degrees in range."""
    path = directory / "latlon.npy"
    latlon = read_npy(path)
    if latlon.shape != (count, 2) or not np.issubdtype(latlon.dtype, np.floating):
        raise ValueError(
            f"{path}: expected float coordinates of shape ({count}, 2), got {latlon.dtype} of shape {latlon.shape}"
        )
    for col, name, limit in ((0, "latitude", 90.0), (1, "longitude", 180.0)):
        bad = np.flatnonzero(~(np.abs(latlon[:, col]) <= limit))
        if len(bad):
            r = int(bad[0])
            raise ValueError(
                f"{path}: row {r} has {name} {latlon[r, col]!r}, outside [-{limit:g}, {limit:g}] degrees"
            )
    return latlon


def read_ids(directory: Path, count: int) -> List[str]:
    """``ids.txt``: one id per line, ``count`` of them."""
    path = directory / "ids.txt"
    if not path.is_file():
        raise FileNotFoundError(f"background index {directory} has no ids.txt")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not readable text ({err})") from None
    # One id per line, as save writes them; split on newlines only (splitlines would also split ids
    # holding form feeds or Unicode line separators).
    ids = text.split("\n")
    if ids and ids[-1] == "":
        ids.pop()
    if len(ids) != count:
        raise ValueError(f"{path}: {len(ids)} ids, but the index has {count} rows")
    return ids
