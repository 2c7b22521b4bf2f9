"""Plumbing every detector shares: resizing and batching images, matching boxes, sampling them.

* :class:`DetectionTransform` normalises each image, resizes it so that its short side is
  ``min_size`` (the long side at most ``max_size``), pads the batch to a multiple of 32 and, after
  the model has run, maps boxes and masks back to the original image. It is the only place that
  resizes a detector's images: datasets hand over images at their own size (the default
  training augmentation only flips), and multi-scale training is a tuple ``min_size`` given to
  the model. :func:`resized_shape` is the one implementation of the min/max-size rule.
* :func:`training_targets` checks the targets a detector is given and removes crowd regions, so
  that no model ever trains a crowd region as an object.
* :func:`match_boxes` assigns each anchor or proposal the ground-truth box it overlaps most, or
  marks it background / ignored by IoU thresholds.
* :func:`sample_balanced` picks a fixed number of training examples per image with at most a
  given fraction of positives, because background outnumbers objects by hundreds to one.

The numbers follow torchvision's ``GeneralizedRCNNTransform``, ``Matcher`` and
``BalancedPositiveNegativeSampler`` (tests compare them), including the order of random draws,
so that a minis model and torchvision's trained from the same random state see the same samples.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minis.nn.layers import IMAGENET_MEAN, IMAGENET_STD
from minis.ops.masks import detection_masks, paste_masks_in_image, resize_masks

BELOW_LOW_THRESHOLD = -1  # match_boxes: IoU below the background threshold
BETWEEN_THRESHOLDS = -2  # match_boxes: neither object nor background; ignored by the loss


class ImageBatch:
    """Padded images ``tensors [B,3,H,W]`` and each image's size before padding, ``image_sizes``."""

    def __init__(self, tensors: torch.Tensor, image_sizes: list[tuple[int, int]]) -> None:
        self.tensors = tensors
        self.image_sizes = image_sizes


def resize_boxes(boxes: torch.Tensor, old_size: Sequence[int], new_size: Sequence[int]) -> torch.Tensor:
    """Scale xyxy ``boxes [N,4]`` from an image of ``old_size (h, w)`` to one of ``new_size``."""
    ratio_h, ratio_w = (
        torch.tensor(new, dtype=torch.float32, device=boxes.device) / torch.tensor(old, dtype=torch.float32, device=boxes.device)
        for new, old in zip(new_size, old_size)
    )
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack([x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h], dim=1)


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """The factor that makes the short side ``min_size`` unless the long side would pass ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_shape(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """Output ``(height, width)`` of the detection resize rule (Detectron's and torchvision's).

    The image is scaled by :func:`resize_scale`, and each side rounded down, as
    ``F.interpolate(scale_factor=..., recompute_scale_factor=True)`` (hence torchvision) does.
    """
    scale = resize_scale(height, width, min_size, max_size)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


class DetectionTransform(nn.Module):
    """Normalise, resize and batch images (and their targets); map predictions back.

    ``min_size`` may be a tuple: in training each image then gets a short side drawn from it
    (multi-scale training); evaluation always uses the last one. This is the only resize a
    detector's images go through (see the module docstring).
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 size_divisible: int = 32) -> None:
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.size_divisible = size_divisible

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, std={self.image_std}"

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None
                ) -> tuple[ImageBatch, list[dict] | None]:
        """``images``: list of ``[3,H_i,W_i]`` in 0..1. Returns the batch and the resized targets (copies)."""
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
        targets = [dict(t) for t in targets] if targets is not None else None
        resized = []
        for i, image in enumerate(images):
            image, target = self.resize(self.normalize(image), targets[i] if targets is not None else None)
            resized.append(image)
            if targets is not None:
                targets[i] = target
        image_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized]
        return ImageBatch(self.pad_and_stack(resized), image_sizes), targets

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image: torch.Tensor, target: dict | None) -> tuple[torch.Tensor, dict | None]:
        """Scale so the short side is ``min_size`` unless the long side would pass ``max_size``."""
        if self.training:  # one draw per image, even with a single size: keeps the random stream aligned
            min_size = self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]
        else:
            min_size = self.min_size[-1]
        height, width = image.shape[-2:]
        size = resized_shape(height, width, min_size, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, None
        target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def pad_and_stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``[B,3,H,W]``: every image in the top-left corner of a zero canvas, sides multiples of 32.

        A multiple of the coarsest stride keeps every FPN level aligned with the level above.
        """
        stride = self.size_divisible
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        height, width = (-(-height // stride) * stride, -(-width // stride) * stride)
        batch = images[0].new_zeros(len(images), 3, height, width)
        for canvas, image in zip(batch, images):
            canvas[:, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Boxes back to original pixels; ``masks [N,1,M,M]`` pasted into ``[N,1,H,W]`` probabilities.

        Inside :func:`minis.ops.masks.rle_masks` the masks come out as COCO RLEs instead, pasted
        a chunk of detections at a time (see :func:`minis.ops.masks.detection_masks`).
        """
        for detection, size, original in zip(detections, image_sizes, original_sizes):
            detection["boxes"] = boxes = resize_boxes(detection["boxes"], size, original)
            if "masks" in detection:
                masks = detection["masks"]
                detection["masks"] = detection_masks(
                    len(masks), original, lambda part: paste_masks_in_image(masks[part], boxes[part], original))
        return detections


def check_targets(targets: list[dict] | None, num_images: int) -> list[dict]:
    """Refuse training targets a detector cannot learn from, naming the image and the field.

    Crowd regions (``iscrowd = 1``) are exempt from the box check: they are removed before
    training (:func:`training_targets`), and COCO's crowd boxes may be degenerate.
    """
    if targets is None:
        raise ValueError("training mode needs targets: model(images, targets)")
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        image_id = target.get("image_id", f"#{i}")
        for field in ("boxes", "labels"):
            if field not in target:
                raise ValueError(f"image id {image_id}: target has no {field!r}")
        boxes = target["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"image id {image_id}: 'boxes' must be [N,4], got {tuple(boxes.shape)}")
        for field in ("labels", "masks", "iscrowd"):
            if field in target and len(target[field]) != len(boxes):
                raise ValueError(f"image id {image_id}: {len(boxes)} boxes but {len(target[field])} {field}")
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1) & ~crowd_flags(target)
        if degenerate.any():
            first = int(degenerate.nonzero()[0])
            raise ValueError(f"image id {image_id}: box {first} {boxes[first].tolist()} has no width or no height")
    return targets


# Per-instance fields of a detection target: dropped together when an instance is dropped.
INSTANCE_FIELDS = ("boxes", "labels", "masks", "iscrowd", "area")


def crowd_flags(target: dict) -> torch.Tensor:
    """``[N]`` bool: which instances of ``target`` are crowd regions (none when it has no ``iscrowd``)."""
    boxes = target["boxes"]
    if "iscrowd" not in target:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    return torch.as_tensor(target["iscrowd"], device=boxes.device).reshape(-1) != 0


def drop_crowd(target: dict) -> dict:
    """A copy of ``target`` without its crowd regions (every per-instance field filtered alike)."""
    crowd = crowd_flags(target)
    if not crowd.any():
        return dict(target)
    keep = ~crowd
    return {key: value[keep.to(value.device)] if key in INSTANCE_FIELDS else value for key, value in target.items()}


def training_targets(targets: list[dict] | None, num_images: int) -> list[dict]:
    """The targets a detector trains on: checked (:func:`check_targets`), crowd regions removed.

    A crowd region (``iscrowd = 1``: COCO's "a crowd of people" RLE, a labelme ``__ignore__``
    shape) marks many objects, or none, under one mask. Training it as one object would teach
    the model to draw one box around a crowd, so no model may use it as a positive: not as an
    anchor, a proposal, a location, nor a mask target. Every detector calls this function first
    in training, so the rule lives in one place and new models inherit it.

    The choice is torchvision's reference scripts' (drop crowd annotations before training), not
    Detectron's (keep them and mark anchors that overlap a crowd region as ignored). With it, an
    image whose only annotations are crowd regions trains exactly like an image without objects.
    The price: pixels of a crowd are background for the losses. Evaluation is unaffected:
    pycocotools reads crowd regions from the annotation file and does not count detections that
    fall on them as false positives.

    Returns new dicts (the caller's targets are not modified).
    """
    return [drop_crowd(target) for target in check_targets(targets, num_images)]


def match_boxes(quality: torch.Tensor, high: float, low: float, allow_low_quality: bool) -> torch.Tensor:
    """For each prediction (column of ``quality [G,P]``, an IoU matrix) its ground truth or a flag.

    Returns ``[P]`` int64: the index of the best-overlapping ground truth when its IoU >= ``high``;
    :data:`BELOW_LOW_THRESHOLD` when the IoU < ``low`` (background); :data:`BETWEEN_THRESHOLDS`
    otherwise (ignored). ``allow_low_quality`` (the RPN's rule) also keeps, for every ground truth,
    the predictions that overlap it best even below ``high``: without it a small or oddly shaped
    object that no anchor covers at IoU 0.7 would never be a positive.
    """
    best_iou, matches = quality.max(dim=0)
    best_before_thresholds = matches.clone() if allow_low_quality else None
    matches[best_iou < low] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= low) & (best_iou < high)] = BETWEEN_THRESHOLDS
    if allow_low_quality:
        best_per_truth = quality.max(dim=1).values
        # every prediction that ties with a ground truth's best overlap (ties are common for anchors)
        _, predictions = torch.nonzero(quality == best_per_truth[:, None], as_tuple=True)
        matches[predictions] = best_before_thresholds[predictions]
    return matches


def sample_balanced(labels: list[torch.Tensor], per_image: int, positive_fraction: float
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Masks of the sampled positives (``label >= 1``) and negatives (``label == 0``) per image.

    At most ``per_image * positive_fraction`` positives, drawn at random; negatives fill the rest.
    Labels of ``-1`` (ignored) are never sampled. Returns two lists of ``[N_i]`` uint8 masks.
    """
    positives, negatives = [], []
    for image_labels in labels:
        positive = torch.nonzero(image_labels >= 1).squeeze(1)
        negative = torch.nonzero(image_labels == 0).squeeze(1)
        num_positive = min(positive.numel(), int(per_image * positive_fraction))
        num_negative = min(negative.numel(), per_image - num_positive)
        chosen_positive = positive[torch.randperm(positive.numel(), device=positive.device)[:num_positive]]
        chosen_negative = negative[torch.randperm(negative.numel(), device=negative.device)[:num_negative]]
        positive_mask = torch.zeros_like(image_labels, dtype=torch.uint8)
        negative_mask = torch.zeros_like(image_labels, dtype=torch.uint8)
        positive_mask[chosen_positive] = 1
        negative_mask[chosen_negative] = 1
        positives.append(positive_mask)
        negatives.append(negative_mask)
    return positives, negatives


def top_candidates_per_level(scores: torch.Tensor, counts: Sequence[int], threshold: float, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-stage detectors' candidate selection for one image, before NMS.

    ``scores [N,K]`` hold every location's (or anchor's) score per class, levels one after the
    other (``counts`` rows each). On each level, the (row, class) pairs scoring above
    ``threshold`` and among its ``k`` best are kept: a fine level has many more rows than a
    coarse one, and without a per-level limit it would fill the list alone.

    Returns ``flat [D]`` (``row * K + class``) and their scores ``[D]``, level by level, each
    level's in decreasing score order (RetinaNet's and FCOS's rule, as torchvision applies it).
    """
    num_classes = scores.shape[1]
    chosen, chosen_scores, start = [], [], 0
    for count in counts:
        level = scores[start:start + count].flatten()
        index = torch.nonzero(level > threshold).squeeze(1)
        top_scores, order = level[index].topk(min(k, len(index)))
        chosen.append(index[order] + start * num_classes)
        chosen_scores.append(top_scores)
        start += count
    return torch.cat(chosen), torch.cat(chosen_scores)


def postprocess_image_masks(detections: list[dict], image_sizes: list[tuple[int, int]],
                            original_sizes: list[tuple[int, int]]) -> list[dict]:
    """Boxes and whole-image masks ``[N,1,h,w]`` (the resized image's) back to the original image's pixels.

    For models whose masks cover the image rather than a box (CondInst, YOLACT). Inside
    :func:`minis.ops.masks.rle_masks` the masks come out as COCO RLEs, resized a chunk of
    detections at a time (see :func:`minis.ops.masks.detection_masks`).
    """
    for detection, size, original in zip(detections, image_sizes, original_sizes):
        detection["boxes"] = resize_boxes(detection["boxes"], size, original)
        masks = detection["masks"]
        detection["masks"] = detection_masks(len(masks), original, lambda part: resize_masks(masks[part], original))
    return detections


def mask_targets(masks: torch.Tensor, stride: int, sampled: bool = False) -> torch.Tensor:
    """Ground-truth masks ``[M,H,W]`` (0/1) at the predicted masks' stride: ``[M,1,H/stride,W/stride]``.

    By default the fraction of each ``stride x stride`` cell the object covers; with ``sampled``,
    the one pixel at offset ``stride // 2`` in each cell (AdelaiDet's targets, 0 or 1).
    """
    if sampled:
        return masks[:, None, stride // 2::stride, stride // 2::stride].float()
    return F.avg_pool2d(masks[:, None].float(), stride)


def pad_to(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[M,h,w]`` masks in the top-left corner of a ``[M,*size]`` zero canvas (like the padded images)."""
    return F.pad(masks, (0, size[1] - masks.shape[-1], 0, size[0] - masks.shape[-2]))
