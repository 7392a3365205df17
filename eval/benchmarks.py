"""Ground truth of the evaluation sets (Im2GPS, Im2GPS3k, YFCC4k) and MP16 metadata, read and validated.

Every reader returns a DataFrame ``IMG_ID, LAT, LON`` (plus ``AUTHOR`` when the file has it), coordinates in
degrees as float64. Bad input raises ``ValueError`` naming the file, the line (1-based, the header is line 1)
and the column. The column aliases and the validation are those of :mod:`geoswc.data.metadata`, which owns
every table of photo positions; ``read_locations`` and ``standardize_locations`` are its functions.

Photos are matched between files by :func:`normalize_image_id`, because the same photo appears in the wild as
``1000269685_e60e9cdfb4_1125_78841376@N00.jpg`` (Im2GPS3k), ``Athens_00016_516320955_2f7c0642b4_212_...jpg``
(Im2GPS), ``45/77/3228511372.jpg`` (MP16) or a bare ``1000269685``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import pandas as pd

from geoswc.data.metadata import (
    COLUMN_ALIASES,
    normalize_photo_id,
    normalize_photo_ids,
    read_locations,
    standardize_locations,
)

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
    "COLUMN_ALIASES",
]


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
    return normalize_photo_ids(image_ids)


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
