"""Whole-pipeline training (`geoswc fit`) and the one-command quickstart (`geoswc demo`).

``geoswc fit TRAIN.csv --images ROOT -o MODEL_DIR`` (photo files) or ``geoswc fit --shards SHARDS -o MODEL_DIR``
(webdataset shards of ``geoswc data shards``, e.g. MP16 from GeoEstimation's msgpack files) runs every stage of
the ICMR 2021 system (sections 3 and 4.2) in order, each in its own folder under ``MODEL_DIR/work/``:

    data       the training metadata, minus the photos of benchmark authors (``--exclude``, paper 4.2); from
               shards, the coordinates of their samples (JSON members only), refused if a benchmark leaks in
    cells      three S2 granularities built from the training photos (paper 3.1)
    backbone   EfficientNet + CE over the finest cells, end to end (``geoswc train backbone``)
    features   pooled backbone features of the training photos (``geoswc train features``)
    heads      CE, HC and MvMF heads on the frozen backbone (``geoswc train heads``)
    retrieval  the residual retrieval module (``geoswc train retrieval``)
    index      the placeable background index (``geoswc index build``)
    model      the model folder ``Geolocator.from_pretrained`` loads, written to ``MODEL_DIR``

A stage writes ``stage.json`` last, holding a key computed from the configuration sections it reads, its
inputs and the markers of the stages before it. A stage whose marker holds the current key is skipped, so a
failed run resumes where it stopped; a changed setting changes the key of its stage and of every later one,
which then run again. ``--stages`` runs a subset (the stages before it must be complete).

From shards, the backbone and feature stages read the shards and label every sample from its coordinates
with the cells built here (``--relabel``): labels stored in shards written for another partition are ignored.

Started with ``accelerate launch -m geoswc.fit ...`` the training stages run on every process; the others run
on the main process while the rest wait at a barrier.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from geoswc.config import Config, resolve_config

logger = logging.getLogger(__name__)

STAGES = ("data", "cells", "backbone", "features", "heads", "retrieval", "index", "model")
MARKER = "stage.json"
ATTEMPT = "attempt.json"
# Configuration sections each stage reads; a change in one of them reruns the stage and everything after it.
STAGE_SECTIONS = {
    "data": (),
    "cells": ("cells",),
    "backbone": ("data", "backbone", "train"),
    "features": ("data", "train"),
    "heads": ("heads", "train"),
    "retrieval": ("retrieval", "train"),
    "index": ("retrieval",),
    "model": ("swc",),
}
# Stages every process runs under `accelerate launch`; the others run on the main process only.
DISTRIBUTED_STAGES = ("backbone", "features", "heads", "retrieval")


# ------------------------------------------------------------------------------------------- run state
@dataclass
class FitRun:
    """Everything one ``geoswc fit`` needs: where the data is, where the work goes, the resolved config.

    The training photos are either ``train_csv`` with ``images`` or ``shards`` (a shard folder, brace or glob
    pattern); validation photos, optional, ``val_csv`` (with ``val_images``, default ``images``) or
    ``val_shards``.
    """

    model_dir: Path
    config: Config
    train_csv: Optional[Path] = None
    images: Optional[Path] = None
    shards: Optional[str] = None
    exclude: Tuple[Path, ...] = ()
    cpu: bool = False
    val_csv: Optional[Path] = None
    val_images: Optional[Path] = None
    val_shards: Optional[str] = None
    echo: Callable[[str], None] = logger.info
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.model_dir / "work"

    @property
    def config_file(self) -> Path:
        return self.work / "config.yaml"

    def stage_dir(self, stage: str) -> Path:
        return self.work / stage

    def check_inputs(self) -> None:
        """Raise on a missing or contradictory input before any stage runs.

        Raises:
            ValueError: neither or both of ``train_csv`` and ``shards``, ``images`` missing for ``train_csv`` or
                given with ``shards``, both ``val_csv`` and ``val_shards``.
            FileNotFoundError: naming the first missing file, folder or shard.
        """
        if (self.train_csv is None) == (self.shards is None):
            raise ValueError("give the training photos either as TRAIN.csv with --images or as --shards "
                             f"DIR_OR_PATTERN ({'both' if self.shards is not None else 'neither'} given)")
        if self.shards is not None:
            if self.images is not None:
                raise ValueError("--images goes with TRAIN.csv; with --shards the photos are read from the shards "
                                 "(a --val-csv's image root is --val-images)")
            _check_shards(self.shards, "--shards")
        else:
            if self.images is None:
                raise ValueError(f"{self.train_csv} needs --images (the image root its IMG_IDs are relative to)")
            if not self.train_csv.is_file():
                raise FileNotFoundError(f"training metadata not found: {self.train_csv}")
            if not self.images.is_dir():
                raise FileNotFoundError(f"image folder not found: {self.images}")
        if self.val_csv is not None and self.val_shards is not None:
            raise ValueError("give validation photos either as --val-csv or as --val-shards, not both")
        if self.val_csv is not None and (self.val_images or self.images) is None:
            raise ValueError("--val-csv needs --val-images (the image root of its IMG_IDs)")
        if self.val_shards is not None:
            _check_shards(self.val_shards, "--val-shards")
        for path in self.exclude:
            if not path.is_file():
                raise FileNotFoundError(f"--exclude file not found: {path}")


def _check_shards(pattern: str, flag: str) -> List[str]:
    """The shard files of ``pattern``, which must all exist."""
    from geoswc.data.loading import expand_urls

    urls = expand_urls(pattern)
    if not urls:
        raise FileNotFoundError(f"{flag} {pattern!r}: no shards (*.tar) found")
    absent = [u for u in urls if not Path(u).is_file()]
    if absent:
        raise FileNotFoundError(f"{flag} {pattern!r}: shard not found: {absent[0]} "
                                f"({len(absent)} of {len(urls)} missing)")
    return urls


def _shard_identity(pattern: str) -> Dict[str, Any]:
    """What identifies a shard set without reading it: every shard's resolved path and size, and the digest of
    the ``summary.json`` beside them (``geoswc data shards`` records counts, skips and settings there). The
    pattern itself is left out, so ``shards/`` and ``shards/*.tar`` naming the same files are the same input."""
    urls = _check_shards(pattern, "shards")
    summaries = sorted({Path(u).parent / "summary.json" for u in urls})
    return {
        "files": [[str(Path(u).resolve()), Path(u).stat().st_size] for u in urls],
        "summaries": {str(p.resolve()): _file_digest(p) for p in summaries if p.is_file()},
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stage_inputs(run: FitRun, stage: str) -> Dict[str, Any]:
    """What a stage reads from outside the work folder (beside the configuration)."""
    if stage == "data":
        exclude = {str(p.resolve()): _file_digest(p) for p in run.exclude}
        if run.shards is not None:
            return {"shards": _shard_identity(run.shards), "exclude": exclude}
        return {
            "train_csv": str(run.train_csv.resolve()),
            "train_csv_sha256": _file_digest(run.train_csv),
            "exclude": exclude,
        }
    if stage in ("backbone", "features"):
        if run.shards is not None:
            inputs = {"shards": _shard_identity(run.shards)}
        else:
            inputs = {"images": str(run.images.resolve())}
        if stage == "backbone" and run.val_csv is not None:
            inputs["val_csv"] = str(run.val_csv.resolve())
        if stage == "backbone" and run.val_shards is not None:
            inputs["val_shards"] = _shard_identity(run.val_shards)
        return inputs
    return {}


def read_marker(folder: Path) -> Optional[Dict[str, Any]]:
    """The ``stage.json`` of a finished stage, or ``None``."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def stage_key(run: FitRun, stage: str) -> str:
    """The key a stage's marker must hold for its output to count as current.

    Raises:
        ValueError: when a stage before it has not finished.
    """
    index = STAGES.index(stage)
    upstream = {}
    for earlier in STAGES[:index]:
        marker = read_marker(run.stage_dir(earlier))
        if marker is None:
            raise ValueError(
                f"stage {stage!r} needs stage {earlier!r}, which has not finished in {run.work}; run it first "
                f"(--stages {earlier} {stage}) or leave --stages out"
            )
        upstream[earlier] = [marker["key"], marker["finished"]]
    config = run.config.to_dict()
    payload = {
        "stage": stage,
        "config": {section: config[section] for section in STAGE_SECTIONS[stage]},
        "inputs": _stage_inputs(run, stage),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stage_is_current(run: FitRun, stage: str) -> bool:
    marker = read_marker(run.stage_dir(stage))
    if marker is None:
        return False
    try:
        return marker.get("key") == stage_key(run, stage)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- stages
def _run_train(argv: List[str]) -> None:
    """Run one ``geoswc train`` stage in this process (all ranks), raising on failure."""
    from geoswc import train

    parser = argparse.ArgumentParser(prog="geoswc train")
    train.add_stage_parsers(parser.add_subparsers(dest="stage", required=True))
    args = parser.parse_args(argv)
    args.command = "train"
    code = int(args.func(args) or 0)
    if code:
        raise RuntimeError(f"geoswc train {' '.join(argv)} exited with status {code}")


def _common_train_args(run: FitRun, stage: str, *, resume: bool) -> List[str]:
    argv = ["--cells", str(run.stage_dir("cells")), "--out", str(run.stage_dir(stage)),
            "--config", str(run.config_file)]
    if run.cpu:
        argv.append("--cpu")
    if resume:
        argv.append("--resume")
    return argv


def _stage_data(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """Validated training metadata without the photos of benchmark authors or the benchmark photos themselves."""
    from geoswc.data.images import image_path
    from geoswc.data.metadata import Exclusions, read_metadata

    if run.shards is not None:
        return _shard_data(run, out)
    frame = read_metadata(run.train_csv)
    n_read = len(frame)
    by_author = by_id = 0
    if run.exclude:
        author_mask, id_mask = Exclusions.from_files(run.exclude).masks(frame)
        by_author, by_id = int(author_mask.sum()), int(id_mask.sum())
        frame = frame[~(author_mask | id_mask)].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"no training photos left in {run.train_csv} after --exclude")
    missing = [i for i in frame["IMG_ID"] if not image_path(run.images, i).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(frame)} photos of {run.train_csv} are not under {run.images}, e.g. "
            f"{image_path(run.images, missing[0])}"
        )
    columns = [c for c in ("IMG_ID", "AUTHOR", "LAT", "LON") if c in frame.columns]
    frame[columns].to_csv(out / "train.csv", index=False)
    run.echo(f"  {n_read} photos read, {by_author} dropped by author and {by_id} by photo id (--exclude), "
             f"{len(frame)} kept")
    return {"photos": len(frame), "excluded_by_author": by_author, "excluded_by_id": by_id}


def _shard_data(run: FitRun, out: Path) -> Dict[str, Any]:
    """The coordinates of the shards' samples (their JSON members; images are not read), for the cells.

    Photos cannot be dropped from shards here, so ``--exclude`` checks instead: a benchmark author or photo in
    the shards stops the run, pointing at ``geoswc data shards --exclude``.
    """
    from geoswc.data.metadata import Exclusions
    from geoswc.data.shards import read_shard_metadata

    urls = _check_shards(run.shards, "--shards")
    frame = read_shard_metadata(urls, progress=True)
    if frame.empty:
        raise ValueError(f"--shards {run.shards!r}: the {len(urls)} shards hold no samples")
    if run.exclude:
        author_mask, id_mask = Exclusions.from_files(run.exclude).masks(frame)
        leaked = (author_mask | id_mask).nonzero()[0]
        if len(leaked):
            example = frame.iloc[int(leaked[0])]
            raise ValueError(
                f"the shards hold {int(author_mask.sum())} photos by authors and {int(id_mask.sum())} photos of "
                f"the --exclude benchmarks (e.g. {example['IMG_ID']} by {example['AUTHOR']}); fit cannot drop "
                "photos from shards: write them again with geoswc data shards ... --exclude "
                + " ".join(str(p) for p in run.exclude)
            )
    frame.to_csv(out / "train.csv", index=False)
    run.echo(f"  {len(frame)} photos in {len(urls)} shards"
             + (", none by a benchmark author or of a benchmark (--exclude)" if run.exclude else ""))
    return {"photos": len(frame), "shards": len(urls), "excluded_by_author": 0, "excluded_by_id": 0}


def _stage_cells(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """S2 cells at every granularity of ``cells.max_images`` from the training photos (paper 3.1)."""
    import pandas as pd

    from geoswc.geocells import S2Partitioner

    frame = pd.read_csv(run.stage_dir("data") / "train.csv")
    c = run.config.cells
    geocells = S2Partitioner(min_images=c.min_images, max_images=tuple(c.max_images), start_level=c.start_level,
                             target_cells=c.target_cells).fit(frame["LAT"].to_numpy(), frame["LON"].to_numpy())
    geocells = geocells.geocells_
    geocells.save(out)
    sizes = {p.name: len(p) for p in geocells.partitions}
    run.echo("  " + ", ".join(f"{name}: {n} cells" for name, n in sizes.items()))
    return {"cells": sizes, "fingerprint": str(geocells.fingerprint)}


def _photo_args(run: FitRun, csv_flag: str) -> List[str]:
    """Where a training stage reads the training photos: the shards, labelled with this run's cells from each
    sample's coordinates (``--relabel``), or the data stage's CSV under ``--images``."""
    if run.shards is not None:
        return ["--shards", str(run.shards), "--relabel"]
    return [csv_flag, str(run.stage_dir("data") / "train.csv"), "--images", str(run.images)]


def _stage_backbone(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    argv = ["backbone", *_common_train_args(run, "backbone", resume=resume), *_photo_args(run, "--train-csv")]
    if run.val_csv is not None:
        argv += ["--val-csv", str(run.val_csv), "--val-images", str(run.val_images or run.images)]
    if run.val_shards is not None:
        argv += ["--val-shards", str(run.val_shards)]
    _run_train(argv)
    return _summary(out / "train_backbone.json")


def _stage_features(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    _run_train(["features", *_common_train_args(run, "features", resume=False), *_photo_args(run, "--csv"),
                "--model", str(run.stage_dir("backbone"))])
    return _summary(out / "train_features.json")


def _stage_heads(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    _run_train(["heads", *_common_train_args(run, "heads", resume=resume),
                "--features", str(run.stage_dir("features")), "--model", str(run.stage_dir("backbone")),
                "--train-ce"])
    return _summary(out / "train_heads.json")


def _stage_retrieval(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    _run_train(["retrieval", *_common_train_args(run, "retrieval", resume=resume),
                "--features", str(run.stage_dir("features"))])
    return _summary(out / "train_retrieval.json")


def _stage_index(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """The placeable background (paper 3.3.3): training photos whose top-1 cell is right, embedded."""
    from geoswc.retrieval.background import build_background

    head = run.config.retrieval.placeable_head
    head_path = run.stage_dir("heads") / "heads" / f"{head}.safetensors"
    if not head_path.is_file():
        trained = sorted(p.stem for p in (run.stage_dir("heads") / "heads").glob("*.safetensors"))
        raise ValueError(f"retrieval.placeable_head is {head!r} but the heads stage trained: {', '.join(trained)}")
    report = build_background(
        run.stage_dir("features"), head_path=head_path,
        retrieval_path=run.stage_dir("retrieval") / "retrieval.safetensors", cells_dir=run.stage_dir("cells"),
        out_dir=out, exclude=run.exclude, dtype=run.config.retrieval.index_dtype,
        device="cpu" if run.cpu else None, config=run.config.to_dict(),
    )
    run.echo(f"  {report['kept']} of {report['total']} training photos are placeable background "
             f"({report['wrong_cell']} in a wrong top-1 cell)")
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str))}


def _stage_model(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """Compose the trained parts into the model folder ``Geolocator.from_pretrained`` loads."""
    from geoswc.classifiers import create_backbone, load_backbone_weights, load_head
    from geoswc.geocells import Geocells
    from geoswc.geolocator import Geolocator
    from geoswc.retrieval.index import BackgroundIndex
    from geoswc.retrieval.model import ResidualRetrievalModule

    geocells = Geocells.load(run.stage_dir("cells"))
    fingerprint = str(geocells.fingerprint)
    spec = json.loads((run.stage_dir("backbone") / "backbone.json").read_text())
    backbone = create_backbone(spec["model"], pretrained=False)
    load_backbone_weights(backbone, run.stage_dir("backbone") / "backbone.safetensors")
    heads = {p.stem: load_head(p, geocells=geocells)
             for p in sorted((run.stage_dir("heads") / "heads").glob("*.safetensors"))}
    retrieval = ResidualRetrievalModule.load(run.stage_dir("retrieval") / "retrieval.safetensors",
                                             fingerprint=fingerprint)
    index = BackgroundIndex.load(run.stage_dir("index"), mmap=False, fingerprint=fingerprint)
    model = Geolocator(backbone=backbone, geocells=geocells, heads=heads, retrieval=retrieval, index=index,
                       config=run.config, backbone_name=spec["model"], data_config=spec.get("data_config"))
    model.save_pretrained(run.model_dir)
    run.echo(f"  model folder {run.model_dir}: backbone {spec['model']}, heads {', '.join(heads)}, "
             f"background index of {len(index)} photos")
    return {"model_dir": str(run.model_dir), "heads": list(heads), "index_photos": len(index)}


def _summary(path: Path) -> Dict[str, Any]:
    """The short part of a training summary worth keeping in the marker (last epoch of every run)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())

    def last(summary):
        history = summary.get("history") or []
        return history[-1] if history else {}

    if "heads" in data:
        return {kind: last(s) for kind, s in data["heads"].items()}
    if "history" in data:
        return last(data)
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str))}


STAGE_FUNCTIONS: Dict[str, Callable[[FitRun, Path, bool], Dict[str, Any]]] = {
    "data": _stage_data,
    "cells": _stage_cells,
    "backbone": _stage_backbone,
    "features": _stage_features,
    "heads": _stage_heads,
    "retrieval": _stage_retrieval,
    "index": _stage_index,
    "model": _stage_model,
}


# ------------------------------------------------------------------------------------------- pipeline
def _process_state(cpu: bool):
    from accelerate import PartialState

    from geoswc.engine import use_cpu

    return PartialState(cpu=use_cpu(cpu))


def _broadcast(state, value: Any) -> Any:
    """``value`` as the main process sees it, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def resolve_fit_config(preset: Optional[str], config_file: Optional[str], sets: Sequence[str]) -> Config:
    """The configuration for ``fit``: defaults -> preset -> file -> ``--set``."""
    return resolve_config(preset, config_file, sets)


def run_pipeline(run: FitRun, stages: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Run (or skip, when current) the requested stages in order.

    Args:
        run: inputs, output folder and configuration.
        stages: names from ``STAGES``; default all of them.

    Returns:
        ``{stage: marker}`` for every requested stage.
    """
    wanted = list(STAGES) if not stages else list(stages)
    for name in wanted:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose from: {', '.join(STAGES)}")
    wanted = [s for s in STAGES if s in wanted]
    run.check_inputs()

    state = _process_state(run.cpu)
    if state.is_main_process:
        run.work.mkdir(parents=True, exist_ok=True)
        run.config.save(run.config_file)
    state.wait_for_everyone()

    markers: Dict[str, Dict[str, Any]] = {}
    for number, stage in enumerate(wanted, 1):
        out = run.stage_dir(stage)
        plan = None
        if state.is_main_process:
            plan = _plan_stage(run, stage)
        plan = _broadcast(state, plan)
        label = f"[{number}/{len(wanted)}] {stage}"
        if plan["skip"]:
            if state.is_main_process:
                run.echo(f"{label}: up to date, skipped ({out})")
            markers[stage] = read_marker(out)
            continue
        if state.is_main_process:
            run.echo(f"{label}: {'resuming' if plan['resume'] else 'running'} -> {out}")
        started = time.perf_counter()
        details: Dict[str, Any] = {}
        if stage in DISTRIBUTED_STAGES:
            details = STAGE_FUNCTIONS[stage](run, out, plan["resume"])
        elif state.is_main_process:
            details = STAGE_FUNCTIONS[stage](run, out, plan["resume"])
        state.wait_for_everyone()
        seconds = time.perf_counter() - started
        run.timings[stage] = seconds
        if state.is_main_process:
            marker = {"stage": stage, "key": plan["key"], "finished": time.time(), "seconds": round(seconds, 2),
                      "config": {s: run.config.to_dict()[s] for s in STAGE_SECTIONS[stage]},
                      "inputs": _stage_inputs(run, stage), "details": details,
                      "num_processes": state.num_processes}
            tmp = out / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=2, default=str) + "\n")
            tmp.replace(out / MARKER)
            (out / ATTEMPT).unlink(missing_ok=True)
            run.echo(f"{label}: done in {_duration(seconds)}")
        state.wait_for_everyone()
        markers[stage] = read_marker(out)
    return markers


def _plan_stage(run: FitRun, stage: str) -> Dict[str, Any]:
    """Decide on the main process: skip (current), resume (same key as an unfinished attempt) or start afresh."""
    out = run.stage_dir(stage)
    key = stage_key(run, stage)
    marker = read_marker(out)
    if marker is not None and marker.get("key") == key:
        return {"skip": True, "resume": False, "key": key}
    attempt = out / ATTEMPT
    resume = marker is None and attempt.is_file() and json.loads(attempt.read_text()).get("key") == key
    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    attempt.write_text(json.dumps({"key": key, "started": time.time()}) + "\n")
    return {"skip": False, "resume": resume, "key": key}


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------------------------- demo
DEMO_TRAIN = 3000
DEMO_TEST = 300
DEMO_TAG_PHOTOS = 24
# Fine-tuning the backbone is by far the slowest stage on a CPU: one epoch from the ImageNet weights keeps the
# demo within minutes and already sharpens the regions the heads learn.
DEMO_SETTINGS = ("backbone.epochs=1",)
# The modes whose 1 km and 750/2500 km accuracies show the paper's effect, classification first.
HEAD_MODES = ("ce", "hc", "mvmf")
SWC_MODES = ("ce+rrm", "hc+rrm", "mvmf+rrm")


def _call(argv: Sequence[str]) -> None:
    """Run a ``geoswc`` subcommand in this process; errors propagate instead of becoming exit codes."""
    from geoswc.cli import build_parser

    args = build_parser().parse_args(list(argv))
    code = int(args.func(args) or 0)
    if code:
        raise RuntimeError(f"geoswc {' '.join(argv)} exited with status {code}")


def _make_world(folder: Path, *, n_train: int, n_test: int, seed: int) -> bool:
    """Write the synthetic world unless the same one is already there; returns whether it was written."""
    from geoswc.data.synth import make_world

    spec_file = folder / "world.json"
    if spec_file.is_file() and (folder / "test.csv").is_file():
        spec = json.loads(spec_file.read_text())
        if (spec.get("n_train"), spec.get("n_test"), spec.get("seed")) == (n_train, n_test, seed):
            return False
    if folder.exists():
        shutil.rmtree(folder)
    make_world(folder, n_train=n_train, n_test=n_test, seed=seed, workers=min(4, os.cpu_count() or 1))
    return True


def _copy_photos(world: Path, target: Path, count: int) -> List[str]:
    """A folder of test photos as an archive would hold them (flat, original file names)."""
    import pandas as pd

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ids = pd.read_csv(world / "test.csv")["IMG_ID"].astype(str).tolist()[:count]
    for img_id in ids:
        shutil.copy2(world / "images" / img_id, target / Path(img_id).name)
    return ids


def paper_effect(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The comparison the paper makes (Table 1): the best head alone vs the best Search within Cell at 1 km,
    and the heads' accuracy at 750 and 2500 km."""
    heads = {m: results[m] for m in HEAD_MODES if m in results}
    swc = {m: results[m] for m in SWC_MODES if m in results}
    if not heads or not swc:
        raise ValueError(f"the comparison needs head and Search-within-Cell results, got: {', '.join(results)}")
    best_head = max(heads, key=lambda m: heads[m]["accuracy"]["1"])
    best_swc = max(swc, key=lambda m: swc[m]["accuracy"]["1"])
    return {
        "head": best_head, "head_1km": heads[best_head]["accuracy"]["1"],
        "swc": best_swc, "swc_1km": swc[best_swc]["accuracy"]["1"],
        "heads_750km": {m: r["accuracy"]["750"] for m, r in heads.items()},
        "heads_2500km": {m: r["accuracy"]["2500"] for m, r in heads.items()},
    }


def _rewrite_report(eval_dir: Path, model_dir: Path, truth_csv: Path, commands: List[str], title: str) -> Dict:
    """The evaluation report again, with every command of the run (not only ``evaluate``) as provenance."""
    import pandas as pd

    from geoswc.config import Config
    from geoswc.eval import load_benchmark
    from geoswc.eval.report import read_results_json, write_report
    from geoswc.geocells import Geocells

    results = read_results_json(eval_dir / "results.json")
    predictions = {mode: pd.read_csv(eval_dir / f"predictions_{mode}.csv") for mode in results}
    return write_report(eval_dir, results, predictions=predictions, truth=load_benchmark(truth_csv),
                        geocells=Geocells.load(model_dir / "cells"), commands=commands,
                        config=Config.load(model_dir / "config.yaml").to_dict(), title=title)


def run_demo(args: argparse.Namespace) -> int:
    """``geoswc demo``: synthetic world -> ``fit --preset tiny`` -> ``evaluate`` -> ``tag``, then a summary."""
    from geoswc.eval import format_table
    from geoswc.eval.report import read_results_json

    out = Path(args.out)
    world, model_dir, eval_dir = out / "world", out / "model", out / "eval"
    photos, tags = out / "photos", out / "tags.csv"
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    sets = list(DEMO_SETTINGS) + list(args.set or [])

    print(f"[demo 1/4] synthetic world: {args.train} training and {args.test} test photos -> {world}")
    t = time.perf_counter()
    if not _make_world(world, n_train=args.train, n_test=args.test, seed=args.seed):
        print("  already there, reused")
    timings["world"] = time.perf_counter() - t

    print(f"[demo 2/4] geoswc fit --preset tiny -> {model_dir}")
    t = time.perf_counter()
    cfg = resolve_fit_config("tiny", None, sets)
    run = FitRun(train_csv=world / "train.csv", images=world / "images", model_dir=model_dir, config=cfg,
                 cpu=args.cpu, echo=lambda message: print("  " + message))
    run_pipeline(run)
    timings["fit"] = time.perf_counter() - t

    print(f"[demo 3/4] geoswc evaluate on the {args.test} test photos -> {eval_dir}")
    t = time.perf_counter()
    evaluate_argv = ["evaluate", "--model", str(model_dir), "--meta", str(world / "test.csv"),
                     "--images", str(world / "images"), "-o", str(eval_dir), "--workers", "0"]
    _call(evaluate_argv + (["--device", "cpu"] if args.cpu else []))
    timings["evaluate"] = time.perf_counter() - t

    print(f"[demo 4/4] geoswc tag on a folder of {DEMO_TAG_PHOTOS} test photos -> {tags}")
    t = time.perf_counter()
    _copy_photos(world, photos, DEMO_TAG_PHOTOS)
    tag_argv = ["tag", str(photos), "--model", str(model_dir), "-o", str(tags), "--overwrite", "--workers", "0"]
    _call(tag_argv)
    timings["tag"] = time.perf_counter() - t

    set_flags = "".join(f" --set {s}" for s in sets)
    user_flags = "".join(f" --set {s}" for s in args.set or [])
    commands = [
        f"geoswc demo -o {out}" + (f" --train {args.train} --test {args.test} --seed {args.seed}"
                                   if (args.train, args.test, args.seed) != (DEMO_TRAIN, DEMO_TEST, 0) else "")
        + user_flags,
        "# which runs the equivalent of:",
        f"geoswc data synth {world} --train {args.train} --test {args.test} --seed {args.seed}",
        f"geoswc fit {world / 'train.csv'} --images {world / 'images'} -o {model_dir} --preset tiny{set_flags}",
        "geoswc " + " ".join(evaluate_argv[:-2]),
        "geoswc " + " ".join(tag_argv[:-2]),
    ]
    written = _rewrite_report(eval_dir, model_dir, world / "test.csv", commands,
                              title=f"geoswc demo: synthetic world, {args.test} test photos")
    results = read_results_json(eval_dir / "results.json")
    effect = paper_effect(results)
    total = time.perf_counter() - started

    print()
    print(f"Table 1 on the synthetic test split ({args.test} photos; accuracy in % within each distance):")
    print(format_table({mode: results[mode] for mode in results}))
    print()
    margin = effect["swc_1km"] - effect["head_1km"]
    print(f"Search within Cell ({effect['swc']}) places {effect['swc_1km']:.1f}% of the photos within 1 km, "
          f"the best head alone ({effect['head']}) {effect['head_1km']:.1f}% ({margin:+.1f} points); "
          "the heads place " + ", ".join(f"{m} {v:.1f}%" for m, v in effect["heads_2500km"].items())
          + " within 2500 km.")
    print()
    print(f"model folder:  {model_dir}  (Geolocator.from_pretrained; stages and logs in {run.work})")
    print(f"report:        {written['markdown']}")
    print(f"               {written['html']}  (self-contained, opens offline)")
    print(f"predictions:   {eval_dir}/predictions_<mode>.csv, {eval_dir / 'results.json'}")
    print(f"tags:          {tags}  ({DEMO_TAG_PHOTOS} photos from {photos})")
    print("time:          " + ", ".join(f"{k} {_duration(v)}" for k, v in timings.items())
          + f"; total {_duration(total)}")
    (out / "demo.json").write_text(json.dumps({"effect": effect, "timings": timings, "total_s": total,
                                               "commands": commands}, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- CLI
def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_csv", type=Path, nargs="?", metavar="TRAIN.csv",
                        help="training metadata CSV (IMG_ID,AUTHOR,LAT,LON; MP16 format), with --images")
    parser.add_argument("--images", type=Path, help="image root the IMG_IDs of TRAIN.csv are relative to")
    parser.add_argument("--shards", metavar="DIR_OR_PATTERN",
                        help="instead of TRAIN.csv and --images: webdataset shards of the training photos "
                             "(geoswc data shards, with or without --cells), a folder, a brace pattern or a "
                             "quoted glob ('shards/*.tar')")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="model folder; intermediate results go to OUT/work/<stage>/")
    parser.add_argument("--preset", default="paper", help="configuration preset: paper (default) or tiny")
    parser.add_argument("--config", help="YAML/JSON configuration file applied after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set backbone.epochs=10 (repeatable)")
    parser.add_argument("--exclude", type=Path, nargs="+", default=[], metavar="BENCH.csv",
                        help="drop training photos whose author or photo id appears in these benchmark CSVs "
                             "(with --shards, which cannot drop photos: stop if the shards hold any)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"run only these stages (the earlier ones must be complete): {', '.join(STAGES)}")
    parser.add_argument("--val-csv", type=Path, help="validation metadata: backbone accuracy after every epoch")
    parser.add_argument("--val-images", type=Path, help="image root of --val-csv (default: --images)")
    parser.add_argument("--val-shards", metavar="DIR_OR_PATTERN",
                        help="validation shards instead of --val-csv: backbone accuracy after every epoch")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")


def run_fit(args: argparse.Namespace) -> int:
    """``geoswc fit``: the whole pipeline, printing one line per stage and a closing summary."""
    cfg = resolve_fit_config(args.preset, args.config, args.set)
    main_process = _process_state(args.cpu).is_main_process
    run = FitRun(train_csv=args.train_csv, images=args.images, shards=args.shards, model_dir=args.out, config=cfg,
                 exclude=tuple(args.exclude), cpu=args.cpu, val_csv=args.val_csv, val_images=args.val_images,
                 val_shards=args.val_shards, echo=print if main_process else (lambda message: None))
    started = time.perf_counter()
    run_pipeline(run, args.stages)
    if main_process:
        print(f"fit finished in {_duration(time.perf_counter() - started)}: model folder {args.out} "
              f"(stages under {run.work})")
    return 0


def register(subparsers) -> None:
    fit = subparsers.add_parser("fit", help="train the whole pipeline from a CSV or shards to a model folder",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(fit)
    fit.set_defaults(func=run_fit)

    demo = subparsers.add_parser(
        "demo", help="synthetic world -> fit (tiny preset) -> evaluate -> tag, in minutes on a CPU",
        description="Write a synthetic world in the MP16 format, train the whole pipeline on it with the tiny "
        "preset, evaluate every Table 1 mode on its test photos (report.md/report.html) and geotag a folder "
        "of its photos. A rerun reuses what is already done.")
    demo.add_argument("-o", "--out", type=Path, default=Path("geoswc-demo"), help="output folder (default: geoswc-demo)")
    demo.add_argument("--train", type=int, default=DEMO_TRAIN, help=f"training photos (default {DEMO_TRAIN})")
    demo.add_argument("--test", type=int, default=DEMO_TEST, help=f"test photos (default {DEMO_TEST})")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic world (default 0)")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one setting of the tiny preset (repeatable)")
    demo.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    demo.set_defaults(func=run_demo)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``accelerate launch -m geoswc.fit TRAIN.csv --images ROOT -o MODEL_DIR ...`` (or ``--shards SHARDS``)."""
    parser = argparse.ArgumentParser(prog="geoswc.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_fit_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "fit"
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_fit(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"geoswc fit: error: {err}", file=sys.stderr)
        return 2
    finally:
        from geoswc.cli import close_process_group

        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
