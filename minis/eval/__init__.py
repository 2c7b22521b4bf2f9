"""Evaluation: COCO box/mask AP through pycocotools, and confusion-matrix mIoU."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "coco_evaluate": "minis.eval.coco",
    "evaluate_coco_results": "minis.eval.coco",
    "predictions_to_coco_results": "minis.eval.coco",
    "semantic_evaluate": "minis.eval.semantic",
    "ConfusionMatrix": "minis.eval.semantic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minis.eval' has no attribute {name!r}")
