"""YOLACT (Bolya, Zhou, Xiao & Lee, ICCV 2019): masks from prototypes and coefficients, in one stage.

Mask R-CNN and FCIS segment each detection from features pooled in its box, a second stage
whose cost grows with the number of objects. YOLACT splits instance segmentation into two
tasks that run in parallel, once per image:

* a **protonet** (an FCN on ``P3``, upsampled to stride 4) predicts ``k = 32`` image-sized
  *prototype* masks ``P [h,w,k]``, the same for every instance;
* the detector's head predicts, next to each anchor's class scores and box offsets, ``k``
  *coefficients* ``c`` (``tanh``: a prototype can be added or subtracted).

An instance's mask is ``sigmoid(P c)``: for the ``n`` detections kept by NMS, one matrix
product ``sigmoid(P C^T) [h,w,n]`` (:func:`assemble_masks`), then **cropped** to the box (the
ground-truth box in training, the predicted one at test; outside it the mask is 0) and
upsampled to the image. Nothing in the mask path depends on the number of detections except
that product, hence "real time".

How can a fully convolutional protonet make masks that differ by position, when the same
pixels give the same output wherever they are? Zero padding: the network can tell how far a
pixel lies from the image border, and the prototypes learn partitions of the image (left of
some line, top-left quadrant, ...) that the coefficients combine into one instance's mask.

The detector is :class:`minis.models.retinanet.RetinaNet` (the paper builds on it) with YOLACT's
head and losses:

* **Head, shared across P3-P7**: one 3x3 convolution (ReLU), then three sibling 3x3
  convolutions: ``C + 1`` class logits per anchor (a **softmax** with a background class, not
  RetinaNet's sigmoids), 4 box offsets (SSD's encoding: :class:`minis.ops.BoxCoder` weights 10,
  10, 5, 5), ``k`` coefficients.
* **Anchors**: 3 per location, aspect ratios 1, 1/2, 2, one size per level: 24, 48, 96, 192 and
  384 pixels at 550 (scaled with ``max_size``), centred in their cells.
* **Matching**: IoU >= 0.5 positive, < 0.4 negative, in between ignored; every object keeps its
  best anchor (:func:`minis.nn.detection.match_boxes`, RetinaNet's rule).
* **Losses**, each divided by the batch's number of positives:
  softmax cross-entropy over the positives and the hardest negatives, 3 per positive (online
  hard example mining: the rest of the ~20k background anchors would drown the objects);
  smooth L1 on the offsets (weight 1.5); the mask loss, binary cross-entropy between the
  assembled mask and the object's mask at prototype resolution, inside the ground-truth box,
  divided by the box's area (so a large object does not outweigh a small one; weight 6.125,
  at most 100 masks per image); and an auxiliary **semantic segmentation** loss, a 1x1
  convolution on ``P3`` predicting a sigmoid per class (weight 1, training only), which gives
  the features extra supervision at no cost at test time.
* **Inference**: softmax scores above 0.05, the best 200 per class, **Fast NMS** per class
  (:func:`minis.ops.batched_fast_nms`: the IoU matrix of a class's candidates sorted by score,
  its upper triangle, a box survives when no higher-scoring box overlaps it above 0.5, removed
  boxes included; one matrix operation instead of a sequential loop), the best 100 overall;
  masks are assembled for those only.
* **YOLACT++'s mask re-scoring** (``rescore=True``, Bolya et al., TPAMI 2020): a small network
  (five stride-2 3x3 convolutions of 8 to 128 channels, a 1x1 convolution to one output per
  class, global max pooling) reads a detection's binarised, cropped mask and predicts its IoU
  with the object, trained with smooth L1 (weight 25) on the training positives' masks. The
  mask's score becomes ``class score x predicted IoU`` (``mask_scores``, which
  :func:`minis.eval.coco_evaluate` ranks masks by); box scores are unchanged.

Departures from the paper (and its code, where the paper is silent):

* **Aspect-ratio anchors.** The released configurations set ``use_square_anchors``, which makes
  the height equal to the width: the three anchors of a location are then the same square, and
  the published models were trained with them. Here the ratios are what the paper says.
* **Images keep their aspect ratio** (the long side at most ``max_size = 550``, padded to a
  multiple of 32) where the paper stretches every image to 550 x 550: minis's detectors share
  one :class:`minis.nn.detection.DetectionTransform`.
* **The detector's backbone is RetinaNet's here** (:mod:`minis.models.retinanet`): ``P7`` is a
  convolution of ``ReLU(P6)`` and the FPN outputs have no ReLU, where YOLACT's code has no ReLU
  before ``P7`` and a ReLU on each prediction layer.
* **Crowd regions are dropped** before matching (:func:`minis.nn.detection.training_targets`, the
  rule of every minis detector) where the authors' code marks anchors that overlap a crowd as
  ignored.
* **Head and protonet initialised** like RetinaNet's head (normal, std 0.01) and PyTorch's
  default, where the code uses Xavier initialisation.
* **Images without positives give no classification loss** (0 hard negatives for 0 positives),
  as in the authors' code; the paper does not say.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.models.fcos import build_fcos_backbone, first_object_index
from minis.models.rcnn import SHAPES_RECIPE as RCNN_SHAPES_RECIPE
from minis.models.retinanet import RetinaNet, RetinaNetConfig, conv3x3, flatten_anchors, subnet
from minis.nn.detection import BELOW_LOW_THRESHOLD, ImageBatch, postprocess_image_masks
from minis.nn.fpn import BackboneFPN
from minis.ops import batched_fast_nms, clip_boxes_to_image

PUBLISHED_ANCHOR_SIZES = (24, 48, 96, 192, 384)  # P3..P7 at 550 x 550
PUBLISHED_INPUT_SIZE = 550
SUPPRESSION = ("fast", "standard")


@dataclass
class YOLACTConfig(RetinaNetConfig):
    """YOLACT-550's settings (the paper's and its code's); RetinaNet's focal-loss fields are unused."""

    min_size: int | tuple[int, ...] = 550
    max_size: int = 550
    anchor_sizes: tuple[float, ...] | None = None  # None: PUBLISHED_ANCHOR_SIZES x max_size / 550
    anchor_scales: tuple[float, ...] = (1.0,)
    aspect_ratios: tuple[float, ...] = (1.0, 0.5, 2.0)
    anchor_offset: float = 0.5  # at the cells' centres, as SSD and YOLACT place them
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # SSD's variances 0.1, 0.2
    head_convs: int = 1
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0
    # prototypes
    num_prototypes: int = 32
    protonet_channels: int = 256
    protonet_convs: int = 3  # 3x3 convolutions before the x2 upsampling
    # losses
    negatives_per_positive: int = 3  # OHEM
    box_weight: float = 1.5
    mask_weight: float = 6.125
    semantic_weight: float = 1.0  # 0: no semantic segmentation branch
    masks_per_image: int = 100  # at most this many positives per image train the masks (drawn at random)
    crop_masks: bool = True  # False: whole-image masks, in training and at test (the chapter's ablation)
    # inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_candidates: int = 200  # per class, before NMS
    detections_per_img: int = 100
    suppression: str = "fast"  # or "standard": torchvision's greedy NMS
    # YOLACT++'s mask re-scoring
    rescore: bool = False
    rescore_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    rescore_weight: float = 25.0
    rescore_min_area: float = 25.0  # objects smaller than this (prototype pixels) do not train the re-scoring


class YOLACTOutputs(NamedTuple):
    """The head's outputs for every anchor of every level (``N = sum_l H_l*W_l*A``)."""

    class_logits: torch.Tensor  # [B,N,C] softmax logits, column 0 the background
    deltas: torch.Tensor  # [B,N,4] box offsets from the anchor
    coefficients: torch.Tensor  # [B,N,k] in (-1, 1)


class YOLACTHead(nn.Module):
    """One shared 3x3 convolution, then class logits, box offsets and ``k`` tanh coefficients per anchor."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_prototypes: int, convs: int = 1
                 ) -> None:
        super().__init__()
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.tower = subnet(channels, convs)
        self.cls_logits = conv3x3(channels, num_anchors * num_classes)
        self.deltas = conv3x3(channels, num_anchors * 4)
        self.coefficients = conv3x3(channels, num_anchors * num_prototypes)

    def forward(self, features: Sequence[torch.Tensor]) -> YOLACTOutputs:
        shared = [self.tower(f) for f in features]
        return YOLACTOutputs(
            flatten_anchors([self.cls_logits(f) for f in shared], self.num_classes),
            flatten_anchors([self.deltas(f) for f in shared], 4),
            torch.tanh(flatten_anchors([self.coefficients(f) for f in shared], self.num_prototypes)))


class Protonet(nn.Module):
    """``P3 [B,C,h,w] -> k prototypes [B,k,2h,2w]``: 3x3 convolutions, x2 upsampling, 3x3, 1x1, ReLU.

    The final ReLU leaves the prototypes unbounded above and non-negative: the paper found that
    a prototype can then be very confident (large) where it is sure, e.g. on clear background.
    """

    def __init__(self, in_channels: int, channels: int = 256, num_prototypes: int = 32, convs: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.before = nn.Sequential(*layers)
        self.after = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, num_prototypes, 1)

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.before(p3), scale_factor=2, mode="bilinear", align_corners=False)
        return F.relu(self.out(F.relu(self.after(x))))


class MaskRescorer(nn.Module):
    """YOLACT++'s fast mask re-scoring: binarised masks ``[n,1,h,w]`` -> predicted IoU per class ``[n,C-1]``."""

    def __init__(self, num_foreground: int, channels: Sequence[int] = (8, 16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(1 if i == 0 else channels[i - 1], width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        last = nn.Conv2d(channels[-1], num_foreground, 1)
        # Every prediction starts at 0.5, a middling IoU. With the ReLU after it, PyTorch's default
        # initialisation can start a class's output below zero for every mask: a zero gradient, and
        # that class's predicted IoU stays 0 for good (seen on shapes: the loss stuck near 4).
        nn.init.normal_(last.weight, std=0.01)
        nn.init.constant_(last.bias, 0.5)
        layers += [last, nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masks).amax(dim=(2, 3))  # global max pooling


# ----------------------------------------------------------------------------------------------
# Masks from prototypes
# ----------------------------------------------------------------------------------------------


def assemble_masks(prototypes: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Mask logits ``P C^T``: prototypes ``[k,h,w]`` and coefficients ``[n,k]`` -> ``[n,h,w]``.

    One matrix product for all the image's instances (the sigmoid comes after).
    """
    k, height, width = prototypes.shape
    return (coefficients @ prototypes.reshape(k, height * width)).reshape(-1, height, width)


def box_region(boxes: torch.Tensor, size: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """``[n,h,w]`` bool: the pixels of an ``(h, w)`` map (of ``stride`` image pixels) whose centre is inside each box."""
    height, width = size
    ys = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride[0]
    xs = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride[1]
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # [n,w]
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # [n,h]
    return inside_y[:, :, None] & inside_x[:, None, :]


def masks_at(targets: list[dict], padded_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Every object's mask of the batch, in order, at a map's ``size``: ``[M,h,w]`` 0/1 float.

    Each mask is padded like its image, resized bilinearly and thresholded at 0.5 (YOLACT's targets).
    """
    resized = []
    for target in targets:
        masks = target["masks"].float()
        masks = F.pad(masks, (0, padded_size[1] - masks.shape[-1], 0, padded_size[0] - masks.shape[-2]))
        resized.append(F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5)
    return torch.cat(resized).float()


def mask_iou(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks, row by row: ``[n,h,w]`` x ``[n,h,w]`` -> ``[n]``."""
    intersection = (predicted * truth).sum((1, 2))
    union = predicted.sum((1, 2)) + truth.sum((1, 2)) - intersection
    return intersection / union.clamp(min=1)


def top_k_per_class(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` best scores of each label, grouped by label (no loop over the labels)."""
    order = scores.argsort(descending=True)
    order = order[labels[order].argsort(stable=True)]  # by label, best first within each
    grouped = labels[order]
    rank = torch.arange(len(order), device=scores.device) - torch.searchsorted(grouped, grouped)
    return order[rank < k]


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                       ratio: int) -> torch.Tensor:
    """Softmax cross-entropy summed over the positives and the ``ratio x`` hardest negatives of each image.

    ``logits [B,N,C]``, ``labels [B,N]`` (0 for the negatives), masks ``positive`` and ``negative``
    ``[B,N]``. A negative is hard when it looks like an object: a high loss for "background".
    """
    batch, count, classes = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, classes).float(), labels.reshape(-1), reduction="none")
    loss = loss.reshape(batch, count)
    ranked = torch.where(negative, loss.detach(), torch.full_like(loss, -1.0))
    rank = ranked.argsort(dim=1, descending=True).argsort(dim=1)
    wanted = (ratio * positive.sum(1)).clamp(max=count - 1)
    hard = negative & (rank < wanted[:, None])
    return torch.where(positive | hard, loss, torch.zeros_like(loss)).sum()


def published_anchor_sizes(max_size: int) -> tuple[float, ...]:
    """The paper's anchor sizes (24..384 at 550 pixels), scaled to images of long side ``max_size``."""
    return tuple(size * max_size / PUBLISHED_INPUT_SIZE for size in PUBLISHED_ANCHOR_SIZES)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class YOLACT(RetinaNet):
    """``model(images, targets=None)``: losses in training; in eval per image ``boxes``, ``labels``,
    ``scores`` and ``masks [N,1,H,W]`` (probabilities at the input's size), plus ``mask_iou`` and
    ``mask_scores [N]`` with ``rescore=True``.
    """

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: YOLACTConfig | None = None) -> None:
        config = config or YOLACTConfig()
        if config.anchor_sizes is None:
            config = dataclasses.replace(config, anchor_sizes=published_anchor_sizes(config.max_size))
        if config.suppression not in SUPPRESSION:
            raise ValueError(f"suppression must be one of {', '.join(SUPPRESSION)}, got {config.suppression!r}")
        super().__init__(backbone, num_classes, config)
        self.protonet = Protonet(backbone.channels, config.protonet_channels, config.num_prototypes,
                                 config.protonet_convs)
        self.semantic_head = nn.Conv2d(backbone.channels, num_classes - 1, 1) if config.semantic_weight > 0 else None
        self.rescorer = MaskRescorer(num_classes - 1, config.rescore_channels) if config.rescore else None

    def build_head(self) -> nn.Module:
        cfg = self.config
        return YOLACTHead(self.backbone.channels, self.num_anchors, self.num_classes, cfg.num_prototypes,
                          cfg.head_convs)

    # -- training -------------------------------------------------------------------------------

    def detection_losses(self, outputs: YOLACTOutputs, anchors: torch.Tensor, matched: torch.Tensor,
                         targets: list[dict]) -> dict[str, torch.Tensor]:
        """OHEM softmax cross-entropy and smooth-L1 offsets, divided by the batch's positives."""
        cfg = self.config
        positive = matched >= 0
        num_positive = max(1, int(positive.sum()))
        image_index, anchor_index = positive.nonzero(as_tuple=True)
        flat_object = first_object_index(targets, image_index) + matched[image_index, anchor_index]
        gt_boxes = torch.cat([t["boxes"] for t in targets])[flat_object]
        labels = torch.zeros_like(matched)
        labels[image_index, anchor_index] = torch.cat([t["labels"] for t in targets])[flat_object]
        loss_cls = ohem_cross_entropy(outputs.class_logits, labels, positive, matched == BELOW_LOW_THRESHOLD,
                                      cfg.negatives_per_positive)
        per_anchor = self.box_loss(outputs.deltas[image_index, anchor_index].float(), anchors[anchor_index], gt_boxes)
        return {"loss_classifier": loss_cls / num_positive,
                "loss_box_reg": cfg.box_weight * per_anchor.sum() / num_positive}

    def branch_losses(self, batch: ImageBatch, features: list[torch.Tensor], outputs: YOLACTOutputs,
                      anchors: torch.Tensor, matched: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The mask loss (and the semantic and re-scoring losses when they are on)."""
        cfg = self.config
        padded_size = tuple(batch.tensors.shape[-2:])
        prototypes = self.protonet(features[0])  # [B,k,h,w]
        proto_size = tuple(prototypes.shape[-2:])
        stride = (padded_size[0] / proto_size[0], padded_size[1] / proto_size[1])
        num_positive = max(1, int((matched >= 0).sum()))
        image_index, anchor_index = self.mask_training_positives(matched)
        flat_object = first_object_index(targets, image_index) + matched[image_index, anchor_index]
        gt_boxes = torch.cat([t["boxes"] for t in targets])[flat_object]
        truth = masks_at(targets, padded_size, proto_size)[flat_object]  # [P,h,w]
        coefficients = outputs.coefficients[image_index, anchor_index]
        counts = torch.bincount(image_index, minlength=len(targets)).tolist()
        logits = torch.cat([assemble_masks(p, c) for p, c in zip(prototypes, coefficients.split(counts))]).float()
        losses_per_pixel = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
        if cfg.crop_masks:
            losses_per_pixel = losses_per_pixel * box_region(gt_boxes, proto_size, stride)
            # the mean over the box: small objects count as much as large ones
            area = ((gt_boxes[:, 2] - gt_boxes[:, 0]) / stride[1] * (gt_boxes[:, 3] - gt_boxes[:, 1]) / stride[0])
        else:
            area = torch.full_like(gt_boxes[:, 0], float(proto_size[0] * proto_size[1]))
        loss_mask = (losses_per_pixel.sum((1, 2)) / area.clamp(min=1)).sum()
        losses = {"loss_mask": cfg.mask_weight * loss_mask / num_positive}
        if self.semantic_head is not None:
            losses["loss_semantic"] = cfg.semantic_weight * self.semantic_loss(features[0], targets, padded_size)
        if self.rescorer is not None:
            losses["loss_mask_iou"] = cfg.rescore_weight * self.rescoring_loss(
                logits.detach(), truth, gt_boxes, torch.cat([t["labels"] for t in targets])[flat_object], proto_size,
                stride) / num_positive
        return losses

    def mask_training_positives(self, matched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The positives that train the masks: all of them, or ``masks_per_image`` drawn at random per image."""
        positive = matched >= 0
        limit = self.config.masks_per_image
        if positive.shape[0] and int(positive.sum(1).max()) > limit:
            draw = torch.where(positive, torch.rand(positive.shape, device=matched.device), torch.full_like(
                matched, 2.0, dtype=torch.float32))
            rank = draw.argsort(dim=1).argsort(dim=1)
            positive = positive & (rank < limit)
        return positive.nonzero(as_tuple=True)

    def semantic_loss(self, p3: torch.Tensor, targets: list[dict], padded_size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel sigmoid per class on ``P3`` against the union of each class's masks; mean over pixels and images."""
        logits = self.semantic_head(p3).float()  # [B,C-1,h,w]
        size = tuple(logits.shape[-2:])
        masks = masks_at(targets, padded_size, size).split([len(t["labels"]) for t in targets])
        truth = torch.stack([  # [B,C-1,h,w]: a pixel is class c's when any object of class c covers it
            (F.one_hot(t["labels"] - 1, logits.shape[1]).T.float() @ m.flatten(1)).clamp(max=1).reshape(-1, *size)
            for t, m in zip(targets, masks)])
        return F.binary_cross_entropy_with_logits(logits, truth, reduction="sum") / (size[0] * size[1] * len(targets))

    def rescoring_loss(self, logits: torch.Tensor, truth: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                       proto_size: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
        """Smooth L1 between the predicted and the true IoU of each positive's (detached, binarised) mask."""
        predicted = self.binary_masks(logits, boxes, proto_size, stride)
        keep = truth.sum((1, 2)) >= self.config.rescore_min_area
        iou = self.rescorer(predicted[keep, None])[torch.arange(int(keep.sum()), device=labels.device),
                                                   labels[keep] - 1]
        return F.smooth_l1_loss(iou, mask_iou(predicted[keep], truth[keep]), reduction="sum")

    def binary_masks(self, logits: torch.Tensor, boxes: torch.Tensor, proto_size: tuple[int, int],
                     stride: tuple[float, float]) -> torch.Tensor:
        """Masks > 0.5, cropped to their boxes when cropping is on: ``[n,h,w]`` float."""
        masks = (logits > 0).float()
        if self.config.crop_masks:
            masks = masks * box_region(boxes, proto_size, stride)
        return masks

    # -- inference ------------------------------------------------------------------------------

    def detect(self, outputs: YOLACTOutputs, anchors: torch.Tensor, counts: list[int],
               image_sizes: list[tuple[int, int]]) -> tuple[list[dict], list[torch.Tensor]]:
        """Per image: softmax scores above the threshold, the best ``topk_candidates`` per class, NMS per class."""
        cfg = self.config
        probabilities = outputs.class_logits.float().softmax(-1)[..., 1:]  # [B,N,C-1] without the background
        detections, kept = [], []
        for image, size in enumerate(image_sizes):
            anchor_index, class_index = torch.nonzero(probabilities[image] > cfg.score_thresh, as_tuple=True)
            scores = probabilities[image, anchor_index, class_index]
            best = top_k_per_class(scores, class_index, cfg.topk_candidates)
            anchor_index, labels, scores = anchor_index[best], class_index[best] + 1, scores[best]
            boxes = self.box_coder.decode_single(outputs.deltas[image, anchor_index].float(), anchors[anchor_index])
            boxes = clip_boxes_to_image(boxes, size)
            suppress = batched_fast_nms if cfg.suppression == "fast" else batched_nms
            keep = suppress(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
            detections.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
            kept.append(anchor_index[keep])
        return detections, kept

    def add_branch_outputs(self, batch: ImageBatch, features: list[torch.Tensor], outputs: YOLACTOutputs,
                           detections: list[dict], kept: list[torch.Tensor]) -> None:
        """Masks for the kept detections only: ``sigmoid(P C^T)``, cropped, upsampled to the image."""
        prototypes = self.protonet(features[0])
        padded_size = tuple(batch.tensors.shape[-2:])
        proto_size = tuple(prototypes.shape[-2:])
        stride = (padded_size[0] / proto_size[0], padded_size[1] / proto_size[1])
        for image, (detection, anchor_index) in enumerate(zip(detections, kept)):
            logits = assemble_masks(prototypes[image], outputs.coefficients[image, anchor_index]).float()
            masks = logits.sigmoid()
            if self.config.crop_masks:
                masks = masks * box_region(detection["boxes"], proto_size, stride)
            if self.rescorer is not None:
                binary = self.binary_masks(logits, detection["boxes"], proto_size, stride)
                predicted = self.rescorer(binary[:, None])
                iou = predicted[torch.arange(len(binary), device=binary.device), detection["labels"] - 1]
                detection["mask_iou"] = iou
                detection["mask_scores"] = detection["scores"] * iou.clamp(0, 1)
            height, width = batch.image_sizes[image]
            masks = F.interpolate(masks[:, None], size=padded_size, mode="bilinear", align_corners=False)
            detection["masks"] = masks[..., :height, :width]

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Boxes and whole-image masks back to the original image's pixels."""
        return postprocess_image_masks(detections, image_sizes, original_sizes)


# The settings on the 128-pixel shapes benchmark for a 2-core CPU: the small pretrained backbone,
# a 64-channel FPN and protonet, 128-pixel images, YOLACT++'s re-scoring on (the chapter compares
# both rankings of the same masks). The anchors keep their published sizes in pixels (3 strides
# wide on each level): scaled by 128 / 550 they would leave the benchmark's objects of 38 to 70
# pixels to the 2x2 and 1x1 grids of P6 and P7.
SHAPES_SETTINGS: dict = {"backbone": "small", "pretrained_backbone": True, "fpn_channels": 64, "min_size": 128,
                         "max_size": 256, "anchor_sizes": PUBLISHED_ANCHOR_SIZES, "protonet_channels": 64,
                         "rescore": True}
SHAPES_RECIPE: dict = RCNN_SHAPES_RECIPE


@register("yolact")
def yolact(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False, fpn_channels: int = 256,
           trainable_layers: int | None = None, **config) -> YOLACT:
    """YOLACT with a ResNet-FPN (P3-P7); ``config`` overrides :class:`YOLACTConfig` fields (``rescore=True``: YOLACT++'s)."""
    settings = config_from_kwargs(YOLACTConfig, config, "YOLACT")
    return YOLACT(build_fcos_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                  settings)
