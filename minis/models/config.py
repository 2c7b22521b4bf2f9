"""Model settings from builder keyword arguments, checked once for every model.

A detector's settings are a dataclass (``RCNNConfig``, ``FCOSConfig``, ...) whose fields its
builder accepts as keyword arguments: ``build("fcos", 81, score_thresh=0.3)``. A misspelt setting
must not be silently ignored, so every builder goes through :func:`config_from_kwargs`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

Config = TypeVar("Config")


def config_from_kwargs(config_class: type[Config], kwargs: dict[str, Any], model: str) -> Config:
    """``config_class(**kwargs)``, refusing any argument that is not one of its fields.

    Raises:
        TypeError: naming the unknown argument(s), the model and the settings class, e.g.
            ``"FCOS: unknown argument(s) score_threshold; settings are the fields of FCOSConfig"``.
    """
    names = {field.name for field in fields(config_class)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"{model}: unknown argument(s) {', '.join(unknown)}; settings are the fields of "
                        f"{config_class.__name__}")
    return config_class(**kwargs)
