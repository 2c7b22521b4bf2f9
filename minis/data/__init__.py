"""Data: the synthetic shapes benchmark, COCO and labelme readers, joint transforms.

Every dataset returns ``(image, target)``: ``image`` a float tensor ``[3,H,W]`` in 0..1 and
``target`` a dict (see :class:`minis.data.coco.CocoInstances` for instance targets and
:class:`minis.data.semantic.SemanticSegmentation` for semantic ones).
"""

from __future__ import annotations

import importlib

# Public name -> module that defines it. Resolved on first use so that ``import minis.data``
# stays cheap and each module can be read (and imported) on its own.
_EXPORTS = {
    "make_shapes": "minis.data.shapes",
    "SHAPE_CLASSES": "minis.data.shapes",
    "CocoInstances": "minis.data.coco",
    "CocoSemantic": "minis.data.coco",
    "CocoVOCSemantic": "minis.data.coco",
    "SemanticSegmentation": "minis.data.semantic",
    "labelme_to_coco": "minis.data.labelme",
    "download_coco": "minis.data.download",
    "train_transforms": "minis.data.transforms",
    "semantic_train_transforms": "minis.data.transforms",
    "collate_instances": "minis.data.collate",
    "collate_semantic": "minis.data.collate",
    "build_datasets": "minis.data.catalog",
    "build_dataset": "minis.data.catalog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minis.data' has no attribute {name!r}")
