"""Conversions from torchvision models to minis models (same weights, same outputs).

Each architecture issue adds its converter to ``_CONVERTERS``, keyed by torchvision class name.
"""

from __future__ import annotations

from typing import Callable

import torch

_CONVERTERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {}


def convert(tv_model: torch.nn.Module) -> torch.nn.Module:
    kind = type(tv_model).__name__
    if kind not in _CONVERTERS:
        supported = ", ".join(sorted(_CONVERTERS)) or "none yet"
        raise TypeError(f"no minis port for torchvision {kind}; ports exist for: {supported}")
    return _CONVERTERS[kind](tv_model)
