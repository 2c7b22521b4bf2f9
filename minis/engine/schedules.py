"""Optimizers and learning-rate schedules.

The learning rate is set per *iteration*, not per epoch: a short linear warmup (large early
gradients of a freshly initialised head can wreck pretrained weights) followed by one of the
usual decays. The whole schedule is a function ``lr_factor(iteration)`` that multiplies the
base learning rate, and ``torch.optim.lr_scheduler.LambdaLR`` applies it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # imported for type hints only: trainer.py imports this module
    from minis.engine.trainer import TrainConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "step", "constant")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a group with weight decay and one without.

    Weight decay pulls weights towards zero to keep the function simple. On a normalisation
    layer's scale and shift, or on a bias, it does nothing useful: they set scale and offset,
    not complexity, and shrinking them only fights the normalisation. So, as in most modern
    training recipes, every parameter with fewer than 2 dimensions (norm weights, all biases)
    gets ``weight_decay = 0``.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over :func:`parameter_groups` of ``model``."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}")


def lr_factor(
    iteration: int,
    *,
    total_iters: int,
    schedule: str = "poly",
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    poly_power: float = 0.9,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based).

    - warmup: from ``warmup_factor`` rising linearly to 1 over the first ``warmup_iters``;
    - ``poly``: ``(1 - t/T) ** poly_power``, the DeepLab schedule;
    - ``cosine``: ``(1 + cos(pi t/T)) / 2``, half a cosine from 1 down to 0;
    - ``step``: multiplied by ``gamma`` at each milestone (iterations) already passed;
    - ``constant``: 1.

    The decay runs over all ``total_iters`` (warmup included) and is multiplied by the warmup
    factor, as torchvision's reference scripts do.
    """
    progress = min(iteration, total_iters) / max(total_iters, 1)
    if schedule == "poly":
        factor = (1.0 - progress) ** poly_power
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "step":
        factor = gamma ** sum(iteration >= milestone for milestone in milestones)
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``config`` as a ``LambdaLR``, stepped once per iteration.

    ``config.milestones`` are given in epochs (how people think about them) and converted to
    iterations here.
    """
    total_iters = config.epochs * iters_per_epoch
    milestones = [epoch * iters_per_epoch for epoch in config.milestones]

    def factor(iteration: int) -> float:
        return lr_factor(
            iteration,
            total_iters=total_iters,
            schedule=config.schedule,
            warmup_iters=config.warmup_iters,
            warmup_factor=config.warmup_factor,
            poly_power=config.poly_power,
            milestones=milestones,
            gamma=config.gamma,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
