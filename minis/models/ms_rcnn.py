"""Mask Scoring R-CNN (Huang, Huang, Gong, Huang & Wang, CVPR 2019): Mask R-CNN that judges its masks.

A detection's score measures how sure the classifier is about the class, not how good the mask
is. A MaskIoU head looks at the RoI features and the predicted mask and regresses the mask's IoU
with the ground truth; the mask's score is ``class score x predicted MaskIoU`` (output
``mask_scores``, which :func:`minis.eval.coco_evaluate` ranks masks by), so mask AP ranks good
masks first. Boxes keep their class scores. Everything else is :class:`minis.models.rcnn.MaskRCNN`,
which this model extends with one head and one loss.

Departures from the paper:

* **The head's widths follow the mask and box heads** (256 and 1024 by default, the paper's), so
  the small CPU settings shrink it with them.
* **The FPN Mask R-CNN of torchvision** underneath (see :mod:`minis.models.rcnn`), where the
  paper's code builds on maskrcnn-benchmark; the two differ in the details that module lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minis.models import rcnn, register
from minis.models.rcnn import MaskRCNN, RCNNConfig, RoISamples, _build, mask_loss
from minis.nn.fpn import BackboneFPN
from minis.ops.masks import chunk_slices

# Mask R-CNN's small CPU settings and training recipe, but 4 epochs instead of 6: the MaskIoU head
# makes every step slower, and six epochs do not fit the chapter's 3-minute budget on two cores
# (`python -m minis bench ms-rcnn` compares the two models at the full 6 epochs).
SHAPES_SETTINGS: dict = rcnn.SHAPES_SETTINGS
SHAPES_RECIPE: dict = {**rcnn.SHAPES_RECIPE, "epochs": 4}


class MaskIoUHead(nn.Module):
    """Predicts each mask's IoU with its object: ``features [K,C,14,14], mask [K,1,28,28] -> [K,classes]``.

    The 28x28 mask is max-pooled to 14x14 and concatenated to the RoI features; four 3x3
    convolutions (the last with stride 2) and three fully connected layers follow (the paper's
    Figure 3), one IoU per class as for the masks.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, hidden: int = 1024,
                 roi_size: int = 14) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + 1 if i == 0 else channels, channels, 3, padding=1, stride=2 if i == 3 else 1)
            for i in range(4))
        self.fc1 = nn.Linear(channels * (roi_size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.iou = nn.Linear(hidden, num_classes)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.iou.weight, std=0.01)
        nn.init.zeros_(self.iou.bias)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = torch.cat([features, F.max_pool2d(masks, kernel_size=2, stride=2)], dim=1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.iou(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def gt_area_inside_boxes(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Fraction of each matched object's pixels that lie inside its box, ``[K]``, via integral images.

    The mask target only shows the object inside the proposal; dividing by this fraction gives
    the whole object's area in the target's units, so that a mask that misses a part of the
    object cut off by the box is still penalised.

    Memory: the integral images are exact int32 counts, built only for the objects some box is
    matched to, a chunk of objects at a time (``minis.ops.masks.chunk_slices``): ``G`` float
    images of a large photo would take gigabytes.
    """
    height, width = gt_masks.shape[-2:]
    # whole pixels whose centre lies in the box, as the projected target counts them
    x1 = (boxes[:, 0] - 0.5).ceil().clamp(0, width).long()
    y1 = (boxes[:, 1] - 0.5).ceil().clamp(0, height).long()
    x2 = (boxes[:, 2] - 0.5).ceil().clamp(0, width).long().maximum(x1)
    y2 = (boxes[:, 3] - 0.5).ceil().clamp(0, height).long().maximum(y1)
    inside = torch.zeros(len(matched), dtype=torch.float32, device=boxes.device)
    total = torch.zeros_like(inside)
    objects = matched.unique()  # sorted
    for part in chunk_slices(len(objects), height + 1, width + 1):
        chunk = objects[part]
        integral = gt_masks.new_zeros(len(chunk), height + 1, width + 1, dtype=torch.int32)
        integral[:, 1:, 1:] = gt_masks[chunk]
        integral.cumsum_(1).cumsum_(2)  # in place; integral[g, y, x]: pixels of object g in [0,y) x [0,x)
        pairs = torch.nonzero(torch.isin(matched, chunk)).squeeze(1)
        g = torch.searchsorted(chunk, matched[pairs])  # each pair's object within the chunk
        corners = (integral[g, y2[pairs], x2[pairs]] - integral[g, y1[pairs], x2[pairs]]
                   - integral[g, y2[pairs], x1[pairs]] + integral[g, y1[pairs], x1[pairs]])
        inside[pairs] = corners.float()
        total[pairs] = integral[g, -1, -1].float()
    return inside / total.clamp(min=1)


def mask_iou_targets(mask_logits: torch.Tensor, mask_targets: torch.Tensor, inside_fraction: torch.Tensor
                     ) -> torch.Tensor:
    """IoU of each binarised predicted mask (``[K,M,M]`` logits > 0) with its object, ``[K]``."""
    predicted = (mask_logits > 0).float()
    truth = (mask_targets >= 0.5).float()
    intersection = (predicted * truth).sum((1, 2))
    truth_area = truth.sum((1, 2)) / inside_fraction.clamp(min=1e-6)
    union = predicted.sum((1, 2)) + truth_area - intersection
    return intersection / union.clamp(min=1.0)


class MaskScoringRCNN(MaskRCNN):
    """Mask R-CNN whose masks are scored ``class probability x predicted mask IoU``.

    Detections hold ``scores [N]`` (the class probabilities, as Mask R-CNN's: box AP is ranked by
    them), ``mask_iou [N]`` (the MaskIoU head's estimate) and ``mask_scores [N]`` (their product,
    which ranks the masks for mask AP). Setting ``model.score_with_mask_iou = False`` leaves out
    ``mask_scores``: the same detections and masks ranked as Mask R-CNN ranks them, for comparing
    the two scorings.
    """

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: RCNNConfig | None = None) -> None:
        super().__init__(backbone, num_classes, config)
        self.maskiou_head = MaskIoUHead(backbone.channels, num_classes, self.config.mask_head_channels,
                                        self.config.representation_size, roi_size=self.mask_pool_size)
        self.score_with_mask_iou = True

    def branch_losses(self, features, image_sizes, samples: RoISamples, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.mask_training_batch(features, image_sizes, samples, targets)
        boxes, matched, labels, roi_features, mask_logits, mask_targets = batch
        losses = {"loss_mask": mask_loss(mask_logits, labels, mask_targets)}
        if mask_targets.numel() == 0:
            losses["loss_maskiou"] = sum(p.sum() * 0 for p in self.maskiou_head.parameters())
            return losses
        index = torch.arange(len(labels), device=labels.device)
        own_logits = mask_logits[index, labels].detach()  # the head judges the masks, it does not change them
        inside = torch.cat([gt_area_inside_boxes(t["masks"], b, m) for t, b, m in zip(targets, boxes, matched)])
        iou_targets = mask_iou_targets(own_logits, mask_targets, inside)
        predicted_iou = self.maskiou_head(roi_features, own_logits.sigmoid()[:, None])[index, labels]
        losses["loss_maskiou"] = self.config.maskiou_weight * F.mse_loss(predicted_iou, iou_targets)
        return losses

    def add_branch_outputs(self, features, image_sizes, detections: list[dict]) -> torch.Tensor:
        roi_features = super().add_branch_outputs(features, image_sizes, detections)
        masks = torch.cat([d["masks"] for d in detections])
        labels = torch.cat([d["labels"] for d in detections])
        iou = self.maskiou_head(roi_features, masks)[torch.arange(len(labels), device=labels.device), labels]
        for detection, image_iou in zip(detections, iou.split([len(d["boxes"]) for d in detections])):
            detection["mask_iou"] = image_iou
            if self.score_with_mask_iou:  # the masks are re-ranked; the boxes keep their class scores
                detection["mask_scores"] = detection["scores"] * image_iou.clamp(0, 1)
        return roi_features




@register("ms_rcnn")
def ms_rcnn(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
            fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> MaskScoringRCNN:
    """Mask Scoring R-CNN with FPN; ``config`` overrides :class:`RCNNConfig` fields."""
    return _build(MaskScoringRCNN, num_classes, backbone, pretrained_backbone, fpn_channels, trainable_layers,
                  **config)
