"""Joint image + target transforms, built on ``torchvision.transforms.v2``.

Every transform here is called as ``transform(image, target) -> (image, target)`` and works on
both kinds of target in ``minis``:

- instance targets (``boxes``, ``labels``, ``masks``, ``iscrowd``, ``area``, ``image_id``);
- semantic targets (``semantic``, ``image_id``).

torchvision's v2 functions know what to do with each piece because the pieces are typed
``tv_tensors``: an ``Image`` is interpolated bilinearly, a ``Mask`` with nearest neighbour (so
no new label values appear), ``BoundingBoxes`` have their coordinates scaled, flipped or
shifted. Plain values (``labels``, ``image_id``) pass through untouched.

``area`` is left as the COCO annotation's area in the original image: COCO evaluation reads
areas from the json, not from the targets, so nothing downstream needs it rescaled.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from minis.data.coco import IGNORE_INDEX

# Per-instance tensors that must be dropped together with their box (masks, being typed
# tv_tensors.Mask, are dropped by SanitizeBoundingBoxes on its own).
PER_INSTANCE_FIELDS = ("labels", "iscrowd", "area")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``s`` or ``(h, w)`` -> ``(h, w)``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class RandomScale(nn.Module):
    """Resize by a factor drawn uniformly from ``scale_range`` (the DeepLab/PSPNet augmentation)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale_range = scale_range

    def forward(self, image: Any, target: dict) -> tuple[Any, dict]:
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        height, width = F.get_size(image)
        size = [max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))]
        return v2.Resize(size, antialias=True)(image, target)


class PadTo(nn.Module):
    """Pad at the bottom and right so the image is at least ``size`` (``(h, w)`` or an int).

    The image is padded with 0, instance masks with 0 (no object there), and the semantic map
    with 255, the ignore index: padding is not background, so the loss must skip it. Padding
    at the bottom/right leaves box coordinates unchanged (only their canvas grows).
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        super().__init__()
        self.height, self.width = _pair(size)

    def forward(self, image: Any, target: dict) -> tuple[Any, dict]:
        height, width = F.get_size(image)
        padding = [0, 0, max(self.width - width, 0), max(self.height - height, 0)]  # left, top, right, bottom
        if not any(padding):
            return image, target
        padded = {}
        for key, value in target.items():
            if key == "semantic":
                value = F.pad(value, padding, fill=IGNORE_INDEX)
            elif isinstance(value, (tv_tensors.Mask, tv_tensors.BoundingBoxes)):
                value = F.pad(value, padding, fill=0)
            padded[key] = value
        return F.pad(image, padding, fill=0), padded


def _per_instance_fields(inputs: tuple) -> tuple[torch.Tensor, ...]:
    """For SanitizeBoundingBoxes: the target's tensors with one entry per box."""
    _, target = inputs
    return tuple(target[key] for key in PER_INSTANCE_FIELDS if key in target)


class DropEmptyBoxes(nn.Module):
    """Remove instances whose box became empty (cropped away, or under 1 pixel after a resize).

    Their masks, labels, iscrowd and area go with them. Semantic targets (no ``boxes``) pass
    through unchanged, so the same pipeline serves both tasks.
    """

    def __init__(self, min_size: float = 1.0) -> None:
        super().__init__()
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=_per_instance_fields)

    def forward(self, image: Any, target: dict) -> tuple[Any, dict]:
        if "boxes" not in target:
            return image, target
        return self.sanitize(image, target)


def _color_jitter(strength: float) -> list[nn.Module]:
    """Brightness, contrast and saturation each jittered by up to ``strength`` (0 = none).

    Colour transforms touch only the ``Image``; masks and boxes pass through.
    """
    if not strength:
        return []
    return [v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)]


def train_transforms(flip: float = 0.5, jitter: float = 0.0) -> v2.Compose:
    """Training augmentation for instance segmentation: colour jitter (when ``jitter > 0``) and
    a horizontal flip with probability ``flip``, then instances with empty boxes dropped.

    No resize: a detector resizes its images itself (``DetectionTransform``, the model's
    ``min_size`` / ``max_size``), and resizing here too would be undone there. Multi-scale
    training is a tuple ``min_size`` given to the model, e.g.
    ``build("mask_rcnn", K, min_size=(640, 672, 704, 736, 768, 800))``: one short side drawn per
    image in training, the last one at evaluation.
    """
    steps = _color_jitter(jitter)
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    steps.append(DropEmptyBoxes())
    return v2.Compose(steps)


def semantic_train_transforms(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: float = 0.5,
    jitter: float = 0.0,
) -> v2.Compose:
    """Fixed-size training crops for semantic segmentation, so images batch without collation tricks.

    Colour jitter (when ``jitter > 0``), random rescale by a factor in ``scale_range``, pad to
    at least ``crop_size`` (semantic map padded with 255 = ignore), random crop of
    ``crop_size``, horizontal flip. Instance targets work too (their empty boxes are dropped).
    """
    steps = _color_jitter(jitter) + [
        RandomScale(scale_range),
        PadTo(crop_size),
        v2.RandomCrop(_pair(crop_size)),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    steps.append(DropEmptyBoxes())
    return v2.Compose(steps)
