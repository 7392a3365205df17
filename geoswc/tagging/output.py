"""Result files of `geoswc tag`: one row per photo, written incrementally, resumable after any kill.

CSV and JSONL outputs are appended to directly, one flush per batch. After a kill (even SIGKILL) the file
ends in whole rows plus at most one partial row; `recover` cuts the partial row off and returns the whole
ones, whose paths are the photos already done.

GeoJSON and Parquet cannot be appended to row by row, and several ranks cannot share one file, so those runs
append to JSONL journals ``OUT.journal-<rank>.jsonl`` instead; at the end `merge` writes the final file from
the journals (and from an earlier final file when resuming) in discovery order, atomically, and deletes the
journals.

Every file of a run is named after ``OUT``: the journals here, the run record ``OUT.run.json`` and the lock
``OUT.lock`` (`geoswc.tagging.records`), the review page ``OUT.html`` (`geoswc.tagging.report`). What the system
refuses (disk full, permission denied) is raised as an `OutputError`, one line naming the file
(`geoswc.tagging.files`).

Every format has the same columns (`COLUMNS`); the list-valued ones (`LIST_COLUMNS`: ``top_cells``,
``evidence``) are JSON arrays in JSONL and GeoJSON and the same JSON text in one CSV or Parquet field, read
back as lists by `read_rows`. docs/tagging.md describes every column.

A CSV text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-`` or ``@``, after
any ``'``) is written with a leading ``'`` (`escape_cell`), which `read_rows` takes off again; ``raw=True``
(``geoswc tag --raw``) writes the text as it is. Numbers are never escaped: a negative latitude stays a number.
"""

from __future__ import annotations

import csv
import glob
import importlib
import io
import json
import logging
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from geoswc.data.validation import choice_error
from geoswc.data.files import atomic_path
from geoswc.tagging.files import (  # noqa: F401 (OutputError, output_error: importable from here as before)
    ENCODING,
    ERRORS,
    REPLACE_HINT,
    OutputError,
    finite,
    open_nofollow,
    os_errors,
    output_error,
)

logger = logging.getLogger(__name__)

COLUMNS = (
    "path",
    "status",
    "error",
    "lat",
    "lon",
    "method",
    "cell_token",
    "cell_probability",
    "confidence",
    # Reviewable output (docs/tagging.md): the best guess of an abstention, the nearest place, the photo's own
    # EXIF GPS and its distance to the prediction, the near-duplicate group, the alternatives and the evidence.
    "guess_lat",
    "guess_lon",
    "place",
    "admin1",
    "admin2",
    "country_code",
    "country",
    "place_distance_km",
    "exif_lat",
    "exif_lon",
    "exif_distance_km",
    "duplicate_group",
    "top_cells",
    "evidence",
)
FLOAT_COLUMNS = (
    "lat",
    "lon",
    "cell_probability",
    "confidence",
    "guess_lat",
    "guess_lon",
    "place_distance_km",
    "exif_lat",
    "exif_lon",
    "exif_distance_km",
)
INT_COLUMNS = ("duplicate_group",)
# List-valued columns: JSON arrays in JSONL and GeoJSON, the same JSON text in one CSV or Parquet field.
LIST_COLUMNS = ("top_cells", "evidence")
# Columns whose CSV cells are text, escaped against formula injection (`escape_cell`).
TEXT_COLUMNS = tuple(key for key in COLUMNS if key not in FLOAT_COLUMNS + INT_COLUMNS)
# A cell a spreadsheet would read as a formula (OWASP's CSV injection list), after any quotes added before.
_FORMULA = re.compile(r"'*[=+\-@]")
# Columns a prediction fills (make_row); the others are filled by the tag run (geoswc.tagging.run.review_fields).
PREDICTION_COLUMNS = ("lat", "lon", "method", "cell_token", "cell_probability", "confidence")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".geojson": "geojson", ".parquet": "parquet"}

# ok: placed; abstain: below --min-confidence (the guess in guess_lat/guess_lon); skipped: already geotagged
# (--skip-geotagged); error: not readable as a photo.
STATUSES = ("ok", "error", "abstain", "skipped")
Row = Dict[str, object]
# Prediction keys that name a column differently (the Geolocator's records say ``cell_prob``).
PREDICTION_ALIASES = {"cell_probability": "cell_prob"}
# Names that moved to their own modules, importable from here as before (loaded on first use: those modules
# import this one).
_MOVED = {
    "OutputLock": "geoswc.tagging.records",
    "lock_path": "geoswc.tagging.records",
    "read_run_record": "geoswc.tagging.records",
    "run_record_path": "geoswc.tagging.records",
    "write_run_record": "geoswc.tagging.records",
    "write_html_report": "geoswc.tagging.report",
}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def output_format(path: str) -> str:
    """The output format named by a file's extension.

    Raises:
        ValueError: the extension is not one of .csv, .jsonl, .geojson, .parquet.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise choice_error("output format", ext or path, FORMATS)
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
    for key in PREDICTION_COLUMNS:
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


# One CSV field as csv.writer writes it: quoted (quotes doubled inside) or plain (no quote, comma or newline).
_FIELD = r'(?:"(?:[^"]|"")*"|[^",\n]*)'
_FIELD_GROUPS = r'(?:"((?:[^"]|"")*)"|([^",\n]*))'  # the same, capturing (quoted, plain)
_CSV_ROW = re.compile(",".join([_FIELD_GROUPS] * len(COLUMNS)) + r"\n")  # a record of len(COLUMNS) fields
_CSV_RECORD = re.compile(_FIELD + r"(?:," + _FIELD + r")*\n")  # a record of any number of fields
_CSV_FIELD = re.compile(_FIELD_GROUPS + r"[,\n]")
# What a kill can leave of the last record: whole fields, then part of one (a quoted one maybe unclosed).
_CSV_PARTIAL = re.compile(r"(?:" + _FIELD + r',)*(?:"(?:[^"]|"")*"?|[^",\n]*)\Z')


def _damaged(source: str, line: int, what: str) -> ValueError:
    return ValueError(f"{source} line {line} {what}; {REPLACE_HINT} or repair that line")


def _check_row(row: Row, source: str, where: str) -> Row:
    """``row`` with every column (missing ones None), or a ValueError naming ``where`` when it is no row."""
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        raise ValueError(f"{source} {where} is not a geoswc tag row (no path); {REPLACE_HINT}")
    if row.get("status") not in STATUSES:
        raise ValueError(
            f"{source} {where} has status {row.get('status')!r}, not one of {', '.join(STATUSES)}; "
            f"{REPLACE_HINT}"
        )
    row = {key: row.get(key) for key in COLUMNS}
    for key in LIST_COLUMNS:
        if isinstance(row[key], str):  # Parquet keeps them as JSON text
            row[key] = _json_list(row[key], source, where, key)
    return row


def _json_list(text: str, source: str, where: str, key: str) -> Optional[list]:
    if text == "":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise ValueError(f"{source} {where} has {key} {text[:40]!r}, not a JSON list; {REPLACE_HINT}")
    return value


def _csv_fields(match: re.Match) -> List[str]:
    groups = match.groups()
    return [
        quoted.replace('""', '"') if quoted is not None else plain
        for quoted, plain in zip(groups[0::2], groups[1::2])
    ]


def _record_fields(record: str) -> List[str]:
    """The fields of a well-formed CSV record of any length."""
    fields, pos = [], 0
    while pos < len(record):
        match = _CSV_FIELD.match(record, pos)
        fields.extend(_csv_fields(match))
        pos = match.end()
    return fields


def escape_cell(text: str) -> str:
    """A CSV text cell that no spreadsheet runs as a formula: ``'`` before a cell starting with ``=``, ``+``,
    ``-`` or ``@`` (or with quotes and then one of those, so `unescape_cell` gives every text back exactly)."""
    return "'" + text if _FORMULA.match(text) else text


def unescape_cell(text: str) -> str:
    """The text `escape_cell` was given."""
    return text[1:] if text.startswith("'") and _FORMULA.match(text, 1) else text


def _csv_row(fields: List[str], source: str, line: int) -> Row:
    row: Row = dict(zip(COLUMNS, fields))
    for key in TEXT_COLUMNS:
        row[key] = unescape_cell(row[key])
    if row["status"] not in STATUSES:
        raise _damaged(source, line, f"has status {row['status']!r}, not one of {', '.join(STATUSES)}")
    for key in FLOAT_COLUMNS + INT_COLUMNS:
        kind = float if key in FLOAT_COLUMNS else int
        try:
            row[key] = kind(row[key]) if row[key] != "" else None
        except ValueError:
            raise _damaged(source, line, f"has {key} {row[key]!r}, not a number") from None
    for key in LIST_COLUMNS:
        row[key] = _json_list(row[key], source, f"line {line}", key)
    for key in ("method", "cell_token"):
        row[key] = row[key] or None
    return row


def _is_csv_row(text: str) -> bool:
    match = _CSV_ROW.fullmatch(text)
    return match is not None and _csv_fields(match)[1] in STATUSES


def _parse_csv(text: str, source: str):
    """The rows of a CSV output and the length of its whole records (a torn last record is left out).

    Only the last record may be incomplete (cut by a kill: it runs to the end of the file, unterminated);
    anything else that is not a row as geoswc writes them is a ValueError naming its line.
    """
    rows: List[Row] = []
    pos, line, header = 0, 1, True
    while pos < len(text):
        match = _CSV_ROW.match(text, pos) or _CSV_RECORD.match(text, pos)
        if match is None:
            rest = text[pos:]
            # A torn record spans several lines only through a quoted file name holding a newline; lines that
            # are whole rows of their own mean a stray quote swallowed them.
            inner = rest.split("\n")[1:-1]
            if _CSV_PARTIAL.match(rest) and not any(_is_csv_row(part + "\n") for part in inner):
                return rows, pos
            raise _damaged(source, line, "is not a CSV row (a stray quote?)")
        record = match.group(0)
        if match.re is _CSV_RECORD:
            fields = _record_fields(record)
            if header:
                raise ValueError(
                    f"{source} has columns {fields}, not those of geoswc tag ({', '.join(COLUMNS)}); "
                    "use --overwrite to replace it or another output name"
                )
            raise _damaged(source, line, f"has {len(fields)} fields, not {len(COLUMNS)}")
        fields = _csv_fields(match)
        if header:
            if tuple(fields) != COLUMNS:
                raise ValueError(
                    f"{source} has columns {fields}, not those of geoswc tag ({', '.join(COLUMNS)}); "
                    "use --overwrite to replace it or another output name"
                )
            header = False
        else:
            rows.append(_csv_row(fields, source, line))
        pos = match.end()
        line += record.count("\n")
    return rows, pos


def _parse_jsonl(text: str, source: str):
    """The rows of a JSONL output or journal and the length of its whole lines (a torn last line left out)."""
    rows = []
    lines = text.split("\n")
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source} line {number} is not a JSON row ({err.msg}); {REPLACE_HINT}"
            ) from None
        rows.append(_check_row(row, source, f"line {number}"))
    return rows, len(text) - len(lines[-1])


def read_appendable(path: str, fmt: str, *, repair: bool) -> List[Row]:
    """The whole rows of a CSV or JSONL output or journal.

    Args:
        path: the file.
        fmt: ``csv`` or ``jsonl``.
        repair: truncate a last row cut by a kill (no trailing newline, or an unclosed quote) so appending
            can go on.

    Raises:
        ValueError: a row before the last one is damaged (the message names the file and the line).
        OutputError: the file cannot be read or repaired.
    """
    with os_errors("read", path), open(path, "rb") as f:
        data = f.read()
    text = data.decode(ENCODING, ERRORS)
    rows, end = _parse_csv(text, path) if fmt == "csv" else _parse_jsonl(text, path)
    if end < len(text):
        torn = len(text[end:].encode(ENCODING, ERRORS))
        logger.info("%s ends in a partial row (%d bytes)%s", path, torn, "; cut off" if repair else "")
        if repair:
            with os_errors("repair", path), open_nofollow(path, "r+b") as f:
                f.truncate(len(data) - torn)
    return rows


def read_rows(path: str, fmt: str) -> List[Row]:
    """Every row of a finished output file of any format."""
    if fmt in ("csv", "jsonl"):
        return read_appendable(path, fmt, repair=False)
    if fmt == "geojson":
        with os_errors("read", path), open(path, encoding=ENCODING, errors=ERRORS) as f:
            try:
                collection = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid GeoJSON ({err.msg}); {REPLACE_HINT}") from None
        features = collection.get("features") if isinstance(collection, dict) else None
        if not isinstance(features, list):
            raise ValueError(f"{path} is not a GeoJSON FeatureCollection; {REPLACE_HINT}")
        return [
            _check_row(feature.get("properties") if isinstance(feature, dict) else None, path, f"feature {n}")
            for n, feature in enumerate(features, 1)
        ]
    pq = pyarrow_parquet()
    try:
        with os_errors("read", path):
            table = pq.read_table(path)
    except OutputError:
        raise
    except Exception as err:  # pyarrow's errors for a damaged file
        raise ValueError(f"{path} is not a readable Parquet file ({err}); {REPLACE_HINT}") from None
    return [_check_row(row, path, f"row {n}") for n, row in enumerate(table.to_pylist(), 1)]


# --------------------------------------------------------------------------------------------- writing


def _flat(key: str, value):
    """A value as one CSV or Parquet field: list columns as compact JSON text."""
    if key in LIST_COLUMNS and value is not None:
        return json.dumps(value, separators=(",", ":"))
    return value


def _csv_line(row: Row, *, raw: bool = False) -> str:
    cells = ["" if row.get(key) is None else _flat(key, row.get(key)) for key in COLUMNS]
    if not raw:
        cells = [escape_cell(cell) if isinstance(cell, str) else cell for cell in cells]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _line_writer(fmt: str, raw: bool) -> Callable[[Row], str]:
    if fmt == "csv":
        return lambda row: _csv_line(row, raw=raw)
    return _json_line


def _json_line(row: Row) -> str:
    # ensure_ascii keeps every row on one line and the file pure ASCII, whatever the file names hold.
    return json.dumps({key: row.get(key) for key in COLUMNS}) + "\n"


class RowWriter:
    """Appends rows to a CSV or JSONL file, flushing after every batch so a kill loses at most one row.

    A write the system refuses (disk full, ...) raises an `OutputError` naming the file; what it left is at
    most one partial row at the end, which ``--resume`` cuts off. A symbolic link at ``path`` is refused, not
    followed. ``raw``: CSV text cells as they are, not escaped against formula injection (`escape_cell`).
    """

    def __init__(self, path: str, fmt: str, *, raw: bool = False):
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"RowWriter appends csv or jsonl, not {fmt!r}")
        self.path, self.fmt = path, fmt
        self._line = _line_writer(fmt, raw)
        with os_errors("write", path):
            self._file = open_nofollow(path, "a", encoding=ENCODING, errors=ERRORS)
            new = os.fstat(self._file.fileno()).st_size == 0
        if new and fmt == "csv":
            self._append(",".join(COLUMNS) + "\n")

    def _append(self, text: str) -> None:
        with os_errors("write", self.path):
            self._file.write(text)
            self._file.flush()

    def write(self, rows: Iterable[Row]) -> None:
        self._append("".join(self._line(row) for row in rows))

    def close(self) -> None:
        with os_errors("write", self.path):
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


def _parquet_value(key: str, value):
    value = _flat(key, value)
    if isinstance(value, str):
        return value.encode(ENCODING, ERRORS).decode(ENCODING, "replace")
    return value


def write_rows(path: str, fmt: str, rows: Sequence[Row], *, raw: bool = False) -> None:
    """Write a complete output file atomically (a temporary file renamed over ``path``); ``raw`` as `RowWriter`.

    Raises:
        OutputError: the system refused (the message names ``path``); ``path`` is then as it was.
    """
    with os_errors("write", path), atomic_path(path) as tmp:
        if fmt in ("csv", "jsonl"):
            line = _line_writer(fmt, raw)
            with open(tmp, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
                f.write(",".join(COLUMNS) + "\n" if fmt == "csv" else "")
                f.write("".join(line(row) for row in rows))
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
                        "properties": {key: finite(row.get(key)) for key in COLUMNS},
                    }
                    f.write(("," if number else "") + json.dumps(feature) + "\n")
                f.write("]}\n")
        else:
            import pyarrow as pa

            pq = pyarrow_parquet()
            kinds = {key: pa.float64() for key in FLOAT_COLUMNS}
            kinds.update({key: pa.int64() for key in INT_COLUMNS})
            schema = pa.schema([(key, kinds.get(key, pa.string())) for key in COLUMNS])
            # Parquet strings are UTF-8: bytes of non-UTF-8 file names become U+FFFD there.
            columns = {key: [_parquet_value(key, row.get(key)) for row in rows] for key in COLUMNS}
            pq.write_table(pa.table(columns, schema=schema), tmp)


def merge(
    output: str,
    fmt: str,
    order: Sequence[str],
    *,
    include_existing: bool,
    key: Optional[Callable[[str], str]] = None,
    raw: bool = False,
) -> List[Row]:
    """Write the final output from the journals of every rank, then delete the journals.

    Rows are written in ``order`` (the discovery order); rows of photos outside it (an earlier run over other
    inputs) come first, in their stored order. A photo is written once, from its first row.

    Args:
        output: the final file.
        fmt: its format.
        order: the paths of this run, in discovery order.
        include_existing: keep the rows of an existing ``output`` (resuming).
        key: what identifies the photo of a path (default: the path itself); `geoswc.tagging.run` gives its real
            path, so two spellings of one photo are one photo.
        raw: as `RowWriter`.

    Returns:
        The rows written.
    """
    key = key or (lambda path: path)
    rows: List[Row] = []
    if include_existing and os.path.exists(output):
        rows.extend(read_rows(output, fmt))
    journals = journal_paths(output)
    for journal in journals:
        rows.extend(read_appendable(journal, "jsonl", repair=False))
    by_key: Dict[str, Row] = {}
    for row in rows:
        by_key.setdefault(key(row["path"]), row)
    position = {key(path): number for number, path in enumerate(order)}
    merged = sorted(by_key.items(), key=lambda item: position.get(item[0], -1))
    merged = [row for _, row in merged]
    write_rows(output, fmt, merged, raw=raw)
    for journal in journals:
        with os_errors("remove", journal):
            os.remove(journal)
    return merged
