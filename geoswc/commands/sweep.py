"""`geoswc sweep EVAL_DIR -o OUT`: the last stages re-run over a grid of settings (`geoswc.evaluation.sweep.run_sweep`)."""

from __future__ import annotations

import argparse

from geoswc.swc import AGGREGATIONS


def run(args: argparse.Namespace) -> int:
    from geoswc.evaluation.sweep import run_sweep

    done = run_sweep(
        args.eval_dir,
        args.output,
        model=args.model,
        head=args.head,
        k=args.k,
        eps_km=args.eps_km,
        min_samples=args.min_samples,
        aggregation=args.aggregation,
        scope=args.scope,
        index_mode=args.index_mode,
    )
    table = done.table
    columns = ["head", "k", "eps_km", "min_samples", "aggregation", "scope", "index_mode"]
    shown = table[columns + ["acc_1km", "acc_25km", "acc_2500km", "median_km", "ms_per_photo"]].copy()
    shown["mark"] = [
        " ".join(m for m, flag in (("paper", p), ("default", d)) if flag)
        for p, d in zip(table["paper"], table["default"])
    ]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print()
    print(
        f"{len(table)} settings; wrote {done.written['csv']}, {done.written['markdown']}"
        + "".join(f", {path.name}" for key, path in done.written.items() if key.startswith("plot_"))
    )
    return 0


def register(subparsers) -> None:
    from geoswc.evaluation.sweep import INDEX_MODES, SCOPE_HELP

    parser = subparsers.add_parser(
        "sweep",
        help="re-run Search within Cell from an evaluation over grids of K, eps, aggregation, scope, index",
        description="Re-run the stages after the networks (retrieval, clustering, aggregation) from the store "
        "that `geoswc evaluate` keeps in its output folder, without the backbone, for every combination of the "
        "values given. A flag not given keeps the value evaluate used, so the row of the model's own settings "
        "reproduces evaluate's numbers. Writes sweep.csv, sweep.md and one plot per swept parameter.",
    )
    parser.add_argument("eval_dir", metavar="EVAL_DIR", help="output folder of geoswc evaluate")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument(
        "--model", metavar="DIR", help="model folder with the background index (default: the evaluated one)"
    )
    parser.add_argument(
        "--head",
        nargs="+",
        metavar="HEAD",
        help="heads whose cells are searched: ce hc mvmf, or none (global)",
    )
    parser.add_argument("--k", nargs="+", type=int, metavar="K", help="neighbours retrieved (paper: 10)")
    parser.add_argument("--eps-km", nargs="+", type=float, metavar="KM", help="DBSCAN radius (paper: 1)")
    parser.add_argument(
        "--min-samples", nargs="+", type=int, metavar="N", help="DBSCAN min_samples (paper: 1)"
    )
    parser.add_argument(
        "--aggregation",
        nargs="+",
        choices=AGGREGATIONS,
        metavar="AGG",
        help=f"one or more of: {' '.join(AGGREGATIONS)} (paper: {AGGREGATIONS[0]})",
    )
    parser.add_argument("--scope", nargs="+", metavar="SCOPE", help=SCOPE_HELP)
    parser.add_argument(
        "--index-mode",
        nargs="+",
        choices=INDEX_MODES,
        metavar="MODE",
        help="exact, sq8 (8-bit scalar quantiser), pq (product quantiser), binary (1 bit per dimension)",
    )
    parser.set_defaults(func=run)
