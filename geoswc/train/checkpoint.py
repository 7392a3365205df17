"""Checkpoints of a training run that resume exactly and never run code when loaded.

Model, optimizer, scheduler, RNG states and objects registered with ``accelerator.register_for_checkpointing``
are written as safetensors and JSON (never pickles), with ``position.json`` (the epoch and the step within
the data stream) written last: a folder that has it is complete.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

logger = logging.getLogger(__name__)


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
