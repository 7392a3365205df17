"""Result files of `geoswc tag`: one row per photo, written incrementally, resumable after any kill.

CSV and JSONL outputs are appended to directly, one flush per batch. After a kill (even SIGKILL) the file
ends in whole rows plus at most one partial row; `recover` cuts the partial row off and returns the whole
ones, whose paths are the photos already done.

GeoJSON and Parquet cannot be appended to row by row, and several ranks cannot share one file, so those runs
append to JSONL journals ``OUT.journal-<rank>.jsonl`` instead; at the end `merge` writes the final file from
the journals (and from an earlier final file when resuming) in discovery order, atomically, and deletes the
journals.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

COLUMNS = ("path", "status", "error", "lat", "lon", "method", "cell_token", "cell_probability", "confidence")
FLOAT_COLUMNS = ("lat", "lon", "cell_probability", "confidence")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".geojson": "geojson", ".parquet": "parquet"}
# Paths are file names from the OS: bytes that are not UTF-8 survive a round trip through the output.
ENCODING, ERRORS = "utf-8", "surrogateescape"

Row = Dict[str, object]
# Prediction keys that name a column differently (the Geolocator's records say ``cell_prob``).
PREDICTION_ALIASES = {"cell_probability": "cell_prob"}


def output_format(path: str) -> str:
    """The output format named by a file's extension.

    Raises:
        ValueError: the extension is not one of .csv, .jsonl, .geojson, .parquet.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"unknown output format {ext or path!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[ext]


def make_row(path: str, *, error: Optional[str] = None, prediction: Optional[dict] = None) -> Row:
    """One output row: an ``ok`` row from a prediction, or an ``error`` row with its reason."""
    row: Row = dict.fromkeys(COLUMNS)
    row["path"] = path
    if error is not None:
        row["status"] = "error"
        # One line per row whatever the exception text held.
        row["error"] = " ".join(str(error).split())
        return row
    row["status"] = "ok"
    row["error"] = ""
    for key in COLUMNS[3:]:
        value = prediction.get(key, prediction.get(PREDICTION_ALIASES.get(key)))
        if key in FLOAT_COLUMNS and value is not None:
            value = float(value)
        row[key] = value
    return row


def journal_path(output: str, rank: int) -> str:
    return f"{output}.journal-{rank:05d}.jsonl"


def journal_paths(output: str) -> List[str]:
    """The journals of every rank of earlier or current runs writing ``output``."""
    pattern = glob.escape(output) + ".journal-[0-9][0-9][0-9][0-9][0-9].jsonl"
    return sorted(glob.glob(pattern))


# --------------------------------------------------------------------------------------------- reading


def _complete_end(data: bytes, fmt: str) -> int:
    """Byte length of the whole rows at the start of ``data`` (a row ends at a newline outside quotes)."""
    end = data.rfind(b"\n") + 1
    if fmt == "csv":
        # A newline inside a quoted field (a file name may hold one) does not end a row: the quotes before a
        # row's end are balanced.
        while end and data.count(b'"', 0, end) % 2:
            end = data.rfind(b"\n", 0, end - 1) + 1
    return end


def _parse_csv(text: str, source: str) -> List[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    if tuple(header) != COLUMNS:
        raise ValueError(
            f"{source} has columns {header}, not those of geoswc tag ({', '.join(COLUMNS)}); "
            "use --overwrite to replace it or another output name"
        )
    rows = []
    for fields in reader:
        row = dict(zip(COLUMNS, fields))
        for key in FLOAT_COLUMNS:
            row[key] = float(row[key]) if row[key] != "" else None
        for key in ("method", "cell_token"):
            row[key] = row[key] or None
        rows.append(row)
    return rows


def _parse_jsonl(text: str, source: str) -> List[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source} line {number} is not a JSON row ({err.msg}); use --overwrite to replace it"
            )
        if not isinstance(row, dict) or "path" not in row:
            raise ValueError(f"{source} line {number} is not a geoswc tag row; use --overwrite to replace it")
        rows.append(row)
    return rows


def read_appendable(path: str, fmt: str, *, repair: bool) -> List[Row]:
    """The whole rows of a CSV or JSONL output or journal.

    Args:
        path: the file.
        fmt: ``csv`` or ``jsonl``.
        repair: truncate the file after its last whole row (a row cut by a kill) so appending can go on.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = _complete_end(data, fmt)
    if end < len(data):
        logger.info(
            "%s ends in a partial row (%d bytes)%s", path, len(data) - end, "; cut off" if repair else ""
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
    text = data[:end].decode(ENCODING, ERRORS)
    return _parse_csv(text, path) if fmt == "csv" else _parse_jsonl(text, path)


def read_rows(path: str, fmt: str) -> List[Row]:
    """Every row of a finished output file of any format."""
    if fmt in ("csv", "jsonl"):
        return read_appendable(path, fmt, repair=False)
    if fmt == "geojson":
        with open(path, encoding=ENCODING, errors=ERRORS) as f:
            try:
                collection = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} is not valid GeoJSON ({err.msg}); use --overwrite to replace it"
                ) from None
        return [dict(feature["properties"]) for feature in collection.get("features", [])]
    pq = pyarrow_parquet()
    return pq.read_table(path).to_pylist()


# --------------------------------------------------------------------------------------------- writing


def _csv_line(row: Row) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        ["" if row[key] is None else row[key] for key in COLUMNS]
    )
    return buffer.getvalue()


def _json_line(row: Row) -> str:
    # ensure_ascii keeps every row on one line and the file pure ASCII, whatever the file names hold.
    return json.dumps({key: row[key] for key in COLUMNS}) + "\n"


class RowWriter:
    """Appends rows to a CSV or JSONL file, flushing after every batch so a kill loses at most one row."""

    def __init__(self, path: str, fmt: str):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"RowWriter appends csv or jsonl, not {fmt!r}")
        self.path, self.fmt = path, fmt
        self._line = _csv_line if fmt == "csv" else _json_line
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self._file = open(path, "a", encoding=ENCODING, errors=ERRORS, newline="")
        if new and fmt == "csv":
            self._file.write(",".join(COLUMNS) + "\n")
            self._file.flush()

    def write(self, rows: Iterable[Row]) -> None:
        self._file.write("".join(self._line(row) for row in rows))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet output needs pyarrow: pip install 'geoswc[parquet]'") from None
    return pq


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_rows(path: str, fmt: str, rows: Sequence[Row]) -> None:
    """Write a complete output file atomically (a temporary file renamed over ``path``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if fmt in ("csv", "jsonl"):
            with RowWriter(tmp, fmt) as writer:
                writer.write(rows)
        elif fmt == "geojson":
            with open(tmp, "w", encoding=ENCODING, errors=ERRORS) as f:
                f.write('{"type": "FeatureCollection", "features": [\n')
                for number, row in enumerate(rows):
                    geometry = None
                    if row["status"] == "ok" and row["lat"] is not None:
                        # GeoJSON positions are (lon, lat) (RFC 7946); error rows keep a null geometry.
                        geometry = {"type": "Point", "coordinates": [row["lon"], row["lat"]]}
                    feature = {
                        "type": "Feature",
                        "geometry": geometry,
                        "properties": {key: _finite(row[key]) for key in COLUMNS},
                    }
                    f.write(("," if number else "") + json.dumps(feature) + "\n")
                f.write("]}\n")
        else:
            import pyarrow as pa

            pq = pyarrow_parquet()
            schema = pa.schema(
                [(key, pa.float64() if key in FLOAT_COLUMNS else pa.string()) for key in COLUMNS]
            )
            # Parquet strings are UTF-8: bytes of non-UTF-8 file names become U+FFFD there.
            columns = {
                key: [
                    row[key].encode(ENCODING, ERRORS).decode(ENCODING, "replace")
                    if isinstance(row[key], str)
                    else row[key]
                    for row in rows
                ]
                for key in COLUMNS
            }
            pq.write_table(pa.table(columns, schema=schema), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def merge(output: str, fmt: str, order: Sequence[str], *, include_existing: bool) -> List[Row]:
    """Write the final output from the journals of every rank, then delete the journals.

    Rows are written in ``order`` (the discovery order); rows of paths outside it (an earlier run over other
    inputs) come first, in their stored order. A path is written once, from its first row.

    Args:
        output: the final file.
        fmt: its format.
        order: the paths of this run, in discovery order.
        include_existing: keep the rows of an existing ``output`` (resuming).

    Returns:
        The rows written.
    """
    rows: List[Row] = []
    if include_existing and os.path.exists(output):
        rows.extend(read_rows(output, fmt))
    journals = journal_paths(output)
    for journal in journals:
        rows.extend(read_appendable(journal, "jsonl", repair=False))
    by_path: Dict[str, Row] = {}
    for row in rows:
        by_path.setdefault(row["path"], row)
    position = {path: number for number, path in enumerate(order)}
    merged = sorted(by_path.values(), key=lambda row: position.get(row["path"], -1))
    write_rows(output, fmt, merged)
    for journal in journals:
        os.remove(journal)
    return merged
