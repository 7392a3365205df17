"""The training loop of geoswc and what it is made of, around ``accelerate``.

One loop runs on a laptop CPU, on one GPU and on N GPUs (``accelerate launch``). This module holds what is not
specific to a stage: building the ``Accelerator`` from ``TrainConfig``, seeding, per-rank batches over
in-memory arrays, a per-epoch progress bar (loss, learning rate, images/s), checkpoints that resume exactly
(``accelerate.save_state`` for model/optimizer/scheduler/RNG plus ``position.json`` for the epoch and step
within the data stream), metric gathering across ranks, optional trackers (TensorBoard, CSV) and GPU speed
settings (channels_last, ``torch.compile``).

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

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "csv")


class CSVTracker(GeneralTracker):
    """An accelerate tracker that appends ``step,name,value`` rows to ``<logging_dir>/metrics.csv``."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: Union[str, Path]):
        super().__init__()
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("step,name,value\n")

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: Dict[str, Any]) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

    def log(self, values: Dict[str, Any], step: Optional[int] = None, **kwargs) -> None:
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                writer.writerow([step, name, float(value)])


def use_cpu(cpu: bool = False) -> bool:
    """Whether this process runs on CPU: asked for (``--cpu``, ``ACCELERATE_USE_CPU``), or one of several
    launched processes on a machine without a GPU, whose ranks then talk over gloo.

    Pass the result to every ``PartialState``/``Accelerator``. Without a GPU and without ``cpu=True``,
    accelerate gives each launched rank a world of its own: every rank trains the whole job alone, draws its
    own progress bar and writes the same files. ``PartialState`` also ignores ``ACCELERATE_USE_CPU`` (only
    ``Accelerator`` reads it), and the first state created decides for the whole process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    no_gpu = not torch.cuda.is_available()
    return bool(cpu) or parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and no_gpu)


def build_accelerator(
    train_cfg: Any,
    *,
    cpu: bool = False,
    out_dir: Optional[Union[str, Path]] = None,
    log_with: Sequence[str] = (),
    run_name: str = "train",
) -> Accelerator:
    """An ``Accelerator`` for ``TrainConfig`` (mixed precision, CPU) with optional trackers.

    A ``--mixed_precision`` given to ``accelerate launch`` wins over the config.

    Args:
        train_cfg: ``Config.train``.
        cpu: force CPU even when a GPU is present (``use_cpu`` says when CPU is used anyway).
        out_dir: run folder; trackers write under ``<out_dir>/logs``.
        log_with: trackers, any of ``tensorboard``, ``csv``.
        run_name: tracker run name (the stage).
    """
    precision = train_cfg.mixed_precision
    if precision not in MIXED_PRECISION:
        raise ValueError(
            f"unknown mixed_precision {precision!r}; choose one of: {', '.join(MIXED_PRECISION)}"
        )
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        precision = None
    trackers: List[Any] = []
    for name in log_with:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose one of: {', '.join(TRACKERS)}")
        if out_dir is None:
            raise ValueError("trackers need an output folder")
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ImportError("the TensorBoard tracker needs: pip install tensorboard") from err
            trackers.append("tensorboard")
        else:
            trackers.append(CSVTracker(run_name, Path(out_dir) / "logs"))
    project = None
    if out_dir is not None:
        project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "logs"))
    # Schedules are counted in each rank's own steps and epochs, so the scheduler steps once per call; by default
    # accelerate would step it once per process, ending a 2-rank cosine schedule halfway through training.
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=use_cpu(cpu),
        log_with=trackers or None,
        project_config=project,
        step_scheduler_with_optimizer=False,
    )
    if trackers:
        accelerator.init_trackers(run_name)
    return accelerator


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the metric trackers but keep the process group: `geoswc fit` runs several stages in one launch,
    and ``Accelerator.end_training`` would tear the group down between them."""
    for tracker in accelerator.trackers:
        tracker.finish()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank, so models start with identical weights."""
    set_seed(int(seed), device_specific=False)


def prepare_for_speed(model: nn.Module, train_cfg: Any, accelerator: Accelerator) -> nn.Module:
    """channels_last (image models; also a win on recent CPUs) and ``torch.compile`` on GPU when configured."""
    model = model.to(accelerator.device)
    if getattr(train_cfg, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    if getattr(train_cfg, "compile", False):
        if accelerator.device.type == "cuda":
            model = torch.compile(model)
        else:
            logger.warning("torch.compile is only used on GPU; running eager on %s", accelerator.device)
    return model


def rank_batches(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    num_processes: int = 1,
    process_index: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> List[np.ndarray]:
    """This rank's batches of row indices for one epoch over ``n`` in-memory rows.

    The permutation depends only on ``(seed, epoch)``, so every rank agrees on it and a resumed run replays
    the same order. Ranks take interleaved rows and the same number of batches (DDP steps in lock-step).
    ``batch_size`` is per rank.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // num_processes
    mine = order[process_index : per_rank * num_processes : num_processes]
    if not drop_last and per_rank * num_processes < n and process_index < n - per_rank * num_processes:
        mine = np.append(mine, order[per_rank * num_processes + process_index])
    stop = (len(mine) // batch_size) * batch_size if drop_last else len(mine)
    batches = [mine[i : i + batch_size] for i in range(0, stop, batch_size)]
    if drop_last and not batches and len(mine):
        batches = [mine]
    return batches


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


@dataclass
class TrainPosition:
    """Where training stands: the epoch, the optimizer steps done in it, and the steps done in total."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0

    def advance(self) -> None:
        self.step += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0


class Checkpointer:
    """Resumable checkpoints in ``folder/last``: ``accelerate.save_state`` (registered models, optimizers,
    schedulers, every rank's RNG states) plus ``position.json`` (``TrainPosition``) and ``meta.json``.

    A new checkpoint is written to ``folder/tmp`` and then renamed, so a crash never leaves a half-written
    ``last``.

    Args:
        accelerator: the run's accelerator (models etc. already ``prepare``d).
        folder: where checkpoints live.
        every_steps: ``due`` is true every this many optimizer steps (0: only at epoch ends).
        meta: JSON-able facts stored with each checkpoint and checked on restore (e.g. the fingerprint).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        folder: Union[str, Path],
        *,
        every_steps: int = 0,
        meta: Optional[Mapping[str, Any]] = None,
    ):
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.every_steps = int(every_steps)
        self.meta = dict(meta or {})

    @property
    def last(self) -> Path:
        return self.folder / "last"

    def exists(self) -> bool:
        return (self.last / "position.json").is_file()

    def due(self, position: TrainPosition) -> bool:
        return self.every_steps > 0 and position.global_step % self.every_steps == 0

    def save(self, position: TrainPosition) -> Path:
        tmp = self.folder / "tmp"
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "position.json").write_text(json.dumps(asdict(position)) + "\n")
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
            old = self.folder / "old"
            shutil.rmtree(old, ignore_errors=True)
            if self.last.exists():
                self.last.rename(old)
            tmp.rename(self.last)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return self.last

    def restore(self) -> TrainPosition:
        """Load the last checkpoint into the prepared objects; the position to continue from.

        Raises:
            FileNotFoundError: no checkpoint to resume from.
            ValueError: the checkpoint was made with other ``meta`` (e.g. another partition).
        """
        if not self.exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.folder}")
        saved = json.loads((self.last / "meta.json").read_text())
        for key, value in self.meta.items():
            if key in saved and json.loads(json.dumps(value, default=str)) != saved[key]:
                raise ValueError(
                    f"checkpoint {self.last} has {key}={saved[key]!r} but this run has {key}={value!r}; "
                    "resume with the same settings or start a new output folder"
                )
        self.accelerator.load_state(str(self.last))
        return TrainPosition(**json.loads((self.last / "position.json").read_text()))


def gather_rows(accelerator: Accelerator, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Concatenate per-rank rows of every tensor across ranks (``gather_for_metrics``: the samples that
    padding duplicated for the last batch are dropped)."""
    return {k: accelerator.gather_for_metrics(v.contiguous()) for k, v in tensors.items()}


def gather_by_row(
    accelerator: Accelerator, rows: torch.Tensor, values: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather per-rank results of unequal length (e.g. an evaluation split by ``rank_batches`` without
    dropping rows): returns every rank's ``(rows, values)`` concatenated and sorted by row."""
    rows = accelerator.pad_across_processes(rows.to(accelerator.device), dim=0, pad_index=-1)
    values = accelerator.pad_across_processes(values.to(accelerator.device), dim=0)
    rows, values = accelerator.gather(rows), accelerator.gather(values)
    keep = rows >= 0
    rows, values = rows[keep], values[keep]
    order = torch.argsort(rows)
    return rows[order], values[order]


def sync_buffers(accelerator: Accelerator, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical but each rank's last forward updates its own running statistics; syncing
    them at the end of an epoch makes validation, checkpoints and the saved model the same on every rank.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(module).buffers():
        dist.broadcast(buffer.data, src=0)


def ranks_agree(accelerator: Accelerator, module: nn.Module) -> bool:
    """Whether every rank holds the same weights (a float64 checksum per tensor, compared across ranks)."""
    module = accelerator.unwrap_model(module)
    sums = torch.stack(
        [p.detach().double().sum() for p in module.state_dict().values() if p.is_floating_point()]
    ).to(accelerator.device)
    everyone = accelerator.gather(sums[None]).reshape(accelerator.num_processes, -1)
    return bool((everyone == everyone[0]).all())


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
    if schedule_per not in ("step", "epoch"):
        raise ValueError(f"unknown schedule_per {schedule_per!r}; choose one of: step, epoch")
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
        if schedule_per == "epoch":
            scheduler.step()
        mean_loss = loss_sum / max(seen, 1) if seen else torch.full_like(loss_sum, float("nan"))
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


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights (about 0.1 s for EfficientNet-B4): what identifies a trained model in
    the key of work derived from it."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digest.update(b"\0")
    return digest.hexdigest()
