"""Ground truth of the evaluation sets (Im2GPS, Im2GPS3k, YFCC4k) and MP16 metadata, read and validated.

Every reader returns a DataFrame ``IMG_ID, LAT, LON`` (plus ``AUTHOR`` when the file has it), coordinates in
degrees as float64. Bad input raises ``ValueError`` naming the file, the line (1-based, the header is line 1)
and the column.

Photos are matched between files by :func:`normalize_image_id`, because the same photo appears in the wild as
``1000269685_e60e9cdfb4_1125_78841376@N00.jpg`` (Im2GPS3k), ``Athens_00016_516320955_2f7c0642b4_212_...jpg``
(Im2GPS), ``45/77/3228511372.jpg`` (MP16) or a bare ``1000269685``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import pandas as pd

from geoswc.data.metadata import FLICKR_NAME_RE, IMAGE_EXTENSION_RE, normalize_photo_id

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "normalize_image_id",
    "normalize_image_ids",
    "standardize_locations",
    "read_locations",
    "load_benchmark",
    "PeerPredictions",
    "read_peer_predictions",
]

_EXTENSION_RE = IMAGE_EXTENSION_RE
_FLICKR_RE = FLICKR_NAME_RE

COLUMN_ALIASES = {
    "IMG_ID": ("img_id", "image_id", "id"),
    "LAT": ("lat", "latitude"),
    "LON": ("lon", "long", "lng", "longitude"),
    "AUTHOR": ("author",),
}
_RANGES = {"LAT": 90.0, "LON": 180.0}


@dataclass(frozen=True)
class BenchmarkInfo:
    rows: int
    source: str


BENCHMARKS = {
    "im2gps": BenchmarkInfo(
        237,
        "im2gps_places365.csv from the GeoEstimation repository (github.com/TIBHannover/GeoEstimation, "
        "resources/images/im2gps/)",
    ),
    "im2gps3k": BenchmarkInfo(
        2997,
        "im2gps3k_places365.csv from the GeoEstimation repository (github.com/TIBHannover/GeoEstimation, "
        "resources/images/im2gps3k/)",
    ),
    "yfcc4k": BenchmarkInfo(
        4536,
        "yfcc4k.csv (IMG_ID,LAT,LON) from the YFCC4k list of Vo et al., ICCV 2017 "
        "(github.com/lugiavn/revisiting-im2gps)",
    ),
    "mp16": BenchmarkInfo(
        4723695,
        "mp16_places365.csv from the GeoEstimation repository (github.com/TIBHannover/GeoEstimation, "
        "resources/)",
    ),
}


def normalize_image_id(image_id) -> str:
    """The key under which a photo is matched between prediction and ground-truth files.

    The rule: take the file name (the part after the last ``/`` or ``\\``); drop an image extension
    (``.jpg``, ``.png``, ...; case-insensitive); if what remains is a Flickr-style name ending in
    ``<photo id>_<10-hex secret>`` (optionally followed by ``_<server>_<owner>`` or a size letter), the key is
    the numeric Flickr photo id, otherwise it is the remaining name unchanged (case-sensitive).

    ``1000269685_e60e9cdfb4_1125_78841376@N00.jpg``, ``some/dir/1000269685_e60e9cdfb4_1125_78841376@N00.jpg``
    and ``1000269685`` all give ``"1000269685"``; ``45/77/3228511372.jpg`` gives ``"3228511372"``.
    """
    return normalize_photo_id(image_id)


def normalize_image_ids(image_ids) -> list[str]:
    """:func:`normalize_image_id` for a sequence, vectorised with pandas string methods."""
    ids = pd.Series(image_ids, dtype=object).astype(str).str.strip()
    names = ids.str.replace("\\", "/", regex=False).str.rsplit("/", n=1).str[-1]
    stems = names.str.replace(_EXTENSION_RE, "", regex=True, flags=re.IGNORECASE)
    flickr_ids = stems.str.extract(_FLICKR_RE, expand=False)
    return flickr_ids.fillna(stems).tolist()


def _resolve_columns(columns, source: str, required=("IMG_ID", "LAT", "LON")) -> dict[str, str]:
    """Maps canonical names to the frame's own column names, matching case-insensitively."""
    lower = {}
    for col in columns:
        lower.setdefault(str(col).strip().lower(), col)
    found = {}
    for canon, aliases in COLUMN_ALIASES.items():
        for name in (canon.lower(),) + aliases:
            if name in lower:
                found[canon] = lower[name]
                break
    missing = [c for c in required if c not in found]
    if missing:
        accepted = "; ".join(f"{c}: {', '.join((c,) + COLUMN_ALIASES[c])}" for c in missing)
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
) -> pd.DataFrame:
    """Validates a table of photo positions and returns it as ``IMG_ID, LAT, LON (, AUTHOR)``.

    Args:
        df: the table; column names matched case-insensitively (see ``COLUMN_ALIASES``).
        source: how errors name the table (a file path, or e.g. ``"predictions"``).
        lines: the 1-based line number in the file of each row; without it errors name the 1-based row.
        allow_empty: accept a table without rows.

    Raises:
        ValueError: missing columns, an empty or non-numeric value, a coordinate out of range, or two rows
            for the same photo (the same ID, or two IDs with the same :func:`normalize_image_id` key).
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    cols = _resolve_columns(df.columns, source)
    where = "line" if lines is not None else "row"
    if lines is None:
        lines = np.arange(1, len(df) + 1)
    lines = np.asarray(lines)
    if len(df) == 0 and not allow_empty:
        raise ValueError(f"{source}: no rows (empty file or header only)")

    def fail(i, canon, message):
        raise ValueError(f"{source}: {where} {lines[i]}, column {cols[canon]}: {message}")

    raw_ids = df[cols["IMG_ID"]]
    ids = raw_ids.astype(str).str.strip()
    bad = raw_ids.isna().to_numpy() | (ids == "").to_numpy()
    if bad.any():
        fail(int(np.argmax(bad)), "IMG_ID", "empty image ID")

    out = pd.DataFrame({"IMG_ID": ids.to_numpy()})
    if "AUTHOR" in cols:
        out["AUTHOR"] = df[cols["AUTHOR"]].to_numpy()
    for canon, limit in _RANGES.items():
        raw = df[cols[canon]]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(values).any():
            i = int(np.argmax(np.isnan(values)))
            text = "" if pd.isna(raw.iloc[i]) else str(raw.iloc[i]).strip()
            fail(i, canon, f"non-numeric value {text!r}" if text else "empty value")
        out_of_range = ~(np.abs(values) <= limit)
        if out_of_range.any():
            i = int(np.argmax(out_of_range))
            fail(i, canon, f"value {float(values[i])!r} out of range [-{limit:g}, {limit:g}] degrees")
        out[canon] = values

    keys = pd.Series(normalize_image_ids(out["IMG_ID"]))
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        j = int(np.flatnonzero(dup & (keys == keys[i]).to_numpy())[1])
        same = out["IMG_ID"][i] == out["IMG_ID"][j]
        what = (
            f"duplicate image ID {out['IMG_ID'][j]!r} (also on {where} {lines[i]})"
            if same
            else f"image ID {out['IMG_ID'][j]!r} names the same photo {keys[i]!r} as {out['IMG_ID'][i]!r} "
            f"on {where} {lines[i]}"
        )
        fail(j, "IMG_ID", what)
    columns = ["IMG_ID"] + (["AUTHOR"] if "AUTHOR" in cols else []) + ["LAT", "LON"]
    return out[columns]


def read_locations(path: Union[str, os.PathLike], *, allow_empty: bool = False) -> pd.DataFrame:
    """Reads and validates a CSV of photo positions (predictions or ground truth).

    Args:
        path: a CSV with a header holding ``IMG_ID, LAT, LON`` (any case, common aliases); other columns
            besides ``AUTHOR`` are dropped.
        allow_empty: accept a header without rows.

    Returns:
        DataFrame ``IMG_ID, LAT, LON`` (plus ``AUTHOR`` when present).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        # Strings throughout, so IDs keep their exact text and errors can quote the bad value.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: empty file (expected a header IMG_ID,LAT,LON and one row per photo)"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    lines = np.arange(2, len(df) + 2)
    blank = (df.apply(lambda col: col.str.strip()) == "").all(axis=1).to_numpy()
    if blank.any():
        df, lines = df[~blank].reset_index(drop=True), lines[~blank]
    return standardize_locations(df, source=str(path), lines=lines, allow_empty=allow_empty)


def load_benchmark(
    name_or_path: Union[str, os.PathLike], path: Union[str, os.PathLike, None] = None
) -> pd.DataFrame:
    """Loads the ground truth of a benchmark (or MP16 metadata) as ``IMG_ID, LAT, LON (, AUTHOR)``.

    No benchmark data ships with the package: pass a known name together with the path of its file, or a
    CSV path alone.

    Args:
        name_or_path: one of ``im2gps``, ``im2gps3k``, ``yfcc4k``, ``mp16``, or a CSV path.
        path: the file of the named benchmark.

    Raises:
        FileNotFoundError: a known name without a path (the message says where to get the file) or a
            missing file.
        ValueError: an unknown name, or a file that fails validation.
    """
    key = str(name_or_path).lower()
    if key in BENCHMARKS:
        info = BENCHMARKS[key]
        if path is None:
            raise FileNotFoundError(
                f"benchmark {key!r} needs its ground-truth file (no data ships with geoswc): "
                f"download {info.source} and pass its path"
            )
        df = read_locations(path)
        if len(df) != info.rows:
            logger.warning("%s: %d photos, the published %s set has %d", path, len(df), key, info.rows)
        return df
    if path is not None:
        raise ValueError(f"unknown benchmark {str(name_or_path)!r}; choose one of: {', '.join(BENCHMARKS)}")
    candidate = Path(name_or_path)
    if candidate.suffix.lower() == ".csv" or candidate.exists():
        return read_locations(candidate)
    raise ValueError(
        f"unknown benchmark {str(name_or_path)!r}; choose one of: {', '.join(BENCHMARKS)} (with a path), "
        "or give the path of a CSV file"
    )


class PeerPredictions(NamedTuple):
    """One published per-photo prediction file: what it predicts, its ground truth, its own summary."""

    predictions: pd.DataFrame
    truth: pd.DataFrame
    distance_km: np.ndarray
    summary: dict


_PEER_COLUMNS = ["img_id", "gt_lat", "predicted_lat", "gt_long", "predicted_long", "great_circle_distance"]
_PEER_SUMMARY_RADII = {"street": "1", "city": "25", "region": "200", "country": "750", "continent": "2500"}


def read_peer_predictions(path: Union[str, os.PathLike]) -> PeerPredictions:
    """Reads a per-photo prediction file as published by Müller-Budack et al. (ECCV 2018).

    Columns ``img_id,gt_lat,predicted_lat,gt_long,predicted_long,great_circle_distance``; after a blank line
    the file ends with a summary block (a header of ``street acc (1km), ..., mean deviation (km)`` and one
    row of fractions), which is returned as ``summary = {"accuracy": {"1": %, "25": %, ...}, "mean_km"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file")
    header = [c.strip() for c in lines[0].split(",")]
    if header != _PEER_COLUMNS:
        raise ValueError(f"{path}: line 1: expected header {','.join(_PEER_COLUMNS)}, got {lines[0]!r}")
    end = next(
        (i for i, line in enumerate(lines[1:], 1) if not line.strip() or line.startswith("street acc")),
        len(lines),
    )
    rows = [line.split(",") for line in lines[1:end]]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(_PEER_COLUMNS)), None)
    if bad is not None:
        raise ValueError(
            f"{path}: line {bad + 2}: expected {len(_PEER_COLUMNS)} fields, got {len(rows[bad])}"
        )
    table = pd.DataFrame(rows, columns=_PEER_COLUMNS)
    line_numbers = np.arange(2, len(table) + 2)
    truth = standardize_locations(
        table.rename(columns={"gt_lat": "LAT", "gt_long": "LON"})[["img_id", "LAT", "LON"]],
        source=str(path),
        lines=line_numbers,
    )
    predictions = standardize_locations(
        table.rename(columns={"predicted_lat": "LAT", "predicted_long": "LON"})[["img_id", "LAT", "LON"]],
        source=str(path),
        lines=line_numbers,
    )
    distance_km = pd.to_numeric(table["great_circle_distance"], errors="coerce").to_numpy(dtype=np.float64)

    summary = {}
    tail = [line for line in lines[end:] if line.strip()]
    if len(tail) >= 2:
        names = [c.strip() for c in tail[0].split(",")]
        values = [float(v) for v in tail[1].split(",")]
        accuracy = {}
        for name, value in zip(names, values):
            scale = name.split(" ", 1)[0]
            if scale in _PEER_SUMMARY_RADII:
                accuracy[_PEER_SUMMARY_RADII[scale]] = 100.0 * value
            elif name.startswith("mean deviation"):
                summary["mean_km"] = value
        summary["accuracy"] = accuracy
    return PeerPredictions(predictions, truth, distance_km, summary)
