"""Training of the residual retrieval module on cached backbone features (ICMR 2021 sections 3.3.2 and 4.2).

    geoswc train retrieval --features FEATDIR --cells CELLSDIR --out OUT [--val-features VALDIR]

Every epoch draws one (query, positive) pair from each fine cell with two or more photos, and trains with
InfoNCE over the batch plus a cross-batch memory (AdamW lr 1e-5, weight decay 1e-4, cosine schedule, 64 pairs
per batch per process, 200 epochs by default). ``accelerate launch -m geoswc.train retrieval ...`` runs the same
loop on N processes: pairs are sharded across ranks, embeddings are gathered for the loss, and the memory is
part of the checkpoint, so ``--resume`` continues exactly.

Writes ``OUT/retrieval.safetensors`` (with the partition fingerprint), ``OUT/config.yaml``,
``OUT/history_retrieval.json`` and ``OUT/train_retrieval.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

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


def train_retrieval(
    accelerator,
    features,
    labels: np.ndarray,
    *,
    retrieval_cfg: Any,
    seed: int,
    out_dir: Path,
    fingerprint: str,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    checkpoint_epochs: int = 1,
    val_features=None,
    val_labels: Optional[np.ndarray] = None,
    k_eval: int = 5,
):
    """Train a ``ResidualRetrievalModule`` on ``features`` (N, D) with fine-cell ``labels`` (N,).

    Returns:
        ``(module, summary)``: the unwrapped trained module and a summary (per-epoch loss, same-cell precision@k
        on ``val_features`` when given, whether all ranks agree); ``summary`` is None when ``max_steps`` stopped
        the run early (a checkpoint is written for ``resume``).
    """
    from geoswc.engine import Checkpointer, EpochProgress, TrainPosition, current_lr, ranks_agree
    from geoswc.retrieval import InfoNCEWithMemory, OnePairPerCellSampler, ResidualRetrievalModule

    rc = retrieval_cfg
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"expected features (N, D) and labels (N,), got {features.shape} and {labels.shape}")
    dim = int(features.shape[1])
    model = ResidualRetrievalModule(dim, rc.hidden_dim)
    criterion = InfoNCEWithMemory(rc.temperature, rc.memory_size).to(accelerator.device)
    sampler = OnePairPerCellSampler(
        labels, seed=seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    steps_per_epoch = math.ceil(len(sampler) / rc.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=rc.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, rc.epochs * steps_per_epoch)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(criterion)  # the memory is training state

    ckpt = Checkpointer(
        accelerator,
        out_dir / "checkpoints" / "retrieval",
        every_steps=checkpoint_every,
        meta={"fingerprint": fingerprint, "dim": dim, "hidden_dim": rc.hidden_dim},
    )
    position = ckpt.restore() if resume and ckpt.exists() else TrainPosition()
    history: List[Dict[str, float]] = []
    history_file = out_dir / "history_retrieval.json"
    if resume and history_file.is_file() and position.global_step:
        history = json.loads(history_file.read_text())
    if accelerator.is_main_process:
        logger.info(
            "%d cells with >= 2 photos: %d steps of %d pairs per epoch on each of %d processes",
            sampler.num_pairs,
            steps_per_epoch,
            rc.batch_size,
            accelerator.num_processes,
        )
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    criterion.train()
    for epoch in range(position.epoch, rc.epochs):
        pairs = sampler.shard(epoch)
        bar = EpochProgress(accelerator, steps_per_epoch, epoch=epoch, epochs=rc.epochs, desc="retrieval")
        bar.bar.update(position.step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        seen = 0
        for step in range(position.step, steps_per_epoch):
            batch = pairs[step * rc.batch_size : (step + 1) * rc.batch_size]
            inputs = _batch_features(features, batch.T.reshape(-1), accelerator.device)
            with accelerator.autocast():
                embeddings = model(inputs)
            query, positive = embeddings.float().split(len(batch))
            loss = criterion(query, positive, torch.as_tensor(labels[batch[:, 0]], device=accelerator.device))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            position.advance()
            loss_sum += loss.detach().double()
            seen += 1
            bar.update(2 * len(batch), loss=loss.item(), lr=current_lr(optimizer))
            if ckpt.due(position):
                ckpt.save(position)
            if max_steps is not None and position.global_step >= max_steps:
                bar.close()
                ckpt.save(position)
                return unwrapped, None
        bar.close()
        record = {
            "epoch": epoch + 1,
            "loss": float(loss_sum / max(seen, 1)),
            "lr": current_lr(optimizer),
            "images_per_s": bar.images_per_s,
        }
        if val_features is not None and accelerator.is_main_process:
            emb = unwrapped.embed(val_features, device=accelerator.device)
            record[f"precision_at_{k_eval}"] = same_cell_precision(emb, val_labels, k_eval, seed=seed)
            unwrapped.train()
        history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        if accelerator.is_main_process:
            bar.bar.write(
                f"retrieval epoch {epoch + 1}/{rc.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
            )
            history_file.write_text(json.dumps(history, indent=2) + "\n")
        position.next_epoch()
        if epoch + 1 == rc.epochs or (checkpoint_epochs and (epoch + 1) % checkpoint_epochs == 0):
            ckpt.save(position)
    summary = {
        "history": history,
        "ranks_identical": ranks_agree(accelerator, model),
        "num_processes": accelerator.num_processes,
        "pairs_per_epoch": sampler.num_pairs,
    }
    return unwrapped, summary


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Arguments of ``geoswc train retrieval`` (registered by ``geoswc.train``)."""
    from geoswc.train import _common

    _common(parser)
    parser.add_argument("--features", required=True, help="feature cache of the training photos")
    parser.add_argument("--val-features", help="feature cache for same-cell precision@k after every epoch")
    parser.add_argument("--epochs", type=int, help="override retrieval.epochs")
    parser.add_argument("--batch-size", type=int, help="(query, positive) pairs per step and process")


def run(args) -> int:
    from geoswc.train import FeatureCache, _setup, _write_summary, load_cells

    if args.epochs is not None:
        args.set = list(args.set or []) + [f"retrieval.epochs={args.epochs}"]
    if args.batch_size is not None:
        args.set = list(args.set or []) + [f"retrieval.batch_size={args.batch_size}"]
    cfg, out, accelerator = _setup(args, "retrieval")
    cells = load_cells(args.cells)
    cache = FeatureCache(args.features).check(cells)
    val = FeatureCache(args.val_features).check(cells) if args.val_features else None
    module, summary = train_retrieval(
        accelerator,
        cache.features,
        cache.labels[:, -1],
        retrieval_cfg=cfg.retrieval,
        seed=cfg.train.seed,
        out_dir=out,
        fingerprint=str(cells.fingerprint),
        resume=args.resume,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        val_features=None if val is None else val.features,
        val_labels=None if val is None else val.labels[:, -1],
    )
    if summary is None:
        return 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        module.save(
            out / WEIGHTS_FILE,
            fingerprint=str(cells.fingerprint),
            extra={
                "config": json.dumps(cfg.to_dict(), default=str),
                "backbone": str(cache.meta.get("backbone", "")),
            },
        )
        logger.info("wrote %s", out / WEIGHTS_FILE)
    _write_summary(accelerator, out, "retrieval", summary)
    from geoswc.engine import finish_trackers

    finish_trackers(accelerator)
    return 0
