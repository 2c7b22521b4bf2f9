"""RetinaNet (Lin, Goyal, Girshick, He & Dollar, ICCV 2017): a one-stage detector as accurate as two.

A one-stage detector scores a dense grid of candidate boxes directly, with no proposal stage to
throw most of the background away first. The paper's finding is that what held such detectors
back was not their design but their loss: of the ~100k anchors of an image a handful cover an
object, and the many easy background anchors dominate a cross-entropy loss. The **focal loss**
(:func:`minis.nn.losses.sigmoid_focal_loss`) multiplies each term by ``(1 - p_t)^gamma`` so that
well-classified anchors fade out; with it a plain detector beats the two-stage ones of its time.

The detector itself is deliberately plain:

* **ResNet-FPN, P3-P7**: FPN levels at strides 8 to 128, ``P6`` a stride-2 3x3 convolution of
  ``P5`` and ``P7`` one of ``ReLU(P6)`` (the same backbone as :mod:`minis.models.fcos`, whose
  builder this file reuses). ``P2`` is left out: its anchors would be four times those of ``P3``.
* **9 anchors per location**: sizes ``{2^0, 2^(1/3), 2^(2/3)} x`` the level's base size (32 on
  ``P3`` up to 512 on ``P7``) and aspect ratios 1:2, 1:1, 2:1 (:class:`minis.ops.AnchorGenerator`).
* **Two subnets shared by all levels**: four 3x3 convolutions with ReLU each, then a 3x3
  convolution to ``A x K`` class logits (one sigmoid per class and anchor; the bias starts every
  probability at 0.01, the paper's "prior" that keeps the first steps from being swamped by the
  background) or to ``A x 4`` box offsets (class-agnostic, R-CNN's encoding,
  :class:`minis.ops.BoxCoder` with unit weights).
* **Matching** (:func:`minis.nn.detection.match_boxes`): IoU >= 0.5 with a ground-truth box is a
  positive, < 0.4 background, in between ignored; every object also keeps the anchors that
  overlap it best.
* **Losses**: the focal loss (``alpha = 0.25``, ``gamma = 2``) summed over all non-ignored
  anchors and classes, and the box loss over the positives, each divided by the number of
  positive anchors.
* **Inference**: on each level, the anchors x classes with a probability above 0.05, the best
  1000 of them decoded; then NMS per class at IoU 0.5.

The computation follows torchvision's ``RetinaNet`` (``retinanet_resnet50_fpn``; tests compare
detections, losses and gradients), so that :func:`minis.models.from_torchvision` loads its COCO
weights exactly. As for FCOS, torchvision's class logits have a column for the background label
0 that training never makes positive; minis keeps it (so the weights load) but never reports it.

Departures from the paper, each torchvision's choice:

* **L1 box loss** (``box_loss="l1"``) where the paper uses smooth L1 (the authors' Detectron with
  ``beta = 0.11``: ``box_loss="smooth_l1"``); ``"giou"`` is the loss of torchvision's v2 model.
* **Anchor sizes truncated to whole pixels** (40 and 50 rather than 40.3 and 50.8 on ``P3``).
* **Losses normalised per image**: each image's sums are divided by its own number of positives
  and the images averaged, where the paper divides by the batch's positives.
* **Up to 300 detections per image** (``detections_per_img``); the paper keeps 100.
* **P6 from P5** rather than from ``C5`` (torchvision's v1 model; its v2 takes ``C5``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms  # compiled; minis.ops.batched_nms is the same (tests/test_ops.py)

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.models.fcos import build_fcos_backbone, first_object_index, flatten_levels
from minis.models.rcnn import SHAPES_RECIPE as RCNN_SHAPES_RECIPE
from minis.nn.detection import (BETWEEN_THRESHOLDS, DetectionTransform, ImageBatch, match_boxes,
                                top_candidates_per_level, training_targets)
from minis.nn.fpn import BackboneFPN
from minis.nn.losses import giou_loss, sigmoid_focal_loss
from minis.ops import AnchorGenerator, BoxCoder, box_iou, clip_boxes_to_image

BOX_LOSSES = ("l1", "smooth_l1", "giou")


@dataclass
class RetinaNetConfig:
    """RetinaNet's settings, with torchvision's names and defaults (its COCO recipe)."""

    # images: short side min_size (a tuple: drawn per image in training), long side at most max_size
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # anchors: per level P3..P7 a base size, times each scale, at each aspect ratio (height / width)
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0  # anchors at their cells' top-left corners (torchvision's); 0.5: the centres
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # BoxCoder weights of the offsets
    # head
    head_convs: int = 4  # 3x3 conv + ReLU layers in each subnet
    prior_probability: float = 0.01  # every class starts at this probability
    # training
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "l1"  # "smooth_l1" (the paper's) or "giou" (torchvision's v2 model)
    smooth_l1_beta: float = 0.11  # Detectron's, for box_loss="smooth_l1"
    # inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 300
    topk_candidates: int = 1000  # per level, before NMS


def anchor_sizes_per_level(base_sizes: Sequence[float], scales: Sequence[float]) -> tuple[tuple[int, ...], ...]:
    """Each level's anchor sizes, ``int(base x scale)`` (whole pixels, as torchvision truncates them)."""
    return tuple(tuple(int(base * scale) for scale in scales) for base in base_sizes)


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------


def conv3x3(in_channels: int, out_channels: int, std: float = 0.01, bias: float = 0.0) -> nn.Conv2d:
    """A 3x3 convolution (padding 1) with ``N(0, std)`` weights and a constant bias: RetinaNet's initialisation."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.normal_(conv.weight, std=std)
    nn.init.constant_(conv.bias, bias)
    return conv


def subnet(channels: int, layers: int) -> nn.Sequential:
    """``layers`` x (3x3 convolution, ReLU), shapes unchanged; no normalisation (the paper's head)."""
    return nn.Sequential(*(nn.Sequential(conv3x3(channels, channels), nn.ReLU(inplace=True)) for _ in range(layers)))


def flatten_anchors(maps: Sequence[torch.Tensor], values: int) -> torch.Tensor:
    """Per-level ``[B, A*V, H, W]`` -> ``[B, sum_l H*W*A, V]``: level, then position, then anchor.

    The order :class:`minis.ops.AnchorGenerator` lists the anchors in.
    """
    return flatten_levels(maps).reshape(maps[0].shape[0], -1, values)


class AnchorOutputs(NamedTuple):
    """The head's outputs for every anchor of every level (``N = sum_l H_l*W_l*A``)."""

    class_logits: torch.Tensor  # [B,N,K] one sigmoid logit per class (column 0, the background, unused)
    deltas: torch.Tensor  # [B,N,4] box offsets from the anchor (BoxCoder encoding)


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared by all levels: ``[P3..P7] -> AnchorOutputs``."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, convs: int = 4,
                 prior_probability: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = subnet(channels, convs)
        self.box_tower = subnet(channels, convs)
        prior_bias = -math.log((1 - prior_probability) / prior_probability)
        self.cls_logits = conv3x3(channels, num_anchors * num_classes, bias=prior_bias)
        self.deltas = conv3x3(channels, num_anchors * 4)

    def forward(self, features: Sequence[torch.Tensor]) -> AnchorOutputs:
        return AnchorOutputs(flatten_anchors([self.cls_logits(self.cls_tower(f)) for f in features], self.num_classes),
                             flatten_anchors([self.deltas(self.box_tower(f)) for f in features], 4))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class RetinaNet(nn.Module):
    """``model(images: list[[3,H,W]] in 0..1, targets=None)``: losses in training, detections in eval.

    Detections per image: ``boxes [N,4]`` (xyxy, input pixels), ``labels [N]`` (1..K-1), ``scores [N]``.
    Subclasses (YOLACT) replace the head and add branches through :meth:`build_head`,
    :meth:`branch_losses` and :meth:`add_branch_outputs`.
    """

    task = "instance"

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: RetinaNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or RetinaNetConfig()
        if config.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {config.box_loss!r}")
        if len(config.anchor_sizes) != len(backbone.strides):
            raise ValueError(f"anchor_sizes needs one base size per level ({len(backbone.strides)}), "
                             f"got {config.anchor_sizes}")
        self.num_classes = num_classes
        self.transform = DetectionTransform(config.min_size, config.max_size, config.image_mean, config.image_std)
        self.backbone = backbone
        self.anchor_generator = AnchorGenerator(anchor_sizes_per_level(config.anchor_sizes, config.anchor_scales),
                                                tuple(config.aspect_ratios), config.anchor_offset)
        self.num_anchors = len(config.anchor_scales) * len(config.aspect_ratios)
        self.box_coder = BoxCoder(tuple(config.box_weights))
        self.head = self.build_head()

    def build_head(self) -> nn.Module:
        cfg = self.config
        return RetinaNetHead(self.backbone.channels, self.num_anchors, self.num_classes, cfg.head_convs,
                             cfg.prior_probability)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.training:
            targets = training_targets(targets, len(images))  # checked, crowd regions removed
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)  # [P3..P7]
        outputs = self.head(features)
        # the batch is padded to one size, so every image has the same anchors [N,4]
        anchors = self.anchor_generator(batch, features)[0]
        if self.training:
            matched = self.match(anchors, targets)
            losses = self.detection_losses(outputs, anchors, matched, targets)
            losses.update(self.branch_losses(batch, features, outputs, anchors, matched, targets))
            return losses
        counts = [f.shape[-2] * f.shape[-1] * self.num_anchors for f in features]
        detections, kept = self.detect(outputs, anchors, counts, batch.image_sizes)
        self.add_branch_outputs(batch, features, outputs, detections, kept)
        return self.postprocess(detections, batch.image_sizes, original_sizes)

    # -- training -------------------------------------------------------------------------------

    def match(self, anchors: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """``[B,N]``: each anchor's object (index into its image's boxes), -1 background, -2 ignored."""
        cfg = self.config
        rows = []
        for target in targets:
            if len(target["boxes"]) == 0:
                rows.append(torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device))
            else:
                rows.append(match_boxes(box_iou(target["boxes"], anchors), cfg.fg_iou_thresh, cfg.bg_iou_thresh,
                                        allow_low_quality=True))
        return torch.stack(rows)

    def box_loss(self, deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """Per positive anchor ``[P]``: the box loss between its offsets ``[P,4]`` and its object's box."""
        cfg = self.config
        if cfg.box_loss == "giou":
            return giou_loss(self.box_coder.decode_single(deltas, anchors), gt_boxes, eps=1e-7)
        target = self.box_coder.encode_single(gt_boxes, anchors)
        if cfg.box_loss == "l1":
            return F.l1_loss(deltas, target, reduction="none").sum(1)
        return F.smooth_l1_loss(deltas, target, reduction="none", beta=cfg.smooth_l1_beta).sum(1)

    def detection_losses(self, outputs: AnchorOutputs, anchors: torch.Tensor, matched: torch.Tensor,
                         targets: list[dict]) -> dict[str, torch.Tensor]:
        """Focal loss over the non-ignored anchors, box loss over the positives; per image / its positives."""
        cfg = self.config
        positive = matched >= 0  # [B,N]
        positives_per_image = positive.sum(1).clamp(min=1).float()
        image_index, anchor_index = positive.nonzero(as_tuple=True)
        flat_object = first_object_index(targets, image_index) + matched[image_index, anchor_index]
        gt_boxes = torch.cat([t["boxes"] for t in targets])[flat_object]
        gt_labels = torch.cat([t["labels"] for t in targets])[flat_object]

        class_targets = torch.zeros_like(outputs.class_logits)
        class_targets[image_index, anchor_index, gt_labels] = 1.0
        focal = sigmoid_focal_loss(outputs.class_logits, class_targets, cfg.focal_alpha, cfg.focal_gamma)  # [B,N,K]
        valid = (matched != BETWEEN_THRESHOLDS)[..., None]
        loss_cls = (torch.where(valid, focal, 0.0).sum((1, 2)) / positives_per_image).mean()

        per_anchor = self.box_loss(outputs.deltas[image_index, anchor_index].float(), anchors[anchor_index], gt_boxes)
        per_image = per_anchor.new_zeros(len(targets)).index_add(0, image_index, per_anchor)
        loss_box = (per_image / positives_per_image).mean()
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def branch_losses(self, batch: ImageBatch, features: list[torch.Tensor], outputs, anchors: torch.Tensor,
                      matched: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses of the branches a subclass adds (YOLACT: the masks). None here."""
        return {}

    # -- inference ------------------------------------------------------------------------------

    def detect(self, outputs: AnchorOutputs, anchors: torch.Tensor, counts: list[int],
               image_sizes: list[tuple[int, int]]) -> tuple[list[dict], list[torch.Tensor]]:
        """Per image: the best ``topk_candidates`` (anchor, class) pairs per level, decoded, NMS per class.

        Returns the detections and, per image, the anchor index ``[D]`` of each detection.
        """
        cfg = self.config
        # the background column is never trained positive; a detection of it means nothing
        probabilities = outputs.class_logits.sigmoid()[..., 1:]  # [B,N,K-1]
        num_foreground = probabilities.shape[-1]
        detections, kept = [], []
        for image, size in enumerate(image_sizes):
            flat_index, scores = top_candidates_per_level(probabilities[image], counts, cfg.score_thresh,
                                                          cfg.topk_candidates)
            anchor_index = torch.div(flat_index, num_foreground, rounding_mode="floor")
            labels = flat_index % num_foreground + 1
            boxes = self.box_coder.decode_single(outputs.deltas[image, anchor_index].float(), anchors[anchor_index])
            boxes = clip_boxes_to_image(boxes, size)
            keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
            detections.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
            kept.append(anchor_index[keep])
        return detections, kept

    def add_branch_outputs(self, batch: ImageBatch, features: list[torch.Tensor], outputs,
                           detections: list[dict], kept: list[torch.Tensor]) -> None:
        """Outputs of the branches a subclass adds, written into ``detections``. None here."""

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Boxes back to the original image's pixels."""
        return self.transform.postprocess(detections, image_sizes, original_sizes)


# The settings on the 128-pixel shapes benchmark for a 2-core CPU, as for FCOS: the small
# pretrained backbone, a 64-channel FPN, two convolutions per subnet, 100 detections per image
# (COCO's AP counts no more). The COCO anchors stay: P3-P5's (32 to 203 pixels) cover the
# benchmark's objects of 38 to 70 pixels.
SHAPES_SETTINGS: dict = {"backbone": "small", "pretrained_backbone": True, "fpn_channels": 64, "min_size": 128,
                         "max_size": 256, "head_convs": 2, "detections_per_img": 100}
SHAPES_RECIPE: dict = RCNN_SHAPES_RECIPE


@register("retinanet")
def retinanet(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
              fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> RetinaNet:
    """RetinaNet with a ResNet-FPN (P3-P7); ``config`` overrides :class:`RetinaNetConfig` fields."""
    settings = config_from_kwargs(RetinaNetConfig, config, "RetinaNet")
    return RetinaNet(build_fcos_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                     settings)
