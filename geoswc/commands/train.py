"""`geoswc train backbone | features | heads | retrieval`: one training stage from the command line.

    geoswc train backbone   CE over the finest partition, end to end on images (SGD 0.01, x0.5 / 5 epochs)
    geoswc train features   pooled backbone features of a photo set -> feature cache (resumable, multi-process)
    geoswc train heads      CE / HC / MvMF heads on the frozen backbone, from cached features by default
                            (AdamW 1e-5, cosine, 5 epochs; the MvMF mixture layer starts from the CE layer)
    geoswc train retrieval  the residual retrieval module on cached features (InfoNCE + cross-batch memory)

``accelerate launch -m geoswc.train <stage> ...`` runs the same stage on N processes: each rank reads its own
rows, gradients are averaged by DDP, metrics are gathered, and the run records whether all ranks ended with
identical weights. Each stage is a function of `geoswc.train`; this module only turns flags into its
arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from geoswc.config import Config, resolve_config
from geoswc.geocells import Geocells
from geoswc.train import Photos, extract_features, train_backbone, train_heads, train_retrieval


def _config(args: argparse.Namespace) -> Config:
    return resolve_config(args.preset, args.config, args.set or [])


def _training(args: argparse.Namespace) -> dict:
    return {
        "cpu": args.cpu,
        "resume": args.resume,
        "max_steps": args.max_steps,
        "checkpoint_every": args.checkpoint_every,
        "log_with": args.log_with or (),
    }


def _photos(args: argparse.Namespace, *, csv_flag: str = "--train-csv", csv: Optional[str] = None) -> Photos:
    """The training photos of ``--shards`` or of a metadata CSV with ``--images``."""
    if bool(args.shards) == bool(csv):
        raise ValueError(f"give the training photos either as --shards or as {csv_flag} with --images")
    if args.shards:
        return Photos.from_shards(args.shards, relabel=args.relabel)
    if not args.images:
        raise ValueError(f"{csv_flag} needs --images (the image root the IMG_IDs are relative to)")
    return Photos.from_csv(csv, args.images)


def _val_photos(args: argparse.Namespace) -> Optional[Photos]:
    if getattr(args, "val_shards", None):
        return Photos.from_shards(args.val_shards, relabel=args.relabel)
    if args.val_csv:
        if not (args.val_images or args.images):
            raise ValueError("--val-csv needs --val-images or --images")
        return Photos.from_csv(args.val_csv, args.val_images or args.images)
    return None


def run_backbone(args: argparse.Namespace) -> int:
    train_backbone(
        _config(args),
        cells=Geocells.load(args.cells),
        photos=_photos(args, csv=args.train_csv),
        out=args.out,
        val=_val_photos(args),
        weights=args.backbone_weights,
        **_training(args),
    )
    return 0


def run_features(args: argparse.Namespace) -> int:
    photos = _photos(args, csv_flag="--csv", csv=args.csv)
    extract_features(
        _config(args),
        cells=Geocells.load(args.cells),
        photos=photos,
        out=args.out,
        backbone=args.model,
        weights=args.backbone_weights,
        part_size=args.part_size,
        batch_size=args.batch_size,
        cpu=args.cpu,
        log_with=args.log_with or (),
    )
    return 0


def run_heads(args: argparse.Namespace) -> int:
    config = _config(args)
    on_images = args.on_images or not config.heads.from_features
    if on_images:
        if not (args.model and (args.shards or (args.train_csv and args.images))):
            raise ValueError(
                "heads on images need --model (a backbone stage folder) and --shards or "
                "--train-csv with --images"
            )
        photos, val = _photos(args, csv=args.train_csv), _val_photos(args)
    else:
        if not args.features:
            raise ValueError("heads from cached features need --features (or --on-images with --train-csv)")
        photos = val = None
    train_heads(
        config,
        cells=Geocells.load(args.cells),
        out=args.out,
        features=args.features,
        val_features=args.val_features,
        kinds=args.kinds,
        backbone=args.model,
        train_ce=args.train_ce,
        photos=photos,
        val=val,
        **_training(args),
    )
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    sets = list(args.set or [])
    if args.epochs is not None:
        sets.append(f"retrieval.epochs={args.epochs}")
    if args.batch_size is not None:
        sets.append(f"retrieval.batch_size={args.batch_size}")
    config = resolve_config(args.preset, args.config, sets)
    train_retrieval(
        config,
        cells=Geocells.load(args.cells),
        features=args.features,
        out=args.out,
        val_features=args.val_features,
        **_training(args),
    )
    return 0


# ---------------------------------------------------------------------------------------------- flags
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", required=True, help="Geocells folder (geoswc cells build)")
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (weights, config, checkpoints, logs)"
    )
    parser.add_argument("--preset", help="configuration preset: paper (default values) or tiny")
    parser.add_argument("--config", help="YAML/JSON configuration file applied after the preset")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--log-with", nargs="+", choices=("tensorboard", "csv"), help="metric trackers")
    parser.add_argument(
        "--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every STEPS optimizer steps (default: at epoch ends)",
    )


def _images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        metavar="DIR_OR_PATTERN",
        help="training shards (geoswc data shards --cells): a folder of *.tar or a brace pattern; "
        "instead of --train-csv/--images",
    )
    parser.add_argument(
        "--val-shards", metavar="DIR_OR_PATTERN", help="validation shards (instead of --val-csv)"
    )
    _relabel(parser)
    parser.add_argument("--train-csv", help="training metadata (IMG_ID, AUTHOR, LAT, LON)")
    parser.add_argument("--images", help="image root the IMG_IDs are relative to")
    parser.add_argument("--val-csv", help="validation metadata: accuracy at 1/25/200/750/2500 km each epoch")
    parser.add_argument("--val-images", help="image root of --val-csv (default: --images)")


def _relabel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="label shard samples from their lat/lon with --cells, ignoring the labels stored in "
        "the shards (shards written without --cells or with another partition)",
    )


def add_stage_parsers(stages) -> None:
    p = stages.add_parser("backbone", help="train the backbone with CE over the finest partition")
    _common(p)
    _images(p)
    p.add_argument("--backbone-weights", help="local ImageNet weights (.safetensors/.pth) to start from")
    p.set_defaults(func=run_backbone)

    p = stages.add_parser("features", help="extract pooled backbone features into a feature cache")
    _common(p)
    p.add_argument("--csv", help="metadata of the photos to embed")
    p.add_argument("--images", help="image root the IMG_IDs are relative to")
    p.add_argument(
        "--shards",
        metavar="DIR_OR_PATTERN",
        help="shards to embed (geoswc data shards --cells) instead of --csv/--images",
    )
    _relabel(p)
    p.add_argument("--model", help="backbone stage output folder (default: the configured timm backbone)")
    p.add_argument("--backbone-weights", help="local ImageNet weights when --model is not given")
    p.add_argument("--part-size", type=int, default=4096, help="rows per resumable part")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    p.set_defaults(func=run_features)

    p = stages.add_parser("heads", help="train CE/HC/MvMF heads on the frozen backbone")
    _common(p)
    p.add_argument("--features", help="feature cache of the training photos (geoswc train features)")
    p.add_argument("--val-features", help="feature cache of validation photos")
    p.add_argument("--kinds", nargs="+", help="heads to train (default: heads.kinds)")
    p.add_argument("--model", help="backbone stage folder: its CE layer is reused as the ce head")
    p.add_argument(
        "--train-ce", action="store_true", help="fine-tune the reused CE layer instead of copying it"
    )
    p.add_argument("--on-images", action="store_true", help="train end to end on augmented images")
    _images(p)
    p.set_defaults(func=run_heads)

    p = stages.add_parser("retrieval", help="train the residual retrieval module")
    _common(p)
    p.add_argument("--features", required=True, help="feature cache of the training photos")
    p.add_argument("--val-features", help="feature cache for same-cell precision@k after every epoch")
    p.add_argument("--epochs", type=int, help="override retrieval.epochs")
    p.add_argument("--batch-size", type=int, help="(query, positive) pairs per step and process")
    p.set_defaults(func=run_retrieval)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage: backbone, features, heads or retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    add_stage_parsers(stages)
