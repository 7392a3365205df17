"""Ablations of the last stages without the backbone: the evaluation store and ``geoswc sweep``.

`geoswc evaluate` keeps in ``OUT/store/`` what the backbone and the networks computed for the test photos: the
backbone features (float16), every head's best fine cells, its own prediction and its prediction density, and
the retrieval embeddings (float32, the values the searches ran on), with the ground truth and the model's
partition fingerprint. `replay` re-runs the stages that follow (retrieval within the predicted cell or
anywhere, clustering, aggregation) from that store, and `run_sweep` does so over a grid of settings: the
paper's ablations of K (Table 5) and of the aggregation (Table 6), DBSCAN's eps and min_samples, the search
scope and compressed indexes (SQ8, PQ, and the 1-bit codes of McAleese, "Learning Global Features for Fast
Visual Localisation"). `geoswc evaluate` places its photos through `replay` too, so the row of the model's
own settings is `evaluate`'s result by construction.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geoswc.eval.metrics import RADII_KM, geoguessr_points, haversine_km, radius_key
from geoswc.eval.selective import DENSITY_SCALES_KM, prediction_density
from geoswc.folder_checks import naming
from geoswc.swc import AGGREGATIONS, aggregate, search_within_cell
from geoswc.swc.cluster import DEFAULT_AGGREGATION

logger = logging.getLogger(__name__)

STORE_DIR = "store"
STORE_VERSION = 1
# Best fine cells kept per head and photo: enough for any top-n scope a sweep asks for.
STORE_TOP_CELLS = 32
INDEX_MODES = ("exact", "sq8", "pq", "binary")
_FAISS_MODE = {"exact": "flat", "sq8": "sq8", "pq": "pq", "binary": "binary"}
SCOPE_HELP = "cell (the head's best cell), top<n> (its n best cells, e.g. top3) or global (the whole index)"
PARAMETERS = ("head", "k", "eps_km", "min_samples", "aggregation", "scope", "index_mode")
# The paper's Search within Cell (section 3.4 and Tables 5-6): K = 10, eps = 1 km, the mean of the largest
# cluster of the neighbours in the predicted cell of an exact index.
PAPER_SETTING = {
    "k": 10,
    "eps_km": 1.0,
    "min_samples": 1,
    "aggregation": DEFAULT_AGGREGATION,
    "scope": "cell",
    "index_mode": "exact",
}
# Photos per search call, as `geoswc.evaluation.run` has always located them (the searches' matrix shapes, and so
# their floating-point results, depend on it).
LOCATE_CHUNK = 1024


# ---------------------------------------------------------------------------------------------------------------
# The store.


@dataclass
class HeadOutputs:
    """What one head said about the evaluated photos.

    Attributes:
        top_cells: ``(n, T)`` its best fine cells, best first.
        top_probs: ``(n, T)`` their probabilities.
        latlon_deg: ``(n, 2)`` its own prediction (cell centre, or the MvMF mean).
        density: ``(n, S)`` prediction density at `DENSITY_SCALES_KM`.
    """

    top_cells: np.ndarray
    top_probs: np.ndarray
    latlon_deg: np.ndarray
    density: np.ndarray


@dataclass
class EvalStore:
    """The evaluation store of one ``geoswc evaluate`` run (``OUT/store``).

    Attributes:
        ids: every ground-truth photo, in metadata order; ``truth_deg`` ``(N, 2)`` their positions.
        evaluated: ``(N,)`` bool, the photos that could be read (the rows of the arrays below).
        features: ``(n, D)`` float16 backbone features; ``embeddings`` ``(n, E)`` float32 retrieval embeddings
            (None without a retrieval module).
        heads: ``{kind: HeadOutputs}``.
        meta: ``fingerprint``, ``model``, ``settings`` (the Search within Cell settings evaluate used),
            ``density_scales_km``, ``preferred_head``, ``format_version``.
    """

    ids: List[str]
    truth_deg: np.ndarray
    evaluated: np.ndarray
    features: Optional[np.ndarray]
    embeddings: Optional[np.ndarray]
    heads: Dict[str, HeadOutputs]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated_ids(self) -> List[str]:
        return [i for i, ok in zip(self.ids, self.evaluated) if ok]

    def truth_frame(self) -> pd.DataFrame:
        """The ground truth as ``IMG_ID, LAT, LON``."""
        return pd.DataFrame({"IMG_ID": self.ids, "LAT": self.truth_deg[:, 0], "LON": self.truth_deg[:, 1]})

    def save(self, folder: Union[str, Path]) -> Path:
        """Write the store into ``folder`` (created)."""
        folder = Path(folder)
        (folder / "heads").mkdir(parents=True, exist_ok=True)
        (folder / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids))
        np.save(folder / "truth_latlon.npy", np.asarray(self.truth_deg, dtype=np.float64))
        np.save(folder / "evaluated.npy", np.asarray(self.evaluated, dtype=bool))
        if self.features is not None:
            np.save(folder / "features.npy", np.asarray(self.features, dtype=np.float16))
        if self.embeddings is not None:
            np.save(folder / "embeddings.npy", np.asarray(self.embeddings, dtype=np.float32))
        for kind, head in self.heads.items():
            np.save(folder / "heads" / f"{kind}_top_cells.npy", head.top_cells.astype(np.int32))
            np.save(folder / "heads" / f"{kind}_top_probs.npy", head.top_probs.astype(np.float32))
            np.save(folder / "heads" / f"{kind}_latlon.npy", head.latlon_deg.astype(np.float64))
            np.save(folder / "heads" / f"{kind}_density.npy", head.density.astype(np.float64))
        meta = dict(self.meta, format_version=STORE_VERSION, heads=list(self.heads))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "EvalStore":
        """Read a store written by `save`; ``folder`` may also be the evaluation folder holding ``store/``.

        Raises:
            FileNotFoundError: no store there.
            ValueError: a file disagrees with the others or with ``meta.json``.
        """
        folder = Path(folder)
        if not (folder / "meta.json").is_file() and (folder / STORE_DIR / "meta.json").is_file():
            folder = folder / STORE_DIR
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no evaluation store at {folder} (missing meta.json); run geoswc evaluate -o DIR first and "
                "give DIR"
            )
        with naming(meta_path):
            meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        if meta.get("format_version", 0) > STORE_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta['format_version']} is newer than this geoswc reads "
                f"({STORE_VERSION})"
            )
        ids = (folder / "ids.txt").read_text().split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        with naming(folder / "truth_latlon.npy"):
            truth = np.load(folder / "truth_latlon.npy")
        with naming(folder / "evaluated.npy"):
            evaluated = np.load(folder / "evaluated.npy")
        if truth.shape != (len(ids), 2) or evaluated.shape != (len(ids),):
            raise ValueError(
                f"{folder}: {len(ids)} ids, but truth_latlon.npy is {truth.shape} and evaluated.npy "
                f"{evaluated.shape}"
            )
        n = int(evaluated.sum())

        def optional(name: str, mmap: bool = False) -> Optional[np.ndarray]:
            path = folder / name
            if not path.is_file():
                return None
            with naming(path):
                array = np.load(path, mmap_mode="r" if mmap else None)
            if len(array) != n:
                raise ValueError(f"{path}: {len(array)} rows, but {n} photos were evaluated")
            return array

        heads = {}
        for kind in meta.get("heads", []):
            parts = [
                optional(f"heads/{kind}_{name}.npy")
                for name in ("top_cells", "top_probs", "latlon", "density")
            ]
            if any(p is None for p in parts):
                raise FileNotFoundError(f"{folder / 'heads'}: the outputs of head {kind!r} are incomplete")
            heads[kind] = HeadOutputs(parts[0].astype(np.int64), *parts[1:])
        embeddings = optional("embeddings.npy")
        return cls(
            ids=ids,
            truth_deg=truth,
            evaluated=evaluated,
            features=optional("features.npy", mmap=True),
            embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float32),
            heads=heads,
            meta=meta,
        )


def head_cells(model, kind: str):
    """The partition whose cells head ``kind`` predicts (the finest for a model of one partition)."""
    own = getattr(model, "head_partition", None)
    return own(kind) if own is not None else model.geocells.fine


def search_partition(model, kind: str) -> Optional[str]:
    """The partition to name when searching the index within head ``kind``'s cells: None when the index rows
    are sorted by that partition (the only case for a model of one partition)."""
    own = head_cells(model, kind).name
    index_own = getattr(model.index, "partition", None) or model.geocells.fine.name
    return None if own == index_own else own


def head_outputs(
    model, features: torch.Tensor, kind: str, *, top_cells: int = STORE_TOP_CELLS
) -> HeadOutputs:
    """A head's best cells, own prediction and prediction density for backbone features.

    The best cells and the prediction are those `Geolocator.locate` gives (its ``cell`` mode); the density is
    taken over all fine cells (`geoswc.eval.selective.prediction_density`).
    """
    cells = head_cells(model, kind)
    n_top = min(top_cells, len(cells))
    parts = []
    head = model.heads[kind]
    centers = np.asarray(cells.centers_deg, dtype=np.float64)
    for start in range(0, len(features), LOCATE_CHUNK):
        chunk = features[start : start + LOCATE_CHUNK]
        pred = model.locate(chunk, head=kind, mode="cell", top_k=n_top)
        with torch.inference_mode():
            log_probs = head.fine_log_probs(head(chunk.to(model.device))).float()
            probs = torch.softmax(log_probs, dim=1).cpu().numpy()
        density = prediction_density(probs, centers, best=pred.top_cells[:, 0])
        parts.append((pred.top_cells, pred.top_probs, pred.latlon_deg, density))
    if not parts:
        return HeadOutputs(
            np.zeros((0, n_top), np.int64),
            np.zeros((0, n_top)),
            np.zeros((0, 2)),
            np.zeros((0, len(DENSITY_SCALES_KM))),
        )
    return HeadOutputs(*(np.concatenate(arrays) for arrays in zip(*parts)))


# ---------------------------------------------------------------------------------------------------------------
# Replaying the last stages.


@dataclass(frozen=True)
class Setting:
    """One setting of the stages after the networks.

    Attributes:
        head: the head whose cells are searched (and whose prediction is the fallback); None for pure
            retrieval (scope ``global``).
        k: neighbours retrieved; eps_km, min_samples: DBSCAN; aggregation: one of `AGGREGATIONS`.
        scope: ``cell``, ``top<n>`` or ``global``; index_mode: one of `INDEX_MODES`.
    """

    head: Optional[str]
    k: int = 10
    eps_km: float = 1.0
    min_samples: int = 1
    aggregation: str = DEFAULT_AGGREGATION
    scope: str = "cell"
    index_mode: str = "exact"

    def check(self) -> "Setting":
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.eps_km < 0:
            raise ValueError(f"eps_km must be >= 0, got {self.eps_km}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}"
            )
        if self.index_mode not in INDEX_MODES:
            raise ValueError(
                f"unknown index mode {self.index_mode!r}; choose one of: {', '.join(INDEX_MODES)}"
            )
        scope_cells(self.scope)
        if self.head is None and self.scope != "global":
            raise ValueError(
                f"scope {self.scope!r} needs a head to name the cells; without one use scope global"
            )
        return self


def scope_cells(scope: str) -> Optional[int]:
    """Cells searched per photo for a scope: ``cell`` -> 1, ``top3`` -> 3, ``global`` -> None."""
    if scope == "cell":
        return 1
    if scope == "global":
        return None
    match = re.fullmatch(r"top(\d+)", str(scope))
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown scope {scope!r}; choose {SCOPE_HELP}")
    return int(match.group(1))


def scope_name(top_cells: int) -> str:
    """The scope of a ``top_cells`` setting: 1 -> ``cell``, n -> ``top<n>``."""
    return "cell" if int(top_cells) == 1 else f"top{int(top_cells)}"


@dataclass
class Replayed:
    """Positions of the evaluated photos under one setting.

    Attributes:
        latlon_deg: ``(n, 2)``; method: ``(n,)`` ``swc``, ``rrm``, ``fallback`` (no background photo where
            searched: the head's prediction) or ``cell``; rows, sims: ``(n, K)`` neighbours; seconds: time taken.
    """

    latlon_deg: np.ndarray
    method: np.ndarray
    rows: np.ndarray
    sims: np.ndarray
    seconds: float


class Replayer:
    """Runs `Setting`s on an `EvalStore` and a background index (compressed indexes are built once)."""

    def __init__(self, store: EvalStore, index: Any = None):
        self.store = store
        self.index = index
        self._decoded: Dict[str, Any] = {}

    def fallback(self, head: Optional[str]) -> np.ndarray:
        """The positions used where retrieval finds nothing: the head's, or NaN without a head."""
        n = int(self.store.evaluated.sum())
        if head is None:
            head = self.store.meta.get("preferred_head")
        if head is None or head not in self.store.heads:
            return np.full((n, 2), np.nan)
        return self.store.heads[head].latlon_deg.astype(np.float64).copy()

    def head_only(self, head: str) -> Replayed:
        """The head's own prediction (the ``ce``/``hc``/``mvmf`` rows of Table 1)."""
        self._check_head(head)
        latlon = self.store.heads[head].latlon_deg.astype(np.float64).copy()
        n = len(latlon)
        return Replayed(
            latlon, np.full(n, "cell", dtype=object), np.zeros((n, 0), np.int64), np.zeros((n, 0)), 0.0
        )

    def _check_head(self, head: Optional[str]) -> None:
        if head is not None and head not in self.store.heads:
            raise ValueError(
                f"head {head!r} is not in the store; it has: {', '.join(self.store.heads) or 'none'}"
            )

    def _searchable(self, mode: str):
        """The index whose embeddings are what ``mode`` stores (decoded), for exact search within cells."""
        if mode == "exact":
            return self.index
        if mode not in self._decoded:
            index = self.index
            if mode == "binary":
                parts = [
                    np.where(
                        np.asarray(index.embeddings[s : s + index.chunk_size], np.float32) > 0, 1.0, -1.0
                    )
                    for s in range(0, len(index), index.chunk_size)
                ]
                decoded = (
                    np.concatenate(parts).astype(np.float32)
                    if parts
                    else np.zeros((0, index.dim), np.float32)
                )
            else:
                decoded = index.faiss_index(_FAISS_MODE[mode]).reconstruct_n(0, len(index))
            proxy = copy.copy(index)
            proxy.embeddings = np.ascontiguousarray(decoded, dtype=np.float32)
            proxy.dtype = "float32"
            proxy._searchers = {}
            proxy._device_embeddings = {}
            self._decoded[mode] = proxy
        return self._decoded[mode]

    def run(self, setting: Setting) -> Replayed:
        """Place the evaluated photos under ``setting``."""
        setting.check()
        self._check_head(setting.head)
        store = self.store
        if store.embeddings is None or self.index is None:
            raise ValueError(
                "this store has no retrieval embeddings or no background index; only heads can run"
            )
        started = time.perf_counter()
        n = len(store.embeddings)
        latlon = self.fallback(setting.head)
        method = np.full(n, "fallback", dtype=object)
        emb = store.embeddings
        top = scope_cells(setting.scope)
        if setting.index_mode != "exact":
            self._searchable(setting.index_mode)  # built (and trained) outside the timed part
            started = time.perf_counter()
        if top is None:
            rows_parts, sims_parts = [], []
            for start in range(0, n, LOCATE_CHUNK):
                sims, rows = self.index.search(
                    emb[start : start + LOCATE_CHUNK], setting.k, mode=_FAISS_MODE[setting.index_mode]
                )
                rows_parts.append(rows)
                sims_parts.append(np.where(rows >= 0, sims, -np.inf).astype(np.float32))
            rows = np.concatenate(rows_parts) if rows_parts else np.zeros((0, setting.k), np.int64)
            sims = np.concatenate(sims_parts) if sims_parts else np.zeros((0, setting.k), np.float32)
            valid = rows >= 0
            coords = np.full(rows.shape + (2,), np.nan)
            coords[valid] = np.asarray(self.index.latlon, dtype=np.float64)[rows[valid]]
            result = aggregate(
                coords,
                valid,
                method=setting.aggregation,
                eps_km=setting.eps_km,
                min_samples=setting.min_samples,
                similarity=sims,
            )
            found = valid.any(axis=1)
            latlon[found] = result.latlon_deg[found]
            method[found] = "rrm"
        else:
            cells = store.heads[setting.head].top_cells
            if top > cells.shape[1]:
                raise ValueError(
                    f"scope {setting.scope!r} needs {top} cells per photo; the store keeps {cells.shape[1]}"
                )
            index = self._searchable(setting.index_mode)
            binary = setting.index_mode == "binary"
            partition = (store.meta.get("search_partitions") or {}).get(setting.head)
            options = {} if partition is None else {"partition": partition}
            rows_parts, sims_parts = [], []
            for start in range(0, n, LOCATE_CHUNK):
                stop = start + LOCATE_CHUNK
                queries = torch.from_numpy(np.ascontiguousarray(emb[start:stop]))
                if binary:
                    queries = torch.where(queries > 0, 1.0, -1.0)
                res = search_within_cell(
                    queries,
                    cells[start:stop, :top],
                    index,
                    k=setting.k,
                    eps_km=setting.eps_km,
                    min_samples=setting.min_samples,
                    aggregation=setting.aggregation,
                    **options,
                )
                chunk_latlon = latlon[start:stop]
                chunk_latlon[res.found] = res.latlon_deg[res.found]
                method[start:stop] = np.where(res.found, "swc", "fallback")
                rows_parts.append(res.rows)
                sims_parts.append(res.similarities / index.dim if binary else res.similarities)
            rows = np.concatenate(rows_parts) if rows_parts else np.zeros((0, setting.k), np.int64)
            sims = np.concatenate(sims_parts) if sims_parts else np.zeros((0, setting.k), np.float32)
        return Replayed(latlon, method, rows, sims, time.perf_counter() - started)


def model_setting(store: EvalStore, head: Optional[str]) -> Setting:
    """The setting `geoswc evaluate` used for ``head+rrm`` (``rrm`` when ``head`` is None)."""
    if head is None:
        return Setting(head=None, k=1, aggregation="top1", scope="global")
    cfg = store.meta.get("settings", {})
    return Setting(
        head=head,
        k=int(cfg.get("k", 10)),
        eps_km=float(cfg.get("eps_km", 1.0)),
        min_samples=int(cfg.get("min_samples", 1)),
        scope=scope_name(int(cfg.get("top_cells", 1))),
    )


def predictions_frame(ids: Sequence[str], latlon_deg: np.ndarray) -> pd.DataFrame:
    """``IMG_ID, LAT, LON`` of the photos with a position (as ``predictions_<mode>.csv`` holds them)."""
    frame = pd.DataFrame({"IMG_ID": list(ids), "LAT": latlon_deg[:, 0], "LON": latlon_deg[:, 1]})
    return frame.dropna(subset=["LAT", "LON"])


def score_positions(store: EvalStore, latlon_deg: np.ndarray) -> Dict[str, Any]:
    """`geoswc.eval.score_predictions` of the evaluated photos' positions, without matching ids again.

    The photos are those of the store, in its order, so the distances are computed from the same numbers in the
    same order as ``score_predictions`` computes them for ``evaluate``, and every score is equal to the bit.
    """
    truth = store.truth_deg[store.evaluated]
    has = ~np.isnan(latlon_deg[:, 0])
    n_truth = len(store.ids)
    dist_km = haversine_km(truth[has, 0], truth[has, 1], latlon_deg[has, 0], latlon_deg[has, 1])
    n_scored = int(has.sum())
    return {
        "n_truth": n_truth,
        "n_scored": n_scored,
        "n_missing": n_truth - n_scored,
        "accuracy": {
            radius_key(r): 100.0 * float(np.count_nonzero(dist_km <= r)) / n_truth for r in RADII_KM
        },
        "median_km": float(np.median(dist_km)) if n_scored else None,
        "mean_km": float(np.mean(dist_km)) if n_scored else None,
        "geoguessr_score": float(geoguessr_points(dist_km).sum()) / n_truth,
    }


# ---------------------------------------------------------------------------------------------------------------
# The sweep.


def _unique(values: Iterable) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def sweep_grid(
    store: EvalStore,
    *,
    head: Optional[Sequence[str]] = None,
    k: Optional[Sequence[int]] = None,
    eps_km: Optional[Sequence[float]] = None,
    min_samples: Optional[Sequence[int]] = None,
    aggregation: Optional[Sequence[str]] = None,
    scope: Optional[Sequence[str]] = None,
    index_mode: Optional[Sequence[str]] = None,
) -> List[Setting]:
    """Every combination of the given values (a parameter not given takes the value `evaluate` used).

    ``head`` takes the store's heads and ``none`` (pure retrieval, only with scope ``global``); combinations
    of ``none`` with another scope are left out.

    Raises:
        ValueError: a value outside a parameter's choices (the message lists them).
    """
    own = model_setting(store, next(iter(store.heads), None)) if store.heads else Setting(head=None)
    heads = list(head) if head else list(store.heads) or ["none"]
    choices = list(store.heads) + ["none"]
    for h in heads:
        if h not in choices:
            raise ValueError(f"unknown head {h!r}; this store has: {', '.join(choices)}")
    grid = {
        "head": _unique(None if h == "none" else h for h in heads),
        "k": _unique(int(v) for v in (k or [own.k])),
        "eps_km": _unique(float(v) for v in (eps_km or [own.eps_km])),
        "min_samples": _unique(int(v) for v in (min_samples or [own.min_samples])),
        "aggregation": _unique(aggregation or [own.aggregation]),
        "scope": _unique(scope or [own.scope]),
        "index_mode": _unique(index_mode or [own.index_mode]),
    }
    settings = []
    for values in itertools.product(*grid.values()):
        setting = Setting(**dict(zip(grid, values)))
        if setting.head is None and setting.scope != "global":
            continue
        settings.append(setting.check())
    if not settings:
        raise ValueError("the grid is empty: head 'none' runs only with --scope global")
    return settings


def _row(setting: Setting, scores: Mapping, seconds: float, n: int, methods: np.ndarray) -> dict:
    row = asdict(setting)
    row["head"] = setting.head or "none"
    for r in RADII_KM:
        row[f"acc_{radius_key(r)}km"] = scores["accuracy"][radius_key(r)]
    row["median_km"] = scores["median_km"]
    row["mean_km"] = scores["mean_km"]
    row["geoguessr_score"] = scores.get("geoguessr_score")
    row["ms_per_photo"] = 1000.0 * seconds / max(n, 1)
    row["n_fallback"] = int(np.count_nonzero(methods == "fallback"))
    return row


def _is_paper(setting: Setting) -> bool:
    return setting.head is not None and all(
        getattr(setting, key) == value for key, value in PAPER_SETTING.items()
    )


@dataclass
class SweepResult:
    """`run_sweep`'s table (one row per setting) and the files written."""

    table: pd.DataFrame
    written: Dict[str, Path]


def run_sweep(
    eval_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    model: Union[str, Path, None] = None,
    **grid: Any,
) -> SweepResult:
    """Re-run Search within Cell from an evaluation store over a grid of settings.

    Args:
        eval_dir: the output folder of ``geoswc evaluate`` (or its ``store/``).
        out: where ``sweep.csv``, ``sweep.md`` and the plots go.
        model: the model folder whose background index to search (default: the one evaluate recorded).
        **grid: lists of values for ``head``, ``k``, ``eps_km``, ``min_samples``, ``aggregation``, ``scope``
            and ``index_mode`` (`sweep_grid`).

    Returns:
        A `SweepResult`: columns are the parameters, ``acc_<r>km`` (% at every radius of `RADII_KM`),
        ``median_km``, ``mean_km``, ``geoguessr_score``, ``ms_per_photo``, ``n_fallback``, ``paper`` (the
        paper's setting) and ``default`` (what `evaluate` ran).
    """
    from geoswc.retrieval.index import BackgroundIndex

    store = EvalStore.load(eval_dir)
    model_dir = Path(model) if model is not None else Path(store.meta.get("model", ""))
    if not (model_dir / "index").is_dir():
        raise FileNotFoundError(
            f"no background index at {model_dir / 'index'}; give the model folder with --model DIR"
        )
    index = BackgroundIndex.load(model_dir / "index", fingerprint=store.meta.get("fingerprint"))
    settings = sweep_grid(store, **grid)
    replayer = Replayer(store, index)
    ids = store.evaluated_ids
    own = {model_setting(store, h) for h in store.heads} | {model_setting(store, None)}
    rows = []
    for setting in tqdm(settings, desc="sweep", unit="setting"):
        done = replayer.run(setting)
        scores = score_positions(store, done.latlon_deg)
        row = _row(setting, scores, done.seconds, len(ids), done.method)
        row["paper"] = _is_paper(setting)
        row["default"] = setting in own
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "sweep.csv"}
    table.to_csv(written["csv"], index=False)
    swept = [p for p in PARAMETERS if table[p].nunique() > 1]
    for parameter in swept:
        written[f"plot_{parameter}"] = _plot_parameter(table, parameter, out / f"sweep_{parameter}.png")
    written["markdown"] = out / "sweep.md"
    written["markdown"].write_text(_markdown(table, store, swept, written, eval_dir))
    return SweepResult(table=table, written=written)


def _reference(table: pd.DataFrame, parameter: str) -> pd.Series:
    """Per parameter other than ``parameter``: the default row's value when the grid has it, else the first."""
    defaults = table[table["default"]]
    ref = {}
    for p in PARAMETERS:
        if p == parameter:
            continue
        candidates = defaults[p].tolist() if len(defaults) else []
        ref[p] = candidates[0] if candidates and candidates[0] in table[p].tolist() else table[p].iloc[0]
    return pd.Series(ref)


def _plot_parameter(table: pd.DataFrame, parameter: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    ref = _reference(table, parameter)
    fixed = [p for p in ref.index if p != "head" or parameter == "head"]
    mask = np.ones(len(table), bool)
    for p in fixed:
        if p == "head" and parameter != "head":
            continue
        mask &= (table[p] == ref[p]).to_numpy()
    subset = table[mask]
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.subplots()
    values = _unique(table[parameter].tolist())
    x = np.arange(len(values))
    groups = [("all", subset)] if parameter == "head" else list(subset.groupby("head", sort=False))
    for head, rows in groups:
        for radius, style in (("1", "o-"), ("25", "s--")):
            y = [
                rows.loc[rows[parameter] == v, f"acc_{radius}km"].iloc[0]
                if (rows[parameter] == v).any()
                else np.nan
                for v in values
            ]
            label = f"{radius} km" if parameter == "head" else f"{head}, {radius} km"
            ax.plot(x, y, style, label=label)
    paper_value = PAPER_SETTING.get(parameter)
    if paper_value in values:
        ax.axvline(values.index(paper_value), color="0.6", ls=":", lw=1.2, label="paper's setting")
    ax.set_xticks(x, [str(v) for v in values])
    ax.set_xlabel(parameter)
    ax.set_ylabel("photos within r (%)")
    others = ", ".join(f"{p}={ref[p]}" for p in fixed if p != parameter)
    ax.set_title(f"accuracy vs {parameter} ({others})", fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _markdown(table: pd.DataFrame, store: EvalStore, swept: Sequence[str], written: Mapping, eval_dir) -> str:
    acc = [f"acc_{radius_key(r)}km" for r in RADII_KM]
    header = list(PARAMETERS) + [c.replace("acc_", "").replace("km", " km") for c in acc]
    header += ["median km", "ms/photo", "fallback", ""]
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join(["---"] * len(PARAMETERS) + ["---:"] * (len(header) - len(PARAMETERS) - 1) + ["---"])
        + "|",
    ]
    for _, row in table.iterrows():
        mark = " ".join(m for m, flag in (("paper", row["paper"]), ("default", row["default"])) if flag)
        cells = [str(row[p]) for p in PARAMETERS] + [f"{row[c]:.1f}" for c in acc]
        median = row["median_km"]
        cells += [
            "-" if pd.isna(median) else f"{median:.1f}",
            f"{row['ms_per_photo']:.3f}",
            str(row["n_fallback"]),
            mark,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = int(store.evaluated.sum())
    parts = [
        "# geoswc sweep",
        "",
        f"From the evaluation store of {eval_dir} ({n} of {len(store.ids)} photos evaluated; model "
        f"{store.meta.get('model')}, partition {store.meta.get('fingerprint')}). Accuracy in % of all "
        "ground-truth photos (haversine, R = 6371 km, correct when <= r); `paper` marks the paper's setting "
        "(K = 10, eps = 1 km, largest-cluster mean in the predicted cell, exact index), `default` the row "
        "`geoswc evaluate` reported. ms/photo times the search and the aggregation (not the backbone, which "
        "does not run, nor the one-off training of a compressed index).",
        "",
        *lines,
        "",
    ]
    for parameter in swept:
        name = written[f"plot_{parameter}"].name
        parts += [f"![accuracy vs {parameter}]({name})", ""]
    return "\n".join(parts)


def describe_setting(setting: Setting) -> str:
    """A setting in one line, e.g. ``hc k=10 eps=1 km min_samples=1 largest-cluster-mean cell exact``."""
    return (
        f"{setting.head or 'none'} k={setting.k} eps={setting.eps_km:g} km min_samples={setting.min_samples} "
        f"{setting.aggregation} {setting.scope} {setting.index_mode}"
    )


__all__ = [
    "EvalStore",
    "HeadOutputs",
    "INDEX_MODES",
    "PAPER_SETTING",
    "Replayer",
    "Setting",
    "SweepResult",
    "head_outputs",
    "model_setting",
    "run_sweep",
    "sweep_grid",
]
