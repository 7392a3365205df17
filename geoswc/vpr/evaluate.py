"""`geoswc vpr evaluate`: recall@N and distances of a place-recognition model on one split of a dataset.

Embeds the database and the queries of ``ROOT/images/SPLIT``, searches the database, and writes into ``OUT``
(built in a folder beside it and moved in when complete, so a failed run leaves no half-written result):

- ``results.json``: ``recall@N`` (percent), ``median_top1_m``, ``median_best_of_k_m`` (k = 1..30), the split,
  the counts, the settings, and recall@1 of every compact index mode with its bytes per photo;
- ``predictions.csv``: one row per query and rank, ``query,rank,database,similarity,distance_m`` (paths
  relative to the split folder, ranks from 1);
- ``report.md``, ``report.html``, ``recall_curve.png``, ``examples.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from geoswc.data.vpr import POSITIVE_RADIUS_M, VprSplit, read_split
from geoswc.eval.vpr import BEST_OF_K, DEFAULT_RECALLS, median_best_of_k_m, median_top1_m, recall_at
from geoswc.eval.vpr_report import examples_png, recall_curve_png, write_vpr_report
from geoswc.street.embed import Embedder, check_test_method, fit_pca, init_netvlad, photo_size, train_photos
from geoswc.street.model import LoadedVPR
from geoswc.vpr.search import INDEX_MODES, bytes_per_photo, check_index_mode, database_index, pq_options, rank

logger = logging.getLogger(__name__)

DEFAULT_TOP = 20
RESULT_FILES = ("results.json", "predictions.csv", "report.md", "report.html")


@dataclass
class EvalSettings:
    """The options of an evaluation (defaults: the benchmark's)."""

    split: str = "test"
    test_method: str = "hard_resize"
    resize: Optional[Tuple[int, int]] = None
    recalls: Sequence[int] = DEFAULT_RECALLS
    top: int = DEFAULT_TOP
    radius_m: float = POSITIVE_RADIUS_M
    index_mode: str = "flat"
    compact_table: bool = True
    pca_dim: Optional[int] = None
    whiten: bool = False
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


def _check(settings: EvalSettings) -> None:
    check_test_method(settings.test_method)
    check_index_mode(settings.index_mode)
    if not settings.recalls or min(int(n) for n in settings.recalls) < 1:
        raise ValueError(f"--recall values must be >= 1, got {list(settings.recalls)}")
    if settings.top < 1:
        raise ValueError(f"--top must be >= 1, got {settings.top}")
    if settings.resize is not None and min(settings.resize) < 16:
        raise ValueError(f"--resize must be at least 16 x 16 pixels, got {settings.resize}")


def _prepare_out(out: Path) -> Path:
    """Refuse an output that is not ours to replace; return the temporary folder to build the result in."""
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; choose a real output folder")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "results.json").is_file():
            raise FileExistsError(
                f"{out} is a non-empty folder without results.json; choose a new output folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _similarities(queries: np.ndarray, database: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Inner product of every query with its predicted rows (the best crop's, for per-crop descriptors)."""
    picked = database[np.maximum(predictions, 0)]  # (Q, K, D)
    if queries.ndim == 3:
        sims = np.einsum("qcd,qkd->qck", queries, picked).max(axis=1)
    else:
        sims = np.einsum("qd,qkd->qk", queries, picked)
    return np.where(predictions >= 0, sims, np.nan)


def compact_table(
    index, queries: np.ndarray, positives: List[np.ndarray], *, method: str, dim: int
) -> List[Dict[str, Any]]:
    """recall@1 and bytes per photo of every index mode on the same descriptors."""
    rows = []
    options = pq_options(len(index))
    # The lists as long as the main ranking's, so that crop voting sees the same candidates.
    k = min(len(index), DEFAULT_TOP)
    for mode in INDEX_MODES:
        preds = rank(index, queries, k, method=method, mode=mode, per_crop=k, **options)[:, :1]
        rows.append(
            {
                "mode": mode,
                "bytes_per_photo": bytes_per_photo(mode, dim, **options),
                "recall@1": recall_at(preds, positives, [1])[1],
            }
        )
    return rows


def score(
    split: VprSplit,
    database: np.ndarray,
    queries: np.ndarray,
    settings: EvalSettings,
) -> Tuple[Dict[str, Any], np.ndarray, np.ndarray, List[Dict[str, Any]], Any]:
    """Search and score descriptors of a split: ``(results, predictions, similarities, compact rows, index)``."""
    positives = split.positives(settings.radius_m)
    recalls = sorted({int(n) for n in settings.recalls})
    k = min(len(split.database), max(max(recalls), settings.top, BEST_OF_K))
    index = database_index(database)
    # Crops are searched as deep as the benchmark searches them (max of the recall values, 20 by default), so
    # the first 20 of the merged lists are its lists; longer lists continue with the crops' further rows.
    per_crop = max(DEFAULT_TOP, max(recalls))
    predictions = rank(
        index,
        queries,
        k,
        method=settings.test_method,
        mode=settings.index_mode,
        per_crop=per_crop,
        **pq_options(len(index)),
    )
    q_idx = np.arange(len(split.queries))[:, None]
    distances = np.where(predictions >= 0, split.distances_m(q_idx, predictions), np.inf)
    results: Dict[str, Any] = {}
    for n, value in recall_at(predictions, positives, recalls).items():
        results[f"recall@{n}"] = value
    results["median_top1_m"] = median_top1_m(distances)
    best = median_best_of_k_m(distances, BEST_OF_K)
    results["median_best_of_k_m"] = {str(i + 1): v for i, v in enumerate(best)}
    compact = (
        compact_table(index, queries, positives, method=settings.test_method, dim=database.shape[1])
        if settings.compact_table
        else []
    )
    return results, predictions, _similarities(queries, database, predictions), compact, index


def _write_predictions(
    path: Path, split: VprSplit, predictions: np.ndarray, sims: np.ndarray, top: int
) -> None:
    top = min(top, predictions.shape[1])
    q_idx = np.arange(len(split.queries))[:, None]
    dist = split.distances_m(q_idx, predictions[:, :top])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["query", "rank", "database", "similarity", "distance_m"])
        for q, name in enumerate(split.queries):
            for r in range(top):
                if predictions[q, r] < 0:  # the merged crop lists held fewer distinct photos
                    break
                writer.writerow(
                    [name, r + 1, split.database[predictions[q, r]], f"{sims[q, r]:.6f}", f"{dist[q, r]:.2f}"]
                )


def evaluate_vpr(
    loaded: LoadedVPR, root: Union[str, Path], out: Union[str, Path], settings: EvalSettings
) -> Dict[str, Any]:
    """Evaluate ``loaded`` on ``ROOT/images/SPLIT`` and write the result folder ``out``; returns the results."""
    _check(settings)
    split = read_split(root, settings.split, radius_m=settings.radius_m)
    out = Path(out)
    size = tuple(settings.resize) if settings.resize else photo_size(split.folder / split.database[0])
    embedder = Embedder(
        loaded, size=size, batch_size=settings.batch_size, device=settings.device, progress=settings.progress
    )
    train = (
        train_photos(split.folder.parent / "train") if split.split != "train" else train_photos(split.folder)
    )
    if not loaded.spec.trained_aggregation:
        init_netvlad(embedder, train, seed=settings.seed)
    if settings.pca_dim:
        if loaded.pca is not None:
            raise ValueError(
                f"the model already reduces descriptors with PCA to {loaded.pca.dim}; drop --pca-dim"
            )
        fit_pca(embedder, train, settings.pca_dim, whiten=settings.whiten, seed=settings.seed)
    tmp = _prepare_out(out)
    try:
        db = embedder.descriptors([split.folder / p for p in split.database], "hard_resize", desc="database")
        qs = embedder.descriptors(
            [split.folder / p for p in split.queries], settings.test_method, desc="queries"
        )
        results, predictions, sims, compact, _ = score(split, db, qs, settings)
        results = {
            "split": split.split,
            **results,
            "n_database": len(split.database),
            "n_queries": len(split.queries),
            "n_queries_with_positives": int(sum(len(p) > 0 for p in split.positives(settings.radius_m))),
            "positive_radius_m": float(settings.radius_m),
            "descriptor_dim": int(db.shape[1]),
            "compact_index": compact,
            "settings": {
                **loaded.spec.to_dict(),
                "root": str(root),
                "test_method": settings.test_method,
                "resize": list(size),
                "index_mode": settings.index_mode,
                "recall_values": sorted({int(n) for n in settings.recalls}),
                "top": settings.top,
                **settings.extra,
            },
        }
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _write_predictions(tmp / "predictions.csv", split, predictions, sims, settings.top)
        correct = np.stack(
            [
                np.isin(predictions[q], split.positives(settings.radius_m)[q])
                for q in range(len(split.queries))
            ]
        )
        curve = recall_at(predictions, split.positives(settings.radius_m), range(1, predictions.shape[1] + 1))
        figures = {
            "recall_curve": recall_curve_png(curve, tmp / "recall_curve.png"),
            "examples": examples_png(
                split.folder, split.queries, split.database, predictions, correct, tmp / "examples.png"
            ),
        }
        write_vpr_report(tmp, results, figures, compact)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results
