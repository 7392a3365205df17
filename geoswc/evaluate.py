"""Evaluation: every run of the paper's Table 1 (ICMR 2021, section 5) from one backbone pass
(`evaluate_model`, ``geoswc evaluate``).

The backbone runs once over the test photos; its features feed each mode the model supports:

- ``ce``, ``hc``, ``mvmf``: classification only (the head's cell centre, or the MvMF mean);
- ``rrm``: the location of the most similar background photo (global retrieval);
- ``ce+rrm``, ``hc+rrm``, ``mvmf+rrm``: Search within Cell with that head.

Photos that are missing or unreadable are listed in ``missing.csv`` and scored as missing (wrong at every
radius), never a crash. Outputs: ``predictions_<mode>.csv``, ``results.json`` and ``report.md``/``report.html``.
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
from geoswc.eval import load_benchmark, score_predictions
from geoswc.eval.report import write_report, write_results_json
from geoswc.geolocator import Geolocator

logger = logging.getLogger(__name__)

HEAD_KINDS = ("ce", "hc", "mvmf")
TABLE_MODES = ("ce", "hc", "mvmf", "rrm", "ce+rrm", "hc+rrm", "mvmf+rrm")
BENCHMARK_NAMES = ("im2gps3k", "im2gps", "yfcc4k")
# Photos located per call of Geolocator.locate: bounds the (chunk, n_fine) probability matrices.
_LOCATE_CHUNK = 1024


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
    if mode not in TABLE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(TABLE_MODES)}")
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


def evaluate_features(model, features, *, modes: Sequence[str], swc_options: Optional[dict] = None):
    """Predictions ``{mode: (N, 2) degrees}`` and method counts ``{mode: {method: n}}`` for every mode."""
    swc_options = dict(swc_options or {})
    embeddings = None
    if any(parse_mode(m)[1] in ("swc", "rrm") for m in modes):
        embeddings = (
            torch.cat(
                [
                    model.embed(features[s : s + _LOCATE_CHUNK]).cpu()
                    for s in range(0, len(features), _LOCATE_CHUNK)
                ]
            )
            if len(features)
            else None
        )
    latlon, methods = {}, {}
    for mode in modes:
        head, how = parse_mode(mode)
        parts, kinds = [], []
        for start in range(0, len(features), _LOCATE_CHUNK):
            stop = start + _LOCATE_CHUNK
            pred = model.locate(
                features[start:stop],
                head=head,
                mode=how,
                embeddings=None if embeddings is None else embeddings[start:stop],
                **(swc_options if how == "swc" else {}),
            )
            parts.append(pred.latlon_deg)
            kinds.append(pred.method)
        latlon[mode] = np.concatenate(parts) if parts else np.zeros((0, 2))
        found = np.concatenate(kinds) if kinds else np.zeros(0, dtype=object)
        names, counts = np.unique(found.astype(str), return_counts=True)
        methods[mode] = {str(n): int(c) for n, c in zip(names, counts)}
    return latlon, methods


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
    for flag, value in (("--k", k), ("--eps-km", eps_km), ("--top-cells", top_cells), ("--device", device)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


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
) -> Evaluation:
    """Evaluate a model on a test set and write ``predictions_<mode>.csv``, ``missing.csv``, ``results.json``
    and ``report.md``/``report.html`` into ``out``; see `evaluate_model`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if benchmark:
        if not meta_csv:
            load_benchmark(benchmark)  # explains where the ground-truth file comes from
        truth = load_benchmark(benchmark, meta_csv)
    elif meta_csv:
        truth = load_benchmark(meta_csv)
    else:
        raise ValueError("give the test metadata with --meta TEST.csv (and --benchmark NAME for a named set)")
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    geolocator = model if isinstance(model, Geolocator) else Geolocator.from_pretrained(model, device=device)
    supported = available_modes(geolocator)
    modes = list(modes or supported)
    for mode in modes:
        parse_mode(mode)
        if mode not in supported:
            raise ValueError(
                f"mode {mode!r} needs parts this model lacks; it supports: {', '.join(supported)}"
            )
    swc_options = {
        key: value
        for key, value in (("k", k), ("eps_km", eps_km), ("top_cells", top_cells))
        if value is not None
    }

    ids = truth["IMG_ID"].astype(str).tolist()
    features, errors = extract_features(
        geolocator, [image_path(images, i) for i in ids], batch_size=batch_size, workers=workers
    )
    ok = np.array([i not in errors for i in range(len(ids))], dtype=bool)
    latlon, methods = evaluate_features(geolocator, features[ok], modes=modes, swc_options=swc_options)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok_ids = [img_id for img_id, good in zip(ids, ok) if good]
    predictions, results = {}, {}
    for mode in modes:
        frame = pd.DataFrame({"IMG_ID": ok_ids, "LAT": latlon[mode][:, 0], "LON": latlon[mode][:, 1]})
        frame = frame.dropna(subset=["LAT", "LON"])
        frame.to_csv(out / f"predictions_{mode}.csv", index=False)
        predictions[mode] = frame
        results[mode] = score_predictions(frame, truth)
        results[mode]["methods"] = methods[mode]
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
            ``device``, the Search within Cell settings ``k``, ``eps_km``, ``top_cells`` (default: the
            model's config), and the report's ``commands`` and ``title``.

    Returns:
        ``{mode: scores}``, the content of ``results.json`` (accuracy in % at 0.1 to 2500 km, median error,
        photo counts; photos that could not be read count as missing, wrong at every radius).
    """
    return run_evaluation(model, meta_csv, images=images, out=out, modes=modes, **options).results
