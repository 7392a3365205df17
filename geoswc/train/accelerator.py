"""The ``Accelerator`` a training run uses, built from ``TrainConfig``: mixed precision, CPU or GPU, metric
trackers (TensorBoard, CSV), seeding that gives every rank the same initial weights, and GPU speed settings
(channels_last, ``torch.compile``)."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from torch import nn

from geoswc.data.validation import check_choice

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
    check_choice("mixed_precision", precision, MIXED_PRECISION)
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        precision = None
    trackers: List[Any] = []
    for name in log_with:
        check_choice("tracker", name, TRACKERS)
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
