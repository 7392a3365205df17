"""The classification module's training stages (ICMR 2021 sections 3.2 and 4.2).

- `train_backbone`: EfficientNet + a CE layer over the finest partition (the PlaNet-rule partition when the
  cells hold one, paper 4.1), end to end on images (SGD lr 0.01, momentum 0.9, x0.5 every 5 epochs).
- `train_heads`: CE, HC and MvMF heads on the frozen backbone, from cached features or on augmented images
  (``heads.from_features``; AdamW 1e-5, cosine, 5 epochs); the MvMF mixture layer starts from the trained CE
  layer. Each head uses the partitions `geoswc.classifiers.default_partitions` gives it: CE and MvMF the
  PlaNet-rule partition and HC the GeoEstimation ones when both kinds are there.

Batch sizes are per process (``accelerate launch`` with N processes trains on N x batch_size photos a step).

Both run through `geoswc.train.engine.train_loop`, on one process or under ``accelerate launch`` on N.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from torch import nn

from geoswc.classifiers import (
    HEADS,
    CellClassifier,
    create_backbone,
    create_head,
    default_partitions,
    load_backbone,
    load_head,
    save_backbone,
    save_head,
)
from geoswc.config import Config
from geoswc.data.features import FeatureCache
from geoswc.data.validation import check_choice
from geoswc.train.common import PathLike, StageResult, finish_stage, start_stage, unwrapped
from geoswc.train.engine import prepare_for_speed, train_loop
from geoswc.train.optim import optimizer_and_schedule
from geoswc.train.sources import Batches, Photos, Source, epoch_batches, head_of, open_photos, validate

logger = logging.getLogger(__name__)


def _train_classifier(
    accelerator: Accelerator,
    model: nn.Module,
    section: Any,
    *,
    params: Optional[Sequence[nn.Parameter]] = None,
    train: Source,
    val: Optional[Source],
    seed: int,
    out: Path,
    name: str,
    resume: bool,
    max_steps: Optional[int],
    checkpoint_every: int,
    meta: Dict[str, Any],
) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """`train_loop` with the loss of the model's own head and the optimiser and schedule of ``section``
    (``config.backbone`` or ``config.heads``) over ``params`` (default: all of the model's): the prepared
    model and the loop's summary."""
    batch_size, epochs = section.batch_size, section.epochs
    steps = epochs * max(1, len(train) // (batch_size * accelerator.num_processes))
    optimizer, scheduler, schedule_per = optimizer_and_schedule(
        model if params is None else params, section, total_updates=steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    head = head_of(accelerator, model)

    def loss(batch):
        _, inputs, labels, latlon = batch
        with accelerator.autocast():
            outputs = model(inputs)
        return head.loss(outputs, labels, latlon), len(labels)

    return model, train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        name=name,
        out_dir=out,
        epochs=epochs,
        batches=epoch_batches(train, accelerator, batch_size=batch_size, seed=seed),
        loss=loss,
        schedule_per=schedule_per,
        validate=(lambda: validate(accelerator, model, val, batch_size)) if val is not None else None,
        resume=resume,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        meta=meta,
    )


def train_backbone(
    config: Config,
    *,
    cells: Any,
    photos: Photos,
    out: PathLike,
    val: Optional[Photos] = None,
    weights: Optional[str] = None,
    cpu: bool = False,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    log_with: Sequence[str] = (),
) -> StageResult:
    """Stage 1: the backbone with a CE layer over the finest partition, end to end on images (paper 4.2).

    Args:
        config: the resolved configuration (``backbone``, ``data``, ``train`` sections).
        cells: the `Geocells` the labels come from.
        photos: the training photos.
        out: the stage folder: ``backbone.safetensors``/``backbone.json``, ``heads/ce.safetensors``,
            ``cells/``, ``config.yaml``, checkpoints and history.
        val: validation photos: accuracy at 1/25/200/750/2500 km after every epoch.
        weights: local ImageNet weights to start from (default ``backbone.weights``).
        cpu: run on CPU even when a GPU is there.
        resume: continue from the last checkpoint in ``out``.
        max_steps: stop with a checkpoint after this many optimizer steps.
        checkpoint_every: also checkpoint every this many steps.
        log_with: metric trackers (``tensorboard``, ``csv``).
    """
    out = Path(out)
    accelerator = start_stage(config, out, stage="backbone", cpu=cpu, log_with=log_with)
    bc = config.backbone
    weights = weights or bc.weights
    backbone = create_backbone(bc.model, pretrained=bc.pretrained and weights is None, weights=weights)
    # The paper's backbone learns the ~32K-cell PlaNet partition when the cells hold one (section 4.1).
    ce = create_head(
        "ce",
        in_features=backbone.num_features,
        geocells=cells,
        partitions=default_partitions("backbone", cells),
    )
    model = CellClassifier(backbone, ce)
    train = open_photos(photos, cells, backbone, config, train=True)
    val_source = open_photos(val, cells, backbone, config, train=False) if val is not None else None
    model = prepare_for_speed(model, config.train, accelerator)
    model, summary = _train_classifier(
        accelerator,
        model,
        bc,
        train=train,
        val=val_source,
        seed=config.train.seed,
        out=out,
        name="backbone",
        resume=resume,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        meta={"fingerprint": cells.fingerprint, "model": bc.model},
    )
    if summary is None:
        return StageResult("backbone", out, complete=False)
    accelerator.wait_for_everyone()
    files = {"backbone": out, "ce": out / "heads" / "ce.safetensors", "cells": out / "cells"}
    if accelerator.is_main_process:
        trained = unwrapped(accelerator, model)
        save_backbone(trained.backbone, out, name=bc.model, fingerprint=str(cells.fingerprint), config=config)
        save_head(trained.head, files["ce"], config=config)
        cells.save(files["cells"])
    accelerator.wait_for_everyone()
    finish_stage(accelerator, out, "backbone", summary)
    return StageResult("backbone", out, files, summary)


def _head_kinds(kinds: Optional[Sequence[str]], config: Config) -> list:
    kinds = list(kinds or config.heads.kinds)
    for kind in kinds:
        check_choice("head", kind, HEADS)
    if "mvmf" in kinds and "ce" in kinds:
        kinds = ["ce"] + [k for k in kinds if k != "ce"]  # the MvMF layer starts from the trained CE layer
    return kinds


def _head_inputs(
    config: Config,
    cells: Any,
    on_images: bool,
    *,
    backbone_dir: Optional[Path],
    photos: Optional[Photos],
    val: Optional[Photos],
    features: Optional[PathLike],
    val_features: Optional[PathLike],
) -> Tuple[Optional[nn.Module], Source, Optional[Source], int]:
    """``(frozen backbone or None, training source, validation source or None, feature width)``: augmented
    images through the backbone of ``backbone_dir``, or the feature caches."""
    if on_images:
        frozen, _ = load_backbone(backbone_dir)
        train = open_photos(photos, cells, frozen, config, train=True)
        val_source = open_photos(val, cells, frozen, config, train=False) if val is not None else None
        return frozen, train, val_source, int(frozen.num_features)
    cache = FeatureCache(features).check(cells)
    val_source = Batches(FeatureCache(val_features).check(cells)) if val_features is not None else None
    return None, Batches(cache), val_source, cache.dim


def _reuse_ce(
    accelerator: Accelerator,
    config: Config,
    cells: Any,
    reuse: Path,
    file: Path,
    *,
    frozen: Optional[nn.Module],
    val: Optional[Source],
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The backbone stage's CE layer as the ``ce`` head, copied to ``file`` (and validated): the head and its
    summary."""
    ce_head = load_head(reuse, geocells=cells)
    if accelerator.is_main_process:
        save_head(ce_head, file, config=config)
    summary: Dict[str, Any] = {"reused": str(reuse)}
    if val is not None:
        model = ce_head if frozen is None else CellClassifier(frozen, ce_head, freeze_backbone=True)
        summary["val"] = validate(accelerator, model.to(accelerator.device), val, config.heads.batch_size)
    return ce_head, summary


def _head_model(
    accelerator: Accelerator,
    config: Config,
    cells: Any,
    kind: str,
    in_features: int,
    *,
    reuse: Optional[Path],
    ce_head: Optional[nn.Module],
    frozen: Optional[nn.Module],
) -> nn.Module:
    """A new head of ``kind`` to train (the backbone stage's CE layer for ``ce``, to fine-tune; MvMF started
    from the trained CE layer), on the frozen backbone when training on images."""
    head = create_head(
        kind, in_features=in_features, geocells=cells, partitions=default_partitions(kind, cells)
    )
    if kind == "ce" and reuse is not None and reuse.is_file():
        head = load_head(reuse, geocells=cells)  # fine-tune the backbone's CE layer
    if kind == "mvmf" and ce_head is not None:
        head.init_from_classifier(ce_head)
    if frozen is None:
        return head.to(accelerator.device)
    return prepare_for_speed(CellClassifier(frozen, head, freeze_backbone=True), config.train, accelerator)


def _unchanged(accelerator: Accelerator, frozen: nn.Module, start_state: Dict[str, torch.Tensor]) -> bool:
    """Whether the frozen backbone ends as it started: the paper keeps it fixed while the heads train, weights
    and BatchNorm statistics alike."""
    end_state = unwrapped(accelerator, frozen).state_dict()
    unchanged = all(
        torch.equal(value, end_state[key].detach().to(value.device)) for key, value in start_state.items()
    )
    if not unchanged:
        logger.error("heads: the frozen backbone changed while the heads trained")
    return unchanged


def train_heads(
    config: Config,
    *,
    cells: Any,
    out: PathLike,
    features: Optional[PathLike] = None,
    val_features: Optional[PathLike] = None,
    kinds: Optional[Sequence[str]] = None,
    backbone: Optional[PathLike] = None,
    train_ce: bool = False,
    photos: Optional[Photos] = None,
    val: Optional[Photos] = None,
    cpu: bool = False,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    log_with: Sequence[str] = (),
) -> StageResult:
    """Stage 3: heads on the frozen backbone (paper 4.2: AdamW, cosine, 5 epochs), MvMF initialised from CE.

    By default (``heads.from_features``) the heads train on a feature cache; with ``photos`` (or
    ``heads.from_features: false``) they train end to end on augmented images through the frozen ``backbone``.

    Args:
        config: the resolved configuration (``heads``, ``train`` sections; ``data`` on images).
        cells: the `Geocells` the labels come from.
        out: the stage folder: ``heads/<kind>.safetensors``, ``cells/``, ``config.yaml``, history.
        features: the training photos' feature cache.
        val_features: a validation feature cache: accuracy after every epoch.
        kinds: heads to train (default ``heads.kinds``).
        backbone: a backbone stage folder; its CE layer is the ``ce`` head (copied, or fine-tuned with
            ``train_ce``), and on images its backbone is the frozen feature extractor.
        photos, val: training and validation photos, to train on images.
        cpu, resume, max_steps, checkpoint_every, log_with: as `train_backbone`.
    """
    out = Path(out)
    backbone_dir = Path(backbone) if backbone is not None else None
    kinds = _head_kinds(kinds, config)
    hc = config.heads
    on_images = photos is not None or not hc.from_features
    if not on_images and features is None:
        raise ValueError(
            "heads from cached features need a feature cache (or the training photos, to train on images)"
        )
    if on_images and (backbone_dir is None or photos is None):
        raise ValueError("heads on images need a backbone stage folder and the training photos")
    accelerator = start_stage(config, out, stage="heads", cpu=cpu, log_with=log_with)
    frozen, train, val_source, in_features = _head_inputs(
        config,
        cells,
        on_images,
        backbone_dir=backbone_dir,
        photos=photos,
        val=val,
        features=features,
        val_features=val_features,
    )
    if frozen is not None:
        start_state = {k: v.detach().clone() for k, v in frozen.state_dict().items()}
    reuse = backbone_dir / "heads" / "ce.safetensors" if backbone_dir is not None else None
    summaries: Dict[str, Any] = {}
    files: Dict[str, Path] = {"cells": out / "cells"}
    ce_head = None
    for kind in kinds:
        files[kind] = out / "heads" / f"{kind}.safetensors"
        if kind == "ce" and reuse is not None and reuse.is_file() and not train_ce:
            ce_head, summaries["ce"] = _reuse_ce(
                accelerator, config, cells, reuse, files[kind], frozen=frozen, val=val_source
            )
            continue
        model = _head_model(
            accelerator, config, cells, kind, in_features, reuse=reuse, ce_head=ce_head, frozen=frozen
        )
        params = [p for p in model.parameters() if p.requires_grad]
        model, summary = _train_classifier(
            accelerator,
            model,
            hc,
            params=params,
            train=train,
            val=val_source,
            seed=config.train.seed,
            out=out,
            name=kind,
            resume=resume,
            max_steps=max_steps,
            checkpoint_every=checkpoint_every,
            meta={"fingerprint": cells.fingerprint, "kind": kind},
        )
        if summary is None:
            return StageResult("heads", out, files, {"heads": summaries}, complete=False)
        trained = head_of(accelerator, model)
        if kind == "ce":
            ce_head = trained
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_head(trained, files[kind], config=config)
        summaries[kind] = summary
    if accelerator.is_main_process:
        cells.save(files["cells"])
    accelerator.wait_for_everyone()
    summary = {
        "heads": summaries,
        "ranks_identical": all(s.get("ranks_identical", True) for s in summaries.values()),
        "on_images": on_images,
    }
    if frozen is not None:
        summary["backbone_unchanged"] = _unchanged(accelerator, frozen, start_state)
    finish_stage(accelerator, out, "heads", summary)
    return StageResult("heads", out, files, summary)
