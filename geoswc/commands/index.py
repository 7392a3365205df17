"""``geoswc index build``: the placeable background collection as a Search-within-Cell index (paper 3.3.3)."""

from __future__ import annotations

import argparse
import json

from geoswc.config import resolve_config
from geoswc.geocells import Geocells
from geoswc.train import build_index


def _build(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.preset, args.config, args.set or [])
    report = build_index(
        cfg,
        cells=Geocells.load(args.cells),
        features=args.features,
        head=args.head,
        retrieval=args.retrieval,
        out=args.out,
        exclude=args.exclude or (),
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
    ).summary
    dropped = report["total"] - report["kept"]
    print(
        f"kept {report['kept']} of {report['total']} photos in {report['cells_with_background']} of "
        f"{report['n_cells']} cells; dropped {dropped}: wrong cell {report['wrong_cell']}, "
        f"excluded author {report['excluded_author']}, excluded id {report['excluded_id']}, "
        f"no label {report['no_label']}"
    )
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build the background index for Search within Cell")
    commands = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p = commands.add_parser(
        "build",
        help="placeable training photos -> retrieval embeddings sorted by cell",
        description="Keep the training photos whose top-1 fine cell by --head is their true cell, minus photos by "
        "authors (or with ids) of the --exclude evaluation sets; embed them with the retrieval module and "
        "write a BackgroundIndex folder.",
    )
    p.add_argument("--features", required=True, help="feature cache of the training photos")
    p.add_argument(
        "--head",
        help="classification head (.safetensors) that decides placeability (needless with "
        "--set retrieval.background=all)",
    )
    p.add_argument("--retrieval", required=True, help="trained retrieval module (.safetensors)")
    p.add_argument("--cells", required=True, help="Geocells folder the head and features were made with")
    p.add_argument("-o", "--out", required=True, help="index folder to write")
    p.add_argument(
        "--exclude", nargs="+", metavar="BENCH.csv", help="evaluation sets whose authors/ids are left out"
    )
    p.add_argument(
        "--dtype", choices=("float16", "float32"), help="storage dtype (default: retrieval.index_dtype)"
    )
    p.add_argument("--batch-size", type=int, default=8192, help="rows per forward pass")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--preset", help="configuration preset saved with the index")
    p.add_argument("--config", help="YAML/JSON configuration file")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    p.set_defaults(func=_build)
