"""Stage 4: the residual retrieval module, trained on cached backbone features (ICMR 2021 sections 3.3.2
and 4.2).

Every epoch draws one (query, positive) pair from each fine cell with two or more photos, and trains with
InfoNCE over the batch plus a cross-batch memory (AdamW lr 1e-5, weight decay 1e-4, cosine schedule, 64 pairs
per batch per process, 200 epochs by default). Under ``accelerate launch`` the same loop runs on N processes:
pairs are sharded across ranks, embeddings are gathered for the loss, and the memory is part of the
checkpoint, so a resumed run continues exactly.

`train_retrieval` writes ``OUT/retrieval.safetensors`` (with the partition fingerprint), ``OUT/config.yaml``,
``OUT/history_retrieval.json`` and ``OUT/train_retrieval.json``.

The ablations of section 5.2 are settings of the ``retrieval`` section: ``loss`` (``infonce``, ``triplet`` with
``margin``, or ``none``: no training, the file holds the `IdentityEmbedding` and the backbone features are the
embeddings), ``residual``, ``symmetric``, ``mask_same_cell``, ``memory_size`` and ``temperature``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator

from geoswc.config import Config
from geoswc.data.features import FeatureCache, cache_pool, pooled_cache
from geoswc.data.validation import check_choice
from geoswc.retrieval import (
    IdentityEmbedding,
    OnePairPerCellSampler,
    ResidualRetrievalModule,
    create_retrieval_loss,
)
from geoswc.retrieval.loss import RETRIEVAL_LOSSES
from geoswc.train.common import PathLike, StageResult, finish_stage, start_stage
from geoswc.train.engine import train_loop
from geoswc.train.optim import optimizer_and_schedule

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "retrieval.safetensors"


def same_cell_precision(
    embeddings: np.ndarray, labels: np.ndarray, k: int = 5, *, max_queries: int = 2000, seed: int = 0
) -> float:
    """Mean share of the k nearest other photos (inner product) that lie in the query's cell.

    Queries are a random subset of at most ``max_queries`` rows, searched against all rows (leave-one-out).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(embeddings)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(n, size=min(n, max_queries), replace=False))
    k = min(k, n - 1)
    hits = []
    for start in range(0, len(queries), 512):
        rows = queries[start : start + 512]
        scores = embeddings[rows] @ embeddings.T
        scores[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        hits.append((labels[top] == labels[rows][:, None]).mean(axis=1))
    return float(np.concatenate(hits).mean())


def _batch_features(features, rows: np.ndarray, device) -> torch.Tensor:
    order = np.argsort(rows)
    out = np.empty((len(rows), features.shape[1]), dtype=np.float32)
    out[order] = features[rows[order]]  # read a memory-mapped cache in file order
    return torch.from_numpy(out).to(device)


def fit_retrieval_module(
    accelerator: Accelerator,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    retrieval_cfg: Any,
    seed: int,
    out_dir: PathLike,
    fingerprint: str,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    checkpoint_epochs: int = 1,
    val_features: Optional[np.ndarray] = None,
    val_labels: Optional[np.ndarray] = None,
    k_eval: int = 5,
) -> Tuple[ResidualRetrievalModule, Optional[Dict[str, Any]]]:
    """Train a ``ResidualRetrievalModule`` on ``features`` (N, D) with fine-cell ``labels`` (N,).

    Returns:
        ``(module, summary)``: the unwrapped trained module and a summary (per-epoch loss, same-cell precision@k
        on ``val_features`` when given, whether all ranks agree); ``summary`` is None when ``max_steps`` stopped
        the run early (a checkpoint is written for ``resume``).
    """
    rc = retrieval_cfg
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"expected features (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    dim = int(features.shape[1])
    model = ResidualRetrievalModule(dim, rc.hidden_dim, residual=rc.residual)
    criterion = create_retrieval_loss(
        rc.loss,
        temperature=rc.temperature,
        margin=rc.margin,
        memory_size=rc.memory_size,
        symmetric=rc.symmetric,
        mask_same_cell=rc.mask_same_cell,
    ).to(accelerator.device)
    sampler = OnePairPerCellSampler(
        labels, seed=seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    steps_per_epoch = math.ceil(len(sampler) / rc.batch_size)
    optimizer, scheduler, schedule_per = optimizer_and_schedule(
        model, rc, total_updates=rc.epochs * steps_per_epoch
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # The memory is training state: the engine's Checkpointer saves registered objects as tensors (never
    # accelerate's save_state, whose pickles of registered objects are loaded with weights_only=False).
    accelerator.register_for_checkpointing(criterion)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        logger.info(
            "%d cells with >= 2 photos: %d steps of %d pairs per epoch on each of %d processes",
            sampler.num_pairs,
            steps_per_epoch,
            rc.batch_size,
            accelerator.num_processes,
        )
    criterion.train()

    def batches(epoch: int, skip: int):
        pairs = sampler.shard(epoch)
        return steps_per_epoch, (
            pairs[step * rc.batch_size : (step + 1) * rc.batch_size] for step in range(skip, steps_per_epoch)
        )

    def loss(batch: np.ndarray):
        inputs = _batch_features(features, batch.T.reshape(-1), accelerator.device)
        with accelerator.autocast():
            embeddings = model(inputs)
        query, positive = embeddings.float().split(len(batch))
        value = criterion(query, positive, torch.as_tensor(labels[batch[:, 0]], device=accelerator.device))
        return value, 2 * len(batch)

    def validate() -> Dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        emb = unwrapped.embed(val_features, device=accelerator.device)
        return {f"precision_at_{k_eval}": same_cell_precision(emb, val_labels, k_eval, seed=seed)}

    summary = train_loop(
        accelerator,
        model,
        optimizer,
        scheduler,
        name="retrieval",
        out_dir=out_dir,
        epochs=rc.epochs,
        batches=batches,
        loss=loss,
        schedule_per=schedule_per,
        validate=validate if val_features is not None else None,
        resume=resume,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        checkpoint_epochs=checkpoint_epochs,
        meta={"fingerprint": fingerprint, "dim": dim, "hidden_dim": rc.hidden_dim, **ablation_settings(rc)},
    )
    if summary is not None:
        summary["pairs_per_epoch"] = sampler.num_pairs
        summary["settings"] = ablation_settings(rc)
    return unwrapped, summary


def ablation_settings(retrieval_cfg: Any) -> Dict[str, Any]:
    """The settings of the section 5.2 ablations a retrieval module was trained with (recorded with it)."""
    rc = retrieval_cfg
    settings = {"loss": rc.loss, "residual": bool(rc.residual)}
    if rc.loss == "triplet":
        settings["margin"] = float(rc.margin)
    if rc.loss == "infonce":
        settings["temperature"] = float(rc.temperature)
    if rc.loss != "none":
        settings.update(
            symmetric=bool(rc.symmetric),
            mask_same_cell=bool(rc.mask_same_cell),
            memory_size=int(rc.memory_size),
        )
    return settings


def train_retrieval(
    config: Config,
    *,
    cells: Any,
    features: PathLike,
    out: PathLike,
    val_features: Optional[PathLike] = None,
    cpu: bool = False,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    log_with: Sequence[str] = (),
) -> StageResult:
    """Stage 4: the retrieval module on the training photos' feature cache (``retrieval`` section).

    Args:
        config: the resolved configuration.
        cells: the `Geocells` the cache was labelled with (pairs come from its finest cells).
        features: the training photos' feature cache; with ``backbone.pool`` gem or netvlad, its
            ``retrieval/`` cache of the layer's descriptors is read (`geoswc.data.features.pooled_cache`).
        out: the stage folder: ``retrieval.safetensors``, ``config.yaml``, history, checkpoints.
        val_features: a feature cache for same-cell precision@5 after every epoch.
        cpu, resume, max_steps, checkpoint_every, log_with: as `geoswc.train.train_backbone`.

    With ``retrieval.loss=none`` nothing is trained: the stage writes the `IdentityEmbedding` of the cache's
    feature width (the paper's Table 2 baseline), so the background index and the model folder hold the
    L2-normalised backbone features.

    Raises:
        ValueError: an unknown ``retrieval.loss`` (the choices named).
    """
    check_choice("retrieval.loss", config.retrieval.loss, RETRIEVAL_LOSSES)
    out = Path(out)
    pool = config.backbone.pool
    cache = FeatureCache(pooled_cache(features, pool)).check(cells)
    val = FeatureCache(pooled_cache(val_features, pool)).check(cells) if val_features is not None else None
    accelerator = start_stage(config, out, stage="retrieval", cpu=cpu, log_with=log_with)
    if config.retrieval.loss == "none":
        return _write_identity(accelerator, config, cells=cells, cache=cache, out=out, val=val)
    module, summary = fit_retrieval_module(
        accelerator,
        cache.features,
        cache.labels[:, -1],
        retrieval_cfg=config.retrieval,
        seed=config.train.seed,
        out_dir=out,
        fingerprint=str(cells.fingerprint),
        resume=resume,
        max_steps=max_steps,
        checkpoint_every=checkpoint_every,
        val_features=None if val is None else val.features,
        val_labels=None if val is None else val.labels[:, -1],
    )
    files = {"retrieval": out / WEIGHTS_FILE}
    if summary is None:
        return StageResult("retrieval", out, files, complete=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        module.save(
            files["retrieval"],
            fingerprint=str(cells.fingerprint),
            extra={
                "config": json.dumps(config.to_dict(), default=str),
                "backbone": str(cache.meta.get("backbone", "")),
                "pool": pool,
            },
        )
        logger.info("wrote %s", files["retrieval"])
    accelerator.wait_for_everyone()
    finish_stage(accelerator, out, "retrieval", summary)
    return StageResult("retrieval", out, files, summary)


def _write_identity(
    accelerator: Accelerator, config: Config, *, cells: Any, cache: FeatureCache, out: Path, val: Any
) -> StageResult:
    """``retrieval.loss=none``: the identity embedding as the stage's weights file, and a summary."""
    dim = int(cache.features.shape[1])
    module = IdentityEmbedding(dim)
    files = {"retrieval": out / WEIGHTS_FILE}
    summary: Dict[str, Any] = {"trained": False, **ablation_settings(config.retrieval), "dim": dim}
    if accelerator.is_main_process:
        if val is not None:
            emb = module.embed(val.features)
            summary["precision_at_5"] = same_cell_precision(emb, val.labels[:, -1], 5, seed=config.train.seed)
        module.save(
            files["retrieval"],
            fingerprint=str(cells.fingerprint),
            extra={
                "config": json.dumps(config.to_dict(), default=str),
                "backbone": str(cache.meta.get("backbone", "")),
                "pool": cache_pool(cache.folder),
            },
        )
        logger.info(
            "retrieval.loss=none: wrote the identity embedding (dim %d) to %s", dim, files["retrieval"]
        )
    accelerator.wait_for_everyone()
    finish_stage(accelerator, out, "retrieval", summary)
    return StageResult("retrieval", out, files, summary)
