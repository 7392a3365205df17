"""Adaptive S2 partitions of the Earth into geographic cells (paper section 3.1).

Two splitting rules over the same S2 hierarchy:

* the GeoEstimation rule (Müller-Budack et al., ECCV 2018): start with the level-``start_level`` cells that hold
  images, delete cells with ``<= min_images`` images, split every cell with more than ``max_images`` images
  into its four children until none has more, delete small cells again. One partition per ``max_images``
  value gives the coarse -> fine granularities of the hierarchical heads (paper 3.2.2).
* the PlaNet rule the paper follows for its single-partition heads: repeatedly split the most populated cell
  until ``target_cells`` cells exist, deleting children with ``<= min_images`` images.

This module holds what a fitted partition is: `Partition` (one granularity) and `Geocells` (the partitions
coarse -> fine with their hierarchy, saved as a cells folder). `S2Partitioner`, which applies the rules, is
`geoswc.geocells.partitioner` (also importable from here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import numpy as np

from geoswc.data.files import file_inside, read_json_object
from geoswc.data.sphere import unit_to_latlon
from geoswc.data.validation import check_choice, choose_one_of
from geoswc.geocells import s2 as gs2

logger = logging.getLogger(__name__)

CSV_COLUMNS = ["class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean"]

if TYPE_CHECKING:
    import pandas as pd


def read_table(path: Path, *, skip: int = 0) -> Tuple[List[str], List[List[str]]]:
    """The header and the rows of the CSV file ``path`` after ``skip`` lines, blank lines left out, as text.

    The csv module, not pandas: loading a model reads these tables, and pandas' import alone costs a
    one-photo run a good part of a second.

    Raises:
        ValueError: no header, or a row with more fields than the header (naming its line).
    """
    with open(path, newline="", encoding="utf-8") as f:
        for _ in range(skip):
            f.readline()
        rows = [row for row in csv.reader(f) if row and any(field.strip() for field in row)]
    if not rows:
        raise ValueError("no header line")
    header, body = rows[0], rows[1:]
    for k, row in enumerate(body):
        if len(row) > len(header):
            raise ValueError(f"row {k + 1} has {len(row)} fields, the header {len(header)}")
    return header, [row + [""] * (len(header) - len(row)) for row in body]


def _number(text: str) -> float:
    """``text`` as a number, NaN when it is none (as ``pandas.to_numeric(errors="coerce")``)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


_NEAREST_CHUNK = 4096
# ``Geocells.settings`` key naming how a position finds its cell (`Geocells.assign_positions`).
POSITION_RULE_KEY = "position_to_cell"
CONTAINMENT = "containment"
NEAREST_CENTER = "nearest_center"
POSITION_RULES = (CONTAINMENT, NEAREST_CENTER)


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def xyz_to_latlng_deg(xyz: np.ndarray) -> np.ndarray:
    """Positions ``(N, 2)`` in degrees of (not necessarily unit) vectors ``(N, 3)``."""
    return unit_to_latlon(np.asarray(xyz, dtype=np.float64))


def _nearest_rows(query_xyz: np.ndarray, target_xyz: np.ndarray) -> np.ndarray:
    """Index of the target closest on the sphere (largest dot product) to each query vector."""
    out = np.empty(len(query_xyz), dtype=np.int64)
    for start in range(0, len(query_xyz), _NEAREST_CHUNK):
        block = query_xyz[start : start + _NEAREST_CHUNK] @ target_xyz.T
        out[start : start + _NEAREST_CHUNK] = np.argmax(block, axis=1)
    return out


def _check_centres(centers_deg: np.ndarray, where: str) -> None:
    """Raise ValueError naming the first centre that is not a finite position (lat in [-90, 90], lon in
    [-180, 180] degrees)."""
    for col, name, limit in ((0, "latitude", 90.0), (1, "longitude", 180.0)):
        values = centers_deg[:, col]
        bad = ~(np.abs(values) <= limit)  # NaN compares False: caught here too
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{where}: cell {k} has centre {name} {values[k]!r}, outside [-{limit:g}, {limit:g}] degrees"
            )


class Partition:
    """One granularity: a set of disjoint S2 cells with their photo counts and centres.

    The row order is the class order: ``cell_idx`` ``k`` is ``cell_ids[k]``.

    Args:
        cell_ids: S2 cell ids (uint64), pairwise disjoint.
        counts: Number of training photos in each cell.
        centers_deg: ``(n, 2)`` centre of each cell (lat, lon in degrees): the spherical mean of its photos.
        name: Name of the granularity, e.g. ``cells_50_1000``; also the stem of its CSV file.
        num_images: Number of photos the partition was built from (including dropped ones).
    """

    def __init__(
        self, cell_ids, *, counts, centers_deg, name: str = "cells", num_images: Optional[int] = None
    ):
        self.cell_ids = np.asarray(cell_ids, dtype=np.uint64).reshape(-1)
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        self.centers_deg = np.asarray(centers_deg, dtype=np.float64).reshape(-1, 2)
        self.name = str(name)
        n = len(self.cell_ids)
        if n == 0:
            raise ValueError(f"partition {self.name!r} has no cells")
        if len(self.counts) != n or len(self.centers_deg) != n:
            raise ValueError(
                f"partition {self.name!r}: {n} cell ids but {len(self.counts)} counts and "
                f"{len(self.centers_deg)} centres"
            )
        _check_centres(self.centers_deg, f"partition {self.name!r}")
        if (self.counts < 0).any():
            k = int(np.flatnonzero(self.counts < 0)[0])
            raise ValueError(f"partition {self.name!r}: cell {k} has a negative count {int(self.counts[k])}")
        valid = gs2.is_valid_cell_id(self.cell_ids)
        if not valid.all():
            bad = int(self.cell_ids[~valid][0])
            raise ValueError(f"partition {self.name!r}: invalid S2 cell id {bad} (0x{bad:016x})")
        self.num_images = int(self.counts.sum() if num_images is None else num_images)
        self._order = np.argsort(self.cell_ids, kind="stable")
        self._lo, self._hi = gs2.cell_id_range(self.cell_ids[self._order])
        overlap = self._lo[1:] <= self._hi[:-1]
        if overlap.any():
            k = int(np.flatnonzero(overlap)[0])
            a, b = self.cell_ids[self._order[k]], self.cell_ids[self._order[k + 1]]
            raise ValueError(
                f"partition {self.name!r}: cells {gs2.cell_id_to_token(a)} and {gs2.cell_id_to_token(b)} "
                "overlap; a partition's cells must be disjoint"
            )
        self._tokens = None
        self._centers_xyz = None

    def __len__(self) -> int:
        return len(self.cell_ids)

    def __repr__(self) -> str:
        return f"Partition(name={self.name!r}, cells={len(self)}, images={int(self.counts.sum())})"

    @property
    def tokens(self) -> np.ndarray:
        """S2 tokens of the cells (object array of str), in class order."""
        if self._tokens is None:
            self._tokens = gs2.cell_id_to_token(self.cell_ids)
        return self._tokens

    @property
    def fingerprint(self) -> str:
        """Short stable hash of the ordered cell tokens: equal fingerprints mean equal class labels."""
        return _fingerprint(self.tokens.tolist())

    @property
    def levels(self) -> np.ndarray:
        return gs2.cell_id_level(self.cell_ids)

    @property
    def centers_xyz(self) -> np.ndarray:
        if self._centers_xyz is None:
            self._centers_xyz = gs2.latlng_to_xyz(self.centers_deg[:, 0], self.centers_deg[:, 1])
        return self._centers_xyz

    def lookup(self, cell_ids) -> np.ndarray:
        """cell_idx of the partition cell containing each given cell (leaf or coarser), -1 where none does."""
        ids = np.asarray(cell_ids, dtype=np.uint64)
        lo, hi = gs2.cell_id_range(ids)
        pos = np.searchsorted(self._lo, lo, side="right") - 1
        safe = np.maximum(pos, 0)
        inside = (pos >= 0) & (hi <= self._hi[safe])
        return np.where(inside, self._order[safe], -1).astype(np.int64)

    def nearest(self, lat, lon) -> np.ndarray:
        """cell_idx of the cell whose centre is nearest (great-circle distance) to each position."""
        return _nearest_rows(gs2.latlng_to_xyz(lat, lon).reshape(-1, 3), self.centers_xyz)

    def assign(self, lat, lon, *, nearest: bool = False) -> np.ndarray:
        """Class index of the cell containing each position.

        Args:
            lat: Latitudes in degrees.
            lon: Longitudes in degrees.
            nearest: Map positions that fall in no cell to the cell with the nearest centre instead of -1.

        Returns:
            int64 array shaped like ``lat``; -1 for positions outside every cell unless ``nearest``.
        """
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        labels = self.lookup(gs2.latlng_to_cell_id(lat, lon))
        if nearest:
            outside = labels < 0
            if outside.any():
                labels[outside] = self.nearest(lat[outside], lon[outside])
        return labels

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(
            {
                "class_label": np.arange(len(self), dtype=np.int64),
                "hex_id": self.tokens,
                "imgs_per_cell": self.counts,
                "latitude_mean": self.centers_deg[:, 0],
                "longitude_mean": self.centers_deg[:, 1],
            }
        )

    def save_csv(self, path: Union[str, Path]) -> Path:
        """Write the GeoEstimation format: two preamble lines, then one row per cell in class order."""
        path = Path(path)
        with open(path, "w", newline="") as f:
            f.write(f"num_images: {self.num_images}\n")
            f.write("min_concept_probability: ---\n")
            self.to_frame().to_csv(f, index=False, lineterminator="\n")
        return path

    @classmethod
    def load_csv(cls, path: Union[str, Path], *, name: Optional[str] = None) -> "Partition":
        """Read a partition in the GeoEstimation format; the row's class_label is its cell_idx."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cells file not found: {path}")
        with open(path) as f:
            first, second = f.readline().strip(), f.readline().strip()
        if not first.startswith("num_images:") or not second.startswith("min_concept_probability:"):
            raise ValueError(
                f"{path}: not a GeoEstimation cells file; expected the preamble lines 'num_images: N' and "
                f"'min_concept_probability: ---', found {first[:60]!r} and {second[:60]!r}"
            )
        try:
            num_images = int(first.split(":", 1)[1])
        except ValueError:
            raise ValueError(
                f"{path}: line 1: num_images {first.split(':', 1)[1].strip()!r} is not an integer"
            )
        try:
            header, rows = read_table(path, skip=2)
        except (csv.Error, UnicodeDecodeError, ValueError) as err:
            raise ValueError(
                f"{path}: not a readable cells table ({str(err).strip().splitlines()[0]})"
            ) from None
        if not rows:
            raise ValueError(f"{path}: the cells table has no rows")
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected the header {','.join(CSV_COLUMNS)}"
            )
        text = {col: [row[header.index(col)] for row in rows] for col in CSV_COLUMNS}
        numbers = {}
        for col in ("class_label", "imgs_per_cell", "latitude_mean", "longitude_mean"):
            numbers[col] = np.array([_number(v) for v in text[col]], dtype=np.float64)
            bad = np.isnan(numbers[col])
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{path}: row {row + 1} (line {row + 4}), column {col!r}: {text[col][row]!r} is not a number"
                )
        checks = (
            ("class_label", lambda v: np.isfinite(v) & (v == np.floor(v)), "is not an integer"),
            (
                "imgs_per_cell",
                lambda v: np.isfinite(v) & (v >= 0) & (v == np.floor(v)),
                "is not a count (an integer >= 0)",
            ),
            ("latitude_mean", lambda v: np.abs(v) <= 90.0, "is outside [-90, 90] degrees"),
            ("longitude_mean", lambda v: np.abs(v) <= 180.0, "is outside [-180, 180] degrees"),
        )
        for col, valid, problem in checks:
            bad = ~valid(numbers[col])
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{path}: row {row + 1} (line {row + 4}), column {col!r}: {text[col][row]!r} {problem}"
                )
        labels = numbers["class_label"].astype(np.int64)
        order = np.argsort(labels, kind="stable")
        if not np.array_equal(labels[order], np.arange(len(rows))):
            raise ValueError(f"{path}: class_label must be 0..{len(rows) - 1}, each once")
        try:
            return cls(
                gs2.token_to_cell_id(np.array(text["hex_id"], dtype=object)[order]),
                counts=numbers["imgs_per_cell"][order].astype(np.int64),
                centers_deg=np.column_stack([numbers["latitude_mean"], numbers["longitude_mean"]])[order],
                name=name or path.stem,
                num_images=num_images,
            )
        except ValueError as err:  # a bad token, overlapping cells: name the file
            raise ValueError(f"{path}: {err}") from None


class Geocells:
    """Partitions from coarse to fine plus the hierarchy linking every fine cell to its coarser parents.

    ``hierarchy[f, g]`` is the cell_idx, in granularity ``g``, of the cell containing fine cell ``f``; the last
    column is ``arange(n_fine)``. When no cell of granularity ``g`` contains ``f`` (a coarse cell deleted as
    too small, or partitions from different rules) the entry is -1, or with ``fallback="nearest"`` the coarse
    cell whose centre is nearest to the fine cell's centre.

    Args:
        partitions: The granularities, coarse to fine.
        fallback: ``"none"`` (-1 for fine cells without a containing coarse cell) or ``"nearest"``.
        settings: Free-form description of how the partitions were built, saved in ``geocells.json``.
    """

    FALLBACKS = ("none", "nearest")

    def __init__(
        self, partitions: Sequence[Partition], *, fallback: str = "none", settings: Optional[dict] = None
    ):
        self.partitions = list(partitions)
        if not self.partitions:
            raise ValueError("Geocells needs at least one partition")
        names = [p.name for p in self.partitions]
        if len(set(names)) != len(names):
            raise ValueError(f"partition names must be unique, got {names}")
        check_choice("hierarchy fallback", fallback, self.FALLBACKS)
        self.fallback = fallback
        self.settings = dict(settings or {})
        self.hierarchy = self._build_hierarchy()

    def __len__(self) -> int:
        return len(self.partitions)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p.name}: {len(p)}" for p in self.partitions)
        return f"Geocells({sizes}; fingerprint={self.fingerprint})"

    @property
    def fine(self) -> Partition:
        return self.partitions[-1]

    @property
    def names(self):
        return [p.name for p in self.partitions]

    def partition(self, name: str) -> Partition:
        """The partition called ``name``.

        Raises:
            ValueError: no partition has that name (the names there are listed).
        """
        for part in self.partitions:
            if part.name == name:
                return part
        raise ValueError(f"no partition {name!r} in these cells; {choose_one_of(self.names)}")

    def select(self, names: Sequence[str]) -> "Geocells":
        """The named partitions alone, coarse -> fine in this object's order, with their own hierarchy (the
        finest of them defines the fine classes). What a head that uses some of the partitions predicts over.

        Raises:
            ValueError: an unknown or repeated name, or no name.
        """
        names = [str(n) for n in names]
        if not names:
            raise ValueError("select needs at least one partition name")
        if len(set(names)) != len(names):
            raise ValueError(f"partition names repeated in {names}")
        for name in names:
            self.partition(name)
        chosen = [p for p in self.partitions if p.name in names]
        return Geocells(chosen, fallback=self.fallback, settings=self.settings)

    @property
    def position_rule(self) -> str:
        """How a position finds its cell (``settings["position_to_cell"]``): ``containment``, the S2 cell that
        contains it (cells built by geoswc), or ``nearest_center``, the cell whose centre is nearest (cells that
        are points, as the MvMF components of an imported model, whose authors label a position by the
        nearest mean). Imported cells written before the rule was recorded are ``nearest_center``.

        Raises:
            ValueError: the recorded rule is not one of `POSITION_RULES`.
        """
        default = NEAREST_CENTER if "import" in self.settings else CONTAINMENT
        rule = self.settings.get(POSITION_RULE_KEY, default)
        if rule not in POSITION_RULES:
            raise ValueError(
                f"unknown {POSITION_RULE_KEY} {rule!r} in the cells' settings; choose one of: "
                f"{', '.join(POSITION_RULES)}"
            )
        return rule

    def assign_positions(self, lat, lon, *, partition: Optional[str] = None) -> np.ndarray:
        """cell_idx in ``partition`` (default the finest) of each position, by `position_rule`; -1 for a
        position no cell contains under ``containment``."""
        part = self.fine if partition is None else self.partition(partition)
        if self.position_rule == NEAREST_CENTER:
            lat = np.asarray(lat, dtype=np.float64)
            return part.nearest(lat, np.asarray(lon, dtype=np.float64)).reshape(lat.shape)
        return part.assign(lat, lon)

    def partitions_by_rule(self) -> dict:
        """Names of the partitions built by each rule of `S2Partitioner`, coarse -> fine:
        ``{"max_images": [...], "target_cells": [...]}``, read from the recorded settings (empty lists for
        cells read from files without them)."""
        settings = self.settings
        out = {"max_images": [], "target_cells": []}
        if "min_images" not in settings:
            return out
        min_images = settings["min_images"]
        wanted = {
            "max_images": {f"cells_{min_images}_{m}" for m in settings.get("max_images") or ()},
            "target_cells": {f"cells_{min_images}_n{t}" for t in settings.get("target_cells") or ()},
        }
        for rule, found in wanted.items():
            out[rule] = [name for name in self.names if name in found]
        return out

    @property
    def fingerprint(self) -> str:
        """Hash over every partition's fingerprint, in order, and the hierarchy fallback."""
        return _fingerprint([p.fingerprint for p in self.partitions] + [self.fallback])

    def _build_hierarchy(self) -> np.ndarray:
        fine = self.fine
        columns = []
        for part in self.partitions[:-1]:
            parent = part.lookup(fine.cell_ids)
            missing = parent < 0
            if missing.any():
                logger.info(
                    "%d of %d fine cells have no containing cell in %s",
                    int(missing.sum()),
                    len(fine),
                    part.name,
                )
                if self.fallback == "nearest":
                    parent[missing] = _nearest_rows(fine.centers_xyz[missing], part.centers_xyz)
            columns.append(parent)
        columns.append(np.arange(len(fine), dtype=np.int64))
        return np.stack(columns, axis=1).astype(np.int64)

    def assign(self, lat, lon, *, nearest: bool = False) -> np.ndarray:
        """Labels ``(N, n_granularities)``: the cell_idx of each position at every granularity (-1 = none)."""
        lat = np.asarray(lat, dtype=np.float64).reshape(-1)
        lon = np.asarray(lon, dtype=np.float64).reshape(-1)
        leaves = gs2.latlng_to_cell_id(lat, lon)
        out = np.empty((len(lat), len(self.partitions)), dtype=np.int64)
        for g, part in enumerate(self.partitions):
            out[:, g] = part.lookup(leaves)
            if nearest:
                outside = out[:, g] < 0
                if outside.any():
                    out[outside, g] = part.nearest(lat[outside], lon[outside])
        return out

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``<name>.csv`` per granularity, ``hierarchy.csv`` and ``geocells.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for part in self.partitions:
            part.save_csv(directory / f"{part.name}.csv")
            entries.append(
                {
                    "name": part.name,
                    "file": f"{part.name}.csv",
                    "fingerprint": part.fingerprint,
                    "cells": len(part),
                    "images": int(part.counts.sum()),
                    "num_images": part.num_images,
                }
            )
        import pandas as pd

        pd.DataFrame(self.hierarchy, columns=self.names).to_csv(directory / "hierarchy.csv", index=False)
        meta = {
            "format": "geoswc-geocells",
            "version": 1,
            "fingerprint": self.fingerprint,
            "partitions": entries,
            "hierarchy": {"file": "hierarchy.csv", "fallback": self.fallback},
            "settings": self.settings,
        }
        (directory / "geocells.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @staticmethod
    def read_manifest(directory: Union[str, Path]) -> dict:
        """The validated ``geocells.json`` of a cells folder, with every file it names resolved inside the
        folder: ``{"meta": the JSON, "partitions": [(entry, path)], "hierarchy": path, "fallback": str}``.

        Nothing but ``geocells.json`` is read: a name that points outside the folder (absolute, or with ``..``)
        is refused before any file it names is opened.

        Raises:
            FileNotFoundError: the folder or its ``geocells.json`` is missing.
            ValueError: ``geocells.json`` is not valid JSON of the expected form (file and key named).
        """
        directory = Path(directory)
        meta_path = directory / "geocells.json"
        if not directory.is_dir():
            raise FileNotFoundError(
                f"cells folder not found: {directory} (build one with: geoswc cells build)"
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"geocells.json not found in {directory} (build cells with: geoswc cells build)"
            )
        meta = read_json_object(meta_path)
        if not isinstance(meta.get("fingerprint"), str):
            raise ValueError(f"{meta_path}: 'fingerprint' must be a string, got {meta.get('fingerprint')!r}")
        entries = meta.get("partitions")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{meta_path}: 'partitions' must be a non-empty list")
        partitions = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{meta_path}: partitions[{k}] must be an object, got {entry!r}")
            for key in ("name", "file", "fingerprint"):
                if not isinstance(entry.get(key), str) or not entry[key]:
                    raise ValueError(
                        f"{meta_path}: partitions[{k}] needs a string {key!r}, got {entry.get(key)!r}"
                    )
            path = file_inside(directory, entry["file"], what=f"partitions[{k}] file", source=meta_path)
            partitions.append((entry, path))
        hierarchy = meta.get("hierarchy", {})
        if not isinstance(hierarchy, dict):
            raise ValueError(f"{meta_path}: 'hierarchy' must be an object, got {hierarchy!r}")
        hierarchy_path = file_inside(
            directory, hierarchy.get("file", "hierarchy.csv"), what="hierarchy file", source=meta_path
        )
        fallback = hierarchy.get("fallback", "none")
        check_choice("hierarchy fallback", fallback, Geocells.FALLBACKS, source=meta_path)
        settings = meta.get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{meta_path}: 'settings' must be an object, got {settings!r}")
        return {"meta": meta, "partitions": partitions, "hierarchy": hierarchy_path, "fallback": fallback}

    @staticmethod
    def folder_files(directory: Union[str, Path]) -> List[Path]:
        """Every file of a saved cells folder (``geocells.json``, the partitions' CSVs, the hierarchy), as
        named by its validated ``geocells.json``; what a model folder checksums."""
        manifest = Geocells.read_manifest(directory)
        return (
            [Path(directory) / "geocells.json"]
            + [path for _, path in manifest["partitions"]]
            + [manifest["hierarchy"]]
        )

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Geocells":
        """Read a folder written by `save`, checking every file against the fingerprints in geocells.json.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: a file is malformed, names a file outside the folder, holds values out of range
                (cell centres, counts, tokens), or does not match the fingerprints or the hierarchy; the
                message names the file.
        """
        directory = Path(directory)
        manifest = cls.read_manifest(directory)
        meta = manifest["meta"]
        meta_path = directory / "geocells.json"
        partitions = []
        for entry, path in manifest["partitions"]:
            part = Partition.load_csv(path, name=entry["name"])
            if part.fingerprint != entry["fingerprint"]:
                raise ValueError(
                    f"{path} has fingerprint {part.fingerprint} but geocells.json records "
                    f"{entry['fingerprint']}: the folder mixes cells from different partitions"
                )
            partitions.append(part)
        try:
            geocells = cls(partitions, fallback=manifest["fallback"], settings=meta.get("settings"))
        except ValueError as err:
            raise ValueError(f"{meta_path}: {err}") from None
        if geocells.fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"{meta_path}: fingerprint {meta['fingerprint']} does not match the partitions "
                f"({geocells.fingerprint})"
            )
        hierarchy_path = manifest["hierarchy"]
        if not hierarchy_path.is_file():
            raise FileNotFoundError(f"hierarchy file not found: {hierarchy_path}")
        try:
            header, rows = read_table(hierarchy_path)
        except (csv.Error, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{hierarchy_path}: not a readable hierarchy table ({err})") from None
        stored = np.array([[_number(v) for v in row] for row in rows], dtype=np.float64).reshape(
            len(rows), len(header)
        )
        if header != geocells.names or not np.array_equal(stored, geocells.hierarchy):
            raise ValueError(
                f"{hierarchy_path} does not match the hierarchy of the partitions in {directory}"
            )
        return geocells

    @classmethod
    def from_csvs(cls, paths: Sequence[Union[str, Path]], *, fallback: str = "none") -> "Geocells":
        """Partitions read from GeoEstimation CSV files, ordered coarse -> fine by their number of cells."""
        parts = [Partition.load_csv(p) for p in paths]
        parts.sort(key=len)
        return cls(parts, fallback=fallback, settings={"source": [str(p) for p in paths]})


def __getattr__(name: str):
    # S2Partitioner moved to geoswc.geocells.partitioner, which builds on this module; imported on first use
    # so that both import paths name the same class.
    if name == "S2Partitioner":
        from geoswc.geocells.partitioner import S2Partitioner

        return S2Partitioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
