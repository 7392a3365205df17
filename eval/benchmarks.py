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

from geoswc.data.validation import choice_error, choose_one_of
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
    "PUBLISHED",
    "published_results",
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


# The paper's Table 1 (Kordopatis-Zilos et al., ICMR 2021): accuracy (%) at 0.1, 1, 5, 10, 25, 200, 750 and
# 2500 km of its re-implemented heads (PlaNet = ce), its retrieval module and Search within Cell, EfficientNet-B4
# trained on MP16.
_PUBLISHED_RADII = ("0.1", "1", "5", "10", "25", "200", "750", "2500")
_PUBLISHED_ROWS = {
    "im2gps": {
        "ce": (4.2, 17.3, 33.8, 38.0, 41.8, 53.2, 67.9, 82.3),
        "hc": (1.7, 13.5, 28.7, 32.9, 39.7, 54.0, 68.8, 82.7),
        "mvmf": (4.6, 19.8, 34.2, 40.1, 44.7, 55.7, 67.5, 81.9),
        "rrm": (5.1, 19.4, 35.0, 37.1, 40.5, 51.1, 60.4, 78.1),
        "ce+rrm": (5.5, 19.8, 36.3, 38.0, 41.8, 52.7, 67.9, 82.3),
        "hc+rrm": (5.5, 18.6, 34.6, 36.7, 41.8, 55.3, 69.2, 82.7),
        "mvmf+rrm": (6.3, 21.9, 38.0, 40.5, 44.3, 55.3, 67.5, 81.9),
    },
    "im2gps3k": {
        "ce": (2.8, 11.8, 22.1, 25.3, 28.8, 37.4, 51.0, 67.4),
        "hc": (1.8, 10.1, 20.1, 23.9, 28.4, 37.9, 52.0, 68.1),
        "mvmf": (3.0, 13.1, 23.5, 26.7, 29.8, 38.0, 52.3, 67.6),
        "rrm": (3.6, 12.4, 20.4, 23.5, 26.0, 34.0, 46.9, 63.6),
        "ce+rrm": (4.3, 13.9, 23.4, 26.1, 29.3, 37.4, 51.0, 67.4),
        "hc+rrm": (3.8, 13.2, 22.5, 25.5, 29.1, 37.8, 52.0, 68.1),
        "mvmf+rrm": (4.1, 15.0, 24.3, 27.0, 30.0, 38.0, 52.3, 67.6),
    },
    "yfcc4k": {
        "ce": (1.8, 6.1, 9.7, 11.3, 13.0, 21.0, 36.4, 56.2),
        "hc": (1.1, 5.7, 9.0, 10.9, 13.1, 21.6, 36.6, 55.4),
        "mvmf": (1.9, 6.8, 10.9, 12.6, 14.4, 21.9, 37.5, 56.4),
        "rrm": (2.3, 6.0, 9.0, 10.2, 11.3, 16.8, 30.5, 49.4),
        "ce+rrm": (2.7, 7.2, 10.3, 11.8, 13.0, 20.9, 36.4, 56.2),
        "hc+rrm": (2.5, 7.2, 10.3, 11.7, 13.3, 21.6, 36.5, 55.4),
        "mvmf+rrm": (2.7, 7.9, 11.3, 12.9, 14.3, 21.9, 37.4, 56.5),
    },
}
PUBLISHED = {
    name: {mode: dict(zip(_PUBLISHED_RADII, row)) for mode, row in rows.items()}
    for name, rows in _PUBLISHED_ROWS.items()
}


def published_results(benchmark: str) -> dict:
    """The paper's Table 1 rows for a benchmark: ``{mode: {radius: %}}`` (modes as `geoswc evaluate` names them).

    Raises:
        ValueError: a benchmark the paper does not report (the message lists those it does).
    """
    key = str(benchmark).lower()
    if key not in PUBLISHED:
        raise ValueError(f"no published results for {benchmark!r}; {choose_one_of(PUBLISHED)}")
    return {mode: dict(acc) for mode, acc in PUBLISHED[key].items()}


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
        raise choice_error("benchmark", str(name_or_path), BENCHMARKS)
    candidate = Path(name_or_path)
    if candidate.suffix.lower() == ".csv" or candidate.exists():
        return read_locations(candidate)
    raise ValueError(
        f"unknown benchmark {str(name_or_path)!r}; {choose_one_of(BENCHMARKS)} (with a path), "
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
