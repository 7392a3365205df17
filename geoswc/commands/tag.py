"""`geoswc tag PATH... --model DIR -o OUT.csv|.jsonl|.geojson|.parquet`: geotag photo archives
(`geoswc.tagging.run.tag_photos`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from geoswc.precision import COMPILE_MODES, PRECISION_MODES
from geoswc.runtime import RUNTIMES
from geoswc.tagging.exif_copies import PRECISION_DECIMALS
from geoswc.tagging.files import OutputError
from geoswc.tagging.output import output_format
from geoswc.tagging.run import Ranks, ReviewOptions, summary_lines, tag_photos
from geoswc.tagging.similar import DUPLICATE_THRESHOLD


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
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="photos per model call (default: 8 on a CPU, 64 on a GPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default on a GPU: usable CPUs - 1, at most 32; on a CPU: one per 8 CPUs)",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        metavar="N",
        help="without decoding processes: threads decoding the next batches while the model runs "
        "(default: sized by measurement during the run; 0: decode between batches)",
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
    parser.add_argument(
        "--street-k",
        type=int,
        default=None,
        metavar="K",
        help="street-scale model (geoswc vpr index): place each photo at the largest cluster of its first K "
        "database matches (1 to 100; default 1, the first match)",
    )
    parser.add_argument(
        "--street-eps-m",
        type=float,
        default=None,
        metavar="M",
        help="street-scale model: the cluster radius in metres for --street-k (over 0, at most 10000; default 25)",
    )
    _add_review_arguments(parser.add_argument_group("review (docs/tagging.md)"))
    _add_runtime_arguments(parser)


def _add_review_arguments(review) -> None:
    review.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="N",
        help="list the N best alternative cells (token, centre, probability) in column top_cells",
    )
    review.add_argument(
        "--evidence",
        type=int,
        default=0,
        metavar="N",
        help="list the N most similar background photos behind the prediction in column evidence",
    )
    review.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="P",
        help="status abstain (lat/lon empty, the guess in guess_lat/guess_lon) below this confidence",
    )
    review.add_argument(
        "--skip-geotagged",
        action="store_true",
        help="photos with EXIF GPS get a 'skipped' row with their EXIF position instead of a prediction",
    )
    review.add_argument(
        "--duplicates",
        action="store_true",
        help="number near-duplicate groups (column duplicate_group) by retrieval embedding similarity",
    )
    review.add_argument(
        "--duplicate-threshold",
        type=float,
        default=DUPLICATE_THRESHOLD,
        metavar="COS",
        help=f"cosine similarity from which photos are near-duplicates (default {DUPLICATE_THRESHOLD})",
    )
    review.add_argument(
        "--no-place-names", action="store_true", help="leave the place, region and country columns empty"
    )
    review.add_argument(
        "--no-embeddings",
        action="store_true",
        help="do not keep the archive's embeddings (OUT.embeddings.npy) for geoswc similar",
    )
    review.add_argument("--no-html", action="store_true", help="do not write the review page OUT.html")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision-mode",
        choices=PRECISION_MODES,
        default="auto",
        help="the backbone's precision: auto (default: fp16 on GPU, fp32 on CPU; both place photos as fp32 "
        "does), fp32 (the exact path), bf16, fp16; heads and retrieval stay fp32",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="auto",
        help="torch.compile the backbone: auto (default: on CUDA), on, off; a failed compile runs eager",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the backbone: auto (default: on a CPU in fp32, the fastest of PyTorch, ONNX Runtime and "
        "OpenVINO that agrees, measured once per machine and model, -v prints it; PyTorch otherwise, and for "
        "fewer than 64 photos), torch, onnx, openvino",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="CSV: write text cells as they are (by default a cell starting with =, +, - or @ gets a leading ' "
        "so no spreadsheet runs it as a formula)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextlib.contextmanager
def refusals_exit_1():
    """An `OutputError` (the system refused a file: permission denied, disk full, a link in the way) leaves the
    command as the plain `OSError` it is, so ``geoswc`` exits with status 1 for it, not 2 as for bad input."""
    try:
        yield
    except OutputError as err:
        # OSError(errno, text) would become FileNotFoundError & co., which the command line takes for bad input.
        raise OSError(str(err)) from err


def run(args: argparse.Namespace) -> int:
    """Run `geoswc tag` from parsed arguments; prints the closing summary and returns the exit code."""
    ranks = Ranks()
    output_format(args.output)  # a bad output name fails before the model loads
    with refusals_exit_1():
        summary = _tag(args, ranks)
    if ranks.rank == 0:
        print("\n".join(summary_lines(summary)))
    return 0


def _tag(args: argparse.Namespace, ranks: Ranks) -> dict:
    return tag_photos(
        args.paths,
        model=args.model,  # the folder, so the run record names it (tag_photos loads it once)
        out=args.output,
        batch_size=args.batch_size,
        workers=args.workers,
        decode_threads=args.decode_threads,
        resume=args.resume,
        overwrite=args.overwrite,
        write_exif=args.write_exif,
        precision=args.precision,
        head=args.head,
        precision_mode=args.precision_mode,
        compile=args.compile,
        runtime=args.runtime,
        raw_csv=args.raw,
        predict_options=_street_options(args),
        progress=not args.no_progress and (sys.stderr.isatty() or os.environ.get("GEOSWC_PROGRESS") == "1"),
        ranks=ranks,
        review=ReviewOptions(
            top_k=args.top_k,
            evidence=args.evidence,
            min_confidence=args.min_confidence,
            place_names=not args.no_place_names,
            skip_geotagged=args.skip_geotagged,
            duplicates=args.duplicates,
            duplicate_threshold=args.duplicate_threshold,
            keep_embeddings=not args.no_embeddings,
            html=not args.no_html,
        ),
    )


def _street_options(args: argparse.Namespace) -> dict:
    """``--street-k`` / ``--street-eps-m`` as the keyword arguments of a street-scale model's predictions."""
    given = {"k": args.street_k, "eps_m": args.street_eps_m}
    return {name: value for name, value in given.items() if value is not None}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tag",
        help="geotag photo archives (one row per photo; resumable)",
        description="Geotag photos into a CSV, JSONL, GeoJSON or Parquet file, one row per photo. "
        "Run under `accelerate launch -m geoswc tag ...` to split the photos over several GPUs or nodes.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
