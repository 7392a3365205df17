"""`geoswc demo`: the quickstart (`geoswc.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from geoswc.demo import DEMO_TEST, DEMO_TRAIN, run_demo


def run(args: argparse.Namespace) -> int:
    if args.street:
        from geoswc.demo_street import run_street_demo

        out = args.out or Path("geoswc-street-demo")
        run_street_demo(
            out, seed=args.seed, epochs=args.epochs, loss=args.loss, overrides=args.set, cpu=args.cpu
        )
        return 0
    run_demo(
        args.out or Path("geoswc-demo"),
        n_train=args.train,
        n_test=args.test,
        seed=args.seed,
        overrides=args.set,
        cpu=args.cpu,
    )
    return 0


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="synthetic world -> fit (tiny preset) -> evaluate -> tag, in minutes on a CPU",
        description="Write a synthetic world in the MP16 format, train the whole pipeline on it with the tiny "
        "preset, evaluate every Table 1 mode on its test photos (report.md/report.html) and geotag a folder "
        "of its photos. A rerun reuses what is already done.",
    )
    demo.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="output folder (default: geoswc-demo, with --street geoswc-street-demo)",
    )
    demo.add_argument(
        "--street",
        action="store_true",
        help="the street-scale demo: a synthetic street world, GeM and NetVLAD trained (tiny preset) and "
        "evaluated on unseen streets beside raw pixels and off-the-shelf descriptors, a street model to serve",
    )
    demo.add_argument(
        "--epochs", type=int, default=8, help="with --street: training epochs of each model (default 8)"
    )
    demo.add_argument(
        "--loss",
        choices=("triplet", "batch-hard"),
        default="triplet",
        help="with --street: the training loss (default triplet)",
    )
    demo.add_argument("--train", type=int, default=DEMO_TRAIN, help=f"training photos (default {DEMO_TRAIN})")
    demo.add_argument("--test", type=int, default=DEMO_TEST, help=f"test photos (default {DEMO_TEST})")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic world (default 0)")
    demo.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting of the tiny preset (repeatable); with --street a training setting KEY=VALUE",
    )
    demo.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    demo.set_defaults(func=run)
