"""Faster R-CNN and Mask R-CNN: detect boxes, then segment inside each box.

* Faster R-CNN (Ren et al., NeurIPS 2015) in two stages. A small *Region Proposal Network*
  slides over every FPN level and, for each of a few anchor boxes per position, scores
  "object or not" and regresses the anchor towards the object. The best few thousand boxes
  after NMS are the *proposals*. The second stage cuts a fixed 7x7 feature map out of the FPN
  level that suits each proposal's size (RoIAlign), and a two-layer MLP classifies it into
  K classes + background and refines its box once more, separately per class.
* Mask R-CNN (He et al., ICCV 2017) adds a third branch on 14x14 RoIAlign features: four 3x3
  convolutions and a 2x transposed convolution predict a 28x28 mask *per class*. The mask of
  the class the box head chose is kept; the others are never compared with each other, so the
  masks do not compete for pixels (a per-pixel sigmoid, not a softmax over classes), which the
  paper found worth +5.5 mask AP over the softmax (Table 2b). RoIAlign instead of RoIPool gave
  another +3 AP, because 28x28 masks need features that are not shifted by rounding.
Mask Scoring R-CNN, which re-scores Mask R-CNN's masks, extends it in :mod:`minis.models.ms_rcnn`.

The two models are one class each, Mask R-CNN extending Faster R-CNN. Every step matches
torchvision's ``FasterRCNN`` and ``MaskRCNN`` number for number: ``minis.models.from_torchvision``
(:mod:`minis.models.porting`) loads their weights and the tests compare the outputs, and the
training losses, given the same random state. The FPN and image plumbing live in
:mod:`minis.nn.fpn` and :mod:`minis.nn.detection`; boxes, anchors, NMS and RoIAlign in
:mod:`minis.ops`.

Departures from the Faster R-CNN and Mask R-CNN papers, all torchvision's (and Detectron's)
choices, kept so that torchvision's weights load and its outputs are reproduced:

* **Faster R-CNN is its FPN version** (Lin et al., CVPR 2017): proposals and RoIs on P2-P6 with
  one anchor size per level (32 to 512) and three aspect ratios, a box head of two 1024-wide
  fully connected layers, images of 800 pixels (at most 1333). The paper uses one feature map
  (VGG-16's conv5), 3 sizes x 3 ratios of anchors at every position, VGG's 4096-wide layers
  and 600-pixel images; the FPN version is the one Mask R-CNN builds on and torchvision ships.
* **RoIAlign in Faster R-CNN too**, not the paper's RoIPool (Mask R-CNN's improvement, which
  also helps boxes).
* **End-to-end training**: the RPN and head losses are summed and trained together (the paper's
  "approximate joint training") rather than in the paper's four alternating steps.
* **One objectness logit per anchor** with a sigmoid, not two scores with a softmax: the same
  model with half the outputs, an alternative the paper names itself.
* **Background RoIs from IoU 0**, not 0.1: a box that touches no object is a negative too.
* **Smooth L1 with beta 1/9 in the box head** (the paper's is 1, i.e. sigma 1), as in the RPN.
* **ResNet "v1.5"** (the stride on the 3x3 convolution, torchvision's ImageNet weights) and RGB
  images scaled to 0..1 and normalised by ImageNet's mean and std, where the papers' Caffe
  ResNets stride on the first 1x1 convolution and subtract a BGR mean from 0..255 pixels.
* **Masks are returned as probabilities** pasted into the image (torchvision's output format);
  the paper binarises them at 0.5, which :func:`minis.eval.coco_evaluate` does before scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
# The compiled kernels. minis.ops.roi_align and minis.ops.batched_nms compute the same numbers
# (tests/test_ops.py) and are the versions the chapters explain; a detector runs them on
# thousands of boxes per image, where the C++ loops are several times faster. In training on a
# CPU the features' gradient comes from roi_align_matmul_backward, not from torchvision's
# backward kernel, which took a quarter of a shapes training step (four times as long).
from torchvision.ops import batched_nms, roi_align

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.nn.detection import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, DetectionTransform, ImageBatch,
                                match_boxes, sample_balanced, training_targets)
from minis.nn.fpn import BackboneFPN, backbone_fpn
from minis.ops import AnchorGenerator, BoxCoder, box_iou, clip_boxes_to_image, multiscale_roi_align, remove_small_boxes
from minis.ops.roi import roi_align_matmul_backward


@dataclass
class RCNNConfig:
    """Every setting of the two stages, with torchvision's names and defaults (its COCO recipe).

    Image sizes, anchors, and the thresholds and sample sizes of both stages. ``*_train`` /
    ``*_test`` values apply in training / evaluation mode.
    """

    # images: short side min_size (a tuple: drawn per image in training), long side at most max_size
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # anchors: one size per FPN level P2..P6, three shapes each
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # region proposal network
    rpn_pre_nms_top_n_train: int = 2000  # best boxes per level before NMS
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # proposals per image after NMS
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    # box head
    representation_size: int = 1024  # width of the two fully connected layers
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # mask head
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    # mask scoring head (Mask Scoring R-CNN only, minis.models.ms_rcnn)
    maskiou_weight: float = 1.0


# ----------------------------------------------------------------------------------------------
# Stage one: the region proposal network
# ----------------------------------------------------------------------------------------------


class RPNHead(nn.Module):
    """A 3x3 convolution, then per anchor an objectness logit and four box offsets.

    The same weights run on every FPN level (the levels share a channel count for this reason).
    Level ``l``: ``[B,C,H,W] -> objectness [B,A,H,W], deltas [B,4A,H,W]``.
    """

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, 4 * num_anchors, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hidden = [F.relu(self.conv(feature)) for feature in features]
        return [self.objectness(h) for h in hidden], [self.deltas(h) for h in hidden]


def flatten_anchor_maps(maps: Sequence[torch.Tensor], values: int) -> torch.Tensor:
    """Per-level ``[B, A*values, H, W]`` maps -> ``[B, sum_l H*W*A, values]``.

    Ordered level by level, then position by position, then anchor by anchor: the order in which
    :class:`minis.ops.AnchorGenerator` lists the anchors.
    """
    flat = []
    for m in maps:
        batch, _, height, width = m.shape
        m = m.view(batch, -1, values, height, width).permute(0, 3, 4, 1, 2)  # [B,H,W,A,values]
        flat.append(m.reshape(batch, -1, values))
    return torch.cat(flat, dim=1)


class RegionProposalNetwork(nn.Module):
    """Anchors -> scored, regressed, NMS-filtered proposals (and, in training, the RPN losses)."""

    def __init__(self, channels: int, config: RCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(tuple((s,) for s in config.anchor_sizes), tuple(config.aspect_ratios))
        self.head = RPNHead(channels, len(config.aspect_ratios))
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, batch: ImageBatch, features: list[torch.Tensor], targets: list[dict] | None = None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """``features``: FPN levels ``[B,C,H_l,W_l]``. Returns proposals (``[P_i,4]`` per image) and losses."""
        objectness_maps, delta_maps = self.head(features)
        anchors = self.anchor_generator(batch, features)  # per image [N,4], N = sum_l H_l*W_l*A
        anchors_per_level = [o[0].numel() for o in objectness_maps]
        objectness = flatten_anchor_maps(objectness_maps, 1).flatten(1)  # [B,N]
        deltas = flatten_anchor_maps(delta_maps, 4).reshape(-1, 4)  # [B*N,4]
        # proposals are inputs to stage two, not something to backpropagate into; decoded in the
        # anchors' float32 even when autocast computed the deltas in float16
        proposals = self.box_coder.decode(deltas.detach().to(anchors[0].dtype), anchors).view(len(anchors), -1, 4)
        boxes = self.select_proposals(proposals, objectness.detach(), batch.image_sizes, anchors_per_level)
        if not self.training:
            return boxes, {}
        labels, matched_boxes = self.anchor_targets(anchors, targets)
        regression_targets = self.box_coder.encode(matched_boxes, anchors)
        return boxes, self.losses(objectness.flatten(), deltas, labels, regression_targets)

    def select_proposals(self, proposals: torch.Tensor, objectness: torch.Tensor, image_sizes: list[tuple[int, int]],
                         anchors_per_level: list[int]) -> list[torch.Tensor]:
        """Best ``pre_nms_top_n`` per level, clipped, small boxes dropped, NMS per level, best ``post_nms_top_n``.

        ``proposals [B,N,4]``, ``objectness [B,N]`` logits. Taking the top boxes per level rather
        than overall keeps every level represented; NMS runs per level for the same reason.
        """
        cfg = self.config
        pre_nms = cfg.rpn_pre_nms_top_n_train if self.training else cfg.rpn_pre_nms_top_n_test
        post_nms = cfg.rpn_post_nms_top_n_train if self.training else cfg.rpn_post_nms_top_n_test
        top, levels, start = [], [], 0
        for level, count in enumerate(anchors_per_level):
            _, index = objectness[:, start:start + count].topk(min(pre_nms, count), dim=1)
            top.append(index + start)
            levels.append(torch.full((index.shape[1],), level, dtype=torch.int64, device=objectness.device))
            start += count
        top, levels = torch.cat(top, dim=1), torch.cat(levels)  # [B,T], [T]
        batch_index = torch.arange(len(proposals), device=proposals.device)[:, None]
        scores, proposals = objectness[batch_index, top].sigmoid(), proposals[batch_index, top]

        selected = []
        for boxes, box_scores, size in zip(proposals, scores, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, 1e-3)
            boxes, box_scores, box_levels = boxes[keep], box_scores[keep], levels[keep]
            keep = torch.nonzero(box_scores >= cfg.rpn_score_thresh).squeeze(1)
            boxes, box_scores, box_levels = boxes[keep], box_scores[keep], box_levels[keep]
            keep = batched_nms(boxes, box_scores, box_levels, cfg.rpn_nms_thresh)[:post_nms]
            selected.append(boxes[keep])
        return selected

    def anchor_targets(self, anchors: list[torch.Tensor], targets: list[dict]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: anchor labels ``[N]`` (1 object, 0 background, -1 ignored) and matched boxes ``[N,4]``."""
        cfg = self.config
        labels, matched_boxes = [], []
        for image_anchors, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an image without objects: every anchor is background
                labels.append(torch.zeros(len(image_anchors), dtype=torch.float32, device=image_anchors.device))
                matched_boxes.append(torch.zeros_like(image_anchors))
                continue
            matches = match_boxes(box_iou(gt_boxes, image_anchors), cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh,
                                  allow_low_quality=True)
            matched_boxes.append(gt_boxes[matches.clamp(min=0)])
            image_labels = (matches >= 0).to(torch.float32)
            image_labels[matches == BELOW_LOW_THRESHOLD] = 0.0
            image_labels[matches == BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
        return labels, matched_boxes

    def losses(self, objectness: torch.Tensor, deltas: torch.Tensor, labels: list[torch.Tensor],
               regression_targets: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Binary cross-entropy on sampled anchors, smooth L1 on the positive ones (``[B*N]``, ``[B*N,4]``)."""
        cfg = self.config
        positive, negative = sample_balanced(labels, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
        positive = torch.nonzero(torch.cat(positive)).squeeze(1)
        negative = torch.nonzero(torch.cat(negative)).squeeze(1)
        sampled = torch.cat([positive, negative])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        # beta = 1/9: nearly L1 (robust to outliers) but smooth near zero; divided by all samples
        box_loss = F.smooth_l1_loss(deltas[positive], regression_targets[positive], beta=1 / 9,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}


# ----------------------------------------------------------------------------------------------
# Stage two: the box head (Faster R-CNN)
# ----------------------------------------------------------------------------------------------


class BoxHead(nn.Module):
    """Two fully connected layers on the flattened 7x7 RoI features: ``[K,C,7,7] -> [K,D]``."""

    def __init__(self, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits ``[K, classes]`` and one box refinement per class ``[K, 4*classes]``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class RoISamples:
    """Stage two's training examples per image: proposals, their labels, matched ground truth."""

    proposals: list[torch.Tensor]  # [S_i,4]
    labels: list[torch.Tensor]  # [S_i] int64, 0 = background
    matched: list[torch.Tensor]  # [S_i] index of the matched ground-truth object (clamped at 0)
    regression_targets: list[torch.Tensor] = field(default_factory=list)  # [S_i,4]


def fast_rcnn_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: torch.Tensor,
                   regression_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy over all samples; smooth L1 on the positives' *own class* box (``[K,classes]``, ``[K,4*classes]``)."""
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.nonzero(labels > 0).squeeze(1)
    box_regression = box_regression.reshape(len(class_logits), -1, 4)
    box_loss = F.smooth_l1_loss(box_regression[positive, labels[positive]], regression_targets[positive],
                                beta=1 / 9, reduction="sum") / labels.numel()
    return {"loss_classifier": classification_loss, "loss_box_reg": box_loss}


def with_ground_truth(proposals: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """``[P+G,4]``: the proposals followed by the ground-truth boxes, in the wider of their two dtypes.

    The ground truth is never rounded to the proposals' precision (float16 under autocast, were
    they decoded from float16 deltas): a box off by half a pixel is a worse target.
    """
    dtype = torch.promote_types(proposals.dtype, gt_boxes.dtype)
    return torch.cat([proposals.to(dtype), gt_boxes.to(dtype)])


class FasterRCNN(nn.Module):
    """``model(images: list[[3,H,W]] in 0..1, targets=None)``: losses in training, detections in eval.

    Detections per image: ``boxes [N,4]`` (xyxy, input pixels), ``labels [N]`` (1..K), ``scores [N]``.
    """

    task = "instance"
    box_pool_size = 7  # RoIAlign output for the box head
    sampling_ratio = 2  # RoIAlign samples per bin side

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: RCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or RCNNConfig()
        self.num_classes = num_classes
        self.transform = DetectionTransform(config.min_size, config.max_size, config.image_mean, config.image_std)
        self.backbone = backbone
        self.rpn = RegionProposalNetwork(backbone.channels, config)
        self.box_head = BoxHead(backbone.channels * self.box_pool_size ** 2, config.representation_size)
        self.box_predictor = BoxPredictor(config.representation_size, num_classes)
        self.box_coder = BoxCoder(config.bbox_reg_weights)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.training:
            targets = training_targets(targets, len(images))  # checked, crowd regions removed
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)  # [P2..P6]
        proposals, losses = self.rpn(batch, features, targets)
        # RoIs are pooled from P2..P5; P6 only gives the RPN room for the largest anchors
        detections, roi_losses = self.roi_heads(features[:4], proposals, batch.image_sizes, targets)
        if self.training:
            return {**losses, **roi_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def pool(self, features: list[torch.Tensor], boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]],
             output_size: int) -> torch.Tensor:
        """RoIAlign every box on the FPN level that suits its size: ``[sum K_i, C, size, size]``."""
        return multiscale_roi_align(features, boxes, image_sizes, output_size, self.sampling_ratio,
                                    roi_align=roi_align_matmul_backward)

    def roi_heads(self, features: list[torch.Tensor], proposals: list[torch.Tensor],
                  image_sizes: list[tuple[int, int]], targets: list[dict] | None
                  ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Stage two: training losses on sampled proposals, or detections (with the branches' outputs)."""
        if self.training:
            samples = self.sample_proposals(proposals, targets)
            box_features = self.box_head(self.pool(features, samples.proposals, image_sizes, self.box_pool_size))
            class_logits, box_regression = self.box_predictor(box_features)
            losses = fast_rcnn_loss(class_logits, box_regression, torch.cat(samples.labels),
                                    torch.cat(samples.regression_targets))
            losses.update(self.branch_losses(features, image_sizes, samples, targets))
            return [], losses
        box_features = self.box_head(self.pool(features, proposals, image_sizes, self.box_pool_size))
        detections = self.detect(*self.box_predictor(box_features), proposals, image_sizes)
        self.add_branch_outputs(features, image_sizes, detections)
        return detections, {}

    def branch_losses(self, features: list[torch.Tensor], image_sizes: list[tuple[int, int]], samples: "RoISamples",
                      targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses of the branches a subclass adds after the box head (Mask R-CNN: the mask). None here."""
        return {}

    def add_branch_outputs(self, features: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                           detections: list[dict]) -> None:
        """Outputs of the branches a subclass adds, written into ``detections``. None here."""

    def sample_proposals(self, proposals: list[torch.Tensor], targets: list[dict]) -> RoISamples:
        """Label proposals by IoU with the ground truth (>= 0.5 object) and sample 512 per image, 1/4 positive.

        The ground-truth boxes join the proposals: early in training the RPN proposes nothing
        useful, and the box head still gets perfect positives to learn from.
        """
        cfg = self.config
        proposals = [with_ground_truth(p, t["boxes"]) for p, t in zip(proposals, targets)]
        labels, matched = [], []
        for image_proposals, target in zip(proposals, targets):
            if target["boxes"].numel() == 0:
                matched.append(torch.zeros(len(image_proposals), dtype=torch.int64, device=image_proposals.device))
                labels.append(torch.zeros(len(image_proposals), dtype=torch.int64, device=image_proposals.device))
                continue
            matches = match_boxes(box_iou(target["boxes"], image_proposals), cfg.box_fg_iou_thresh,
                                  cfg.box_bg_iou_thresh, allow_low_quality=False)
            image_labels = target["labels"][matches.clamp(min=0)].to(torch.int64)
            image_labels[matches == BELOW_LOW_THRESHOLD] = 0
            image_labels[matches == BETWEEN_THRESHOLDS] = -1
            matched.append(matches.clamp(min=0))
            labels.append(image_labels)
        positive, negative = sample_balanced(labels, cfg.box_batch_size_per_image, cfg.box_positive_fraction)
        samples = RoISamples([], [], [])
        for i, (pos, neg) in enumerate(zip(positive, negative)):
            keep = torch.nonzero(pos | neg).squeeze(1)
            samples.proposals.append(proposals[i][keep])
            samples.labels.append(labels[i][keep])
            samples.matched.append(matched[i][keep])
        matched_boxes = [t["boxes"][m] if t["boxes"].numel() else torch.zeros_like(p)
                         for t, m, p in zip(targets, samples.matched, samples.proposals)]
        samples.regression_targets = list(self.box_coder.encode(matched_boxes, samples.proposals))
        return samples

    def detect(self, class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: list[torch.Tensor],
               image_sizes: list[tuple[int, int]]) -> list[dict]:
        """Per image: a box per (proposal, class) with that class's probability, thresholded, NMS per class.

        ``class_logits [K,classes]``, ``box_regression [K,4*classes]`` for the ``K`` proposals of all images.
        """
        cfg = self.config
        counts = [len(p) for p in proposals]
        # decoded in the proposals' precision (float32), not in the head's float16 under autocast
        boxes_all = self.box_coder.decode(box_regression.to(proposals[0].dtype), proposals).split(counts)  # [K_i,classes,4]
        scores_all = F.softmax(class_logits, -1).split(counts)
        detections = []
        for boxes, scores, size in zip(boxes_all, scores_all, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            labels = torch.arange(scores.shape[1], device=scores.device).view(1, -1).expand_as(scores)
            # drop the background column; every remaining (proposal, class) pair is a candidate
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.nonzero(scores > cfg.box_score_thresh).squeeze(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, cfg.box_nms_thresh)[: cfg.box_detections_per_img]
            detections.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        return detections


# ----------------------------------------------------------------------------------------------
# The mask branch (Mask R-CNN)
# ----------------------------------------------------------------------------------------------


class MaskHead(nn.Module):
    """Four 3x3 convolutions, a 2x transposed convolution, one mask logit map per class.

    ``[K,C,14,14] -> [K,classes,28,28]``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)
                                   for i in range(layers))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for layer in [*self.convs, self.upsample, self.logits]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.logits(F.relu(self.upsample(x)))


def project_masks_on_boxes(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor,
                           size: int) -> torch.Tensor:
    """Each box's matched ground-truth mask cut out and resampled to ``[K,size,size]`` (RoIAlign).

    The target is the part of the object *inside the proposal*, in the proposal's frame: the
    same crop the mask head sees.
    """
    rois = torch.cat([matched[:, None].to(boxes), boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, mask_targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy on the ground-truth class's mask only (``[K,classes,M,M]``)."""
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0  # no positive RoI: a zero that still reaches every parameter
    own_class = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(own_class, mask_targets)


class MaskBatch(NamedTuple):
    """The mask branch's training inputs and outputs for the positive RoIs of a batch (``K`` in all)."""

    boxes: list[torch.Tensor]  # [K_i,4] positive proposals per image
    matched: list[torch.Tensor]  # [K_i] their ground-truth object
    labels: torch.Tensor  # [K] their class
    roi_features: torch.Tensor  # [K,C,14,14]
    mask_logits: torch.Tensor  # [K,classes,28,28]
    mask_targets: torch.Tensor  # [K,28,28]


class MaskRCNN(FasterRCNN):
    """Faster R-CNN plus a mask per detection: detections also hold ``masks [N,1,H,W]`` (probabilities)."""

    mask_pool_size = 14

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: RCNNConfig | None = None) -> None:
        super().__init__(backbone, num_classes, config)
        self.mask_head = MaskHead(backbone.channels, num_classes, self.config.mask_head_channels,
                                  self.config.mask_head_layers)

    def masks_for(self, features: list[torch.Tensor], boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI features ``[K,C,14,14]`` and mask logits ``[K,classes,28,28]`` for the boxes of all images."""
        roi_features = self.pool(features, boxes, image_sizes, self.mask_pool_size)
        return roi_features, self.mask_head(roi_features)

    def positive_samples(self, samples: RoISamples, targets: list[dict]
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The positive proposals per image, their matched object indices, and their labels ``[K]``."""
        positive = [torch.nonzero(labels > 0).squeeze(1) for labels in samples.labels]
        boxes = [p[i] for p, i in zip(samples.proposals, positive)]
        matched = [m[i] for m, i in zip(samples.matched, positive)]
        labels = torch.cat([t["labels"][m] for t, m in zip(targets, matched)])
        return boxes, matched, labels

    def mask_training_batch(self, features, image_sizes, samples: RoISamples, targets: list[dict]) -> MaskBatch:
        """The mask branch on the positive samples, with the targets its losses need."""
        boxes, matched, labels = self.positive_samples(samples, targets)
        roi_features, mask_logits = self.masks_for(features, boxes, image_sizes)
        size = mask_logits.shape[-1]
        mask_targets = torch.cat([project_masks_on_boxes(t["masks"], b, m, size)
                                  for t, b, m in zip(targets, boxes, matched)])
        return MaskBatch(boxes, matched, labels, roi_features, mask_logits, mask_targets)

    def branch_losses(self, features, image_sizes, samples: RoISamples, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.mask_training_batch(features, image_sizes, samples, targets)
        return {"loss_mask": mask_loss(batch.mask_logits, batch.labels, batch.mask_targets)}

    def add_branch_outputs(self, features, image_sizes, detections: list[dict]) -> torch.Tensor:
        """Adds ``masks [N,1,28,28]`` (the detected class's probabilities) to each detection; returns the RoI features."""
        roi_features, mask_logits = self.masks_for(features, [d["boxes"] for d in detections], image_sizes)
        labels = torch.cat([d["labels"] for d in detections])
        masks = mask_logits[torch.arange(len(labels), device=labels.device), labels][:, None].sigmoid()
        for detection, image_masks in zip(detections, masks.split([len(d["boxes"]) for d in detections])):
            detection["masks"] = image_masks
        return roi_features


# The settings the book's chapters use on the 128-pixel shapes benchmark, for a 2-core CPU: the
# small backbone and a 64-channel FPN; anchors 4x the stride of their level instead of 8x (the
# objects are 40-70 pixels, where COCO's go up to 800); lighter heads; fewer proposals and RoI
# samples (an image holds one or two objects, not dozens). The backbone starts from the weights
# minis ships (minis/pretrain.py: the small ResNet pretrained on 2000 other shapes images), as both
# papers fine-tune an ImageNet-pretrained ResNet; with frozen batch norm, stem and first stage, as
# torchvision does with ImageNet weights. From scratch, four runs of the chapter's recipe (seeds 0,
# 1, 2 at 2 threads, seed 0 at 1) gave mask AP 0.729, 0.637, 0.656 and 0.704, a spread of 0.092.
SHAPES_SETTINGS: dict = {
    "backbone": "small", "pretrained_backbone": True, "fpn_channels": 64, "min_size": 128, "max_size": 256,
    "anchor_sizes": (16, 32, 64, 128, 256), "representation_size": 256, "mask_head_channels": 64,
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 32,
}

# The chapters' training recipe on the shapes benchmark (TrainConfig fields), for these settings:
# AdamW with a long warm-up, a cosine decay and clipping. In trial runs 3e-3 reached mask AP 0.75
# with either seed; 4e-3 gave 0.60 or 0.42 depending on the seed, and 6e-3 diverged. The FCOS and
# CondInst chapters train with it too, so that the three compare on one budget.
SHAPES_RECIPE: dict = {"epochs": 6, "batch_size": 8, "lr": 0.003, "optimizer": "adamw", "weight_decay": 1e-4,
                       "warmup_iters": 200, "schedule": "cosine", "clip_grad_norm": 5.0}


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _build(model_class, num_classes: int, backbone: str, pretrained_backbone: bool, fpn_channels: int,
           trainable_layers: int | None, **kwargs) -> FasterRCNN:
    config = config_from_kwargs(RCNNConfig, kwargs, model_class.__name__)
    body = backbone_fpn(backbone, fpn_channels, pretrained=pretrained_backbone, trainable_layers=trainable_layers)
    return model_class(body, num_classes, config)


@register("faster_rcnn")
def faster_rcnn(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
                fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> FasterRCNN:
    """Faster R-CNN with FPN; ``config`` overrides :class:`RCNNConfig` fields (e.g. ``min_size=512``)."""
    return _build(FasterRCNN, num_classes, backbone, pretrained_backbone, fpn_channels, trainable_layers, **config)


@register("mask_rcnn")
def mask_rcnn(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
              fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> MaskRCNN:
    """Mask R-CNN with FPN; ``config`` overrides :class:`RCNNConfig` fields."""
    return _build(MaskRCNN, num_classes, backbone, pretrained_backbone, fpn_channels, trainable_layers, **config)
