"""`geoswc tag PATH... --model DIR -o OUT.csv|.jsonl|.geojson|.parquet`: geotag photo archives
(`geoswc.tag.tag_photos`)."""

from __future__ import annotations

import argparse
import os
import sys

from geoswc.archive import PRECISION_DECIMALS
from geoswc.tag import Ranks, summary_lines, tag_photos
from geoswc.tag_output import output_format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="photo files, folders, globs or @list.txt files"
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="model folder (Geolocator.save_pretrained)"
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="result file: .csv, .jsonl, .geojson or .parquet"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="photos per model call (default 32)")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: CPU count - 1, at most 8)"
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="complete an interrupted run's output (same model, precision, head and --write-exif)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output, its run record and existing copies in --write-exif",
    )
    parser.add_argument(
        "--write-exif",
        metavar="DIR",
        help="write JPEG copies with GPS EXIF under DIR, outside every input folder (originals are never "
        "touched; existing files in DIR are kept unless --overwrite)",
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISION_DECIMALS),
        default="exact",
        help="round published positions: city = 2 decimals (~1 km), region = 1 (~11 km), country = 0 (~111 km)",
    )
    parser.add_argument("--head", default=None, help="classification head to use (default: the model's own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `geoswc tag` from parsed arguments; prints the closing summary and returns the exit code."""
    ranks = Ranks()
    output_format(args.output)  # a bad output name fails before the model loads
    summary = tag_photos(
        args.paths,
        model=args.model,  # the folder, so the run record names it (tag_photos loads it once)
        out=args.output,
        batch_size=args.batch_size,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        write_exif=args.write_exif,
        precision=args.precision,
        head=args.head,
        progress=not args.no_progress and (sys.stderr.isatty() or os.environ.get("GEOSWC_PROGRESS") == "1"),
        ranks=ranks,
    )
    if ranks.rank == 0:
        print("\n".join(summary_lines(summary)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tag",
        help="geotag photo archives (one row per photo; resumable)",
        description="Geotag photos into a CSV, JSONL, GeoJSON or Parquet file, one row per photo. "
        "Run under `accelerate launch -m geoswc.tag ...` to split the photos over several GPUs or nodes.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
