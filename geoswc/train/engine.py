"""The training loop of geoswc and what it is made of, around ``accelerate``.

One loop runs on a laptop CPU, on one GPU and on N GPUs (``accelerate launch``). This module holds what is not
specific to a stage: building the ``Accelerator`` from ``TrainConfig``, seeding, per-rank batches over
in-memory arrays, a per-epoch progress bar (loss, learning rate, images/s), checkpoints that resume exactly
(model/optimizer/scheduler/RNG and registered objects as safetensors and JSON, never pickles, plus
``position.json`` for the epoch and step within the data stream), metric gathering across ranks, optional
trackers (TensorBoard, CSV) and GPU speed settings (channels_last, ``torch.compile``).

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
import random
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
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
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


# Checkpoints travel with model folders (`geoswc fit` keeps them under ``work/``), so loading one must never run
# code: nothing in them is a pickle. Weights are safetensors; every other piece of training state is a JSON
# tree whose tensors sit in a safetensors file beside it (`save_tree`).
CHECKPOINT_FORMAT = 1
POSITION_FILE = "position.json"  # written last: a checkpoint folder that has it is complete
_SCALARS = (type(None), bool, int, float, str)
# Their checkpoints are not one full copy of the state per process; accelerate saves them its own way.
_UNSUPPORTED_DISTRIBUTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


def _encode_tree(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, tuple):
        return {"tuple": [_encode_tree(item, tensors) for item in value]}
    if isinstance(value, list):
        return {"list": [_encode_tree(item, tensors) for item in value]}
    if isinstance(value, Mapping):
        return {"dict": [[_encode_tree(k, tensors), _encode_tree(v, tensors)] for k, v in value.items()]}
    raise TypeError(
        f"cannot checkpoint a {type(value).__name__}: training state must be tensors, numbers, strings, None "
        "and dicts, lists and tuples of them"
    )


def _decode_tree(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, _SCALARS):
        return node
    if isinstance(node, dict) and len(node) == 1:
        tag, body = next(iter(node.items()))
        if tag == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
        if tag in ("list", "tuple") and isinstance(body, list):
            items = [_decode_tree(item, tensors) for item in body]
            return items if tag == "list" else tuple(items)
        if (
            tag == "dict"
            and isinstance(body, list)
            and all(isinstance(p, list) and len(p) == 2 for p in body)
        ):
            pairs = [(_decode_tree(k, tensors), _decode_tree(v, tensors)) for k, v in body]
            if all(isinstance(k, _SCALARS) for k, _ in pairs):
                return dict(pairs)
    raise ValueError(f"unexpected entry {json.dumps(node)[:80]}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing: the checkpoint is incomplete")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"checkpoint file {path} is not JSON written by geoswc ({err})") from err


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise ValueError(f"checkpoint file {path} is not a safetensors file ({err})") from err


def save_tree(tree: Any, stem: Union[str, Path]) -> None:
    """Write ``tree`` (nested dicts, lists and tuples of tensors, numbers, strings and None: a ``state_dict``)
    as ``<stem>.json``, its structure and numbers, and ``<stem>.safetensors``, its tensors. No pickle: reading
    it back (`load_tree`) cannot run code. Tuples and non-string dict keys come back as they were."""
    stem = Path(stem)
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode_tree(tree, tensors)
    save_file(tensors, str(stem.parent / f"{stem.name}.safetensors"))
    (stem.parent / f"{stem.name}.json").write_text(json.dumps(encoded) + "\n")


def load_tree(stem: Union[str, Path]) -> Any:
    """What `save_tree` wrote (tensors on CPU).

    Raises:
        ValueError: a file is missing or is not what `save_tree` writes (the message names it).
    """
    stem = Path(stem)
    tensors = _read_safetensors(stem.parent / f"{stem.name}.safetensors")
    path = stem.parent / f"{stem.name}.json"
    encoded = _read_json(path)
    try:
        return _decode_tree(encoded, tensors)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"checkpoint file {path} is not what geoswc writes ({err})") from err


def _rng_state() -> Dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Any, path: Path) -> None:
    try:
        random.setstate(state["python"])
        name, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                logger.warning("%s holds the CUDA random states of %d devices; not restored", path, len(cuda))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"checkpoint file {path} does not hold random states ({err})") from err


def _load_into(obj: Any, state: Any, path: Path) -> None:
    try:
        obj.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        raise ValueError(
            f"checkpoint file {path} does not fit this run's {type(obj).__name__}: {err}"
        ) from err


def _is_complete(folder: Path) -> bool:
    return (folder / POSITION_FILE).is_file()


def _remove_checkpoint(folder: Path) -> None:
    # The completion mark goes first: a removal cut short never leaves a folder that looks complete.
    (folder / POSITION_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


class Checkpointer:
    """Resumable checkpoints in ``folder/last``: the training state ``accelerate.save_state`` covers (the
    prepared models, optimizers and schedulers, the gradient scaler, objects registered with
    ``accelerator.register_for_checkpointing``, every rank's RNG states), plus ``position.json``
    (``TrainPosition``) and ``meta.json``.

    Nothing is pickled, because checkpoints travel with model folders and accelerate's ``load_state`` would
    unpickle registered objects with ``weights_only=False`` (optimizer, scheduler and RNG states are pickles
    too). A checkpoint holds ``model.safetensors`` (``model_<i>`` for further models), ``state.json`` +
    ``state.safetensors`` (optimizers, schedulers, scaler, registered objects; `save_tree`),
    ``rng_<rank>.json`` + ``rng_<rank>.safetensors``, ``meta.json`` and, written last, ``position.json``: a
    folder with ``position.json`` is complete. A checkpoint of any other form is refused with a ``ValueError``
    naming the file, never loaded.

    A new checkpoint is written to ``folder/tmp``, then rotated: ``last -> old``, ``tmp -> last``, ``old``
    removed. A kill between the renames leaves ``old`` (and ``tmp``) without ``last``: resume takes ``last``,
    else ``old``, and a rotation never removes the only complete checkpoint.

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

    @property
    def old(self) -> Path:
        return self.folder / "old"

    def latest(self) -> Optional[Path]:
        """The complete checkpoint to resume from: ``last``, else ``old`` (a rotation cut short); None if none."""
        for candidate in (self.last, self.old):
            if _is_complete(candidate):
                return candidate
        return None

    def exists(self) -> bool:
        return self.latest() is not None

    def due(self, position: TrainPosition) -> bool:
        return self.every_steps > 0 and position.global_step % self.every_steps == 0

    def _check_supported(self) -> None:
        kind = self.accelerator.distributed_type
        if getattr(kind, "value", kind) in _UNSUPPORTED_DISTRIBUTED:
            raise ValueError(
                f"checkpoints support one full copy of the training state per process (one process, DDP), "
                f"not {getattr(kind, 'value', kind)}"
            )

    def _models(self) -> List[nn.Module]:
        models = [self.accelerator.unwrap_model(model) for model in self.accelerator._models]
        return [getattr(model, "_orig_mod", model) for model in models]  # under torch.compile

    def save(self, position: TrainPosition) -> Path:
        self._check_supported()
        acc = self.accelerator
        tmp = self.folder / "tmp"
        if acc.is_main_process:
            _remove_checkpoint(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_tree(_rng_state(), tmp / f"rng_{acc.process_index}")
        if acc.is_main_process:
            for i, model in enumerate(self._models()):
                save_model(model, str(tmp / _model_file(i)), force_contiguous=True)
            state = {
                "format": CHECKPOINT_FORMAT,
                "num_processes": acc.num_processes,
                "models": len(acc._models),
                "optimizers": [opt.state_dict() for opt in acc._optimizers],
                "schedulers": [sched.state_dict() for sched in acc._schedulers],
                "objects": [obj.state_dict() for obj in acc._custom_objects],
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "step": int(getattr(acc, "step", 0)),
            }
            save_tree(state, tmp / "state")
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / POSITION_FILE).write_text(json.dumps(asdict(position)) + "\n")
            if _is_complete(self.last):
                _remove_checkpoint(self.old)
                self.last.rename(self.old)
            else:
                _remove_checkpoint(self.last)  # a complete `old` stays until the new `last` is in place
            tmp.rename(self.last)
            _remove_checkpoint(self.old)
        acc.wait_for_everyone()
        return self.last

    def restore(self) -> TrainPosition:
        """Load the latest complete checkpoint into the prepared objects; the position to continue from.

        Raises:
            FileNotFoundError: no checkpoint to resume from.
            ValueError: the checkpoint was made with other ``meta`` (e.g. another partition), for other objects,
                or a file of it is not what a checkpoint holds (the message names it).
        """
        self._check_supported()
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.folder}")
        if path != self.last:
            logger.warning(
                "%s is missing (a run stopped while replacing it); resuming from %s", self.last, path
            )
        saved = _read_json(path / "meta.json")
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint file {path / 'meta.json'} is not a JSON object")
        for key, value in self.meta.items():
            if key in saved and json.loads(json.dumps(value, default=str)) != saved[key]:
                raise ValueError(
                    f"checkpoint {path} has {key}={saved[key]!r} but this run has {key}={value!r}; "
                    "resume with the same settings or start a new output folder"
                )
        position = _read_position(path / POSITION_FILE)
        self._load(path)
        return position

    def _load(self, path: Path) -> None:
        acc = self.accelerator
        if not (path / "state.json").is_file() and any(p.suffix in (".bin", ".pkl") for p in path.iterdir()):
            raise ValueError(
                f"checkpoint {path} was written by an older geoswc with accelerate's save_state, whose pickles "
                f"can run code when loaded; it is not loaded. Remove {self.folder} to train from the start"
            )
        state_file = path / "state.json"
        state = load_tree(path / "state")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint file {state_file} is not a geoswc checkpoint of format {CHECKPOINT_FORMAT}"
            )
        objects = {
            "optimizers": acc._optimizers,
            "schedulers": acc._schedulers,
            "objects": acc._custom_objects,
        }
        expected = {"models": len(acc._models), **{name: len(objs) for name, objs in objects.items()}}
        found = {"models": state.get("models")}
        found.update(
            {name: len(state[name]) if isinstance(state.get(name), list) else None for name in objects}
        )
        for name, count in expected.items():
            if found[name] != count:
                raise ValueError(
                    f"checkpoint file {state_file} holds {found[name]} {name} but this run has {count}; "
                    "resume with the same stage and settings"
                )
        for i, model in enumerate(self._models()):
            model_file = path / _model_file(i)
            if not model_file.is_file():
                raise ValueError(f"checkpoint file {model_file} is missing: the checkpoint is incomplete")
            try:
                load_model(model, str(model_file), strict=True, device="cpu")
            except SafetensorError as err:
                raise ValueError(f"checkpoint file {model_file} is not a safetensors file ({err})") from err
            except RuntimeError as err:
                raise ValueError(
                    f"checkpoint file {model_file} does not hold this run's weights ({err})"
                ) from err
        for name in ("optimizers", "schedulers", "objects"):
            for obj, obj_state in zip(objects[name], state[name]):
                _load_into(obj, obj_state, state_file)
        if acc.scaler is not None and state.get("scaler"):
            _load_into(acc.scaler, state["scaler"], state_file)
        if isinstance(state.get("step"), int):
            acc.step = state["step"]
        rng_stem = path / f"rng_{acc.process_index}"
        saved_processes = state.get("num_processes")
        if not isinstance(saved_processes, int) or acc.process_index < saved_processes:
            _set_rng_state(load_tree(rng_stem), path / f"{rng_stem.name}.json")
        else:
            logger.warning(
                "%s was written by %d processes: the random states of rank %d are not restored",
                path,
                saved_processes,
                acc.process_index,
            )


def _model_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def _read_position(path: Path) -> TrainPosition:
    data = _read_json(path)
    fields = ("epoch", "step", "global_step")
    if not (
        isinstance(data, dict)
        and set(data) == set(fields)
        and all(isinstance(data[k], int) and not isinstance(data[k], bool) and data[k] >= 0 for k in fields)
    ):
        raise ValueError(f"checkpoint file {path} is not a training position ({', '.join(fields)})")
    return TrainPosition(**data)


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
