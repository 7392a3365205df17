"""`geoswc precision check MODEL --photos DIR`: measure whether the model's backbone may run in int8 or bf16
(predictions as float32's on held-out photos) and write the model folder's agreement record
(`geoswc.engines.agreement`); `geoswc precision show MODEL` prints it and what ``--runtime auto`` admits."""

from __future__ import annotations

import argparse

PRECISIONS = ("int8", "bf16")


def _photo_paths(inputs):
    from geoswc.data.discovery import discover

    return sorted(photo.path for photo in discover([str(p) for p in inputs]).photos)


def _check(args: argparse.Namespace) -> int:
    from geoswc.assemble import record_precision

    if args.photos_count < 1 or args.calibration < 1:
        raise ValueError(
            f"--photos-count and --calibration must be >= 1, got {args.photos_count} and {args.calibration}"
        )
    photos = _photo_paths(args.photos)
    if not photos:
        raise ValueError(f"--photos {' '.join(map(str, args.photos))}: no photos found")
    held_out = _photo_paths(args.held_out) if args.held_out else None
    if args.held_out and not held_out:
        raise ValueError(f"--held-out {' '.join(map(str, args.held_out))}: no photos found")
    record_precision(
        args.model,
        photos,
        echo=print,
        held_out=held_out,
        compared=args.photos_count,
        calibration=args.calibration,
        precisions=args.precisions,
        all_schemes=args.all_schemes,
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from geoswc.engines import agreement
    from geoswc.geolocator import Geolocator

    model = Geolocator.from_pretrained(args.model, device="cpu", runtime="torch")
    record, decisions = agreement.folder_decisions(args.model, model.backbone)
    print(agreement.format_record(record, decisions))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "precision",
        help="measure and show whether a model may run in int8 or bf16 (its agreement record)",
        description=__doc__,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="run fp32, int8 and (on CPUs with native bf16) bf16 on held-out photos; write MODEL/precision.json",
        description="Calibrate int8 on some of --photos (photos of the model's background), compare the "
        "predictions of fp32 and each reduced precision on others (or on --held-out), and write the record "
        "that --runtime auto reads: a precision runs only where its top-1 cell is fp32's for >= 99.5 % of the "
        "photos and its position within 1 km for >= 99 %.",
    )
    check.add_argument("model", metavar="MODEL", help="model folder")
    check.add_argument("--photos", nargs="+", required=True, metavar="DIR", help="photos of the background")
    check.add_argument("--held-out", nargs="+", metavar="DIR", help="compare on these photos instead")
    check.add_argument("--photos-count", type=int, default=64, metavar="N", help="photos compared (64)")
    check.add_argument("--calibration", type=int, default=32, metavar="N", help="photos calibrated on (32)")
    check.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    check.add_argument(
        "--all-schemes",
        action="store_true",
        help="measure every int8 scheme, not only up to the first that agrees",
    )
    check.set_defaults(func=_check)
    show = actions.add_parser("show", help="print MODEL's agreement record and what --runtime auto admits")
    show.add_argument("model", metavar="MODEL", help="model folder")
    show.set_defaults(func=_show)


def add_precision_photos_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision-photos DIR``, for the commands that write a model folder without photos at hand."""
    parser.add_argument(
        "--precision-photos",
        nargs="+",
        metavar="DIR",
        help="photos of the model's background: measure whether int8/bf16 agree with fp32 on them and record it "
        "in the model folder (as geoswc precision check; without it, auto runs fp32 only)",
    )


def record_written_folder(folder, inputs) -> None:
    """After a command wrote the model folder ``folder``: its agreement record on the photos ``inputs``."""
    from geoswc.assemble import record_precision

    photos = _photo_paths(inputs)
    if not photos:
        raise ValueError(f"--precision-photos {' '.join(map(str, inputs))}: no photos found")
    record_precision(folder, photos, echo=print)
