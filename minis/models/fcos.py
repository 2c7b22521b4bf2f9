"""FCOS (Tian, Shen, Chen & He, ICCV 2019): detection without anchors, one location at a time.

Faster R-CNN's RPN places a few anchor boxes at every position and learns to correct the one
that overlaps an object best. That brings hyper-parameters (sizes, aspect ratios, IoU
thresholds) and tens of thousands of boxes to match per image. FCOS drops the anchors: every
location ``(x, y)`` of every FPN level directly predicts

* a score per class (is this location inside an object of class ``c``?),
* four distances ``(l, t, r, b)`` from the location to the sides of that object's box,
* a *centre-ness* in 0..1: how close the location is to the centre of that box.

Which locations learn which object (:func:`assign_locations`):

* **Inside the box, near its centre.** A location is a candidate for an object when it lies
  inside the box and within ``radius x stride`` of the box's centre ("centre sampling", from
  the FCOS journal version): locations near the border of a box see mostly other things.
* **Multi-level ranges.** Level ``P_l`` is responsible for objects whose largest distance
  ``max(l, t, r, b)`` falls in its range (0-64 pixels for ``P3``, 64-128 for ``P4``, ... 512+
  for ``P7``). Large objects go to coarse levels, small ones to fine levels, and two
  overlapping objects of different sizes rarely compete for the same location.
* **Ambiguity.** A location that still qualifies for several objects learns the smallest.

Losses: focal loss for the classes over all locations, GIoU loss for the boxes and binary
cross-entropy for the centre-ness over the positive locations, each divided by their number.
At inference the score of a location is ``sqrt(class probability x centre-ness)``, so that
boxes predicted far from an object's centre (usually poor ones) rank low; the best 1000 above a
threshold per level go through NMS.

The computation follows torchvision's ``FCOS`` (tests compare outputs, losses and gradients),
so that ``minis.models.from_torchvision`` loads its COCO weights exactly. One thing differs from
torchvision: its class logits have a column for the background label 0, which training never
makes positive; minis keeps the column (so the weights load) but never reports label 0.

Departures from the paper (the ICCV 2019 version), each torchvision's choice unless said:

* **Distances without a learnable scale per level.** The paper predicts ``exp(s_l x)`` pixels
  with a learnable scalar ``s_l`` per level, since the levels share the head but regress
  distances of different ranges. Here they are ``relu(x)`` in units of the level's stride (the
  authors' later "normalised regression targets"), which already puts every level in one range.
  ``learnable_scales=True`` adds the paper's scalars (one per level, initialised to 1, on the
  output before the ReLU); off by default so that ported torchvision weights stay exact.
* **Scores ``sqrt(p x centre-ness)``** where the paper multiplies ``p x centre-ness``. The square
  root changes no ranking (so neither NMS nor AP); it keeps the score on the scale of a
  probability for thresholds and display.
* **The threshold applies to that combined score** (``score_thresh=0.2``, i.e. ``p x
  centre-ness > 0.04``), where the paper keeps locations with a class probability above 0.05
  and only then multiplies by the centre-ness; the best ``topk_candidates`` per level follow.
* **GIoU loss** for the boxes; the paper's IoU loss ``-ln(IoU)`` is ``box_loss="iou"``.
* **Centre-ness on the regression tower** and **centre sampling** (``center_sampling_radius``
  1.5 strides; ``inf`` accepts the whole box, as in the paper): two of the "improvements" of
  the journal version and the authors' code, not in the ICCV paper, which puts the centre-ness
  on the classification tower and makes every location inside a box a candidate.
* **Locations at the corners of their cells** ``(x * stride, y * stride)``; the paper's cell
  centres are ``location_offset=0.5`` (which torchvision's twin cannot follow).
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
from minis.models.rcnn import SHAPES_RECIPE as RCNN_SHAPES_RECIPE
from minis.nn.detection import DetectionTransform, ImageBatch, top_candidates_per_level, training_targets
from minis.nn.fpn import BackboneFPN, backbone_fpn
from minis.nn.losses import giou_loss, iou_loss, sigmoid_focal_loss
from minis.ops import clip_boxes_to_image

FCOS_LEVELS = ("c3", "c4", "c5")  # FPN inputs; P6 and P7 are convolutions of P5
BOX_LOSSES = {"giou": giou_loss, "iou": iou_loss}


@dataclass
class FCOSConfig:
    """FCOS's settings, with torchvision's names and defaults where it has them (its COCO recipe)."""

    # images: short side min_size (a tuple: drawn per image in training), long side at most max_size
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # head
    head_convs: int = 4  # 3x3 conv + group norm + ReLU layers in each tower
    prior_probability: float = 0.01  # initial class probability, so the background does not swamp the first steps
    # training targets
    center_sampling_radius: float = 1.5  # in strides of the location's level
    level_bounds: tuple[float, ...] | None = None  # limits of max(l,t,r,b) between levels; None: 8 x stride
    location_offset: float = 0.0  # where a location sits in its cell, in strides (0.5: the cell's centre)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "giou"  # or "iou": -ln(IoU), the FCOS paper's (torchvision's FCOS uses GIoU)
    learnable_scales: bool = False  # True: the paper's learnable scalar per level on the distances (not in torchvision)
    # inference
    score_thresh: float = 0.2
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000  # per level, before NMS


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------


def tower(channels: int, layers: int, in_channels: int | None = None) -> nn.Sequential:
    """``layers`` x (3x3 convolution, group norm with 32 groups, ReLU): ``[B,in_channels,H,W] -> [B,channels,H,W]``
    (``in_channels`` defaults to ``channels``).

    Group norm, not batch norm: detection batches hold two images per GPU, too few for batch
    statistics, and the same weights run on five levels whose statistics differ.
    """
    modules: list[nn.Module] = []
    for layer in range(layers):
        conv = nn.Conv2d(in_channels if layer == 0 and in_channels is not None else channels, channels, 3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        # ReLU in place: no new buffer per layer (group norm's backward needs its input, not its output)
        modules += [conv, nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)


class HeadOutputs(NamedTuple):
    """The head's outputs for all levels, flattened and concatenated (``N = sum_l H_l*W_l``)."""

    class_logits: torch.Tensor  # [B,N,classes]
    distances: torch.Tensor  # [B,N,4] (l,t,r,b) / stride, >= 0
    centerness: torch.Tensor  # [B,N] logits
    box_features: list[torch.Tensor]  # per level [B,C,H_l,W_l]: the regression tower's output


def flatten_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level ``[B,V,H,W]`` -> ``[B, sum_l H*W, V]``, level by level, positions row-major."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class FCOSHead(nn.Module):
    """Two towers shared by all levels: classes from one; box distances and centre-ness from the other.

    Centre-ness sits on the regression tower (the FCOS journal version: better than on the
    classification tower). Distances go through a ReLU: they are measured in strides, and a
    location inside its box has all four positive.

    With ``num_scales`` (one per level), each level's distances are multiplied by a learnable
    scalar before the ReLU, initialised to 1: the paper's ``exp(s_i x)``, which lets levels that
    share the head's weights still output distances of their own range.
    """

    def __init__(self, channels: int, num_classes: int, convs: int = 4, prior_probability: float = 0.01,
                 num_scales: int = 0) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_scales)) if num_scales else None
        self.cls_tower = tower(channels, convs)
        self.box_tower = tower(channels, convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.distances = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        for conv in (self.cls_logits, self.distances, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # start every class at probability ``prior`` (the focal-loss paper's trick)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: Sequence[torch.Tensor]) -> HeadOutputs:
        cls_features = [self.cls_tower(f) for f in features]
        box_features = [self.box_tower(f) for f in features]
        distances = [self.distances(f) for f in box_features]
        if self.scales is not None:
            distances = [d * scale for d, scale in zip(distances, self.scales)]
        return HeadOutputs(
            flatten_levels([self.cls_logits(f) for f in cls_features]),
            flatten_levels([F.relu(d) for d in distances]),
            flatten_levels([self.centerness(f) for f in box_features])[..., 0],
            box_features,
        )


# ----------------------------------------------------------------------------------------------
# Locations and their targets
# ----------------------------------------------------------------------------------------------


class Locations(NamedTuple):
    """Every location of every level of a padded batch (``N`` in all, the head's order)."""

    points: torch.Tensor  # [N,2] (x, y) in padded-image pixels
    strides: torch.Tensor  # [N] the stride of the location's level
    levels: torch.Tensor  # [N] int64 level index (0 = P3)
    counts: list[int]  # locations per level


def make_locations(features: Sequence[torch.Tensor], padded_size: Sequence[int], strides: Sequence[int],
                   offset: float = 0.0) -> Locations:
    """The image point each feature-map position stands for, level by level, row-major.

    Position ``(i, j)`` of a ``(h, w)`` map is ``((j + offset) * step_x, (i + offset) * step_y)``
    with ``step = padded size // map size``. That is the nominal stride on P3..P5; on P6/P7 the
    stride-2 convolutions round odd sizes up and the step can differ, and we use the step (as
    torchvision does) so that positions span the image.
    """
    points, location_strides, levels, counts = [], [], [], []
    device = features[0].device
    for level, (feature, stride) in enumerate(zip(features, strides)):
        height, width = feature.shape[-2:]
        step_y, step_x = padded_size[0] // height, padded_size[1] // width
        ys = (torch.arange(height, device=device, dtype=torch.float32) + offset) * step_y
        xs = (torch.arange(width, device=device, dtype=torch.float32) + offset) * step_x
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], dim=1))
        location_strides.append(torch.full((height * width,), float(stride), device=device))
        levels.append(torch.full((height * width,), level, dtype=torch.int64, device=device))
        counts.append(height * width)
    return Locations(torch.cat(points), torch.cat(location_strides), torch.cat(levels), counts)


def distances_to_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(l, t, r, b)`` from points ``[...,2]`` to the sides of boxes ``[...,4]`` (broadcast): ``[...,4]``."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)


def decode_distances(distances: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Boxes ``[...,4]`` xyxy from distances in strides ``[...,4]``, points ``[...,2]``, strides ``[...]``."""
    d = distances * strides[..., None]
    x, y = points[..., 0], points[..., 1]
    return torch.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]], dim=-1)


def centerness_target(distances: torch.Tensor) -> torch.Tensor:
    """``sqrt(min(l,r)/max(l,r) x min(t,b)/max(t,b))``: 1 at the box's centre, 0 on its border (``[...,4] -> [...]``)."""
    left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]
    return torch.sqrt(left_right.min(-1).values / left_right.max(-1).values
                      * top_bottom.min(-1).values / top_bottom.max(-1).values)


def level_ranges(strides: torch.Tensor, levels: torch.Tensor, num_levels: int,
                 bounds: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each location's ``(low, high)`` limits on ``max(l,t,r,b)``; the first level starts at 0, the last has no top.

    ``bounds`` holds the ``num_levels - 1`` limits between consecutive levels; by default
    ``8 x stride`` of the lower level (64, 128, 256, 512 for P3..P7, the paper's).
    """
    if bounds is None:
        high, low = strides * 8, strides * 4
    else:
        if len(bounds) != num_levels - 1:
            raise ValueError(f"level_bounds needs {num_levels - 1} values for {num_levels} levels, got {len(bounds)}")
        limits = torch.tensor([0.0, *bounds, math.inf], device=strides.device)
        low, high = limits[levels], limits[levels + 1]
    low = torch.where(levels == 0, torch.zeros_like(low), low)
    high = torch.where(levels == num_levels - 1, torch.full_like(high, math.inf), high)
    return low, high


def assign_locations(locations: Locations, boxes: torch.Tensor, radius: float, low: torch.Tensor,
                     high: torch.Tensor) -> torch.Tensor:
    """The object each location learns: ``[N]`` index into ``boxes [M,4]``, or -1 for background.

    All locations against all objects at once (``[N,M]`` tests), no loop over either.
    """
    if len(boxes) == 0:
        return torch.full((len(locations.points),), -1, dtype=torch.int64, device=boxes.device)
    points, strides = locations.points, locations.strides
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    near_centre = (points[:, None] - centres[None]).abs().max(dim=2).values < radius * strides[:, None]
    distances = distances_to_boxes(points[:, None], boxes[None])  # [N,M,4]
    inside = distances.min(dim=2).values > 0
    reach = distances.max(dim=2).values
    in_range = (reach > low[:, None]) & (reach < high[:, None])
    candidate = near_centre & inside & in_range
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # the smallest candidate object wins: a location inside a small object in front of a large
    # one most likely sees the small one
    area = torch.where(candidate, area[None].expand_as(candidate), torch.full_like(distances[..., 0], math.inf))
    smallest, matched = area.min(dim=1)
    matched[torch.isinf(smallest)] = -1
    return matched


def first_object_index(targets: list[dict], image_index: torch.Tensor) -> torch.Tensor:
    """For each entry of ``image_index``, where its image's first object sits among all the batch's objects."""
    counts = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=image_index.device)
    return counts.cumsum(0)[image_index]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class FCOS(nn.Module):
    """``model(images: list[[3,H,W]] in 0..1, targets=None)``: losses in training, detections in eval.

    Detections per image: ``boxes [N,4]`` (xyxy, input pixels), ``labels [N]`` (1..K), ``scores [N]``.
    """

    task = "instance"

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: FCOSConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FCOSConfig()
        if config.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {config.box_loss!r}")
        self.num_classes = num_classes
        self.transform = DetectionTransform(config.min_size, config.max_size, config.image_mean, config.image_std)
        self.backbone = backbone
        self.head = FCOSHead(backbone.channels, num_classes, config.head_convs, config.prior_probability,
                             len(backbone.strides) if config.learnable_scales else 0)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.training:
            targets = training_targets(targets, len(images))  # checked, crowd regions removed
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)  # [P3..P7]
        outputs = self.head(features)
        locations = make_locations(features, batch.tensors.shape[-2:], self.backbone.strides,
                                   self.config.location_offset)
        if self.training:
            matched = self.assign(locations, targets)
            losses = self.detection_losses(outputs, locations, matched, targets)
            losses.update(self.branch_losses(batch, features, outputs, locations, matched, targets))
            return losses
        detections, kept = self.detect(outputs, locations, batch.image_sizes)
        self.add_branch_outputs(batch, features, outputs, locations, detections, kept)
        return self.postprocess(detections, batch.image_sizes, original_sizes)

    # -- training -------------------------------------------------------------------------------

    def assign(self, locations: Locations, targets: list[dict]) -> list[torch.Tensor]:
        """Per image, the matched object of every location (``[N]``, -1 for background)."""
        low, high = level_ranges(locations.strides, locations.levels, len(locations.counts), self.config.level_bounds)
        return [assign_locations(locations, t["boxes"], self.config.center_sampling_radius, low, high)
                for t in targets]

    def detection_losses(self, outputs: HeadOutputs, locations: Locations, matched: list[torch.Tensor],
                         targets: list[dict]) -> dict[str, torch.Tensor]:
        """Focal loss over all locations; GIoU and centre-ness over the positives; all divided by their count."""
        cfg = self.config
        matched = torch.stack(matched)  # [B,N]
        positive = matched >= 0
        num_positive = max(1, int(positive.sum()))
        image_index, location_index = positive.nonzero(as_tuple=True)
        object_index = matched[image_index, location_index]
        gt_boxes = torch.cat([t["boxes"] for t in targets])
        flat_object = first_object_index(targets, image_index) + object_index  # among the whole batch's objects
        gt_labels = torch.cat([t["labels"] for t in targets])[flat_object]

        class_targets = torch.zeros_like(outputs.class_logits)
        class_targets[image_index, location_index, gt_labels] = 1.0
        loss_cls = sigmoid_focal_loss(outputs.class_logits, class_targets, cfg.focal_alpha, cfg.focal_gamma,
                                      reduction="sum")
        points, strides = locations.points[location_index], locations.strides[location_index]
        boxes = decode_distances(outputs.distances[image_index, location_index], points, strides)
        loss_box = BOX_LOSSES[cfg.box_loss](boxes, gt_boxes[flat_object], reduction="sum")
        true_distances = distances_to_boxes(points, gt_boxes[flat_object])  # [P,4]
        loss_centerness = F.binary_cross_entropy_with_logits(
            outputs.centerness[image_index, location_index], centerness_target(true_distances), reduction="sum")
        return {"loss_classifier": loss_cls / num_positive, f"loss_box_{cfg.box_loss}": loss_box / num_positive,
                "loss_centerness": loss_centerness / num_positive}

    def branch_losses(self, batch: ImageBatch, features: list[torch.Tensor], outputs: HeadOutputs,
                      locations: Locations, matched: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses of the branches a subclass adds (CondInst: the masks). None here."""
        return {}

    # -- inference ------------------------------------------------------------------------------

    def detect(self, outputs: HeadOutputs, locations: Locations, image_sizes: list[tuple[int, int]]
               ) -> tuple[list[dict], list[torch.Tensor]]:
        """Per image: scored candidates per level, the best ``topk_candidates`` each, NMS per class.

        Returns the detections and, per image, the location index ``[D]`` of each detection (for
        branches that need the location's other outputs, like CondInst's mask parameters).
        """
        cfg = self.config
        # the background column is never trained positive; a detection of it means nothing
        probabilities = outputs.class_logits.sigmoid()[..., 1:]
        scores_all = torch.sqrt(probabilities * outputs.centerness.sigmoid()[..., None])  # [B,N,K-1]
        num_foreground = scores_all.shape[-1]
        detections, kept = [], []
        for image, size in enumerate(image_sizes):
            flat_index, scores = top_candidates_per_level(scores_all[image], locations.counts, cfg.score_thresh,
                                                          cfg.topk_candidates)
            location = torch.div(flat_index, num_foreground, rounding_mode="floor")
            labels = flat_index % num_foreground + 1
            boxes = decode_distances(outputs.distances[image, location], locations.points[location],
                                     locations.strides[location])
            boxes = clip_boxes_to_image(boxes, size)
            keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
            detections.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
            kept.append(location[keep])
        return detections, kept

    def add_branch_outputs(self, batch: ImageBatch, features: list[torch.Tensor], outputs: HeadOutputs,
                           locations: Locations, detections: list[dict], kept: list[torch.Tensor]) -> None:
        """Outputs of the branches a subclass adds, written into ``detections``. None here."""

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Boxes back to the original image's pixels."""
        return self.transform.postprocess(detections, image_sizes, original_sizes)


# The settings the book's chapters use on the 128-pixel shapes benchmark, for a 2-core CPU: the
# small backbone, a 64-channel FPN and two convolutions per tower instead of four; a score
# threshold of 0.05 (the R-CNNs' box_score_thresh) rather than 0.2, since AP rewards a long
# ranked list.
SHAPES_SETTINGS: dict = {"backbone": "small", "fpn_channels": 64, "min_size": 128, "max_size": 256, "head_convs": 2,
                         "score_thresh": 0.05}
# The training recipe: Mask R-CNN's (rcnn.SHAPES_RECIPE), so that the chapters compare the two on one budget.
SHAPES_RECIPE: dict = RCNN_SHAPES_RECIPE


# ----------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------


def build_fcos_backbone(backbone: str, pretrained_backbone: bool, fpn_channels: int,
                        trainable_layers: int | None) -> BackboneFPN:
    """A ResNet with an FPN on ``c3..c5`` plus ``P6``/``P7`` convolutions: ``[P3..P7]``."""
    return backbone_fpn(backbone, fpn_channels, pretrained=pretrained_backbone, trainable_layers=trainable_layers,
                        levels=FCOS_LEVELS, top="p6p7")


@register("fcos")
def fcos(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False, fpn_channels: int = 256,
         trainable_layers: int | None = None, **config) -> FCOS:
    """FCOS with a ResNet-FPN (P3-P7); ``config`` overrides :class:`FCOSConfig` fields."""
    settings = config_from_kwargs(FCOSConfig, config, "FCOS")
    return FCOS(build_fcos_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                settings)

