"""Metadata readers and leakage control for MP16-style training data (paper 4.2).

The training set's metadata is a CSV ``IMG_ID,AUTHOR,LAT,LON,...`` (MP16's ``mp16_places365.csv``; IMG_ID a
relative path like ``45/77/3228511372.jpg``); evaluation sets use the same header with Flickr file names
(``1000269685_e60e9cdfb4_1125_78841376@N00.jpg``) or bare ids (``10201275523.jpg``). Images come either as files
under a root folder or inside GeoEstimation's msgpack shards (records ``{"image": JPEG bytes, "id": IMG_ID}``).

Paper 4.2 trains "after removing all the images of the users that appeared in the evaluation sets"; the
exclusion helpers drop photos whose author or photo id appears in a benchmark, comparing photo ids in one
normal form (`normalize_photo_id`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Set, Tuple, Union

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Accepted spellings of each column, first = canonical.
_COLUMN_ALIASES = {
    "IMG_ID": ("IMG_ID", "img_id", "image_id", "id", "ID"),
    "AUTHOR": ("AUTHOR", "author", "owner", "OWNER"),
    "LAT": ("LAT", "lat", "latitude", "LATITUDE"),
    "LON": ("LON", "lon", "lng", "long", "longitude", "LONGITUDE"),
}


def read_metadata(path: PathLike) -> pd.DataFrame:
    """Read and validate a metadata CSV.

    Args:
        path: CSV with at least an image id, latitude and longitude column (``IMG_ID,LAT,LON``; common lowercase
            spellings are accepted). ``AUTHOR`` and any further columns are kept.

    Returns:
        DataFrame whose first columns are ``IMG_ID`` (str), ``AUTHOR`` (str, if present), ``LAT``, ``LON``
        (float64 degrees), followed by the file's other columns.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a required column is missing, an id is empty or repeated, or a coordinate is missing or out
            of range; the message names the file, the line and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty (expected a header IMG_ID,AUTHOR,LAT,LON and one row per photo)") from None
    rename = {}
    for canonical, aliases in _COLUMN_ALIASES.items():
        found = [c for c in aliases if c in frame.columns]
        if found:
            rename[found[0]] = canonical
        elif canonical != "AUTHOR":
            raise ValueError(
                f"{path}: no {canonical} column (accepted: {', '.join(aliases)}); found columns: "
                f"{', '.join(frame.columns)}"
            )
    frame = frame.rename(columns=rename)
    ids = frame["IMG_ID"].str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if len(empty):
        raise ValueError(f"{path}: line {empty[0] + 2}, column IMG_ID: empty image id")
    duplicated = np.flatnonzero(ids.duplicated().to_numpy())
    if len(duplicated):
        raise ValueError(f"{path}: line {duplicated[0] + 2}, column IMG_ID: repeated id {ids.iloc[duplicated[0]]!r}")
    frame["IMG_ID"] = ids
    for column, limit in (("LAT", 90.0), ("LON", 180.0)):
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > limit))
        if len(bad):
            raise ValueError(
                f"{path}: line {bad[0] + 2}, column {column}: {frame[column].iloc[bad[0]]!r} is not a number "
                f"in [-{limit:g}, {limit:g}]"
            )
        frame[column] = values
    first = [c for c in ("IMG_ID", "AUTHOR", "LAT", "LON") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]].reset_index(drop=True)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif")
IMAGE_EXTENSION_RE = r"\.(?:" + "|".join(IMAGE_EXTENSIONS) + r")$"
# A Flickr file name ends with <photo id>_<10-hex secret>, then either <server>_<owner nsid> (the Im2GPS
# naming) or a one-letter size suffix. Anchoring at the end skips the prefixes Im2GPS adds ("Athens_00016_").
FLICKR_NAME_RE = r"(?:^|_)(\d+)_[0-9a-fA-F]{10}(?:_\d+_\d+@N\d+|_[a-z])?$"
_EXTENSION_PATTERN = re.compile(IMAGE_EXTENSION_RE, re.IGNORECASE)
_FLICKR_PATTERN = re.compile(FLICKR_NAME_RE)


def normalize_photo_id(img_id: str) -> str:
    """The key under which one photo is recognised across MP16, Im2GPS, YFCC4k and prediction files.

    Take the file name (after the last ``/`` or ``\\``), drop an image extension; if what remains is a
    Flickr-style name ending in ``<photo id>_<10-hex secret>`` (optionally ``_<server>_<owner>`` or a size
    letter), the key is the numeric photo id, otherwise the remaining name unchanged. So
    ``45/77/3228511372.jpg`` and ``3228511372.jpg`` give ``3228511372``, and
    ``1000269685_e60e9cdfb4_1125_78841376@N00.jpg`` and ``Athens_00016_1000269685_e60e9cdfb4_1125_78841376@N00``
    give ``1000269685``, while distinct non-Flickr names never merge.
    """
    name = str(img_id).strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem = _EXTENSION_PATTERN.sub("", name)
    flickr = _FLICKR_PATTERN.search(stem)
    return flickr.group(1) if flickr else stem


@dataclass
class Exclusions:
    """Authors and normalised photo ids of evaluation sets that must not leak into training."""

    authors: Set[str] = field(default_factory=set)
    photo_ids: Set[str] = field(default_factory=set)
    sources: List[str] = field(default_factory=list)

    @classmethod
    def from_files(cls, paths: Sequence[PathLike]) -> "Exclusions":
        """Collect AUTHOR and IMG_ID values of benchmark CSVs (files without AUTHOR contribute ids only)."""
        result = cls()
        for path in paths:
            frame = read_metadata(path)
            result.photo_ids.update(normalize_photo_id(i) for i in frame["IMG_ID"])
            if "AUTHOR" in frame.columns:
                result.authors.update(a.strip() for a in frame["AUTHOR"] if a.strip())
            result.sources.append(str(path))
        return result

    def masks(self, frame: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
        """Boolean masks ``(by_author, by_id)`` over the rows of ``frame``; a photo excluded by its author is not
        counted again by its id."""
        if "AUTHOR" in frame.columns and self.authors:
            by_author = frame["AUTHOR"].astype(str).str.strip().isin(self.authors).to_numpy()
        else:
            by_author = np.zeros(len(frame), dtype=bool)
        normalised = frame["IMG_ID"].map(normalize_photo_id)
        by_id = normalised.isin(self.photo_ids).to_numpy() & ~by_author
        return by_author, by_id


def find_leaks(train: PathLike, benchmarks: Sequence[PathLike]) -> Dict[str, object]:
    """Overlaps between a training CSV and benchmark CSVs, by author and by photo id; writes nothing.

    Returns:
        ``{"train": path, "train_rows": n, "benchmarks": {path: {"rows", "shared_authors", "photos_by_shared_authors",
        "shared_photo_ids"}}, "excluded_author": n, "excluded_id": n}`` with the last two counting training rows
        that ``--exclude`` would drop, and up to 20 examples of each kind of overlap.
    """
    train_frame = read_metadata(train)
    train_ids = train_frame["IMG_ID"].map(normalize_photo_id)
    train_authors = (
        train_frame["AUTHOR"].astype(str).str.strip() if "AUTHOR" in train_frame.columns else None
    )
    report: Dict[str, object] = {"train": str(train), "train_rows": len(train_frame), "benchmarks": {}}
    for path in benchmarks:
        bench = read_metadata(path)
        bench_ids = set(bench["IMG_ID"].map(normalize_photo_id))
        shared_ids = sorted(set(train_ids) & bench_ids)
        entry: Dict[str, object] = {"rows": len(bench), "shared_photo_ids": len(shared_ids),
                                    "examples_photo_ids": shared_ids[:20]}
        if train_authors is not None and "AUTHOR" in bench.columns:
            shared_authors = sorted(set(train_authors) & set(bench["AUTHOR"].astype(str).str.strip()) - {""})
            entry["shared_authors"] = len(shared_authors)
            entry["photos_by_shared_authors"] = int(train_authors.isin(shared_authors).sum())
            entry["examples_authors"] = shared_authors[:20]
        report["benchmarks"][str(path)] = entry
    by_author, by_id = Exclusions.from_files(benchmarks).masks(train_frame)
    report["excluded_author"] = int(by_author.sum())
    report["excluded_id"] = int(by_id.sum())
    return report


def expand_globs(patterns: Iterable[PathLike]) -> List[Path]:
    """Files matching shell patterns, sorted within each pattern; a pattern matching nothing raises."""
    files: List[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.fspath(pattern)))
        if not matches:
            raise FileNotFoundError(f"no file matches {os.fspath(pattern)!r}")
        files += [Path(m) for m in matches]
    return files


def iter_msgpack_records(paths: Sequence[PathLike]) -> Iterator[Tuple[str, bytes]]:
    """Yield ``(IMG_ID, JPEG bytes)`` from GeoEstimation msgpack shards (records ``{"image", "id"}``).

    A truncated shard ends its own iteration with a warning instead of stopping the job.
    """
    import msgpack

    for path in paths:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 30)
            try:
                for record in unpacker:
                    if not isinstance(record, dict) or "id" not in record or "image" not in record:
                        logger.warning("%s: skipping a record without 'id' and 'image'", path)
                        continue
                    yield str(record["id"]), bytes(record["image"])
            except (msgpack.OutOfData, msgpack.ExtraData, ValueError) as err:
                logger.warning("%s: shard ends early (%s)", path, err)
