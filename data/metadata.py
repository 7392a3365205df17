"""Metadata readers and leakage control for MP16-style training data (paper 4.2).

The training set's metadata is a CSV ``IMG_ID,AUTHOR,LAT,LON,...`` (MP16's ``mp16_places365.csv``; IMG_ID a
relative path like ``45/77/3228511372.jpg``); evaluation sets use the same header with Flickr file names
(``1000269685_e60e9cdfb4_1125_78841376@N00.jpg``) or bare ids (``10201275523.jpg``). Images come either as files
under a root folder or inside GeoEstimation's msgpack shards (records ``{"image": JPEG bytes, "id": IMG_ID}``).

This module owns every table of photo positions - training metadata, benchmark ground truth, predictions: one
set of column aliases (`COLUMN_ALIASES`, any case) and one validator (`standardize_locations`, behind
`read_locations` and `read_metadata`) whose errors name the file, the line and the column.

Paper 4.2 trains "after removing all the images of the users that appeared in the evaluation sets"; the
exclusion helpers drop photos whose author or photo id appears in a benchmark, comparing photo ids in one
normal form (`normalize_photo_id`).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import msgpack
import numpy as np
import pandas as pd

from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Accepted names of each column, matched case-insensitively; the first is the canonical name.
COLUMN_ALIASES: Dict[str, Tuple[str, ...]] = {
    "IMG_ID": ("IMG_ID", "image_id", "id"),
    "AUTHOR": ("AUTHOR", "owner"),
    "LAT": ("LAT", "latitude"),
    "LON": ("LON", "long", "lng", "longitude"),
}
COORDINATE_LIMITS = {"LAT": 90.0, "LON": 180.0}
_UNIQUE_CHOICES = ("photo", "id")

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


def normalize_photo_ids(img_ids: Iterable) -> List[str]:
    """`normalize_photo_id` of every id, vectorised with pandas string methods."""
    ids = pd.Series(list(img_ids), dtype=object).astype(str).str.strip()
    names = ids.str.replace("\\", "/", regex=False).str.rsplit("/", n=1).str[-1]
    stems = names.str.replace(IMAGE_EXTENSION_RE, "", regex=True, flags=re.IGNORECASE)
    flickr_ids = stems.str.extract(FLICKR_NAME_RE, expand=False)
    return flickr_ids.fillna(stems).tolist()


def resolve_columns(
    columns: Iterable, *, source: str, required: Sequence[str] = ("IMG_ID", "LAT", "LON")
) -> Dict[str, str]:
    """Find the table's own name of each canonical column in `COLUMN_ALIASES`, matching case-insensitively.

    Args:
        columns: the table's column names.
        source: how errors name the table (a file path, or e.g. ``"predictions"``).
        required: canonical columns that must be present.

    Returns:
        ``{canonical name: the table's column}`` for every canonical column found.

    Raises:
        ValueError: a required column is missing; the message lists the accepted names and the columns found.
    """
    columns = list(columns)
    by_lower: Dict[str, object] = {}
    for column in columns:
        by_lower.setdefault(str(column).strip().lower(), column)
    found = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        match = next((by_lower[a.lower()] for a in aliases if a.lower() in by_lower), None)
        if match is not None:
            found[canonical] = match
    missing = [c for c in required if c not in found]
    if missing:
        accepted = "; ".join(f"{c}: {', '.join(COLUMN_ALIASES[c])}" for c in missing)
        raise ValueError(
            f"{source}: missing column {', '.join(missing)} (accepted names, any case: {accepted}); "
            f"found columns: {', '.join(map(str, columns)) or 'none'}"
        )
    return found


def standardize_locations(
    df: pd.DataFrame,
    *,
    source: str,
    lines: Optional[np.ndarray] = None,
    allow_empty: bool = False,
    keep_columns: bool = False,
    unique: str = "photo",
) -> pd.DataFrame:
    """Validate a table of photo positions and return it as ``IMG_ID, (AUTHOR,) LAT, LON``.

    Args:
        df: the table; column names matched case-insensitively against `COLUMN_ALIASES`.
        source: how errors name the table (a file path, or e.g. ``"predictions"``).
        lines: the 1-based line number in the file of each row; without it errors name the 1-based row.
        allow_empty: accept a table without rows.
        keep_columns: keep the table's other columns, after the standard ones; by default they are dropped.
        unique: ``"photo"`` rejects two rows for one photo (the same ID, or two IDs with the same
            `normalize_photo_id` key); ``"id"`` rejects only repeated IDs.

    Returns:
        A new DataFrame with ``IMG_ID`` (stripped str), ``AUTHOR`` when the table has it, ``LAT`` and ``LON``
        (float64 degrees), then the other columns when ``keep_columns``; the index runs from 0.

    Raises:
        ValueError: missing columns, an empty or non-numeric value, a coordinate out of range, a repeated
            photo, or no rows without ``allow_empty``; the message names the source, the line (or row) and
            the table's own column name.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    check_choice("unique", unique, _UNIQUE_CHOICES)
    cols = resolve_columns(df.columns, source=source)
    df = df.reset_index(drop=True)
    where = "line" if lines is not None else "row"
    lines = np.arange(1, len(df) + 1) if lines is None else np.asarray(lines)
    if len(df) == 0 and not allow_empty:
        raise ValueError(f"{source}: no rows (empty file or header only)")

    def fail(i: int, canonical: str, message: str):
        raise ValueError(f"{source}: {where} {lines[i]}, column {cols[canonical]}: {message}")

    raw_ids = df[cols["IMG_ID"]]
    ids = raw_ids.astype(str).str.strip()
    bad = raw_ids.isna().to_numpy() | (ids == "").to_numpy()
    if bad.any():
        fail(int(np.argmax(bad)), "IMG_ID", "empty image ID")

    out = pd.DataFrame({"IMG_ID": ids})
    if "AUTHOR" in cols:
        out["AUTHOR"] = df[cols["AUTHOR"]]
    for canonical, limit in COORDINATE_LIMITS.items():
        raw = df[cols[canonical]]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(values).any():
            i = int(np.argmax(np.isnan(values)))
            text = "" if pd.isna(raw.iloc[i]) else str(raw.iloc[i]).strip()
            fail(i, canonical, f"non-numeric value {text!r}" if text else "empty value")
        out_of_range = ~(np.abs(values) <= limit)
        if out_of_range.any():
            i = int(np.argmax(out_of_range))
            fail(i, canonical, f"value {float(values[i])!r} out of range [-{limit:g}, {limit:g}] degrees")
        out[canonical] = values

    keys = pd.Series(normalize_photo_ids(out["IMG_ID"]) if unique == "photo" else out["IMG_ID"])
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        j = int(np.flatnonzero(dup & (keys == keys[i]).to_numpy())[1])
        what = (
            f"duplicate image ID {out['IMG_ID'][j]!r} (also on {where} {lines[i]})"
            if out["IMG_ID"][i] == out["IMG_ID"][j]
            else f"image ID {out['IMG_ID'][j]!r} names the same photo {keys[i]!r} as {out['IMG_ID'][i]!r} "
            f"on {where} {lines[i]}"
        )
        fail(j, "IMG_ID", what)
    if keep_columns:
        used = set(cols.values())
        for column in df.columns:
            if column not in used and column not in out.columns:
                out[column] = df[column]
    return out


_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def read_csv_text(path: PathLike, *, expected: str = "", **options) -> pd.DataFrame:
    """Read a CSV file with a header as text, turning every way the file can be unreadable into one-line errors.

    Values are read as str (``dtype=str``, no NA conversion) from UTF-8 (a byte-order mark is accepted). A row
    with more fields than the header is an error wherever it is: pandas would otherwise take the extra fields
    of a first such row as an index and silently shift every column.

    Args:
        path: the CSV file.
        expected: what the file should hold, quoted when it is empty (e.g. ``"a header IMG_ID,LAT,LON"``).
        **options: further `pandas.read_csv` options (e.g. ``skip_blank_lines``).

    Returns:
        The table, its index running from 0.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, an empty file, a row with more fields than the header, bytes that are not
            UTF-8, or text pandas cannot parse (e.g. an unterminated quote); one line naming the file and,
            where known, the line (1-based, the header is line 1).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a CSV file")
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    options = {"dtype": str, "keep_default_na": False, "encoding": "utf-8-sig", **options}
    try:
        frame = pd.read_csv(path, **options)
        if not isinstance(frame.index, pd.RangeIndex):
            # Read without a header, every row must have the header's field count: pandas names the line.
            pd.read_csv(path, header=None, **options)
            raise ValueError(f"{path}: line 2 has more fields than the header")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file" + (f" (expected {expected})" if expected else "")) from None
    except pd.errors.ParserError as err:
        text = " ".join(str(err).split())
        fields = _FIELD_COUNT.search(text)
        if fields:
            expected_fields, line, seen = fields.groups()
            message = f"line {line} has {seen} fields, the header has {expected_fields}"
        else:
            message = f"not a readable CSV file ({text.replace('Error tokenizing data. C error: ', '')})"
        raise ValueError(f"{path}: {message}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {_undecodable(path, err)}") from None
    return frame


def _undecodable(path: Path, err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8 text: the decoder's position is in pandas' buffer, so find the line."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (
                    f"line {number}: byte 0x{line[bad.start]:02x} at position {bad.start + 1} is not UTF-8 "
                    "text (save the file as UTF-8)"
                )
    return f"not UTF-8 text ({err.reason}); save the file as UTF-8"


def read_locations(
    path: PathLike, *, allow_empty: bool = False, keep_columns: bool = False, unique: str = "photo"
) -> pd.DataFrame:
    """Read and validate a CSV of photo positions: ground truth, predictions or training metadata.

    Values are read as text, so IDs keep their exact spelling and errors quote the bad value; blank lines are
    skipped but counted, so errors name the line in the file (the header is line 1).

    Args:
        path: a CSV with a header holding ``IMG_ID, LAT, LON`` (any case, or an alias in `COLUMN_ALIASES`).
        allow_empty: accept a header without rows.
        keep_columns: keep columns other than ``IMG_ID, AUTHOR, LAT, LON`` (as text) after those.
        unique: what counts as a repeated photo, see `standardize_locations`.

    Returns:
        DataFrame ``IMG_ID, (AUTHOR,) LAT, LON`` as `standardize_locations` returns it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file `read_csv_text` cannot read (a directory, an empty file, a row with more fields than
            the header, bytes that are not UTF-8, broken quoting), or a table that fails
            `standardize_locations`; the message is one line naming the file and, where known, the line.
    """
    frame = read_csv_text(
        path, expected="a header IMG_ID,LAT,LON and one row per photo", skip_blank_lines=False
    )
    lines = np.arange(2, len(frame) + 2)
    if len(frame.columns):
        # A blank line reads as a row whose first field is empty; only those rows need the full check.
        candidates = np.flatnonzero((frame.iloc[:, 0].str.strip() == "").to_numpy())
        if len(candidates):
            rest = frame.iloc[candidates].apply(lambda col: col.str.strip())
            blank = np.zeros(len(frame), dtype=bool)
            blank[candidates] = (rest == "").all(axis=1).to_numpy()
            if blank.any():
                frame, lines = frame[~blank].reset_index(drop=True), lines[~blank]
    return standardize_locations(
        frame,
        source=str(path),
        lines=lines,
        allow_empty=allow_empty,
        keep_columns=keep_columns,
        unique=unique,
    )


def read_metadata(path: PathLike) -> pd.DataFrame:
    """Read and validate a metadata CSV (``IMG_ID,AUTHOR,LAT,LON,...``), keeping every column.

    Args:
        path: CSV with at least an image id, latitude and longitude column (``IMG_ID,LAT,LON``; the aliases of
            `COLUMN_ALIASES` are accepted in any case). ``AUTHOR`` and any further columns are kept.

    Returns:
        DataFrame whose first columns are ``IMG_ID`` (str), ``AUTHOR`` (str, if present), ``LAT``, ``LON``
        (float64 degrees), followed by the file's other columns as text. A header without rows gives an empty
        frame.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable CSV (see `read_locations`), a required column is missing, an
            id is empty or repeated, or a coordinate is missing or out of range; the message names the file,
            the line and the column.
    """
    return read_locations(path, allow_empty=True, keep_columns=True, unique="id")


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
    train_authors = train_frame["AUTHOR"].astype(str).str.strip() if "AUTHOR" in train_frame.columns else None
    report: Dict[str, object] = {"train": str(train), "train_rows": len(train_frame), "benchmarks": {}}
    for path in benchmarks:
        bench = read_metadata(path)
        bench_ids = set(bench["IMG_ID"].map(normalize_photo_id))
        shared_ids = sorted(set(train_ids) & bench_ids)
        entry: Dict[str, object] = {
            "rows": len(bench),
            "shared_photo_ids": len(shared_ids),
            "examples_photo_ids": shared_ids[:20],
        }
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


# GeoEstimation writes each record as a small map whose first key is "image" or "id": after bytes that are not
# msgpack, reading resumes at the next place where such a map starts.
_RECORD_START = re.compile(rb"[\x81-\x8f](?:\xa5image|\xa2id)")
_MSGPACK_MAX_BUFFER = 1 << 30
_RESYNC_CHUNK = 1 << 20


@dataclass(frozen=True)
class MsgpackRecord:
    """One record of a GeoEstimation msgpack file, usable or not.

    Attributes:
        position: 0-based index of the record among the records read from its file.
        img_id: the record's ``id`` as str (an int id is converted); None when it has none that names a photo.
        image: the photo's encoded bytes; None when the record is malformed.
        problem: why the record is malformed, e.g. ``"image is int, not bytes"``; None for a usable record.
    """

    position: int
    img_id: Optional[str]
    image: Optional[bytes]
    problem: Optional[str] = None


@dataclass(frozen=True)
class MsgpackFileError:
    """Why part of a msgpack file could not be read.

    ``reason`` is ``"unreadable"`` (the file cannot be opened, or an I/O error stopped reading), ``"truncated"``
    (the file ends inside a record) or ``"damaged"`` (bytes that are not msgpack records, skipped); ``detail``
    says where.
    """

    reason: str
    detail: str


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _os_reason(err: OSError) -> str:
    return err.strerror or str(err)


def _msgpack_record(position: int, obj: object) -> MsgpackRecord:
    """Check one decoded object against the record format ``{"image": bytes, "id": str}``."""
    if not isinstance(obj, dict):
        return MsgpackRecord(position, None, None, f"not a map but {_kind(obj)}")
    img_id, problem = obj.get("id"), None
    if "id" not in obj:
        problem = "no 'id'"
    elif isinstance(img_id, bool) or not isinstance(img_id, (str, int)):
        problem = f"id is {_kind(img_id)}, not str"
    elif not str(img_id).strip():
        problem = "empty id"
    img_id = None if problem else str(img_id)
    image = obj.get("image")
    if problem is None and "image" not in obj:
        problem = "no 'image'"
    elif problem is None and not isinstance(image, bytes):
        # Never bytes(image): an int would be taken as a size to allocate.
        problem = f"image is {_kind(image)}, not bytes"
    return MsgpackRecord(position, img_id, None if problem else image, problem)


class MsgpackReader:
    """The records of one GeoEstimation msgpack file, read past every damage that leaves records to read.

    Iterating yields a `MsgpackRecord` for every object that decodes, usable or malformed. Bytes that are not
    msgpack (or a record cut short in the middle of the file) are skipped up to the next place a record starts;
    a file that ends inside a record is truncated after its last complete record; a file that cannot be opened
    or fails with an I/O error yields what was read before. Each of these is logged and listed in ``errors``
    (`MsgpackFileError`); ``records`` counts the records yielded.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.errors: List[MsgpackFileError] = []
        self.records = 0

    def _error(self, reason: str, detail: str) -> None:
        logger.warning("%s: %s: %s", self.path, reason, detail)
        self.errors.append(MsgpackFileError(reason, detail))

    def __iter__(self) -> Iterator[MsgpackRecord]:
        self.errors, self.records = [], 0
        try:
            mode = os.stat(self.path).st_mode
            if not stat.S_ISREG(mode):  # a FIFO would block the job forever, a device never end
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                self._error("unreadable", f"cannot open: {kind}")
                return
            f = open(self.path, "rb")
        except OSError as err:
            self._error("unreadable", f"cannot open: {_os_reason(err)}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start = 0
            while True:
                try:
                    f.seek(start)
                    unpacker = msgpack.Unpacker(
                        f,
                        raw=False,
                        strict_map_key=False,  # a map with other keys is a malformed record, not the file's end
                        unicode_errors="surrogateescape",
                        max_buffer_size=_MSGPACK_MAX_BUFFER,
                    )
                    end, failure = start, None
                    while True:
                        try:
                            obj = next(unpacker)
                        except StopIteration:
                            break
                        except (ValueError, TypeError, msgpack.UnpackException) as err:
                            failure = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                            break
                        end = start + unpacker.tell()
                        yield _msgpack_record(self.records, obj)
                        self.records += 1
                    if failure is None and end >= size:
                        return
                    resume = _find_record_start(f, end + 1)
                except OSError as err:
                    self._error("unreadable", f"I/O error after {self.records} records: {_os_reason(err)}")
                    return
                if resume is None:
                    if failure is None:
                        self._error("truncated", f"ends inside a record at byte {end} of {size}")
                    else:
                        self._error("damaged", f"bytes {end}-{size} are not msgpack records ({failure})")
                    return
                what = failure or "an incomplete record"
                self._error("damaged", f"bytes {end}-{resume} are not msgpack records ({what}); skipped")
                start = resume


def _find_record_start(f, offset: int) -> Optional[int]:
    """The offset of the first record start at or after ``offset`` in the open file ``f``, or None."""
    overlap = 6  # a record start is at most 7 bytes: keep enough to find one across two chunks
    f.seek(offset)
    carry, base = b"", offset
    while True:
        chunk = f.read(_RESYNC_CHUNK)
        if not chunk:
            return None
        buffer = carry + chunk
        match = _RECORD_START.search(buffer)
        if match:
            return base - len(carry) + match.start()
        carry, base = buffer[-overlap:], base + len(chunk)


def iter_msgpack_records(paths: Sequence[PathLike]) -> Iterator[Tuple[str, bytes]]:
    """Yield ``(IMG_ID, image bytes)`` of every usable record of GeoEstimation msgpack shards (``{"image", "id"}``).

    Malformed records (no id, an image that is not bytes, not a map) are skipped with a warning; damaged,
    truncated and unreadable files yield what `MsgpackReader` recovers from them. `MsgpackReader` reports both.
    """
    for path in paths:
        for record in MsgpackReader(path):
            if record.problem is not None:
                logger.warning("%s: record %d skipped: %s", path, record.position, record.problem)
                continue
            yield record.img_id, record.image
