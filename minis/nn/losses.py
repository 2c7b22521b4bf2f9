"""Losses of the one-stage detectors: focal loss, GIoU loss, dice loss.

* **Focal loss** (Lin et al., ICCV 2017, RetinaNet). A one-stage detector scores every location
  of every FPN level: tens of thousands of candidates per image of which a handful are objects.
  Plain cross-entropy is then dominated by the many easy background locations. The focal loss
  multiplies each term by ``(1 - p_t)^gamma``, where ``p_t`` is the probability given to the
  right answer, so that well-classified examples fade out, and weighs positives by ``alpha``.
* **IoU loss** (Yu et al., ACM MM 2016, UnitBox; the FCOS paper's box loss): ``-ln(IoU)``
  between a predicted box and its target.
* **GIoU loss** (Rezatofighi et al., CVPR 2019): ``1 - GIoU`` between a predicted box and its
  target. IoU itself is the measure a detector is judged by and does not depend on the box's
  scale; the "generalised" term ``(enclosing area - union) / enclosing area`` keeps a gradient
  when the boxes do not overlap at all.
* **Dice loss** (Milletari et al., 3DV 2016; used by CondInst): ``1 - 2|X.Y| / (|X|^2 + |Y|^2)``
  per mask. It compares whole masks, so a small object counts as much as a large one, and it
  needs no weighting of foreground against background pixels.

The focal and GIoU losses compute the same numbers as ``torchvision.ops.sigmoid_focal_loss`` and
``torchvision.ops.generalized_box_iou_loss`` (tests/test_fcos.py, where FCOS uses them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum() * 0.0
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    """Focal loss on independent sigmoid outputs; ``logits`` and 0/1 ``targets`` of any (equal) shape.

    ``alpha`` weighs positives (``1 - alpha`` negatives); ``alpha < 0`` turns the weighting off.
    RetinaNet's ``alpha = 0.25`` looks backwards (positives are rare) but the ``gamma`` term
    already removes most of the negatives' weight, and 0.25 was best in the paper's Table 1a.
    """
    # float32: under mixed precision a sum over every location and class overflows float16
    logits, targets = logits.float(), targets.float()
    probability = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_right = probability * targets + (1 - probability) * (1 - targets)
    loss = cross_entropy * (1 - p_right) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def _paired_iou(boxes: torch.Tensor, target_boxes: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of each box with the target in the same row (``[..., 4]`` xyxy pairs)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    tx1, ty1, tx2, ty2 = target_boxes.unbind(-1)
    overlap_w = (torch.min(x2, tx2) - torch.max(x1, tx1)).clamp(min=0)
    overlap_h = (torch.min(y2, ty2) - torch.max(y1, ty1)).clamp(min=0)
    intersection = overlap_w * overlap_h
    union = (x2 - x1) * (y2 - y1) + (tx2 - tx1) * (ty2 - ty1) - intersection
    return intersection / (union + eps), union


def iou_loss(boxes: torch.Tensor, target_boxes: torch.Tensor, reduction: str = "none",
             eps: float = 1e-7) -> torch.Tensor:
    """``-ln(IoU)`` of each box with the target in the same row: ``[..., 4]`` xyxy pairs -> ``[...]``.

    Boxes that do not overlap get ``-ln(eps)`` and no gradient: that is what GIoU adds.
    """
    iou, _ = _paired_iou(boxes, target_boxes, eps)
    return _reduce(-torch.log(iou.clamp(min=eps)), reduction)


def giou_loss(boxes: torch.Tensor, target_boxes: torch.Tensor, reduction: str = "none",
              eps: float = 1e-7) -> torch.Tensor:
    """``1 - GIoU`` of each box with the target in the same row: ``[..., 4]`` xyxy pairs -> ``[...]``."""
    iou, union = _paired_iou(boxes, target_boxes, eps)
    x1, y1, x2, y2 = boxes.unbind(-1)
    tx1, ty1, tx2, ty2 = target_boxes.unbind(-1)
    enclosing = (torch.max(x2, tx2) - torch.min(x1, tx1)) * (torch.max(y2, ty2) - torch.min(y1, ty1))
    giou = iou - (enclosing - union) / (enclosing + eps)
    return _reduce(1 - giou, reduction)


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - dice`` per mask: ``[N,...]`` probabilities and 0/1 targets -> ``[N]``.

    Squares in the denominator (the V-Net form): the gradient then pushes every pixel's
    probability towards its target, not only the ones inside the target. Computed in float32:
    under mixed precision a sum over a large mask passes float16's maximum (65504).
    """
    probabilities, targets = probabilities.flatten(1).float(), targets.flatten(1).float()
    overlap = (probabilities * targets).sum(1)
    total = (probabilities ** 2).sum(1) + (targets ** 2).sum(1) + eps
    return 1 - 2 * overlap / total
