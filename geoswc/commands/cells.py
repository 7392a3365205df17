"""`geoswc cells build | assign`: build S2 partitions from photo positions, label coordinates with them."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from geoswc.geocells.io import read_coordinates
from geoswc.geocells.partition import Partition, S2Partitioner

logger = logging.getLogger(__name__)


def _build(args: argparse.Namespace) -> int:
    _, lat, lon = read_coordinates(args.coords, lat_col=args.lat_col, lon_col=args.lon_col)
    started = time.perf_counter()
    partitioner = S2Partitioner(
        min_images=args.min_images,
        max_images=tuple(args.max_images),
        start_level=args.start_level,
        target_cells=args.target_cells,
        fallback=args.hierarchy_fallback,
    ).fit(lat, lon)
    elapsed = time.perf_counter() - started
    geocells = partitioner.geocells_
    out = geocells.save(args.output)

    n = len(lat)
    print(f"{n} photos from {args.coords} -> {out}  ({elapsed:.2f} s)")
    header = f"{'granularity':<20} {'cells':>8} {'images':>10} {'dropped':>10} {'min/cell':>9} {'max/cell':>9}  fingerprint"
    print(header)
    print("-" * len(header))
    for part in geocells.partitions:
        kept = int(part.counts.sum())
        print(
            f"{part.name:<20} {len(part):>8} {kept:>10} {n - kept:>10} {int(part.counts.min()):>9} "
            f"{int(part.counts.max()):>9}  {part.fingerprint}"
        )
    orphans = (geocells.hierarchy < 0).sum(axis=0)
    print(
        f"hierarchy: {len(geocells.fine)} fine cells; without a containing coarser cell: {orphans[:-1].tolist()}"
    )
    print(f"fingerprint: {geocells.fingerprint}")
    return 0


def _assign(args: argparse.Namespace) -> int:
    partition = Partition.load_csv(args.cells)
    df, lat, lon = read_coordinates(args.coords, lat_col=args.lat_col, lon_col=args.lon_col)
    labels = partition.assign(lat, lon, nearest=args.nearest)
    df = df.copy()
    df[args.label_col] = labels
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.output, index=False)
    outside = int((labels < 0).sum())
    print(
        f"{len(df)} rows labelled with {partition.name} ({len(partition)} cells, fingerprint "
        f"{partition.fingerprint}); outside every cell: {outside} -> {args.output}"
    )
    return 0


def _add_coordinate_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lat-col", default=None, help="latitude column (default: LAT, lat or latitude)")
    parser.add_argument("--lon-col", default=None, help="longitude column (default: LON, lon or longitude)")


def register(subparsers) -> None:
    cells = subparsers.add_parser("cells", help="build S2 geocells and assign coordinates to them")
    sub = cells.add_subparsers(dest="cells_command", metavar="{build,assign}")
    cells.set_defaults(func=lambda args: (cells.print_help(), 2)[1])

    build = sub.add_parser(
        "build",
        help="partition the Earth from photo coordinates",
        description="Write one GeoEstimation-format cells_<min>_<max>.csv per granularity, hierarchy.csv and "
        "geocells.json into the output folder.",
    )
    build.add_argument("coords", type=Path, help="CSV with one row per photo")
    build.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    build.add_argument(
        "--min-images", type=int, default=50, help="delete cells with at most this many photos"
    )
    build.add_argument(
        "--max-images",
        type=int,
        nargs="*",
        default=[5000, 2000, 1000],
        help="one granularity per value: split cells holding more photos (default: 5000 2000 1000)",
    )
    build.add_argument(
        "--target-cells",
        type=int,
        nargs="+",
        default=None,
        help="add a granularity by splitting the most populated cell until this many cells exist",
    )
    build.add_argument("--start-level", type=int, default=2, help="S2 level of the initial cells")
    build.add_argument(
        "--hierarchy-fallback",
        choices=("none", "nearest"),
        default="none",
        help="fine cells with no containing coarser cell: -1 (none) or the nearest coarse centre",
    )
    _add_coordinate_columns(build)
    build.set_defaults(func=_build)

    assign = sub.add_parser("assign", help="add the cell label of every coordinate to a CSV")
    assign.add_argument("cells", type=Path, help="cells CSV in the GeoEstimation format")
    assign.add_argument("coords", type=Path, help="CSV with coordinates")
    assign.add_argument("-o", "--output", type=Path, required=True, help="output CSV (input columns + label)")
    assign.add_argument(
        "--nearest", action="store_true", help="label points outside every cell by the nearest centre"
    )
    assign.add_argument("--label-col", default="class_label", help="name of the added column")
    _add_coordinate_columns(assign)
    assign.set_defaults(func=_assign)
