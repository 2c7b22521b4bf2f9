"""The engine: one Trainer, one evaluator and one predictor for every model.

- :class:`Trainer` and :class:`TrainConfig` (``trainer.py``): the training loop, checkpoints,
  exact resume, logs, distributed training;
- :func:`evaluate` and :func:`predict` (``evaluation.py``): metrics and outputs of any model;
- ``schedules.py``: optimizers and per-iteration learning-rate schedules;
- ``checkpoint.py``: atomic, safely loadable checkpoints and random-state capture;
- ``distributed.py``: the few pieces of ``torch.distributed`` the Trainer uses.
"""

from minis.engine.checkpoint import load_checkpoint, save_checkpoint
from minis.engine.evaluation import evaluate, predict
from minis.engine.schedules import build_optimizer, build_scheduler, lr_factor
from minis.engine.trainer import NonFiniteLossError, TrainConfig, Trainer, resolve_device

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "predict",
    "resolve_device",
    "save_checkpoint",
]
