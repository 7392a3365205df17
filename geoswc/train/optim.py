"""Optimisers and learning-rate schedules as configuration (the ``opt``/``sched`` fields of the backbone,
heads and retrieval sections).

Optimisers come from timm's ``create_optimizer_v2`` by name (``momentum``: SGD with momentum, ``adamw``,
``sgd``: Nesterov SGD, ...) with weight decay on every parameter in one group, as the paper's training applied
it: timm is given the parameters, not the module, so it cannot exempt biases and norm weights
(``filter_bias_and_bn`` needs parameter names). The two schedules of the paper are torch's ``StepLR`` (``step``: x
``gamma`` every ``step_epochs`` epochs, stepped per epoch) and ``CosineAnnealingLR`` (``cosine``: to 0 over
``total_updates``, stepped per update): timm's closed-form schedulers give learning rates that differ from
these in the last bits, which would change trained weights for the same seed.
"""

from __future__ import annotations

from typing import Any, Iterable, Tuple, Union

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from geoswc.data.validation import choice_error

SCHEDULES = ("step", "cosine")


def create_optimizer(
    params: Union[nn.Module, Iterable[torch.Tensor]],
    *,
    opt: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimiser ``opt`` (a timm optimizer name) over ``params``, one parameter group, decay on all.

    Raises:
        ValueError: ``opt`` is not an optimizer timm knows.
    """
    names = list_optimizers()
    if str(opt).lower() not in names:
        raise ValueError(f"unknown optimizer {opt!r}; choose one of: {', '.join(names)}")
    if isinstance(params, nn.Module):
        params = params.parameters()
    return create_optimizer_v2(
        list(params),
        opt=str(opt).lower(),
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        filter_bias_and_bn=False,
    )


def create_schedule(
    optimizer: torch.optim.Optimizer,
    sched: str,
    *,
    total_updates: int = 1,
    step_epochs: int = 1,
    gamma: float = 1.0,
) -> Tuple[Any, str]:
    """``(scheduler, schedule_per)``: the schedule and whether `geoswc.train.engine.train_loop` steps it per
    ``epoch`` or per ``step`` (optimizer update).

    Raises:
        ValueError: ``sched`` is not one of `SCHEDULES`.
    """
    if sched == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_epochs, gamma=gamma), "epoch"
    if sched == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_updates)), "step"
    raise choice_error("schedule", sched, SCHEDULES)


def optimizer_and_schedule(
    params: Union[nn.Module, Iterable[torch.Tensor]], section: Any, *, total_updates: int
) -> Tuple[torch.optim.Optimizer, Any, str]:
    """``(optimizer, scheduler, schedule_per)`` from a config section's ``opt``, ``lr``, ``weight_decay``,
    ``momentum``, ``sched``, ``lr_step_epochs`` and ``lr_gamma`` (the last three only where it has them)."""
    optimizer = create_optimizer(
        params,
        opt=section.opt,
        lr=section.lr,
        weight_decay=section.weight_decay,
        momentum=getattr(section, "momentum", 0.9),
    )
    scheduler, schedule_per = create_schedule(
        optimizer,
        section.sched,
        total_updates=total_updates,
        step_epochs=getattr(section, "lr_step_epochs", 1),
        gamma=getattr(section, "lr_gamma", 1.0),
    )
    return optimizer, scheduler, schedule_per
