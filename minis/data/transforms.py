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


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of the Detectron / torchvision detection resize rule.

    Scale the image so its shorter side becomes ``min_size``, unless that would make the longer
    side exceed ``max_size``; then scale so the longer side is exactly ``max_size``. The aspect
    ratio is kept (up to rounding to whole pixels).
    """
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class ResizeMinMax(nn.Module):
    """Resize so the shorter side is ``min_size`` and the longer at most ``max_size``.

    ``min_size`` may be a sequence: one value is drawn per call (multi-scale training, as in
    Mask R-CNN's recipes).
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int) -> None:
        super().__init__()
        self.min_sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        self.max_size = max_size

    def forward(self, image: Any, target: dict) -> tuple[Any, dict]:
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        height, width = F.get_size(image)
        size = resized_shape(height, width, min_size, self.max_size)
        return v2.Resize(list(size), antialias=True)(image, target)


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


def train_transforms(
    min_size: int | Sequence[int] = (640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    flip: float = 0.5,
    jitter: float = 0.0,
) -> v2.Compose:
    """Training augmentation for instance segmentation (Mask R-CNN style).

    Colour jitter (when ``jitter > 0``), multi-scale resize (shorter side drawn from
    ``min_size``, longer side at most ``max_size``), horizontal flip with probability ``flip``,
    then instances with empty boxes dropped. The defaults are the COCO recipe; the small
    synthetic benchmark uses small sizes.
    """
    steps = _color_jitter(jitter) + [ResizeMinMax(min_size, max_size)]
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    steps.append(DropEmptyBoxes())
    return v2.Compose(steps)


def eval_transforms(min_size: int | None = 800, max_size: int = 1333) -> v2.Compose:
    """Evaluation: the deterministic resize (or nothing when ``min_size`` is None).

    With a resize, predictions come out in the resized frame; scale boxes and masks back to
    the original image before comparing with the COCO json (or pass ``min_size=None``).
    """
    return v2.Compose([v2.Identity() if min_size is None else ResizeMinMax(min_size, max_size)])


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
