"""`geoswc evaluate`: every run of the paper's Table 1 (ICMR 2021, section 5) from one backbone pass.

The backbone runs once over the test photos; its features feed each mode the model supports:

- ``ce``, ``hc``, ``mvmf``: classification only (the head's cell centre, or the MvMF mean);
- ``rrm``: the location of the most similar background photo (global retrieval);
- ``ce+rrm``, ``hc+rrm``, ``mvmf+rrm``: Search within Cell with that head.

Photos that are missing or unreadable are listed in ``missing.csv`` and scored as missing (wrong at every
radius), never a crash. Outputs: ``predictions_<mode>.csv``, ``results.json`` and ``report.md``/``report.html``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

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


class _PhotoDataset:
    """Decoded, transformed test photos; a photo that cannot be read yields its error instead."""

    def __init__(self, paths: Sequence[Path], transform, target: int):
        self.paths, self.transform, self.target = list(paths), transform, target

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from geoswc.data.images import decode_array

        try:
            side = getattr(self.transform, "decode_side", "short")
            image = decode_array(self.paths[i], target=self.target, target_side=side)
            return i, self.transform(image), None
        except (OSError, ValueError) as err:
            return i, None, str(err) or type(err).__name__


def _collate(samples):
    return samples


def extract_features(model, paths: Sequence[Path], *, batch_size: int, workers: int):
    """Backbone features of every readable photo, in one pass.

    Photos are grouped by transformed size (the paper resizes the longest side only, so sizes differ) and each
    group is run unpadded, so a photo's features do not depend on its batch.

    Returns:
        ``(features (N, D) float32 tensor with NaN rows for unreadable photos, errors {i: message})``.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dataset = _PhotoDataset(paths, model.transform, model.config.data.image_size)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
    )
    features: Dict[int, torch.Tensor] = {}
    errors: Dict[int, str] = {}
    pending: Dict[tuple, List[Tuple[int, torch.Tensor]]] = {}

    def run(shape: tuple) -> None:
        group = pending.pop(shape)
        out = model.features(torch.stack([p for _, p in group])).cpu()
        for (i, _), row in zip(group, out):
            features[i] = row

    for batch in tqdm(loader, desc="backbone", unit="batch"):
        for i, pixels, error in batch:
            if pixels is None:
                errors[i] = error
                continue
            group = pending.setdefault(tuple(pixels.shape), [])
            group.append((i, pixels))
            if len(group) >= batch_size:
                run(tuple(pixels.shape))
        # Bound memory when many sizes occur: run the biggest group once enough photos wait.
        while sum(len(g) for g in pending.values()) > 4 * batch_size:
            run(max(pending, key=lambda s: len(pending[s])))
    for shape in list(pending):
        run(shape)

    dim = next(iter(features.values())).shape[0] if features else 0
    out = torch.full((len(paths), dim), float("nan"))
    for i, row in features.items():
        out[i] = row
    return out, errors


def evaluate_features(model, features, *, modes: Sequence[str], swc_options: Optional[dict] = None):
    """Predictions ``{mode: (N, 2) degrees}`` and method counts ``{mode: {method: n}}`` for every mode."""
    import torch

    swc_options = dict(swc_options or {})
    embeddings = None
    if any(parse_mode(m)[1] in ("swc", "rrm") for m in modes):
        embeddings = torch.cat(
            [model.embed(features[s : s + _LOCATE_CHUNK]).cpu() for s in range(0, len(features), _LOCATE_CHUNK)]
        ) if len(features) else None
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


def _command(args: argparse.Namespace) -> str:
    parts = ["geoswc", "evaluate", "--model", str(args.model)]
    if args.benchmark:
        parts += ["--benchmark", args.benchmark]
    if args.meta:
        parts += ["--meta", str(args.meta)]
    parts += ["--images", str(args.images), "-o", str(args.output), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers)]
    if args.modes:
        parts += ["--modes", *args.modes]
    for flag, value in (("--k", args.k), ("--eps-km", args.eps_km), ("--top-cells", args.top_cells),
                        ("--device", args.device)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from geoswc.eval import load_benchmark, score_predictions
    from geoswc.eval.metrics import format_table
    from geoswc.eval.report import write_report, write_results_json
    from geoswc.geolocator import Geolocator

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.benchmark:
        if not args.meta:
            # load_benchmark explains where the ground-truth file comes from.
            load_benchmark(args.benchmark)
        truth = load_benchmark(args.benchmark, args.meta)
    elif args.meta:
        truth = load_benchmark(args.meta)
    else:
        raise ValueError("give the test metadata with --meta TEST.csv (and --benchmark NAME for a named set)")
    images = Path(args.images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")

    model = Geolocator.from_pretrained(args.model, device=args.device)
    supported = available_modes(model)
    modes = list(args.modes or supported)
    for mode in modes:
        parse_mode(mode)
        if mode not in supported:
            raise ValueError(f"mode {mode!r} needs parts this model lacks; it supports: {', '.join(supported)}")
    swc_options = {k: v for k, v in (("k", args.k), ("eps_km", args.eps_km), ("top_cells", args.top_cells))
                   if v is not None}

    ids = truth["IMG_ID"].astype(str).tolist()
    paths = [images / img_id for img_id in ids]
    features, errors = extract_features(model, paths, batch_size=args.batch_size, workers=args.workers)
    ok = np.array([i not in errors for i in range(len(ids))], dtype=bool)
    latlon, methods = evaluate_features(model, features[ok], modes=modes, swc_options=swc_options)

    out = Path(args.output)
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
    command = _command(args)
    written = write_report(
        out, results, predictions=predictions, truth=truth, geocells=model.geocells, commands=[command],
        config=model.config.to_dict(), title=f"geoswc evaluation: {args.benchmark or Path(args.meta).name}",
    )

    print(f"model: {args.model} (heads: {', '.join(model.head_names) or 'none'}; "
          f"background index: {len(model.index) if model.index is not None else 0} photos)")
    print(f"photos: {len(ids)} in metadata, {int(ok.sum())} evaluated, {len(errors)} missing or unreadable"
          + (f" (listed in {out / 'missing.csv'})" if errors else ""))
    for i in sorted(errors)[:5]:
        print(f"  {ids[i]}: {errors[i]}")
    print()
    print(format_table(results))
    print()
    for mode in modes:
        if "fallback" in methods[mode]:
            print(f"{mode}: {methods[mode]['fallback']} photos fell back to the head's prediction "
                  f"(no background photo in their cell)")
    print(f"wrote {out / 'results.json'}, {written['markdown']}, {written['html']} and "
          f"predictions_<mode>.csv for {len(modes)} modes")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's Table 1 for a model folder: classification, retrieval and Search within Cell",
        description="Run the backbone once over the test photos, then every mode of the paper's Table 1 the "
        "model supports (ce, hc, mvmf, rrm, ce+rrm, hc+rrm, mvmf+rrm). Accuracy at 0.1/1/5/10/25/200/750/2500 km "
        "by haversine on R = 6371 km (correct when distance <= r); missing photos count as wrong.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder (Geolocator.save_pretrained)")
    parser.add_argument("--meta", metavar="TEST.csv", help="test metadata with IMG_ID, LAT, LON")
    parser.add_argument("--benchmark", choices=BENCHMARK_NAMES,
                        help="named evaluation set; --meta gives its ground-truth file")
    parser.add_argument("--images", required=True, metavar="ROOT", help="folder holding the photos (IMG_ID paths)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes (0 = in the main one)")
    parser.add_argument("--modes", nargs="+", metavar="MODE",
                        help=f"subset of: {' '.join(TABLE_MODES)} (default: all the model supports)")
    parser.add_argument("--k", type=int, help="Search within Cell neighbours (default: the model's config, 10)")
    parser.add_argument("--eps-km", type=float, help="DBSCAN radius in km (default: the model's config, 1)")
    parser.add_argument("--top-cells", type=int, help="cells searched per photo (default: the model's config, 1)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)
