"""Whole-pipeline training (`fit_model`, ``geoswc fit``).

``geoswc fit TRAIN.csv --images ROOT -o MODEL_DIR`` (photo files) or ``geoswc fit --shards SHARDS -o MODEL_DIR``
(webdataset shards of ``geoswc data shards``, e.g. MP16 from GeoEstimation's msgpack files) runs every stage of
the ICMR 2021 system (sections 3 and 4.2) in order, each in its own folder under ``MODEL_DIR/work/``:

    data       the training metadata, minus the photos of benchmark authors (``--exclude``, paper 4.2); from
               shards, the coordinates of their samples (JSON members only), refused if a benchmark leaks in
    cells      three S2 granularities built from the training photos (paper 3.1)
    backbone   EfficientNet + CE over the finest cells, end to end (`geoswc.train.train_backbone`)
    features   pooled backbone features of the training photos (`geoswc.train.extract_features`)
    heads      CE, HC and MvMF heads on the frozen backbone (`geoswc.train.train_heads`)
    retrieval  the residual retrieval module (`geoswc.train.train_retrieval`)
    index      the placeable background index (`geoswc.train.build_index`)
    model      the model folder ``Geolocator.from_pretrained`` loads, written to ``MODEL_DIR``

A stage writes ``stage.json`` last, holding a key computed from the configuration sections it reads, its
inputs and the markers of the stages before it. A stage whose marker holds the current key is skipped, so a
failed run resumes where it stopped; a changed setting changes the key of its stage and of every later one,
which then run again. ``--stages`` runs a subset (the stages before it must be complete).

From shards, the backbone and feature stages read the shards and label every sample from its coordinates
with the cells built here (``--relabel``): labels stored in shards written for another partition are ignored.

Started with ``accelerate launch -m geoswc fit ...`` the training stages run on every process; the others run
on the main process while the rest wait at a barrier.

A variant goes to its own folder: ``--from RUN`` (``reuse``) links every stage of the run in ``RUN`` whose key
equals the one this run needs (same data, same settings of the sections it reads, same stages before it) into
``MODEL_DIR/work/`` instead of running it again; a variant of the retrieval ablations (``--set
retrieval.loss=triplet``) runs only its retrieval, index and model stages. A linked stage is a symbolic link to
``RUN``'s folder, so ``RUN`` must stay where it is; one that has to run again replaces the link.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import pandas as pd
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from geoswc.assemble import assemble_model, describe, record_precision
from geoswc.classifiers.aggregation import RETRIEVAL_POOL_FILE
from geoswc.classifiers.backbone import check_pretrained_available
from geoswc.config import Config, resolve_config
from geoswc.data.files import write_text_atomic
from geoswc.data.images import image_path
from geoswc.data.metadata import Exclusions, read_metadata
from geoswc.data.shards import read_shard_metadata
from geoswc.data.validation import check_choice
from geoswc.geocells import Geocells, S2Partitioner
from geoswc.train import Photos, build_index, extract_features, train_backbone, train_heads, train_retrieval
from geoswc.train.accelerator import use_cpu
from geoswc.train.features import RETRIEVAL_CACHE
from geoswc.train.sources import shard_files

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
    "heads": ("data", "heads", "train"),
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
    reuse: Optional[Path] = None
    echo: Callable[[str], None] = logger.info
    precision_check: bool = True
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
            raise ValueError(
                "give the training photos either as TRAIN.csv with --images or as --shards "
                f"DIR_OR_PATTERN ({'both' if self.shards is not None else 'neither'} given)"
            )
        if self.shards is not None:
            if self.images is not None:
                raise ValueError(
                    "--images goes with TRAIN.csv; with --shards the photos are read from the shards "
                    "(a --val-csv's image root is --val-images)"
                )
            shard_files(self.shards, "--shards")
        else:
            if self.images is None:
                raise ValueError(
                    f"{self.train_csv} needs --images (the image root its IMG_IDs are relative to)"
                )
            if not self.train_csv.is_file():
                raise FileNotFoundError(f"training metadata not found: {self.train_csv}")
            if not self.images.is_dir():
                raise FileNotFoundError(f"image folder not found: {self.images}")
        if self.val_csv is not None and self.val_shards is not None:
            raise ValueError("give validation photos either as --val-csv or as --val-shards, not both")
        if self.val_csv is not None and (self.val_images or self.images) is None:
            raise ValueError("--val-csv needs --val-images (the image root of its IMG_IDs)")
        if self.val_shards is not None:
            shard_files(self.val_shards, "--val-shards")
        for path in self.exclude:
            if not path.is_file():
                raise FileNotFoundError(f"--exclude file not found: {path}")
        if self.reuse is not None:
            if not (self.reuse / "work").is_dir():
                raise FileNotFoundError(f"--from {self.reuse}: not a geoswc fit folder (no work/ in it)")
            if self.reuse.resolve() == self.model_dir.resolve():
                raise ValueError(f"--from {self.reuse} is the output folder itself; give the run to reuse")


def _shard_identity(pattern: str) -> Dict[str, Any]:
    """What identifies a shard set without reading it: every shard's resolved path and size, and the digest of
    the ``summary.json`` beside them (``geoswc data shards`` records counts, skips and settings there). The
    pattern itself is left out, so ``shards/`` and ``shards/*.tar`` naming the same files are the same input."""
    urls = shard_files(pattern, "shards")
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
        bc = run.config.backbone
        if stage == "features" and bc.pool != "avg":
            # The retrieval descriptors' layer (the section is the backbone stage's, see `_stage_config`).
            inputs["retrieval_pool"] = {
                "pool": bc.pool,
                **({"clusters": bc.clusters} if bc.pool == "netvlad" else {}),
            }
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
    payload = {
        "stage": stage,
        "config": _stage_config(run, stage),
        "inputs": _stage_inputs(run, stage),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stage_config(run: FitRun, stage: str) -> Dict[str, Any]:
    """The configuration sections a stage's key covers. The backbone stage does not read ``backbone.pool`` or
    ``backbone.clusters`` (only the features stage does, through its inputs): they are left out of its key, so
    a variant with another pool reuses the trained backbone (``--from``)."""
    config = run.config.to_dict()
    sections = {section: dict(config[section]) for section in STAGE_SECTIONS[stage]}
    if "backbone" in sections:
        sections["backbone"]["pool"] = "avg"  # the key an avg run has always had
        sections["backbone"].pop("clusters", None)
    return sections


def stage_is_current(run: FitRun, stage: str) -> bool:
    marker = read_marker(run.stage_dir(stage))
    if marker is None:
        return False
    try:
        return marker.get("key") == stage_key(run, stage)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- stages
def _cells(run: FitRun) -> Geocells:
    return Geocells.load(run.stage_dir("cells"))


def _photos(run: FitRun) -> Photos:
    """Where a training stage reads the training photos: the shards, labelled with this run's cells from each
    sample's coordinates (``relabel``), or the data stage's CSV under ``images``."""
    if run.shards is not None:
        return Photos.from_shards(run.shards, relabel=True)
    return Photos.from_csv(run.stage_dir("data") / "train.csv", run.images)


def _val_photos(run: FitRun) -> Optional[Photos]:
    if run.val_shards is not None:
        return Photos.from_shards(run.val_shards, relabel=True)
    if run.val_csv is not None:
        return Photos.from_csv(run.val_csv, run.val_images or run.images)
    return None


def _stage_data(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """Validated training metadata without the photos of benchmark authors or the benchmark photos themselves."""
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
    run.echo(
        f"  {n_read} photos read, {by_author} dropped by author and {by_id} by photo id (--exclude), "
        f"{len(frame)} kept"
    )
    return {"photos": len(frame), "excluded_by_author": by_author, "excluded_by_id": by_id}


def _shard_data(run: FitRun, out: Path) -> Dict[str, Any]:
    """The coordinates of the shards' samples (their JSON members; images are not read), for the cells.

    Photos cannot be dropped from shards here, so ``--exclude`` checks instead: a benchmark author or photo in
    the shards stops the run, pointing at ``geoswc data shards --exclude``.
    """
    urls = shard_files(run.shards, "--shards")
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
    run.echo(
        f"  {len(frame)} photos in {len(urls)} shards"
        + (", none by a benchmark author or of a benchmark (--exclude)" if run.exclude else "")
    )
    return {"photos": len(frame), "shards": len(urls), "excluded_by_author": 0, "excluded_by_id": 0}


def _stage_cells(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """S2 cells at every granularity of ``cells.max_images`` from the training photos (paper 3.1)."""
    frame = pd.read_csv(run.stage_dir("data") / "train.csv")
    c = run.config.cells
    geocells = S2Partitioner(
        min_images=c.min_images,
        max_images=tuple(c.max_images),
        start_level=c.start_level,
        target_cells=c.target_cells,
    ).fit(frame["LAT"].to_numpy(), frame["LON"].to_numpy())
    geocells = geocells.geocells_
    geocells.save(out)
    sizes = {p.name: len(p) for p in geocells.partitions}
    run.echo("  " + ", ".join(f"{name}: {n} cells" for name, n in sizes.items()))
    return {"cells": sizes, "fingerprint": str(geocells.fingerprint)}


def _stage_backbone(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    return train_backbone(
        run.config,
        cells=_cells(run),
        photos=_photos(run),
        out=out,
        val=_val_photos(run),
        cpu=run.cpu,
        resume=resume,
    ).last_epochs()


def _stage_features(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    # Resumable by part whatever ``resume`` says: parts of another run are recognised and discarded.
    return extract_features(
        run.config,
        cells=_cells(run),
        photos=_photos(run),
        out=out,
        backbone=run.stage_dir("backbone"),
        cpu=run.cpu,
    ).last_epochs()


def _stage_heads(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """The heads on the frozen backbone: from the feature cache, or (``heads.from_features: false``, the paper)
    on the training photos with the backbone's augmentation."""
    on_images = not run.config.heads.from_features
    return train_heads(
        run.config,
        cells=_cells(run),
        out=out,
        features=run.stage_dir("features"),
        backbone=run.stage_dir("backbone"),
        train_ce=True,
        photos=_photos(run) if on_images else None,
        val=_val_photos(run) if on_images else None,
        cpu=run.cpu,
        resume=resume,
    ).last_epochs()


def _retrieval_features(run: FitRun) -> Optional[Path]:
    """The cache of the ``backbone.pool`` descriptors (`geoswc.train.features`), None with average pooling."""
    return run.stage_dir("features") / RETRIEVAL_CACHE if run.config.backbone.pool != "avg" else None


def _stage_retrieval(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    features = _retrieval_features(run) or run.stage_dir("features")
    return train_retrieval(
        run.config, cells=_cells(run), features=features, out=out, cpu=run.cpu, resume=resume
    ).last_epochs()


def _stage_index(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """The placeable background (paper 3.3.3): training photos whose top-1 cell is right, embedded."""
    head = run.config.retrieval.placeable_head
    head_path = run.stage_dir("heads") / "heads" / f"{head}.safetensors"
    if not head_path.is_file():
        trained = sorted(p.stem for p in (run.stage_dir("heads") / "heads").glob("*.safetensors"))
        raise ValueError(
            f"retrieval.placeable_head is {head!r} but the heads stage trained: {', '.join(trained)}"
        )
    result = build_index(
        run.config,
        cells=_cells(run),
        features=run.stage_dir("features"),
        head=head_path,
        retrieval=run.stage_dir("retrieval") / "retrieval.safetensors",
        out=out,
        exclude=run.exclude,
        device="cpu" if run.cpu else None,
        embed_features=_retrieval_features(run),
    )
    report = result.summary
    run.echo(
        f"  {report['kept']} of {report['total']} training photos are placeable background "
        f"({report['wrong_cell']} in a wrong top-1 cell)"
    )
    return result.last_epochs()


def _stage_model(run: FitRun, out: Path, resume: bool) -> Dict[str, Any]:
    """Compose the trained parts into the model folder ``Geolocator.from_pretrained`` loads
    (`geoswc.assemble.assemble_model`, as ``geoswc assemble``)."""
    pooled = _retrieval_features(run)
    summary = assemble_model(
        run.model_dir,
        cells=_cells(run),
        backbone=run.stage_dir("backbone"),
        heads=run.stage_dir("heads") / "heads",
        retrieval=run.stage_dir("retrieval") / "retrieval.safetensors",
        index=run.stage_dir("index"),
        config=run.config,
        retrieval_pool=None if pooled is None else pooled / RETRIEVAL_POOL_FILE,
    )
    run.echo("  " + describe(summary))
    if run.precision_check:
        record_precision(run.model_dir, _background_photos(run), echo=run.echo, strict=False)
    return summary


def _background_photos(run: FitRun) -> list:
    """The background photos of the index as files under ``images`` (none for shards: their photos are not
    files), for the agreement record of reduced precisions."""
    ids = run.stage_dir("index") / "ids.txt"
    if run.images is None or not ids.is_file():
        if run.shards is not None:
            run.echo("  the background photos are in shards, not files: int8/bf16 are not measured here")
        return []
    return [str(image_path(run.images, i)) for i in ids.read_text().splitlines() if i]


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
def process_state(cpu: bool):
    return PartialState(cpu=use_cpu(cpu))


def _broadcast(state, value: Any) -> Any:
    """``value`` as the main process sees it, on every process."""
    if state.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


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
        check_choice("stage", name, STAGES)
    wanted = [s for s in STAGES if s in wanted]
    run.check_inputs()
    _check_backbone_weights(run, wanted)

    state = process_state(run.cpu)
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
            if state.is_main_process and plan.get("reused"):
                run.echo(f"{label}: reused, linked to {out.resolve()}")
            elif state.is_main_process:
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
            marker = {
                "stage": stage,
                "key": plan["key"],
                "finished": time.time(),
                "seconds": round(seconds, 2),
                "config": {s: run.config.to_dict()[s] for s in STAGE_SECTIONS[stage]},
                "inputs": _stage_inputs(run, stage),
                "details": details,
                "num_processes": state.num_processes,
            }
            write_text_atomic(out / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
            (out / ATTEMPT).unlink(missing_ok=True)
            run.echo(f"{label}: done in {duration(seconds)}")
        state.wait_for_everyone()
        markers[stage] = read_marker(out)
    return markers


def _check_backbone_weights(run: FitRun, wanted: Sequence[str]) -> None:
    """Before any stage runs: a backbone stage that will start from timm's pretrained weights fails now, in
    seconds and naming them, when they are neither cached nor downloadable (`check_pretrained_available`)."""
    bc = run.config.backbone
    if "backbone" not in wanted or not bc.pretrained or bc.weights is not None:
        return
    if stage_is_current(run, "backbone"):
        return
    check_pretrained_available(bc.model)


def _plan_stage(run: FitRun, stage: str) -> Dict[str, Any]:
    """Decide on the main process: skip (current), resume (same key as an unfinished attempt) or start afresh."""
    out = run.stage_dir(stage)
    key = stage_key(run, stage)
    marker = read_marker(out)
    if marker is not None and marker.get("key") == key:
        return {"skip": True, "resume": False, "key": key}
    if _reuse_stage(run, stage, key):
        return {"skip": True, "resume": False, "key": key, "reused": True}
    if out.is_symlink():
        out.unlink()  # a stage linked from another run, which this run must now make itself
    attempt = out / ATTEMPT
    resume = marker is None and attempt.is_file() and json.loads(attempt.read_text()).get("key") == key
    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    attempt.write_text(json.dumps({"key": key, "started": time.time()}) + "\n")
    return {"skip": False, "resume": resume, "key": key}


def _reuse_stage(run: FitRun, stage: str, key: str) -> bool:
    """Link ``stage`` to the same stage of ``run.reuse`` when that one finished with ``key``; True if linked.

    The model stage is never linked: it writes the model folder itself.
    """
    if run.reuse is None or stage == "model":
        return False
    source = (run.reuse / "work" / stage).resolve()
    marker = read_marker(source)
    out = run.stage_dir(stage)
    if marker is None or marker.get("key") != key or source == out.resolve():
        return False
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(source, target_is_directory=True)
    return True


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def fit_model(
    train_csv: Optional[Union[str, Path]] = None,
    *,
    images: Optional[Union[str, Path]] = None,
    out: Union[str, Path],
    preset: str = "paper",
    overrides: Sequence[str] = (),
    exclude: Sequence[Union[str, Path]] = (),
    shards: Optional[str] = None,
    config_file: Optional[Union[str, Path]] = None,
    stages: Optional[Sequence[str]] = None,
    val_csv: Optional[Union[str, Path]] = None,
    val_images: Optional[Union[str, Path]] = None,
    val_shards: Optional[str] = None,
    cpu: bool = False,
    reuse: Optional[Union[str, Path]] = None,
    echo: Callable[[str], None] = logger.info,
    precision_check: bool = True,
) -> Path:
    """Train every stage of the pipeline into a model folder (``geoswc fit``); resumable.

    Args:
        train_csv: training metadata (``IMG_ID, AUTHOR, LAT, LON``; MP16 format), with ``images``.
        images: the folder the IMG_IDs of ``train_csv`` are relative to.
        out: the model folder; each stage works in ``out/work/<stage>/``.
        preset: configuration preset, ``paper`` or ``tiny``.
        overrides: ``section.key=value`` settings (as ``--set``).
        exclude: benchmark CSVs whose authors and photo ids are dropped from training (paper 4.2).
        shards: instead of ``train_csv`` and ``images``: webdataset shards (folder, brace or glob pattern).
        config_file: a YAML/JSON configuration applied after the preset, before ``overrides``.
        stages: run only these stages (the earlier ones must be complete).
        val_csv, val_images, val_shards: validation photos (backbone accuracy after every epoch).
        cpu: run on CPU even when a GPU is there.
        reuse: an earlier ``fit`` folder whose finished stages this run links instead of running them again,
            when their keys match (``--from``; a variant in its own folder).
        echo: where the one-line progress reports go.
        precision_check: measure whether int8/bf16 agree with float32 on background photos and record it in
            the model folder (`geoswc.engines.agreement`; not for shards, whose photos are not files).

    Returns:
        The model folder (`geoswc.Geolocator.from_pretrained` loads it).
    """
    config = resolve_config(preset, config_file, list(overrides))
    run = FitRun(
        model_dir=Path(out),
        config=config,
        train_csv=None if train_csv is None else Path(train_csv),
        images=None if images is None else Path(images),
        shards=shards,
        exclude=tuple(Path(p) for p in exclude),
        cpu=cpu,
        val_csv=None if val_csv is None else Path(val_csv),
        val_images=None if val_images is None else Path(val_images),
        val_shards=val_shards,
        reuse=None if reuse is None else Path(reuse),
        echo=echo,
        precision_check=precision_check,
    )
    run_pipeline(run, stages)
    return run.model_dir
