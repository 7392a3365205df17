"""`geoswc fit`: the whole pipeline from a CSV or shards to a model folder (`geoswc.train.fit.fit_model`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from geoswc.train import fit
from geoswc.train.fit import STAGES, duration, fit_model, process_state


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "train_csv",
        type=Path,
        nargs="?",
        metavar="TRAIN.csv",
        help="training metadata CSV (IMG_ID,AUTHOR,LAT,LON; MP16 format), with --images",
    )
    parser.add_argument("--images", type=Path, help="image root the IMG_IDs of TRAIN.csv are relative to")
    parser.add_argument(
        "--shards",
        metavar="DIR_OR_PATTERN",
        help="instead of TRAIN.csv and --images: webdataset shards of the training photos "
        "(geoswc data shards, with or without --cells), a folder, a brace pattern or a "
        "quoted glob ('shards/*.tar')",
    )
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        help="model folder; intermediate results go to OUT/work/<stage>/",
    )
    parser.add_argument("--preset", default="paper", help="configuration preset: paper (default) or tiny")
    parser.add_argument("--config", help="YAML/JSON configuration file applied after the preset")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set backbone.epochs=10 (repeatable)",
    )
    parser.add_argument(
        "--exclude",
        type=Path,
        nargs="+",
        default=[],
        metavar="BENCH.csv",
        help="drop training photos whose author or photo id appears in these benchmark CSVs "
        "(with --shards, which cannot drop photos: stop if the shards hold any)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help=f"run only these stages (the earlier ones must be complete): {', '.join(STAGES)}",
    )
    parser.add_argument(
        "--val-csv", type=Path, help="validation metadata: backbone accuracy after every epoch"
    )
    parser.add_argument("--val-images", type=Path, help="image root of --val-csv (default: --images)")
    parser.add_argument(
        "--val-shards",
        metavar="DIR_OR_PATTERN",
        help="validation shards instead of --val-csv: backbone accuracy after every epoch",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    parser.add_argument(
        "--from",
        dest="reuse",
        type=Path,
        metavar="RUN",
        help="an earlier fit folder: its stages that this run would make the same way (same data, settings and "
        "earlier stages) are linked, not run again; e.g. a retrieval ablation (--set retrieval.loss=triplet) "
        "in its own -o folder trains only its retrieval stage and index",
    )
    parser.add_argument(
        "--no-precision-check",
        action="store_true",
        help="do not measure whether int8/bf16 agree with fp32 (the model folder's precision.json)",
    )


def run(args: argparse.Namespace) -> int:
    """The whole pipeline, printing one line per stage (main process) and a closing summary."""
    main_process = process_state(args.cpu).is_main_process
    started = time.perf_counter()
    fit_model(
        args.train_csv,
        images=args.images,
        out=args.out,
        preset=args.preset,
        overrides=args.set,
        exclude=args.exclude,
        shards=args.shards,
        config_file=args.config,
        stages=args.stages,
        val_csv=args.val_csv,
        val_images=args.val_images,
        val_shards=args.val_shards,
        cpu=args.cpu,
        reuse=getattr(args, "reuse", None),
        echo=print if main_process else (lambda message: None),
        precision_check=not getattr(args, "no_precision_check", False),
    )
    if main_process:
        print(
            f"fit finished in {duration(time.perf_counter() - started)}: model folder {args.out} "
            f"(stages under {Path(args.out) / 'work'})"
        )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train the whole pipeline from a CSV or shards to a model folder",
        description=fit.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_fit_arguments(parser)
    parser.set_defaults(func=run)
