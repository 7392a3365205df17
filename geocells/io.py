"""Reading photo coordinates from CSV files, with errors that name file, row and column.

The coordinate columns are found by the one set of aliases every position table shares
(`geoswc.data.metadata.COLUMN_ALIASES`, any case); other columns are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

from geoswc.data.metadata import COLUMN_ALIASES, read_csv_text

LAT_COLUMNS = COLUMN_ALIASES["LAT"]
LON_COLUMNS = COLUMN_ALIASES["LON"]


def _pick_column(path: Path, columns, requested: Optional[str], candidates, what: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{path}: no {what} column {requested!r}; columns are: {', '.join(columns)}")
        return requested
    by_case = {c.casefold(): c for c in reversed(columns)}
    for name in candidates:
        if name.casefold() in by_case:
            return by_case[name.casefold()]
    raise ValueError(
        f"{path}: no {what} column found; expected one of {', '.join(candidates)} in any case (or pass the name explicitly); "
        f"columns are: {', '.join(columns)}"
    )


def _validated(path: Path, df: pd.DataFrame, column: str, limit: float) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: row {row + 1} (line {row + 2}), column {column!r}: {df[column].iloc[row]!r} is not a number"
        )
    bad = np.abs(values) > limit
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: row {row + 1} (line {row + 2}), column {column!r}: {df[column].iloc[row]!r} is outside "
            f"[-{limit:g}, {limit:g}] degrees"
        )
    return values


def read_coordinates(
    path: Union[str, Path], *, lat_col: Optional[str] = None, lon_col: Optional[str] = None
) -> Tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Read a CSV of photo positions.

    Args:
        path: CSV file with a header.
        lat_col: Latitude column; by default the first of `LAT_COLUMNS` present, in any case.
        lon_col: Longitude column; by default the first of `LON_COLUMNS` present, in any case.

    Returns:
        The table as read (all columns kept), and float64 latitude and longitude arrays in degrees.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a file that is not a readable CSV (a directory, an empty file, a row with more fields
            than the header, bytes that are not UTF-8: see `geoswc.data.metadata.read_csv_text`), a missing
            column, a non-numeric or an out-of-range value; one line naming the file, the row and the column.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"coordinates file not found: {path}")
    df = read_csv_text(path, expected="a header with latitude and longitude columns")
    if df.empty:
        raise ValueError(f"{path}: the file has a header but no rows")
    columns = [str(c) for c in df.columns]
    lat_name = _pick_column(path, columns, lat_col, LAT_COLUMNS, "latitude")
    lon_name = _pick_column(path, columns, lon_col, LON_COLUMNS, "longitude")
    lat = _validated(path, df, lat_name, 90.0)
    lon = _validated(path, df, lon_name, 180.0)
    return df, lat, lon
