"""Every architecture in one registry, built by name.

>>> import minis.models
>>> model = minis.models.build("baseline_fcn", num_classes=5)

``num_classes`` counts the background, as torchvision does: a dataset with K object classes
has ``num_classes = K + 1`` (semantic class 0 / instance label 0 is the background).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Decorator that makes a model builder available to :func:`build` under ``name``."""

    def wrap(builder: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def build(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
    """Build the model registered as ``name`` with ``num_classes`` classes (background included).

    Every model carries ``model.task`` (``"semantic"`` or ``"instance"``) and
    ``model.build_args`` (the arguments needed to build it again from a checkpoint).
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.build_args = {"name": name, "num_classes": num_classes, **kwargs}
    return model


def shapes_settings(name: str) -> dict:
    """The small CPU configuration of model ``name``: the ``build`` options the book trains on shapes.

    A model file declares it as ``SHAPES_SETTINGS`` next to its builder (detectors: the small
    backbone, narrow FPN and heads, 128-pixel inputs). Models without one (the semantic models,
    whose defaults are already small) give ``{}``. Tests and benchmarks that run every registered
    model use it, so a new model joins them by declaring its settings.

    >>> model = build("mask_rcnn", num_classes=5, **shapes_settings("mask_rcnn"))
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    module = sys.modules[_REGISTRY[name].__module__]
    return dict(getattr(module, "SHAPES_SETTINGS", {}))


def shapes_recipe(name: str) -> dict:
    """The chapter's training recipe of model ``name`` on shapes: its model file's ``SHAPES_RECIPE``
    (:class:`~minis.engine.TrainConfig` fields). Raises ``KeyError`` for a model whose file has none.

    >>> config = TrainConfig(**shapes_recipe("condinst"), device="cpu")
    """
    shapes_settings(name)  # an unknown name: the same message
    module = sys.modules[_REGISTRY[name].__module__]
    if not hasattr(module, "SHAPES_RECIPE"):
        having = [n for n in list_models() if hasattr(sys.modules[_REGISTRY[n].__module__], "SHAPES_RECIPE")]
        raise KeyError(f"{name!r} has no shapes recipe; models with one: {', '.join(having)}")
    return dict(module.SHAPES_RECIPE)


def chapter_options(name: str) -> dict:
    """The ``build`` options model ``name``'s chapter adds on shapes: its model file's ``SHAPES_OPTIONS``
    (the semantic models': U-Net's width, depth and deep supervision, DeepLab's and PSPNet's head
    width and pretrained backbone), ``{}`` if it has none. ``minis train --recipe shapes`` builds with
    :func:`shapes_settings`, then these.

    >>> model = build("unet", num_classes=6, **chapter_options("unet"))
    """
    shapes_settings(name)  # an unknown name: the same message
    module = sys.modules[_REGISTRY[name].__module__]
    return dict(getattr(module, "SHAPES_OPTIONS", {}))


def from_torchvision(tv_model: torch.nn.Module) -> torch.nn.Module:
    """Return the minis model with the same weights and outputs as a torchvision model.

    Ports are added with the architectures they belong to (FCN, DeepLabV3, Faster/Mask R-CNN,
    FCOS); a model that has no port yet is refused with the list of those that have one.
    """
    from minis.models import porting

    return porting.convert(tv_model)


# Architectures register themselves on import; importing them here keeps ``build`` complete.
from minis.models import baseline  # noqa: E402,F401
from minis.models import deeplab  # noqa: E402,F401
from minis.models import pspnet  # noqa: E402,F401
from minis.models import fcn  # noqa: E402,F401
from minis.models import unet  # noqa: E402,F401
from minis.models import rcnn  # noqa: E402,F401
from minis.models import ms_rcnn  # noqa: E402,F401
from minis.models import fcis  # noqa: E402,F401
from minis.models import fcos  # noqa: E402,F401
from minis.models import condinst  # noqa: E402,F401
from minis.models import retinanet  # noqa: E402,F401
from minis.models import yolact  # noqa: E402,F401
from minis.models import solo  # noqa: E402,F401
from minis.models import solov2  # noqa: E402,F401
