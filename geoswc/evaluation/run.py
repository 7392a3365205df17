"""Evaluation: every run of the paper's Table 1 (ICMR 2021, section 5) from one backbone pass
(`evaluate_model`, ``geoswc evaluate``).

The backbone runs once over the test photos; its features feed each mode the model supports:

- ``ce``, ``hc``, ``mvmf``: classification only (the head's cell centre, or the MvMF mean);
- ``rrm``: the location of the most similar background photo (global retrieval);
- ``ce+rrm``, ``hc+rrm``, ``mvmf+rrm``: Search within Cell with that head.

Photos that are missing or unreadable are listed in ``missing.csv`` and scored as missing (wrong at every
radius), never a crash. Outputs: ``predictions_<mode>.csv``, ``results.json`` and ``report.md``/``report.html``,
and ``store/`` (`geoswc.evaluation.store.EvalStore`): the features, head outputs and embeddings of the test photos, from
which ``geoswc sweep`` re-runs the last stages without the backbone. The modes are placed from that store
(`geoswc.evaluation.replay.Replayer`), so a sweep's row of the same settings reproduces these numbers exactly.

Beyond Table 1, ``results.json`` holds per mode the GeoGuessr score, the selective-prediction split and
coverage curve of the head's prediction density (`geoswc.eval.selective`), accuracy by country and continent
(when `geoswc.data.places` is installed) and, for ``rrm``, recall@N and mAP of same-cell neighbours.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geoswc.data.images import image_path
from geoswc.data.photos import PhotoDataset, photo_batches
from geoswc.eval import haversine_km, load_benchmark, score_predictions
from geoswc.eval.metrics import geographic_breakdown, retrieval_metrics
from geoswc.eval.report import write_report, write_results_json
from geoswc.eval.selective import DENSITY_SCALES_KM, selective_summary
from geoswc.geolocator import Geolocator
from geoswc.evaluation.replay import Replayer, model_setting
from geoswc.evaluation.store import (
    STORE_DIR,
    STORE_TOP_CELLS,
    EvalStore,
    head_outputs,
    search_partition,
)
from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)

HEAD_KINDS = ("ce", "hc", "mvmf")
TABLE_MODES = ("ce", "hc", "mvmf", "rrm", "ce+rrm", "hc+rrm", "mvmf+rrm")
BENCHMARK_NAMES = ("im2gps3k", "im2gps", "yfcc4k")
# Photos located per call of Geolocator.locate: bounds the (chunk, n_fine) probability matrices.
_LOCATE_CHUNK = 1024
# N of the retrieval measures recall@N and mAP@N of the ``rrm`` mode.
RETRIEVAL_NS = (1, 5, 10)


def available_modes(model) -> List[str]:
    """The Table 1 modes this model supports, in the paper's order."""
    has_retrieval = model.retrieval is not None and model.index is not None
    modes = [kind for kind in HEAD_KINDS if kind in model.heads]
    if has_retrieval:
        modes.append("rrm")
        modes += [f"{kind}+rrm" for kind in HEAD_KINDS if kind in model.heads]
    return modes


def parse_mode(mode: str) -> Tuple[Optional[str], str]:
    """``"hc+rrm"`` -> ``("hc", "swc")``, ``"hc"`` -> ``("hc", "cell")``, ``"rrm"`` -> ``(None, "rrm")``."""
    check_choice("mode", mode, TABLE_MODES)
    if mode == "rrm":
        return None, "rrm"
    if mode.endswith("+rrm"):
        return mode[: -len("+rrm")], "swc"
    return mode, "cell"


def extract_features(model, paths: Sequence[Path], *, batch_size: int, workers: int):
    """Backbone features of every readable photo, in one pass over the photos.

    Photos are grouped by transformed size (the paper resizes the longest side only, so sizes differ) and each
    group is run unpadded, so a photo's features do not depend on its batch.

    Returns:
        ``(features (N, D) float32 tensor with NaN rows for unreadable photos, errors {i: message})``.
    """
    dataset = PhotoDataset(paths, model.transform)
    features: Dict[int, torch.Tensor] = {}
    errors: Dict[int, str] = {}
    with tqdm(total=len(dataset), desc="backbone", unit="img") as bar:
        for batch in photo_batches(dataset, batch_size=batch_size, workers=workers):
            errors.update(batch.errors)
            if len(batch):
                for i, row in zip(batch.indices.tolist(), model.features(batch.pixels).cpu()):
                    features[i] = row
            bar.update(len(batch) + len(batch.errors))
    dim = next(iter(features.values())).shape[0] if features else 0
    out = torch.full((len(dataset), dim), float("nan"))
    for i, row in features.items():
        out[i] = row
    return out, errors


def compute_embeddings(model, features: torch.Tensor) -> Optional[np.ndarray]:
    """Retrieval embeddings ``(N, E)`` float32 of backbone features (None without a retrieval module)."""
    if model.retrieval is None:
        return None
    if not len(features):
        return np.zeros((0, model.retrieval.dim), dtype=np.float32)
    return torch.cat(
        [model.embed(features[s : s + _LOCATE_CHUNK]).cpu() for s in range(0, len(features), _LOCATE_CHUNK)]
    ).numpy()


def build_store(
    model,
    features: torch.Tensor,
    *,
    ids: Sequence[str],
    truth_deg: np.ndarray,
    evaluated: np.ndarray,
    settings: Dict[str, Any],
    model_path: Optional[Union[str, Path]] = None,
) -> EvalStore:
    """What the networks computed for the evaluated photos, for `evaluate_store` and ``geoswc sweep``.

    Args:
        model: the `Geolocator`.
        features: ``(n, D)`` backbone features of the evaluated photos.
        ids, truth_deg, evaluated: every ground-truth photo, its position, whether it was read.
        settings: the Search within Cell settings (``k``, ``eps_km``, ``min_samples``, ``top_cells``).
        model_path: the model folder (recorded so a sweep finds the background index).
    """
    heads = {
        kind: head_outputs(model, features, kind, top_cells=max(STORE_TOP_CELLS, int(settings["top_cells"])))
        for kind in model.head_names
    }
    meta = {
        "fingerprint": model.fingerprint,
        "model": None if model_path is None else str(Path(model_path).resolve()),
        "backbone": model.backbone_name,
        "settings": dict(settings),
        "density_scales_km": list(DENSITY_SCALES_KM),
        "preferred_head": model.resolve_head() if model.heads else None,
        "search_partitions": (
            {kind: search_partition(model, kind) for kind in model.head_names}
            if model.index is not None
            else {}
        ),
        "index_rows": len(model.index) if model.index is not None else 0,
    }
    return EvalStore(
        ids=list(ids),
        truth_deg=np.asarray(truth_deg, dtype=np.float64),
        evaluated=np.asarray(evaluated, dtype=bool),
        features=features.numpy().astype(np.float16),
        embeddings=compute_embeddings(model, features),
        heads=heads,
        meta=meta,
    )


def evaluate_store(store: EvalStore, index, *, modes: Sequence[str]):
    """Predictions ``{mode: (n, 2) degrees}`` and method counts ``{mode: {method: n}}`` of the evaluated photos.

    Every mode runs through `geoswc.evaluation.replay.Replayer` with the store's settings, the path ``geoswc sweep``
    takes, so its row of these settings is this result exactly.
    """
    replayer = Replayer(store, index)
    latlon, methods = {}, {}
    for mode in modes:
        head, how = parse_mode(mode)
        done = replayer.head_only(head) if how == "cell" else replayer.run(model_setting(store, head))
        latlon[mode] = done.latlon_deg
        names, counts = np.unique(done.method.astype(str), return_counts=True)
        methods[mode] = {str(n): int(c) for n, c in zip(names, counts)}
    return latlon, methods


def extra_metrics(
    model,
    store: EvalStore,
    predictions: Dict[str, pd.DataFrame],
    truth: pd.DataFrame,
    *,
    modes: Sequence[str],
) -> Dict[str, Dict[str, Any]]:
    """Per mode: selective prediction (modes with a head), country and continent accuracy (when
    `geoswc.data.places` is available) and, for ``rrm``, recall@N and mAP of same-cell neighbours."""
    extra: Dict[str, Dict[str, Any]] = {mode: {} for mode in modes}
    ok_truth = store.truth_deg[store.evaluated]
    for mode in modes:
        head, _ = parse_mode(mode)
        frame = predictions[mode]
        if head is None or not len(ok_truth):
            continue
        pred = (
            frame.set_index(frame["IMG_ID"].astype(str))
            .reindex(store.evaluated_ids)[["LAT", "LON"]]
            .to_numpy()
        )
        has = ~np.isnan(pred[:, 0])
        dist_km = haversine_km(ok_truth[has, 0], ok_truth[has, 1], pred[has, 0], pred[has, 1])
        extra[mode]["selective"] = selective_summary(
            dist_km, store.heads[head].density[has], scales_km=store.meta["density_scales_km"], head=head
        )
    try:
        from geoswc.data import places

        truth_codes = places.country_codes(truth[["LAT", "LON"]].to_numpy(dtype=np.float64))
    except (ImportError, FileNotFoundError) as err:
        logger.warning("no accuracy by country and continent: %s", err)
    else:
        for mode in modes:
            extra[mode]["geography"] = geographic_breakdown(
                predictions[mode], truth, truth_countries=truth_codes
            )
    if "rrm" in modes and store.embeddings is not None and model.index is not None and len(ok_truth):
        k = min(RETRIEVAL_NS[-1], len(model.index))
        _, rows = model.index.search(store.embeddings, k)
        # The model's own rule: containment for S2 cells, the nearest mean for imported MvMF components.
        query_cells = model.geocells.assign_positions(
            ok_truth[:, 0], ok_truth[:, 1], partition=getattr(model.index, "partition", None) or None
        )
        neighbour_cells = np.where(rows >= 0, np.asarray(model.index.cell_idx)[np.maximum(rows, 0)], -1)
        sizes = model.index.cell_sizes()
        relevant = np.where(query_cells >= 0, sizes[np.maximum(query_cells, 0)], 0)
        extra["rrm"]["retrieval"] = retrieval_metrics(
            neighbour_cells, query_cells, relevant, ns=[n for n in RETRIEVAL_NS if n <= k]
        )
    return extra


@dataclass
class Evaluation:
    """What `run_evaluation` did: the scores and where everything went.

    Attributes:
        results: ``{mode: scores}``, the content of ``results.json``.
        ids: the test photos, in metadata order; ``errors`` ``{row: reason}`` those that could not be read.
        written: the report files by kind (``markdown``, ``html``, figures).
        model: the evaluated `Geolocator`.
    """

    results: Dict[str, Dict[str, Any]]
    ids: List[str]
    errors: Dict[int, str]
    out: Path
    written: Dict[str, Path] = field(default_factory=dict)
    model: Any = None


def evaluate_command(
    model: Any,
    meta_csv: Any,
    *,
    images: Any,
    out: Any,
    benchmark: Optional[str] = None,
    batch_size: int = 32,
    workers: int = 4,
    modes: Optional[Sequence[str]] = None,
    k: Optional[int] = None,
    eps_km: Optional[float] = None,
    top_cells: Optional[int] = None,
    device: Optional[str] = None,
    precision_mode: Optional[str] = None,
    runtime: Optional[str] = None,
) -> str:
    """The ``geoswc evaluate`` command line equivalent to these arguments (the report's provenance)."""
    parts = ["geoswc", "evaluate", "--model", str(model)]
    if benchmark:
        parts += ["--benchmark", benchmark]
    if meta_csv:
        parts += ["--meta", str(meta_csv)]
    parts += [
        "--images",
        str(images),
        "-o",
        str(out),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
    ]
    if modes:
        parts += ["--modes", *modes]
    flags = (("--k", k), ("--eps-km", eps_km), ("--top-cells", top_cells), ("--device", device))
    for flag, value in flags + (("--precision-mode", precision_mode), ("--runtime", runtime)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _ground_truth(meta_csv: Optional[Union[str, Path]], benchmark: Optional[str]) -> pd.DataFrame:
    """The test set's ``IMG_ID, LAT, LON`` (a named benchmark's, or any CSV's)."""
    if benchmark:
        if not meta_csv:
            load_benchmark(benchmark)  # explains where the ground-truth file comes from
        return load_benchmark(benchmark, meta_csv)
    if meta_csv:
        return load_benchmark(meta_csv)
    raise ValueError("give the test metadata with --meta TEST.csv (and --benchmark NAME for a named set)")


def _open_model(
    model: Union[str, Path, Geolocator],
    *,
    device: Optional[str],
    precision_mode: Optional[str],
    runtime: Optional[str],
) -> Geolocator:
    """A loaded model as given (re-optimised only when a precision mode or runtime is asked for), or the model
    folder loaded."""
    if isinstance(model, Geolocator):
        if precision_mode is None and runtime is None:
            return model
        return model.optimize(precision_mode=precision_mode or "auto", runtime=runtime or "auto")
    return Geolocator.from_pretrained(
        model, device=device, precision_mode=precision_mode or "auto", runtime=runtime or "auto"
    )


def _write_predictions(
    out: Path,
    ids: Sequence[str],
    latlon: Dict[str, np.ndarray],
    methods: Dict[str, Any],
    truth: pd.DataFrame,
) -> Tuple[Dict[str, pd.DataFrame], Dict[str, Dict[str, Any]]]:
    """Write ``predictions_<mode>.csv`` of every mode (the photos with a position) and score it: the
    predictions and the results, by mode."""
    predictions, results = {}, {}
    for mode in latlon:
        frame = pd.DataFrame({"IMG_ID": ids, "LAT": latlon[mode][:, 0], "LON": latlon[mode][:, 1]})
        frame = frame.dropna(subset=["LAT", "LON"])
        frame.to_csv(out / f"predictions_{mode}.csv", index=False)
        predictions[mode] = frame
        results[mode] = score_predictions(frame, truth)
        results[mode]["methods"] = methods[mode]
    return predictions, results


def run_evaluation(
    model: Union[str, Path, Geolocator],
    meta_csv: Optional[Union[str, Path]],
    *,
    images: Union[str, Path],
    out: Union[str, Path],
    modes: Optional[Sequence[str]] = None,
    benchmark: Optional[str] = None,
    batch_size: int = 32,
    workers: int = 4,
    device: Optional[str] = None,
    k: Optional[int] = None,
    eps_km: Optional[float] = None,
    top_cells: Optional[int] = None,
    commands: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    precision_mode: Optional[str] = None,
    runtime: Optional[str] = None,
) -> Evaluation:
    """Evaluate a model on a test set and write ``predictions_<mode>.csv``, ``missing.csv``, ``results.json``
    and ``report.md``/``report.html`` into ``out``; see `evaluate_model`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    truth = _ground_truth(meta_csv, benchmark)
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    geolocator = _open_model(model, device=device, precision_mode=precision_mode, runtime=runtime)
    supported = available_modes(geolocator)
    modes = list(modes or supported)
    for mode in modes:
        parse_mode(mode)
        if mode not in supported:
            raise ValueError(
                f"mode {mode!r} needs parts this model lacks; it supports: {', '.join(supported)}"
            )
    swc_cfg = geolocator.config.swc
    settings = {
        "k": swc_cfg.k if k is None else int(k),
        "eps_km": swc_cfg.eps_km if eps_km is None else float(eps_km),
        "min_samples": int(swc_cfg.min_samples),
        "top_cells": swc_cfg.top_cells if top_cells is None else int(top_cells),
    }

    ids = truth["IMG_ID"].astype(str).tolist()
    features, errors = extract_features(
        geolocator, [image_path(images, i) for i in ids], batch_size=batch_size, workers=workers
    )
    ok = np.array([i not in errors for i in range(len(ids))], dtype=bool)
    store = build_store(
        geolocator,
        features[ok],
        ids=ids,
        truth_deg=truth[["LAT", "LON"]].to_numpy(dtype=np.float64),
        evaluated=ok,
        settings=settings,
        model_path=None if isinstance(model, Geolocator) else model,
    )
    latlon, methods = evaluate_store(store, geolocator.index, modes=modes)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store.save(out / STORE_DIR)
    ok_ids = [img_id for img_id, good in zip(ids, ok) if good]
    predictions, results = _write_predictions(out, ok_ids, latlon, methods, truth)
    for mode, more in extra_metrics(geolocator, store, predictions, truth, modes=modes).items():
        results[mode].update(more)
    pd.DataFrame(
        {"IMG_ID": [ids[i] for i in sorted(errors)], "ERROR": [errors[i] for i in sorted(errors)]}
    ).to_csv(out / "missing.csv", index=False)
    write_results_json(out / "results.json", results)
    if commands is None:
        commands = [
            evaluate_command(
                model if not isinstance(model, Geolocator) else "MODEL",
                meta_csv,
                images=images,
                out=out,
                benchmark=benchmark,
                batch_size=batch_size,
                workers=workers,
                modes=modes if modes != supported else None,
                k=k,
                eps_km=eps_km,
                top_cells=top_cells,
                device=device,
                precision_mode=precision_mode,
                runtime=runtime,
            )
        ]
    written = write_report(
        out,
        results,
        predictions=predictions,
        truth=truth,
        geocells=geolocator.geocells,
        commands=list(commands),
        config=geolocator.config.to_dict(),
        title=title or f"geoswc evaluation: {benchmark or Path(meta_csv).name}",
        benchmark=benchmark,
    )
    return Evaluation(results=results, ids=ids, errors=errors, out=out, written=written, model=geolocator)


def evaluate_model(
    model: Union[str, Path, Geolocator],
    meta_csv: Optional[Union[str, Path]],
    *,
    images: Union[str, Path],
    out: Union[str, Path],
    modes: Optional[Sequence[str]] = None,
    **options: Any,
) -> Dict[str, Dict[str, Any]]:
    """Every Table 1 mode of a model on a test set, from one backbone pass (``geoswc evaluate``).

    Args:
        model: a model folder (`Geolocator.save_pretrained`) or a loaded `Geolocator`.
        meta_csv: the test metadata (``IMG_ID, LAT, LON``).
        images: the folder the IMG_IDs are relative to.
        out: the output folder: ``predictions_<mode>.csv``, ``missing.csv``, ``results.json``,
            ``report.md``, ``report.html``.
        modes: a subset of ``ce hc mvmf rrm ce+rrm hc+rrm mvmf+rrm`` (default: all the model supports).
        **options: ``benchmark`` (a named set), ``batch_size`` (32), ``workers`` (4 decoding processes),
            ``device``, ``precision_mode`` (``auto``, ``fp32``, ``bf16``, ``fp16``: the backbone's precision,
            `geoswc.precision`), ``runtime`` (``auto``, ``torch``, ``onnx``: what runs the backbone,
            `geoswc.runtime`), the Search within Cell settings ``k``, ``eps_km``, ``top_cells`` (default: the
            model's config), and the report's ``commands`` and ``title``.

    Returns:
        ``{mode: scores}``, the content of ``results.json`` (accuracy in % at 0.1 to 2500 km, median error,
        photo counts; photos that could not be read count as missing, wrong at every radius).
    """
    return run_evaluation(model, meta_csv, images=images, out=out, modes=modes, **options).results
