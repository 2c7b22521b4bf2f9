"""Collate functions: how a list of ``(image, target)`` items becomes one batch.

Semantic models take one tensor ``[B,3,H,W]``, so their images (and label maps) must share a
size; training transforms crop them to make sure. Instance models take a *list* of images of any
size (the torchvision convention) because detection images are rarely cropped, so their batch is
simply the lists of images and targets.

Both return plain ``torch.Tensor`` objects: the ``tv_tensors`` wrappers (``Image``, ``Mask``,
``BoundingBoxes``) only matter to the transforms, which run before collation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _plain(value: Any) -> Any:
    """A tv_tensor as a plain tensor (same data, no copy); anything else unchanged."""
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def _image_id(target: Any, position: int) -> Any:
    return target.get("image_id", f"#{position}") if isinstance(target, dict) else f"#{position}"


def collate_semantic(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack semantic items into ``(images [B,3,H,W] float, targets [B,H,W] int64, image_ids)``.

    Each item is ``(image [3,H,W], {"semantic": [H,W] int64, "image_id": int})``.

    Raises:
        ValueError: the images or label maps do not all have the same size (the message lists
            the image ids and their sizes).
    """
    images = [_plain(image) for image, _ in batch]
    labels = [_plain(target["semantic"]) for _, target in batch]
    image_ids = [_image_id(target, i) for i, (_, target) in enumerate(batch)]
    sizes = [tuple(image.shape[-2:]) for image in images] + [tuple(label.shape[-2:]) for label in labels]
    if len(set(sizes)) > 1:
        listing = ", ".join(
            f"image id {image_id}: image {tuple(image.shape[-2:])} label {tuple(label.shape[-2:])}"
            for image_id, image, label in zip(image_ids, images, labels)
        )
        raise ValueError(
            f"semantic batches need equal sizes; use semantic_train_transforms(crop_size) ({listing})"
        )
    return torch.stack(images).float(), torch.stack(labels).long(), image_ids


def collate_instances(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep instance items as lists: ``([image [3,H,W], ...], [target dict, ...])``.

    Every target keeps its keys (``boxes``, ``labels``, ``masks``, ``iscrowd``, ``area``,
    ``image_id``, ...); tv_tensors become plain tensors.
    """
    images = [_plain(image) for image, _ in batch]
    targets = [{key: _plain(value) for key, value in target.items()} for _, target in batch]
    return images, targets
