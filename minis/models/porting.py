"""Conversions from torchvision models to minis models (same weights, same outputs).

A model file declares its converter with ``@register_port("FCN")`` (the torchvision class
name); :func:`minis.models.from_torchvision` dispatches on the class of the model it is given.
"""

from __future__ import annotations

from typing import Callable

import torch

Converter = Callable[[torch.nn.Module], torch.nn.Module]
_CONVERTERS: dict[str, Converter] = {}


def register_port(torchvision_class: str) -> Callable[[Converter], Converter]:
    """Decorator: ``converter(tv_model) -> minis model`` handles torchvision's ``torchvision_class``."""

    def wrap(converter: Converter) -> Converter:
        if torchvision_class in _CONVERTERS:
            raise ValueError(f"a port for torchvision {torchvision_class} is registered twice")
        _CONVERTERS[torchvision_class] = converter
        return converter

    return wrap


def convert(tv_model: torch.nn.Module) -> torch.nn.Module:
    kind = type(tv_model).__name__
    if kind not in _CONVERTERS:
        supported = ", ".join(sorted(_CONVERTERS)) or "none yet"
        raise TypeError(f"no minis port for torchvision {kind}; ports exist for: {supported}")
    return _CONVERTERS[kind](tv_model)
