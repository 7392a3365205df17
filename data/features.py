"""The feature cache: pooled backbone features of a photo set with their coordinates, labels, ids and authors.

Heads (paper 4.2: trained on the frozen backbone), the retrieval module and the placeable background all
read the training photos' features from here instead of running the backbone again. A cache is a folder:

    features.npy   (N, D) float16, memory-mapped when read
    latlon.npy     (N, 2) float64 degrees
    labels.npy     (N, n_granularities) int64 cell_idx, coarse -> fine (-1: outside every cell)
    ids.txt        one photo id per line
    authors.txt    one author per line (empty when unknown)
    meta.json      fingerprint (of the partition that labelled it), backbone, dim, count, image_size

It is written in parts (one process each, resumable) and merged by rank 0. The merge streams: at MP16 scale
the features alone are ~17 GB. ``meta.json`` marks a complete cache: the merge removes it first and writes
every file under a temporary name, renamed into place once complete; `write_meta` comes last. A merge killed
midway leaves no meta.json and the parts in place, so the next run merges again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence, Union

import numpy as np

from .files import atomic_path, remove_stale_temporaries, write_text_atomic
from .validation import check_choice

PathLike = Union[str, os.PathLike]

CACHE_ARRAYS = {"features": np.float16, "latlon": np.float64, "labels": np.int64}
CACHE_LINES = ("ids", "authors")


def merge_image_parts(
    parts_dir: Path,
    out: Path,
    *,
    latlon: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str],
    authors: Sequence[str],
    part_size: int,
    dim: int,
) -> None:
    """Writes the cache files of ``out`` from the parts of `extract_features` (``part_NNNNN.npy``, features of
    ``part_size`` consecutive rows) and the photo table's coordinates, labels, ids and authors. The table's
    arrays are in memory already and are saved as they are: the coordinates come from pandas in Fortran order,
    and their file keeps it."""
    n = len(latlon)
    n_parts = max(1, math.ceil(n / part_size))

    def blocks() -> Iterator[dict[str, Any]]:
        for part in range(n_parts):
            path = parts_dir / f"part_{part:05d}.npy"
            rows = slice(part * part_size, min(n, (part + 1) * part_size))
            features = np.load(path, mmap_mode="r")
            if features.shape != (rows.stop - rows.start, dim):
                raise ValueError(
                    f"{path} holds features of shape {features.shape}, not rows {rows.start}-{rows.stop} "
                    f"of {dim} features (--part-size {part_size}): a run with other settings left it; "
                    f"remove {parts_dir} and run again"
                )
            yield {"features": features, "ids": ids[rows], "authors": authors[rows]}

    _write_cache(
        out,
        blocks(),
        count=n,
        dim=dim,
        label_shape=labels.shape[1:],
        whole={"latlon": latlon, "labels": labels},
    )


def merge_shard_parts(parts_dir: Path, out: Path, *, n_parts: int, dim: int) -> int:
    """Writes the cache files of ``out`` from the parts of `extract_shard_features` (``part_NNNNN.npz``, one
    per shard, each holding its features, ids, authors, coordinates and labels) in shard order; returns the
    number of rows. Sizes come from the arrays' headers, so only one part at a time is read."""
    paths = [parts_dir / f"part_{part:05d}.npz" for part in range(n_parts)]
    shapes = [_npz_shapes(path) for path in paths]
    rows = [shape["latlon"][0] for shape in shapes]
    # an empty shard's labels are (0, 0): the first non-empty part gives the number of granularities
    label_shape = next(((math.prod(shape["labels"]) // k,) for shape, k in zip(shapes, rows) if k), (0,))

    def blocks() -> Iterator[dict[str, Any]]:
        for path, k in zip(paths, rows):
            if k:
                with np.load(path) as part:
                    yield {
                        "features": part["features"],
                        "latlon": part["latlon"],
                        "labels": part["labels"].reshape(k, -1),
                        "ids": part["ids"],
                        "authors": part["authors"],
                    }

    _write_cache(out, blocks(), count=sum(rows), dim=dim, label_shape=label_shape)
    return sum(rows)


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays of an uncompressed or compressed ``.npz``, from their headers."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shapes[member.removesuffix(".npy")] = read_header(f)[0]
    return shapes


@contextlib.contextmanager
def _npy_writer(path: Path, dtype: Any, shape: tuple[int, ...]) -> Iterator[IO[bytes]]:
    """A binary file positioned at the data of a new ``.npy`` of ``shape``, preallocated with the header
    np.save writes. Rows are written through the file, not the map: copied pages then sit in the page cache
    instead of this process's resident memory."""
    offset = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).offset
    with open(path, "r+b") as f:
        f.seek(offset)
        yield f


def _write_cache(
    out: Path,
    blocks: Iterable[dict[str, Any]],
    *,
    count: int,
    dim: int,
    label_shape: tuple[int, ...],
    whole: dict[str, np.ndarray] | None = None,
) -> None:
    """Streams ``blocks`` (dicts of consecutive rows of the cache files) into ``features.npy``,
    ``latlon.npy``, ``labels.npy``, ``ids.txt`` and ``authors.txt`` of ``out``: the same files an in-memory
    concatenation would give. Arrays in ``whole`` are complete already: they are saved as they are and left
    out of the blocks. See the note above on meta.json and the temporary names."""
    whole = whole or {}
    (out / "meta.json").unlink(missing_ok=True)
    shapes = {"features": (count, dim), "latlon": (count, 2), "labels": (count, *label_shape)}
    streamed = {name: dtype for name, dtype in CACHE_ARRAYS.items() if name not in whole}
    for name in (*CACHE_ARRAYS, *CACHE_LINES):
        target = out / (f"{name}.npy" if name in CACHE_ARRAYS else f"{name}.txt")
        remove_stale_temporaries(target)  # of a merge killed before it could clean up
        (out / f"{name}.tmp{target.suffix}").unlink(missing_ok=True)  # the fixed names of older versions
    with contextlib.ExitStack() as targets:
        # Every file is written under a temporary name and moved into place only once all are complete.
        tmp = {name: targets.enter_context(atomic_path(out / f"{name}.npy")) for name in CACHE_ARRAYS}
        tmp.update({name: targets.enter_context(atomic_path(out / f"{name}.txt")) for name in CACHE_LINES})
        for name, array in whole.items():
            assert array.shape == shapes[name], (name, array.shape, shapes[name])
            with open(tmp[name], "wb") as f:
                np.save(f, np.asarray(array, dtype=CACHE_ARRAYS[name]))
        written = 0
        with contextlib.ExitStack() as stack:
            files: dict[str, IO] = {
                name: stack.enter_context(_npy_writer(tmp[name], dtype, shapes[name]))
                for name, dtype in streamed.items()
            }
            files.update({name: stack.enter_context(open(tmp[name], "w")) for name in CACHE_LINES})
            for block in blocks:
                k = len(block["ids"])
                for name, dtype in streamed.items():
                    rows = np.ascontiguousarray(block[name], dtype=dtype)
                    assert rows.shape == (k, *shapes[name][1:]), (name, rows.shape, shapes[name])
                    files[name].write(memoryview(rows))
                for name in CACHE_LINES:
                    assert len(block[name]) == k, (name, len(block[name]), k)
                    files[name].writelines(f"{value}\n" for value in block[name])
                written += k
        assert written == count, (written, count)


def write_meta(out: Path, meta: dict[str, Any]) -> None:
    """Writes ``meta.json``, the mark of a complete cache, atomically (last, after every other file)."""
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")


class FeatureCache:
    """A complete feature cache, read: ``features`` memory-mapped, the rest in memory.

    Raises:
        FileNotFoundError: the folder holds no complete cache (no ``meta.json``).
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no feature cache in {folder} (write one with: geoswc train features)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.features = np.load(self.folder / "features.npy", mmap_mode="r")
        self.latlon = np.load(self.folder / "latlon.npy")
        self.labels = np.load(self.folder / "labels.npy")

    def __len__(self) -> int:
        return len(self.latlon)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def lines(self, name: str) -> np.ndarray:
        """``ids`` or ``authors`` as an object array, one per row (empty strings when the file is absent).

        Raises:
            ValueError: the file's line count differs from the cache's rows.
        """
        check_choice("cache column", name, CACHE_LINES)
        path = self.folder / f"{name}.txt"
        if not path.is_file():
            return np.full(len(self), "", dtype=object)
        values = path.read_text().splitlines()
        if len(values) != len(self):
            raise ValueError(f"{path} has {len(values)} lines but the feature cache holds {len(self)} rows")
        return np.asarray(values, dtype=object)

    def check(self, geocells: Any) -> "FeatureCache":
        """This cache, after checking that it was labelled with ``geocells``.

        Raises:
            ValueError: the cache's partition fingerprint differs (both named).
        """
        if self.meta.get("fingerprint") != str(geocells.fingerprint):
            raise ValueError(
                f"feature cache {self.folder} was labelled with partition {self.meta.get('fingerprint')!r} but "
                f"the given cells have fingerprint {geocells.fingerprint!r}; use the same cells"
            )
        return self


# The folder of the ``backbone.pool`` descriptors' cache (GeM, NetVLAD) inside a feature cache.
RETRIEVAL_CACHE = "retrieval"


def cache_pool(folder: PathLike) -> str:
    """The pooling of the features in a cache: the ``pool`` its ``meta.json`` records, ``avg`` if none."""
    meta = Path(folder) / "meta.json"
    return str(json.loads(meta.read_text()).get("pool", "avg")) if meta.is_file() else "avg"


def pooled_cache(folder: PathLike, pool: str) -> Path:
    """The cache of ``pool`` features for a feature cache ``folder``: the folder itself when it holds them,
    else its ``retrieval/`` cache (written when ``backbone.pool`` is gem or netvlad).

    Raises:
        ValueError: neither holds ``pool`` features (what they hold named).
    """
    folder = Path(folder)
    if cache_pool(folder) == pool:
        return folder
    inner = folder / RETRIEVAL_CACHE
    if (inner / "meta.json").is_file() and cache_pool(inner) == pool:
        return inner
    held = cache_pool(folder) + (
        f" (and {cache_pool(inner)} in {inner})" if (inner / "meta.json").is_file() else ""
    )
    raise ValueError(
        f"the feature cache {folder} holds {held} features, not {pool}; extract the features with "
        f"backbone.pool={pool} (geoswc train features --set backbone.pool={pool})"
    )
