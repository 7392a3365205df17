"""``geoswc assemble``: a model folder from existing stage outputs (`geoswc.assemble.assemble_from`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from geoswc import assemble
from geoswc.commands.precision import add_precision_photos_argument, record_written_folder


def run(args: argparse.Namespace) -> int:
    assemble.assemble_from(
        args.out,
        source=args.source,
        cells=args.cells,
        backbone=args.backbone,
        heads=args.heads,
        retrieval=args.retrieval,
        index=args.index,
        config_file=args.config,
        overrides=args.set,
        no_retrieval=args.no_retrieval,
        overwrite=args.overwrite,
        echo=print,
    )
    if args.precision_photos:
        record_written_folder(args.out, args.precision_photos)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "assemble",
        help="a model folder from existing stage outputs (a retrieval variant without retraining the backbone)",
        description=assemble.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="RUN",
        help="a geoswc fit folder (its work/ stages) or a model folder: the parts not given below",
    )
    parser.add_argument("--cells", type=Path, help="Geocells folder (default: RUN's)")
    parser.add_argument("--backbone", type=Path, help="folder with backbone.safetensors (default: RUN's)")
    parser.add_argument(
        "--heads",
        type=Path,
        help="folder of <kind>.safetensors heads, or a heads stage folder (default: RUN's)",
    )
    parser.add_argument(
        "--retrieval",
        type=Path,
        help="retrieval.safetensors, or the folder of geoswc train retrieval (default: RUN's)",
    )
    parser.add_argument(
        "--index", type=Path, help="background index folder of geoswc index build (default: RUN's)"
    )
    parser.add_argument(
        "--no-retrieval", action="store_true", help="leave the retrieval module and the index out"
    )
    parser.add_argument("-o", "--out", type=Path, required=True, help="model folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model in a non-empty -o folder")
    parser.add_argument("--config", help="YAML/JSON configuration applied after the recorded ones")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting of the model's configuration, e.g. --set swc.k=5 (repeatable)",
    )
    add_precision_photos_argument(parser)
    parser.set_defaults(func=run)
