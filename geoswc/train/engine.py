"""The training loop of geoswc, around ``accelerate``.

One loop runs on a laptop CPU, on one GPU and on N GPUs (``accelerate launch``). What it is made of lives
beside it: the ``Accelerator`` built from ``TrainConfig``, seeding, trackers and GPU speed settings in
`geoswc.train.accelerator`; per-rank batches and gathering across ranks in `geoswc.train.distributed`;
checkpoints that resume exactly in `geoswc.train.checkpoint`. All of their names are importable from here too.

`train_loop` is the one loop every stage runs (the classifier stages and the retrieval module): a stage
gives it the batches of an epoch and the loss of a batch; the loop owns the backward pass, the optimizer and
scheduler steps, the loss averaged across processes, the progress bar, validation, the history file, the
trackers and the checkpoints that resume exactly::

    accelerator = build_accelerator(cfg.train, cpu=cpu, out_dir=out, log_with=log_with, run_name="heads")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    summary = train_loop(accelerator, model, optimizer, scheduler, name="ce", out_dir=out, epochs=5,
                         batches=lambda epoch, skip: (n_batches, iterator_after(skip)),
                         loss=lambda batch: (head.loss(model(batch.x), batch.y, batch.latlon), len(batch.x)),
                         resume=resume, meta={"fingerprint": cells.fingerprint})
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from geoswc.train.accelerator import (  # noqa: F401  (re-exported: the loop's parts were defined here)
    MIXED_PRECISION,
    TRACKERS,
    CSVTracker,
    build_accelerator,
    finish_trackers,
    prepare_for_speed,
    seed_everything,
    use_cpu,
)
from geoswc.train.checkpoint import (  # noqa: F401
    _SCALARS,
    _UNSUPPORTED_DISTRIBUTED,
    CHECKPOINT_FORMAT,
    POSITION_FILE,
    Checkpointer,
    TrainPosition,
    _decode_tree,
    _encode_tree,
    _is_complete,
    _load_into,
    _model_file,
    _read_json,
    _read_position,
    _read_safetensors,
    _remove_checkpoint,
    _rng_state,
    _set_rng_state,
    load_tree,
    save_tree,
)
from geoswc.train.distributed import (  # noqa: F401
    gather_by_row,
    gather_rows,
    ranks_agree,
    rank_batches,
    sync_buffers,
    weights_digest,
)
from geoswc.data.validation import check_choice

logger = logging.getLogger(__name__)


class EpochProgress:
    """A progress bar for one epoch on the main process, showing loss, learning rate and images/s.

    ``images_per_s`` counts the images of all ranks.
    """

    def __init__(self, accelerator: Accelerator, total: int, *, epoch: int, epochs: int, desc: str = "train"):
        self.world = accelerator.num_processes
        self.images = 0
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=f"{desc} {epoch + 1}/{epochs}",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
            leave=True,
        )

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def update(self, batch_images: int, *, loss: float, lr: float) -> None:
        self.images += batch_images * self.world
        self.bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.images_per_s:.1f}", refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# The batches of one epoch: ``(batches in the epoch, iterator over those after the first skip)``.
EpochBatches = Callable[[int, int], Tuple[int, Iterable[Any]]]
# The loss of one batch and the number of images (or embeddings) it covered on this process.
BatchLoss = Callable[[Any], Tuple[torch.Tensor, int]]


def train_loop(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    name: str,
    out_dir: Union[str, Path],
    epochs: int,
    batches: EpochBatches,
    loss: BatchLoss,
    schedule_per: str = "step",
    validate: Optional[Callable[[], Dict[str, float]]] = None,
    resume: bool = False,
    max_steps: Optional[int] = None,
    checkpoint_every: int = 0,
    checkpoint_epochs: int = 1,
    meta: Optional[Mapping[str, Any]] = None,
) -> Optional[Dict[str, Any]]:
    """Train ``model`` (already ``prepare``d) for ``epochs``, resumable; the one loop of every stage.

    Args:
        accelerator: the run's accelerator.
        model, optimizer, scheduler: prepared by ``accelerator``; anything else that is training state (a
            loss's memory) is registered with ``accelerator.register_for_checkpointing`` by the caller.
        name: the run's name: progress bar, ``history_<name>.json``, ``checkpoints/<name>``.
        out_dir: where history and checkpoints go.
        epochs: epochs in all (a resumed run continues to the same count).
        batches: ``batches(epoch, skip)`` -> ``(n, iterator)``: the epoch's n batches of this process, the
            iterator starting after the first ``skip`` (done before a resume).
        loss: ``loss(batch)`` -> ``(loss tensor, images)``, the forward pass under ``accelerator.autocast``.
        schedule_per: ``step`` or ``epoch``: when the scheduler steps.
        validate: called on every process after each epoch (with the model in eval mode); its metrics join
            the epoch's record.
        resume: continue from ``out_dir/checkpoints/<name>`` when it holds a checkpoint.
        max_steps: stop with a checkpoint after this many optimizer steps in all.
        checkpoint_every: also checkpoint every this many optimizer steps (0: epoch ends only).
        checkpoint_epochs: checkpoint at the end of every this many epochs (and of the last).
        meta: facts stored with the checkpoints and checked on resume (e.g. the partition fingerprint).

    Returns:
        ``{"history": [per-epoch loss (mean over processes), lr, images/s, validation metrics],
        "ranks_identical": bool, "num_processes": int}``, or None when ``max_steps`` stopped the run.
    """
    check_choice("schedule_per", schedule_per, ("step", "epoch"))
    out_dir = Path(out_dir)
    ckpt = Checkpointer(accelerator, out_dir / "checkpoints" / name, every_steps=checkpoint_every, meta=meta)
    position = ckpt.restore() if resume and ckpt.exists() else TrainPosition()
    if position.global_step:
        logger.info("resuming %s at epoch %d step %d", name, position.epoch, position.step)
    history: List[Dict[str, float]] = []
    history_file = out_dir / f"history_{name}.json"
    if position.global_step and history_file.is_file():
        history = json.loads(history_file.read_text())
    model.train()
    for epoch in range(position.epoch, epochs):
        n_batches, items = batches(epoch, position.step)
        bar = EpochProgress(accelerator, n_batches, epoch=epoch, epochs=epochs, desc=name)
        bar.bar.update(position.step)
        mean_loss = _train_epoch(
            accelerator,
            model,
            optimizer,
            scheduler,
            items,
            bar,
            loss=loss,
            schedule_per=schedule_per,
            ckpt=ckpt,
            position=position,
            max_steps=max_steps,
        )
        if mean_loss is None:
            return None
        if schedule_per == "epoch":
            scheduler.step()
        record = _epoch_record(accelerator, model, optimizer, mean_loss, bar, epoch=epoch, validate=validate)
        history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        if accelerator.is_main_process:
            bar.bar.write(
                f"{name} epoch {epoch + 1}/{epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
            )
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.write_text(json.dumps(history, indent=2) + "\n")
        position.next_epoch()
        if epoch + 1 == epochs or (checkpoint_epochs and (epoch + 1) % checkpoint_epochs == 0):
            ckpt.save(position)
    return {
        "history": history,
        "ranks_identical": ranks_agree(accelerator, model),
        "num_processes": accelerator.num_processes,
    }


def _train_epoch(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    items: Iterable[Any],
    bar: EpochProgress,
    *,
    loss: BatchLoss,
    schedule_per: str,
    ckpt: Checkpointer,
    position: TrainPosition,
    max_steps: Optional[int],
) -> Optional[torch.Tensor]:
    """The optimizer steps of one epoch: this process's mean loss over them (NaN when it had no batch), or
    None when ``max_steps`` stopped the run (after a checkpoint)."""
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    seen = 0
    for batch in items:
        value, images = loss(batch)
        accelerator.backward(value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule_per == "step":
            scheduler.step()
        position.advance()
        loss_sum += value.detach().double()
        seen += 1
        bar.update(images, loss=value.item(), lr=current_lr(optimizer))
        if ckpt.due(position):
            ckpt.save(position)
        if max_steps is not None and position.global_step >= max_steps:
            bar.close()
            ckpt.save(position)
            return None
    bar.close()
    return loss_sum / max(seen, 1) if seen else torch.full_like(loss_sum, float("nan"))


def _epoch_record(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    mean_loss: torch.Tensor,
    bar: EpochProgress,
    *,
    epoch: int,
    validate: Optional[Callable[[], Dict[str, float]]],
) -> Dict[str, float]:
    """An epoch's record: the loss averaged over processes, lr, images/s and the validation metrics (after
    syncing BatchNorm buffers, so every rank validates the same model)."""
    record = {
        "epoch": epoch + 1,
        "loss": float(accelerator.reduce(mean_loss, reduction="mean")),
        "lr": current_lr(optimizer),
        "images_per_s": bar.images_per_s,
    }
    sync_buffers(accelerator, model)
    if validate is not None:
        model.eval()
        record.update(validate())
        model.train()
    return record
