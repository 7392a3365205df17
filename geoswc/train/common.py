"""What every training stage shares: its result, how it starts (accelerator, seed, config beside the output)
and how it ends (summary file, trackers closed)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Sequence, Union

from accelerate import Accelerator

from geoswc.config import Config
from geoswc.train.accelerator import build_accelerator, finish_trackers, seed_everything

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass
class StageResult:
    """What a training stage made.

    Attributes:
        stage: ``backbone``, ``features``, ``heads``, ``retrieval`` or ``index``.
        folder: the stage's output folder.
        files: the outputs a later stage reads, by name (e.g. ``{"backbone": folder, "ce": .../ce.safetensors}``).
        summary: what the stage reports (per-epoch history, counts, whether the ranks agree); also written as
            ``train_<stage>.json`` in the folder.
        complete: False when ``max_steps`` stopped the stage early (a checkpoint is there to resume from).
    """

    stage: str
    folder: Path
    files: Dict[str, Path] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    complete: bool = True

    def last_epochs(self) -> Dict[str, Any]:
        """The short form worth keeping: the last epoch of every trained model, else the plain values."""

        def last(summary: Dict[str, Any]) -> Dict[str, Any]:
            history = summary.get("history") or []
            return history[-1] if history else {}

        if "heads" in self.summary:
            return {kind: last(s) for kind, s in self.summary["heads"].items()}
        if "history" in self.summary:
            return last(self.summary)
        return {k: v for k, v in self.summary.items() if isinstance(v, (int, float, str))}


def start_stage(
    config: Config, out: Path, *, stage: str, cpu: bool = False, log_with: Sequence[str] = ()
) -> Accelerator:
    """The stage's accelerator, every rank seeded alike, and the resolved config saved in ``out``."""
    accelerator = build_accelerator(config.train, cpu=cpu, out_dir=out, log_with=log_with, run_name=stage)
    seed_everything(config.train.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    accelerator.wait_for_everyone()
    return accelerator


def finish_stage(accelerator: Accelerator, out: Path, stage: str, summary: Dict[str, Any]) -> None:
    """Write ``train_<stage>.json`` (main process) and close the trackers."""
    if accelerator.is_main_process:
        (out / f"train_{stage}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if not summary.get("ranks_identical", True):
            logger.error("%s: ranks ended with different weights", stage)
    finish_trackers(accelerator)


def unwrapped(accelerator: Accelerator, model: Any) -> Any:
    """A prepared (and possibly compiled) model as the plain module."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)
