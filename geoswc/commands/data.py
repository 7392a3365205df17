"""`geoswc data synth | shards | check-leaks | panorama`: build training data from MP16-style inputs, and
place-recognition views from panoramas."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from geoswc.commands.vpr import add_street_arguments
from geoswc.data.metadata import Exclusions, expand_globs, find_leaks, read_metadata
from geoswc.data.shards import write_shards
from geoswc.data.synth import make_world
from geoswc.data.vpr import PARTS, SPLITS
from geoswc.geocells import Geocells


def _synth(args: argparse.Namespace) -> int:
    if args.street:
        from geoswc.commands.vpr import write_street_world

        return write_street_world(args)
    spec = make_world(
        args.out,
        n_train=args.train,
        n_test=args.test,
        seed=args.seed,
        image_size=args.size,
        workers=args.workers,
    )
    print(
        f"wrote {spec.n_train} training and {spec.n_test} test photos ({spec.image_width}x{spec.image_height}, "
        f"{spec.n_landmarks} landmarks) to {args.out}: train.csv, test.csv, images/"
    )
    return 0


def _shards(args: argparse.Namespace) -> int:
    if (args.images is None) == (args.msgpack is None):
        raise ValueError("give exactly one of --images ROOT or --msgpack GLOB")
    metadata = read_metadata(args.metadata)
    labeler = fingerprint = None
    if args.cells is not None:
        geocells = Geocells.load(args.cells)
        labeler, fingerprint = geocells.assign, geocells.fingerprint
    summary = write_shards(
        metadata,
        args.out,
        images_root=args.images,
        msgpack_paths=expand_globs(args.msgpack) if args.msgpack else None,
        labeler=labeler,
        fingerprint=fingerprint,
        exclusions=Exclusions.from_files(args.exclude) if args.exclude else None,
        samples_per_shard=args.samples_per_shard,
        resize=args.resize,
        quality=args.quality,
        workers=args.workers,
    )
    keys = [
        "written",
        "skipped_corrupt",
        "skipped_missing",
        "skipped_unreadable",
        "excluded_author",
        "excluded_id",
    ]
    if args.msgpack:
        keys += ["skipped_unlisted", "skipped_duplicate", "skipped_malformed"]
        keys += [k for k in ("truncated_files", "damaged_files", "unreadable_files") if summary.get(k)]
    counts = ", ".join(f"{key} {summary[key]}" for key in keys if key in summary)
    print(
        f"{len(summary['shards'])} shards in {args.out}: {counts}; details in {Path(args.out) / 'summary.json'}"
    )
    if summary.get("file_errors"):
        print(
            f"{len(summary['file_errors'])} problems in msgpack files (file_errors in summary.json); "
            "a rerun reads those files again"
        )
    return 0


def _check_leaks(args: argparse.Namespace) -> int:
    report = find_leaks(args.train, args.benchmarks)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['train']}: {report['train_rows']} photos")
        for path, entry in report["benchmarks"].items():
            authors = (
                f"{entry['shared_authors']} shared authors ({entry['photos_by_shared_authors']} training photos), "
                if "shared_authors" in entry
                else "no AUTHOR column, "
            )
            print(f"  {path} ({entry['rows']} photos): {authors}{entry['shared_photo_ids']} shared photo ids")
        print(
            f"--exclude would drop {report['excluded_author']} photos by author and {report['excluded_id']} more "
            "by photo id"
        )
    leaks = report["excluded_author"] + report["excluded_id"]
    return 1 if leaks and args.fail_on_leak else 0


def _panorama(args: argparse.Namespace) -> int:
    from geoswc.data.panorama import cut_panoramas

    summary = cut_panoramas(
        args.panos,
        args.out,
        views=args.views,
        fov_deg=args.fov,
        pitch_deg=args.pitch,
        size=tuple(args.size),
        split=args.split,
        part=args.part,
        positions_csv=args.csv,
        quality=args.quality,
        progress=True,
    )
    sources = ", ".join(f"{n} from {kind}" for kind, n in summary["sources"].items() if n)
    print(
        f"cut {summary['panoramas']} panoramas into {summary['views']} views ({args.size[0]}x{args.size[1]}, "
        f"{args.fov:g} degrees wide, pitch {args.pitch:g}) in {summary['folder']} (positions: {sources})"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="synthetic world, webdataset shards, leakage checks")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = commands.add_parser(
        "synth", help="write a synthetic world in the MP16/Im2GPS format (train.csv, test.csv, images/)"
    )
    synth.add_argument("out", help="output folder")
    synth.add_argument("--train", type=int, default=4000, help="training photos (default 4000)")
    synth.add_argument("--test", type=int, default=400, help="test photos (default 400)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--size", type=int, default=128, help="long side of the 4:3 photos in pixels (default 128)"
    )
    synth.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="rendering processes")
    synth.add_argument(
        "--street",
        action="store_true",
        help="a street world in the place-recognition layout instead (geoswc vpr)",
    )
    add_street_arguments(synth)
    synth.set_defaults(func=_synth)

    shards = commands.add_parser(
        "shards", help="write webdataset tar shards (jpg + json per photo) from metadata and images"
    )
    shards.add_argument("metadata", type=Path, help="metadata CSV: IMG_ID,AUTHOR,LAT,LON (MP16 format)")
    source = shards.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder holding the IMG_ID paths")
    source.add_argument("--msgpack", nargs="+", help="GeoEstimation msgpack shards (glob patterns)")
    shards.add_argument("-o", "--out", type=Path, required=True, help="output folder (a rerun resumes)")
    shards.add_argument("--cells", type=Path, help="geocells folder (geoswc cells build): store class labels")
    shards.add_argument(
        "--exclude",
        type=Path,
        nargs="+",
        default=[],
        help="benchmark CSVs whose authors and photo ids are left out (paper 4.2)",
    )
    shards.add_argument("--samples-per-shard", type=int, default=10000, help="photos per tar (default 10000)")
    shards.add_argument("--resize", type=int, help="re-encode with this short side, e.g. 320 (default: keep)")
    shards.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (default 90)")
    shards.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    shards.set_defaults(func=_shards)

    leaks = commands.add_parser(
        "check-leaks", help="report authors and photo ids shared by a training CSV and benchmark CSVs"
    )
    leaks.add_argument("train", type=Path, help="training metadata CSV (IMG_ID,AUTHOR,LAT,LON)")
    leaks.add_argument("benchmarks", type=Path, nargs="+", help="benchmark CSVs (IMG_ID[,AUTHOR],LAT,LON)")
    leaks.add_argument("--json", action="store_true", help="print the full report as JSON")
    leaks.add_argument(
        "--fail-on-leak", action="store_true", help="exit with status 1 when anything overlaps"
    )
    leaks.set_defaults(func=_check_leaks)

    panorama = commands.add_parser(
        "panorama",
        help="cut equirectangular panoramas into rectilinear views in the place-recognition layout",
    )
    panorama.add_argument("panos", nargs="+", help="panorama files, folders or globs (2:1 equirectangular)")
    panorama.add_argument(
        "-o", "--out", type=Path, required=True, help="dataset root: views go to ROOT/images/SPLIT/PART"
    )
    panorama.add_argument(
        "--views", type=int, default=12, help="views per panorama, view 0 facing north (default 12)"
    )
    panorama.add_argument(
        "--fov", type=float, default=60.0, help="horizontal field of view in degrees (default 60)"
    )
    panorama.add_argument("--pitch", type=float, default=0.0, help="upward tilt in degrees (default 0)")
    panorama.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[480, 640],
        metavar=("H", "W"),
        help="view size (default 480 640)",
    )
    panorama.add_argument("--split", default="test", choices=SPLITS, help="split to write (default test)")
    panorama.add_argument(
        "--part", default="database", choices=PARTS, help="part to write (default database)"
    )
    panorama.add_argument(
        "--csv",
        type=Path,
        help="positions: CSV file,lat,lon[,heading] (heading: compass bearing of the panorama's centre column); "
        "default the file name in the layout, else EXIF GPS",
    )
    panorama.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    panorama.set_defaults(func=_panorama)
