"""`geoswc evaluate`: the paper's Table 1 for a model folder (`geoswc.evaluation.run.run_evaluation`)."""

from __future__ import annotations

import argparse

from geoswc.eval.metrics import format_table
from geoswc.evaluation.run import BENCHMARK_NAMES, TABLE_MODES, evaluate_command, run_evaluation
from geoswc.precision import PRECISION_MODES
from geoswc.runtime import RUNTIMES


def run(args: argparse.Namespace) -> int:
    options = {
        "benchmark": args.benchmark,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "modes": args.modes,
        "k": args.k,
        "eps_km": args.eps_km,
        "top_cells": args.top_cells,
        "device": args.device,
        "precision_mode": args.precision_mode,
        "runtime": args.runtime,
    }
    command = evaluate_command(args.model, args.meta, images=args.images, out=args.output, **options)
    done = run_evaluation(
        args.model, args.meta, images=args.images, out=args.output, commands=[command], **options
    )
    model, out, ids, errors, results = done.model, done.out, done.ids, done.errors, done.results
    print(
        f"model: {args.model} (heads: {', '.join(model.head_names) or 'none'}; "
        f"background index: {len(model.index) if model.index is not None else 0} photos)"
    )
    print(
        f"photos: {len(ids)} in metadata, {len(ids) - len(errors)} evaluated, {len(errors)} missing or unreadable"
        + (f" (listed in {out / 'missing.csv'})" if errors else "")
    )
    for i in sorted(errors)[:5]:
        print(f"  {ids[i]}: {errors[i]}")
    print()
    print(format_table(results))
    print()
    for mode, scores in results.items():
        fallback = scores["methods"].get("fallback")
        if fallback:
            print(
                f"{mode}: {fallback} photos fell back to the head's prediction (no background photo in their cell)"
            )
    print()
    print("mode      GeoGuessr  right country  localizable (density > 0.2 at 25 km): share, acc 1 km / 25 km")
    for mode, scores in results.items():
        country = (scores.get("geography") or {}).get("country_accuracy")
        selective = scores.get("selective")
        sure = (
            "-"
            if not selective or not selective["localizable"]["n"]
            else "{:.1f}%: {:.1f} / {:.1f}".format(
                selective["localizable"]["share"],
                selective["localizable"]["accuracy"]["1"],
                selective["localizable"]["accuracy"]["25"],
            )
        )
        print(
            f"{mode:<9} {scores['geoguessr_score']:>9.0f}  "
            f"{'-' if country is None else f'{country:.1f}%':>13}  {sure}"
        )
    print()
    print(
        f"wrote {out / 'results.json'}, {done.written['markdown']}, {done.written['html']} and "
        f"predictions_<mode>.csv for {len(results)} modes; {out / 'store'} keeps the features, head outputs "
        f"and embeddings for geoswc sweep {out} -o SWEEP_DIR"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's Table 1 for a model folder: classification, retrieval and Search within Cell",
        description="Run the backbone once over the test photos, then every mode of the paper's Table 1 the "
        "model supports (ce, hc, mvmf, rrm, ce+rrm, hc+rrm, mvmf+rrm). Accuracy at 0.1/1/5/10/25/200/750/2500 km "
        "by haversine on R = 6371 km (correct when distance <= r); missing photos count as wrong.",
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="model folder (Geolocator.save_pretrained)"
    )
    parser.add_argument("--meta", metavar="TEST.csv", help="test metadata with IMG_ID, LAT, LON")
    parser.add_argument(
        "--benchmark",
        choices=BENCHMARK_NAMES,
        help="named evaluation set; --meta gives its ground-truth file, and the report puts the paper's "
        "published Table 1 rows beside the measured ones",
    )
    parser.add_argument(
        "--images", required=True, metavar="ROOT", help="folder holding the photos (IMG_ID paths)"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=4, help="image decoding processes (0 = in the main one)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        metavar="MODE",
        help=f"subset of: {' '.join(TABLE_MODES)} (default: all the model supports)",
    )
    parser.add_argument(
        "--k", type=int, help="Search within Cell neighbours (default: the model's config, 10)"
    )
    parser.add_argument("--eps-km", type=float, help="DBSCAN radius in km (default: the model's config, 1)")
    parser.add_argument(
        "--top-cells", type=int, help="cells searched per photo (default: the model's config, 1)"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--precision-mode",
        choices=PRECISION_MODES,
        default=None,
        help="the backbone's precision: auto (default: fp16 on GPU, fp32 on CPU; both place photos as fp32 "
        "does), fp32 (the exact path), bf16, fp16; heads and retrieval stay fp32",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="what runs the backbone: auto (default: on a CPU in fp32, the fastest engine that agrees, "
        "measured once per machine and model; PyTorch otherwise), torch, onnx, openvino",
    )
    parser.set_defaults(func=run)
