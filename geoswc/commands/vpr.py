"""`geoswc vpr evaluate | index | locate | synth | train`: street-scale place recognition (docs/place-recognition.md)."""

from __future__ import annotations

import argparse

# The choices of geoswc.classifiers.aggregation, repeated so that `geoswc vpr --help` does not load torch.
POOLS = ("avg", "gem", "netvlad")
DEFAULT_CLUSTERS = 64


def _load(args: argparse.Namespace):
    from geoswc.street.model import from_folder, off_the_shelf

    given = [x for x in (args.model, args.backbone, args.preset) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --model MODEL, --backbone NAME or --preset tiny")
    if args.weights is not None and args.backbone is None:
        raise ValueError("--weights FILE goes with --backbone NAME (a model folder or a preset has its own)")
    if args.model is not None:
        return from_folder(args.model, pool=args.pool, clusters=args.clusters)
    return off_the_shelf(
        backbone=args.backbone,
        preset=args.preset,
        pool=args.pool or "gem",
        clusters=args.clusters,
        weights=args.weights,
    )


def _evaluate(args: argparse.Namespace) -> int:
    from geoswc.vpr.evaluate import EvalSettings, evaluate_vpr

    loaded = _load(args)
    settings = EvalSettings(
        split=args.split,
        test_method=args.test_method,
        resize=tuple(args.resize) if args.resize else None,
        recalls=args.recall,
        top=args.top,
        radius_m=args.radius,
        index_mode=args.index_mode,
        pca_dim=args.pca_dim,
        whiten=args.whiten,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
    )
    results = evaluate_vpr(loaded, args.root, args.out, settings)
    recalls = ", ".join(f"{k}: {v:.1f}" for k, v in results.items() if k.startswith("recall@"))
    print(
        f"{results['split']}: {results['n_database']} database photos, {results['n_queries']} queries; {recalls}; "
        f"median distance of the first result {results['median_top1_m']:.1f} m"
    )
    print(f"wrote {args.out}/results.json, predictions.csv, report.md, report.html")
    return 0


def _index(args: argparse.Namespace) -> int:
    from geoswc.vpr.locate import index_database

    summary = index_database(
        _load(args),
        args.source,
        args.out,
        split=args.split,
        csv_path=args.csv,
        size=tuple(args.resize) if args.resize else None,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        seed=args.seed,
    )
    print(
        f"indexed {summary['photos']} photos of {summary['root']} ({summary['dim']}-d descriptors) into {args.out}"
    )
    return 0


def _locate(args: argparse.Namespace) -> int:
    import csv
    import sys

    from geoswc.vpr.locate import PlaceLocator, photo_files

    area = [float(v) for v in args.area.split(",")] if args.area else None
    if area is not None and len(area) != 4:
        raise ValueError(f"--area takes south,west,north,east in degrees; got {args.area!r}")
    locator = PlaceLocator.from_pretrained(args.model)
    records = locator.locate(photo_files(args.photos), k=args.k, eps_m=args.eps_m, area=area)
    handle = sys.stdout if args.out is None else open(args.out, "w", newline="")
    writer = csv.writer(handle)
    writer.writerow(["photo", "lat", "lon", "match", "match_lat", "match_lon", "similarity", "method"])
    for r in records:
        first = r["matches"][0]
        writer.writerow(
            [
                r["photo"],
                f"{r['lat']:.6f}",
                f"{r['lon']:.6f}",
                first["path"],
                f"{first['lat']:.6f}",
                f"{first['lon']:.6f}",
                f"{first['similarity']:.4f}",
                r["method"],
            ]
        )
    if args.out is not None:
        handle.close()
    return 0


def _train(args: argparse.Namespace) -> int:
    from geoswc.street.model import from_folder, off_the_shelf
    from geoswc.train.vpr import VPRTrainSettings, settings_with, train_vpr

    settings = settings_with(
        VPRTrainSettings(),
        args.set or [],
        pool=args.pool,
        loss=args.loss,
        mining=args.mining,
        epochs=args.epochs,
    )
    if args.model is not None and (args.backbone or args.preset):
        raise ValueError("give at most one of --model MODEL, --backbone NAME or --preset tiny")
    if args.model is not None:
        loaded = from_folder(args.model, pool=settings.pool, clusters=settings.clusters)
    else:
        preset = None if args.backbone else (args.preset or "tiny")
        loaded = off_the_shelf(
            backbone=args.backbone, preset=preset, pool=settings.pool, clusters=settings.clusters
        )
    summary = train_vpr(
        loaded,
        args.root,
        args.out,
        settings,
        cpu=args.cpu,
        resume=args.resume,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
    )
    if not summary.get("main_process", True):
        return 0
    if summary.get("complete"):
        best = summary["best_epoch"]
        print(
            f"best epoch {best['epoch']}: val recall@1 {best['val_recall@1']:.1f}, recall@5 "
            f"{best['val_recall@5']:.1f}; wrote the model folder {args.out}"
        )
    else:
        print(f"stopped after {args.max_steps} steps; continue with --resume")
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="dataset folder with images/{train,val}/{database,queries}/")
    parser.add_argument("-o", "--out", required=True, help="the model folder to write")
    src = parser.add_argument_group("starting model (at most one; default --preset tiny)")
    src.add_argument("--model", help="a model folder to continue from")
    src.add_argument("--backbone", help="a timm model name with ImageNet weights")
    src.add_argument(
        "--preset", choices=("tiny",), help="the tiny preset's backbone, offline ImageNet weights"
    )
    parser.add_argument("--pool", choices=POOLS, help="aggregation layer (default gem)")
    parser.add_argument("--loss", choices=("triplet", "batch-hard"), help="loss (default triplet)")
    parser.add_argument(
        "--mining", choices=("partial", "full", "random"), help="triplet mining (default partial)"
    )
    parser.add_argument("--epochs", type=int, help="epochs (default 5)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a training setting (VPRTrainSettings)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop with a checkpoint after this many steps")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even with a GPU")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (exactly one)")
    src.add_argument("--model", help="a model folder (geoswc fit / train backbone / vpr index)")
    src.add_argument(
        "--backbone", help="a timm model name with ImageNet weights (off the shelf, no training)"
    )
    src.add_argument(
        "--preset", choices=("tiny",), help="the tiny preset's backbone, offline ImageNet weights"
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="with --backbone: local ImageNet weights (.safetensors, .pth) instead of timm's download",
    )
    parser.add_argument(
        "--pool", choices=POOLS, help="aggregation layer (default: the model's, else gem off the shelf)"
    )
    parser.add_argument(
        "--clusters", type=int, default=DEFAULT_CLUSTERS, help="NetVLAD clusters (default 64)"
    )
    parser.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="split (default test)"
    )
    parser.add_argument(
        "--resize", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the photos')"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="photos per forward pass (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of NetVLAD's k-means and PCA sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def write_street_world(args: argparse.Namespace) -> int:
    from geoswc.data.synth_street import make_street_world

    spec = make_street_world(
        args.out,
        streets={"train": args.train_streets, "val": args.val_streets, "test": args.test_streets},
        street_length_m=args.length,
        db_step_m=args.step,
        queries_per_street=args.queries,
        styles=args.styles,
        seed=args.seed,
    )
    counts = "; ".join(
        f"{s}: {c['database']} database, {c['queries']} queries" for s, c in spec.counts.items()
    )
    print(f"wrote a street world to {args.out}/images ({counts})")
    return 0


def add_street_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the synthetic street world (shared by `geoswc vpr synth` and `geoswc data synth --street`)."""
    parser.add_argument("--train-streets", type=int, default=3, help="streets of the train split (default 3)")
    parser.add_argument("--val-streets", type=int, default=1, help="streets of the val split (default 1)")
    parser.add_argument("--test-streets", type=int, default=2, help="streets of the test split (default 2)")
    parser.add_argument("--length", type=float, default=200.0, help="street length in metres (default 200)")
    parser.add_argument(
        "--step", type=float, default=10.0, help="metres between database photos (default 10)"
    )
    parser.add_argument("--queries", type=int, default=8, help="queries per street (default 8)")
    parser.add_argument(
        "--styles",
        type=int,
        default=6,
        help="facade styles the buildings of the city share (default 6; more: fewer look-alike places)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vpr", help="street-scale place recognition: recall@N of GeM/NetVLAD models, street worlds"
    )
    commands = parser.add_subparsers(dest="vpr_command", metavar="VPR_COMMAND", required=True)

    ev = commands.add_parser(
        "evaluate",
        help="recall@N, median distances and compact-index recall of a model on a place-recognition split",
    )
    ev.add_argument("root", help="dataset folder with images/{train,val,test}/{database,queries}/")
    ev.add_argument(
        "-o", "--out", required=True, help="output folder (results.json, predictions.csv, reports)"
    )
    _model_arguments(ev)
    ev.add_argument(
        "--test-method",
        default="hard_resize",
        choices=("hard_resize", "central_crop", "five_crops", "nearest_crop", "maj_voting"),
        help="how queries are fed to the network (default hard_resize)",
    )
    ev.add_argument("--recall", type=int, nargs="+", default=[1, 5, 10, 20], help="the Ns of recall@N")
    ev.add_argument("--top", type=int, default=20, help="results per query in predictions.csv (default 20)")
    ev.add_argument("--radius", type=float, default=25.0, help="positive radius in metres (default 25)")
    ev.add_argument(
        "--index-mode", default="flat", choices=("flat", "sq8", "pq", "bits"), help="database codes"
    )
    ev.add_argument(
        "--pca-dim", type=int, help="reduce descriptors with PCA fitted on the train split's photos"
    )
    ev.add_argument("--whiten", action="store_true", help="whiten the PCA components")
    ev.set_defaults(func=_evaluate)

    ix = commands.add_parser("index", help="index a database of geotagged photos into a model folder")
    ix.add_argument(
        "source", help="a dataset with the place-recognition layout, or a folder of photos with --csv"
    )
    ix.add_argument("-o", "--out", required=True, help="new model folder")
    ix.add_argument("--csv", help="IMG_ID,LAT,LON of the photos of a plain folder (IMG_ID relative to it)")
    _model_arguments(ix)
    ix.set_defaults(func=_index)

    lo = commands.add_parser("locate", help="place photos at their first match in an indexed database")
    lo.add_argument("model", help="a model folder written by geoswc vpr index")
    lo.add_argument("photos", nargs="+", help="photos or folders")
    lo.add_argument("-k", type=int, default=1, help="matches clustered when > 1 (default 1: the first match)")
    lo.add_argument(
        "--eps-m", type=float, default=25.0, help="cluster radius in metres for -k > 1 (default 25)"
    )
    lo.add_argument("--area", help="restrict the database to south,west,north,east (degrees)")
    lo.add_argument("-o", "--out", help="CSV to write (default: standard output)")
    lo.set_defaults(func=_locate)

    synth = commands.add_parser(
        "synth", help="write a synthetic street world in the place-recognition layout"
    )
    synth.add_argument("out", help="new output folder")
    add_street_arguments(synth)
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(func=write_street_world)

    tr = commands.add_parser(
        "train", help="train a place-recognition model (triplets or batch-hard) on a split's photos"
    )
    _train_arguments(tr)
    tr.set_defaults(func=_train)
