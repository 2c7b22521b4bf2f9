"""FCIS (Li, Qi, Dai, Ji & Wei, CVPR 2017): instance masks assembled from position-sensitive score maps.

**Why an FCN cannot separate instances.** A fully convolutional network gives every pixel one
answer, computed from what the pixel sees (shift the image, and the answers shift with it). But
when two people touch, a pixel of the left one is foreground in the box around the left person
and background in the box around the right one: the same pixel, the same surroundings, two
answers. One map per class cannot hold both.

**Position-sensitive maps** (InstanceFCN, Dai et al., ECCV 2016) make the score depend on where the
pixel lies *relative to the box*: ``k x k`` maps per class, map ``(i, j)`` scoring "this pixel is
the ``(i, j)``-th part of an object". A box is cut into ``k x k`` parts and part ``(i, j)`` copies
its values from map ``(i, j)`` only (:func:`assemble`): the same pixel reads another map in each box
it falls in, so it can be foreground in one and background in the next. Nothing but this copying
is done per box; the maps are shared by the whole image.

**Inside and outside.** FCIS gives every class and part two maps, ``2 k^2 (C+1)`` in all. For a
pixel of a box, three cases:

* inside high, outside low: the box is on an object of the class and the pixel on that object
  (detection yes, segmentation yes);
* inside low, outside high: the box is on an object, but this pixel lies off it, in the box's
  background or on a neighbour (detection yes, segmentation no);
* both low: the box is not on an object of this class (detection no).

The joint formulation reads both tasks from the same two numbers, with no parameter per box
(:func:`joint_formulation`): per pixel, a softmax over (inside, outside) is the mask probability;
per pixel, max(inside, outside) separates the first two cases from the third, and its average over
the box is the box's logit for the class, ``C+1`` logits through a softmax give the class scores.

Shapes (``k`` = ``group_size`` 7, ``R`` = ``roi_size`` 21, ``C+1`` = ``num_classes``):

    images -> ResNet, last stage dilated (output stride 16): c4 [B,C4,H/16,W/16] -> RPN (300 RoIs per image)
                                                             c5 [B,C5,H/16,W/16] -> 1x1 conv + ReLU [B,1024,..]
      -> score maps [B, (C+1)*2*k*k, H/16, W/16]   (class-major, then inside/outside, then part)
      -> box maps   [B, 4*k*k, H/16, W/16]
    per RoI: assembled [N, C+1, 2, R, R] -> class logits [N, C+1], mask logits [N, C+1, R, R];
             box offsets [N, 4] (the parts' average, class-agnostic, as R-FCN)

Training: every proposal (plus the ground-truth boxes) is scored; a RoI with IoU >= 0.5 is
positive. Each RoI's loss is classification cross-entropy plus, for positives, the mean per-pixel
cross-entropy of its class's mask and the smooth-L1 box loss; OHEM back-propagates only the 128 RoIs
per image with the largest loss (:func:`fcis_losses`). Inference: the RoIs and their regressed boxes
are both scored, per-class NMS at 0.3 keeps at most 100, and each kept box's mask is voted by the
boxes around it (:func:`vote_masks`), then binarised at 0.4. :func:`assemble` is the plain version of
the assembly (:func:`minis.ops.ps_roi_align` with ``group_size``); the model computes the same numbers
with one batched ``grid_sample`` (:func:`assemble_sampled`, tested equal): on two CPU cores about three
times as fast forward as torchvision's compiled ``ps_roi_align`` and five times backward, and without the
plain version's gathered samples kept in memory for the backward pass.

Departures from the paper (and from the authors' MXNet code, where it fills in what the paper
leaves open):

* **Bilinear sampling, not average pooling, in the assembly**: each of the ``R x R`` bins is one
  bilinear sample at its centre (RoIAlign, ``sampling_ratio=1``), where MXNet's ``PSROIPooling``
  averages the feature cells of the bin, rounded to whole cells. At stride 16 the 21 x 21 bins of
  most boxes are smaller than a cell: rounding copies one cell into several bins and shifts the
  mask by up to half a cell (Mask R-CNN's case for RoIAlign); samples move smoothly with the box.
* **ResNet-50 by default** (``backbone="resnet101"`` gives the paper's ResNet-101), torchvision's
  "v1.5" ResNets on RGB images normalised by ImageNet's statistics, as in :mod:`minis.models.rcnn`.
* **The RPN of** :mod:`minis.models.rcnn` (one objectness logit per anchor with a sigmoid, torchvision's
  anchor rounding) on conv4, as in the paper; its 3x3 convolution keeps conv4's width (1024 for
  ResNet-50) where the authors' has 512 channels.
* **He initialisation of the 1x1 convolution on conv5**, where the authors draw all new layers from
  N(0, 0.01): after two such layers in a row, the classes teach a backbone trained from scratch
  (the book's) almost nothing, and on shapes training sat for hundreds of iterations calling every
  box background. The score and box maps keep N(0, 0.01).
* **Soft mask targets**: the ground-truth mask resampled to ``R x R`` by RoIAlign, as Mask R-CNN's;
  the authors' code binarises them at 0.4.
* **Loss weights**: the paper's equal weights with the mask loss averaged over the RoI's pixels
  (``mask_loss_weight=1``); the released code weights it by 10 and sums over pixels. The box loss is
  the authors' code's (the paper does not say): smooth L1 with beta 1, offsets scaled by (5, 5, 2, 2).
* **Voted boxes stay as they were**: the authors' code replaces each box by the tight box of its
  voted mask; here voting changes masks only.
* **Masks are binarised at 0.4 on the R x R grid** (the paper's threshold), then pasted into the
  image with the bilinear blending of Mask R-CNN, so that the evaluator's 0.5 cuts along the same
  border; ``mask_threshold=None`` returns the voted probabilities instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms  # the compiled kernels: minis.ops computes the same numbers

from minis.models import rcnn, register
from minis.models.config import config_from_kwargs
from minis.models.rcnn import RegionProposalNetwork, RPNHead, project_masks_on_boxes, with_ground_truth
from minis.nn.backbones import build_backbone
from minis.nn.detection import DetectionTransform, match_boxes, training_targets
from minis.nn.fpn import freeze_stages
from minis.ops import AnchorGenerator, BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from minis.ops.boxes import _float_compute_dtype
from minis.ops.ps_roi import ps_roi_align
from minis.ops.roi import _as_rois, _sample_coordinates, _sampling_grid

OUTPUT_STRIDE = 16  # conv5 dilated: the score maps' stride ("hole algorithm")
_VOTE_ELEMENTS = 2**22  # mask voting resamples at most this many mask values at once


@dataclass
class FCISConfig:
    """FCIS's settings; defaults are the paper's COCO model (the authors' code where the paper is silent).

    The image, anchor and ``rpn_*`` fields have :class:`~minis.models.rcnn.RCNNConfig`'s names and
    meaning: the region proposal network of :mod:`minis.models.rcnn` reads them.
    """

    # images: short side 600, long side at most 1000
    min_size: int | tuple[int, ...] = 600
    max_size: int = 1000
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    head_channels: int = 1024  # the 1x1 convolution on conv5 that the score maps read
    # anchors: every size with every aspect ratio at each position of the one stride-16 map (12 anchors)
    anchor_sizes: tuple[int, ...] = (64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # region proposal network: 300 RoIs per image in training and inference
    rpn_pre_nms_top_n_train: int = 6000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_train: int = 300
    rpn_post_nms_top_n_test: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    # position-sensitive score maps
    group_size: int = 7  # k: parts per side of a RoI, each with its own maps
    roi_size: int = 21  # R: a RoI's masks are R x R (R / k bins per part and side)
    sampling_ratio: int = 1  # bilinear samples per bin side in the assembly
    # training
    box_fg_iou_thresh: float = 0.5  # IoU with an object from which a RoI is positive (else background)
    ohem_rois: int = 128  # per image: the RoIs with the largest loss, the only ones back-propagated
    mask_loss_weight: float = 1.0
    bbox_reg_weights: tuple[float, float, float, float] = (5.0, 5.0, 2.0, 2.0)
    # inference
    box_score_thresh: float = 0.001
    box_nms_thresh: float = 0.3
    box_detections_per_img: int = 100
    mask_voting: bool = True
    voting_iou_thresh: float = 0.5  # boxes overlapping a detection by this much vote for its mask
    mask_threshold: float | None = 0.4  # None: the masks stay probabilities


# ----------------------------------------------------------------------------------------------
# The assembly and the joint formulation: no parameter per RoI
# ----------------------------------------------------------------------------------------------


def assemble(score_maps: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor], roi_size: int, group_size: int,
             spatial_scale: float, sampling_ratio: int = 1) -> torch.Tensor:
    """Each RoI's ``R x R`` inside/outside maps, copied part by part: ``[N, C+1, 2, R, R]``.

    ``score_maps [B, (C+1)*2*k*k, h, w]``. The RoI is cut into ``k x k`` parts; bin ``(u, v)`` lies
    in part ``(u*k // R, v*k // R)`` and reads that part's channel of each class and kind (MXNet's
    ``PSROIPooling`` with ``group_size=k``, ``pooled_size=R``). With ``R == k`` this is exactly
    ``torchvision.ops.ps_roi_align``.
    """
    parts = ps_roi_align(score_maps, boxes, roi_size, spatial_scale, sampling_ratio, group_size=group_size)
    return parts.unflatten(1, (-1, 2))


def assemble_sampled(maps: torch.Tensor, boxes: Sequence[torch.Tensor], roi_size: int, group_size: int,
                     spatial_scale: float) -> torch.Tensor:
    """:func:`assemble` flattened, ``[N, channels / k^2, R, R]``, for one sample per bin and ``R`` a multiple
    ``r k`` of ``k``, as one batched ``F.grid_sample``: the same numbers, several times faster.

    Every bin of every box is one bilinear sample at the bin's centre, read from the maps of the part
    the bin lies in. So the maps are regrouped by part, ``[k^2, channels / k^2, B*H, W]`` (the images
    stacked along the height), and part ``(p, q)`` samples the ``r x r`` bin centres of that part of
    every box at once. The samples follow torchvision's RoIAlign rules (:mod:`minis.ops.roi`): clamped
    onto the map within a cell of its border, which also keeps them on their own image of the stack,
    and 0 farther out. The positions are torchvision's ``ps_roi_align``'s (the box shifted by half a
    cell); grid_sample's backward spreads the gradients with all cores, where the compiled
    ``ps_roi_align`` backward visits every sample on one thread.
    """
    batch, channels, height, width = maps.shape
    k, r = group_size, roi_size // group_size
    kinds = channels // (k * k)  # 2 (C+1) score maps per part, or 4 box maps
    rois = _as_rois(boxes, _float_compute_dtype(maps.dtype), maps.device)
    count = len(rois)
    grid = _sampling_grid(rois, (roi_size, roi_size), spatial_scale, 1, aligned=True)
    x1, y1, bin_w, bin_h, grid_w, grid_h = grid.unbind(1)
    ys, _ = _sample_coordinates(y1, bin_h, grid_h, roi_size, 1)  # [N,R]: the bins' centres
    xs, _ = _sample_coordinates(x1, bin_w, grid_w, roi_size, 1)
    near = ((ys >= -1) & (ys <= height))[:, :, None] & ((xs >= -1) & (xs <= width))[:, None, :]  # [N,R,R]
    # grid_sample's coordinates (align_corners=True): -1 and 1 are the centres of the first and last cell
    stacked_y = rois[:, :1] * height + ys.clamp(0, height - 1)
    normal_y = (2 * stacked_y / max(batch * height - 1, 1) - 1).view(count, k, 1, r, 1)  # [N,p,1,a,1]
    normal_x = (2 * xs.clamp(0, width - 1) / max(width - 1, 1) - 1).view(count, 1, k, 1, r)  # [N,1,q,1,b]
    points = torch.stack(torch.broadcast_tensors(normal_x, normal_y), dim=-1)  # [N,p,q,a,b,(x,y)]
    points = points.permute(1, 2, 0, 3, 4, 5).reshape(k * k, count, r * r, 2)
    by_part = maps.view(batch, kinds, k * k, height, width).permute(2, 1, 0, 3, 4).reshape(k * k, kinds, -1, width)
    samples = F.grid_sample(by_part, points.to(by_part.dtype), mode="bilinear", padding_mode="border",
                            align_corners=True)  # [k*k, kinds, N, r*r]
    samples = samples.view(k, k, kinds, count, r, r).permute(3, 2, 0, 4, 1, 5).reshape(count, kinds, roi_size, roi_size)
    return samples * near[:, None]


def joint_formulation(assembled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C+1, 2, R, R]`` (inside, outside) -> class logits ``[N, C+1]``, mask logits ``[N, C+1, R, R]``.

    Mask: the softmax over (inside, outside) at each pixel; for two values it is the sigmoid of
    their difference, so the mask logit is ``inside - outside``. Class: at each pixel the larger of
    the two (high in the first two cases, low in the third), averaged over the RoI.
    """
    inside, outside = assembled.unbind(2)
    return torch.maximum(inside, outside).mean(dim=(-2, -1)), inside - outside


class RoIOutputs(NamedTuple):
    """What FCIS says about ``N`` RoIs."""

    class_logits: torch.Tensor  # [N, C+1]
    mask_logits: torch.Tensor  # [N, C+1, R, R]: inside - outside, for every class
    box_deltas: torch.Tensor  # [N, 4]: one class-agnostic refinement


# ----------------------------------------------------------------------------------------------
# Losses with online hard example mining
# ----------------------------------------------------------------------------------------------


class RoILosses(NamedTuple):
    """Each RoI's loss terms, ``[N]`` each (the mask and box terms are 0 on background RoIs)."""

    classifier: torch.Tensor
    mask: torch.Tensor
    box: torch.Tensor


def roi_losses(outputs: RoIOutputs, labels: torch.Tensor, mask_targets: torch.Tensor,
               box_targets: torch.Tensor) -> RoILosses:
    """Cross-entropy of every RoI's class; for the positives (``labels > 0``, in order, with
    ``mask_targets [P,R,R]`` and ``box_targets [P,4]``) the mean per-pixel cross-entropy of their own
    class's mask and the smooth-L1 loss of their box offsets. Computed in float32."""
    classifier = F.cross_entropy(outputs.class_logits.float(), labels, reduction="none")
    positive = torch.nonzero(labels > 0).squeeze(1)
    own_mask = outputs.mask_logits[positive, labels[positive]].float()  # [P,R,R]
    mask = F.binary_cross_entropy_with_logits(own_mask, mask_targets, reduction="none").mean(dim=(1, 2))
    box = F.smooth_l1_loss(outputs.box_deltas[positive].float(), box_targets, beta=1.0, reduction="none").sum(1)
    zeros = classifier.new_zeros(len(labels))
    return RoILosses(classifier, zeros.index_put((positive,), mask), zeros.index_put((positive,), box))


def total_roi_loss(losses: RoILosses, mask_loss_weight: float) -> torch.Tensor:
    """Each RoI's loss ``[N]``, the sum OHEM ranks the RoIs by."""
    return losses.classifier + mask_loss_weight * losses.mask + losses.box


def hardest_rois(per_roi_loss: torch.Tensor, counts: Sequence[int], per_image: int) -> torch.Tensor:
    """Indices of the ``per_image`` RoIs with the largest loss in each image (all of an image's if it has fewer)."""
    chosen, start = [], 0
    for count in counts:  # RoIs are listed image after image
        chosen.append(per_roi_loss[start:start + count].topk(min(per_image, count)).indices + start)
        start += count
    return torch.cat(chosen)


def fcis_losses(outputs: RoIOutputs, labels: torch.Tensor, mask_targets: torch.Tensor, box_targets: torch.Tensor,
                counts: Sequence[int], ohem_rois: int, mask_loss_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """OHEM: every RoI is scored, the ``ohem_rois`` per image with the largest total loss are kept.

    No sampling by label: the hard RoIs pick themselves, background or object. Each term is averaged
    over the kept RoIs; the others get no gradient at all. (The model computes the same in two passes,
    :meth:`FCIS.losses`, so that the backward pass visits the kept RoIs only.)
    """
    losses = roi_losses(outputs, labels, mask_targets, box_targets)
    kept = hardest_rois(total_roi_loss(losses, mask_loss_weight).detach(), counts, ohem_rois)
    count = max(1, len(kept))
    return {"loss_classifier": losses.classifier[kept].sum() / count,
            "loss_mask": mask_loss_weight * losses.mask[kept].sum() / count,
            "loss_box_reg": losses.box[kept].sum() / count}


# ----------------------------------------------------------------------------------------------
# Mask voting
# ----------------------------------------------------------------------------------------------


def resample_masks(masks: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``masks [P,R,R]`` covering the boxes ``source [P,4]``, read at the bin centres of ``target [P,4]``.

    Bilinear, and 0 outside the source box: a RoI's mask ends at its box.
    """
    size = masks.shape[-1]
    centres = (torch.arange(size, device=masks.device, dtype=source.dtype) + 0.5) / size  # fractions of a side

    def normalised(axis: int) -> torch.Tensor:  # [P,R]: target's bin centres in the source box's -1..1 frame
        length = source[:, axis + 2] - source[:, axis]
        offset = (target[:, axis] - source[:, axis]) / length  # 0 and 1 for the same box: exactly its own bins
        ratio = (target[:, axis + 2] - target[:, axis]) / length
        return 2 * (offset[:, None] + centres * ratio[:, None]) - 1

    x, y = normalised(0), normalised(1)
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # [P,R,R,(x,y)]
    return F.grid_sample(masks[:, None], grid.to(masks.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def vote_masks(kept_boxes: torch.Tensor, kept_labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
               mask_logits: torch.Tensor, iou_thresh: float = 0.5) -> torch.Tensor:
    """Mask voting: each kept box's mask ``[D,R,R]`` is the average of the masks of its class of all the
    candidate ``boxes [M,4]`` that overlap it by IoU >= ``iou_thresh``, weighted by their ``scores [M,C+1]``
    for that class. ``mask_logits [M,C+1,R,R]``.

    A voter's mask covers its own box: it is resampled into the kept box's frame first. The work
    is done on (kept, voter) pairs, a chunk at a time, so memory stays bounded however many there are.
    """
    kept, voter = torch.nonzero(box_iou(kept_boxes, boxes) >= iou_thresh, as_tuple=True)  # the pairs
    size = mask_logits.shape[-1]
    voted = torch.zeros(len(kept_boxes), size, size, dtype=torch.float32, device=boxes.device)
    weights = scores[voter, kept_labels[kept]].float()
    for part in torch.arange(len(kept), device=boxes.device).split(max(1, _VOTE_ELEMENTS // size**2)):
        masks = mask_logits[voter[part], kept_labels[kept[part]]].float().sigmoid()
        resampled = resample_masks(masks, boxes[voter[part]].float(), kept_boxes[kept[part]].float())
        voted.index_add_(0, kept[part], weights[part, None, None] * resampled)
    total = weights.new_zeros(len(kept_boxes)).index_add_(0, kept, weights)  # each kept box votes for itself
    return voted / total.clamp(min=torch.finfo(total.dtype).tiny)[:, None, None]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class SingleMapRPN(RegionProposalNetwork):
    """:mod:`minis.models.rcnn`'s region proposal network on one feature map with several anchor sizes.

    There, each FPN level has one anchor size; FCIS has a single stride-16 map, so every size sits
    at every position: ``len(anchor_sizes) * len(aspect_ratios)`` anchors (12 on COCO).
    """

    def __init__(self, channels: int, config: FCISConfig) -> None:
        super().__init__(channels, config)  # reads the rpn_* fields; the anchors and head are replaced here
        self.anchor_generator = AnchorGenerator((tuple(config.anchor_sizes),), (tuple(config.aspect_ratios),))
        self.head = RPNHead(channels, self.anchor_generator.num_anchors_per_location()[0])


class FCIS(nn.Module):
    """``model(images: list[[3,H,W]] in 0..1, targets=None)``: losses in training, detections in eval.

    Detections per image: ``boxes [N,4]`` (xyxy, input pixels), ``labels [N]`` (1..C), ``scores [N]``,
    ``masks [N,1,H,W]`` in 0..1 (0/1 inside the box's grid with ``mask_threshold``, blended at the edges).
    """

    task = "instance"

    def __init__(self, backbone: nn.Module, num_classes: int, config: FCISConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FCISConfig()
        self.num_classes = num_classes  # C+1: the background counts
        self.transform = DetectionTransform(config.min_size, config.max_size, config.image_mean, config.image_std)
        self.backbone = backbone
        self.rpn = SingleMapRPN(backbone.channels["c4"], config)
        k = config.group_size
        self.reduce = nn.Conv2d(backbone.channels["c5"], config.head_channels, 1)
        self.score_maps = nn.Conv2d(config.head_channels, num_classes * 2 * k * k, 1)  # 2 k^2 (C+1)
        self.box_maps = nn.Conv2d(config.head_channels, 4 * k * k, 1)
        # He initialisation for the hidden 1x1 layer (it feeds a ReLU), the authors' N(0, 0.01) for the two
        # output layers: two 0.01 layers in a row starve the backbone of the gradient that teaches it the
        # classes, which a pretrained backbone can do without but one trained from scratch cannot
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        for conv in (self.score_maps, self.box_maps):
            nn.init.normal_(conv.weight, std=0.01)
        for conv in (self.reduce, self.score_maps, self.box_maps):
            nn.init.zeros_(conv.bias)
        self.box_coder = BoxCoder(config.bbox_reg_weights)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.training:
            targets = training_targets(targets, len(images))  # checked, crowd regions removed
            for index, target in enumerate(targets):
                if "masks" not in target:
                    raise ValueError(f"image id {target.get('image_id', f'#{index}')}: FCIS needs 'masks' in its "
                                     f"targets")
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        proposals, losses = self.rpn(batch, [features["c4"]], targets)
        hidden = F.relu(self.reduce(features["c5"]))
        maps = (self.score_maps(hidden), self.box_maps(hidden))
        if self.training:
            return {**losses, **self.losses(maps, proposals, targets)}
        detections = self.detect(maps, proposals, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def score_rois(self, maps: tuple[torch.Tensor, torch.Tensor], rois: list[torch.Tensor]) -> RoIOutputs:
        """Class logits, mask logits and box offsets of the RoIs of all images, from the shared maps."""
        score_maps, box_maps = maps
        class_logits, mask_logits = joint_formulation(self.assemble_maps(score_maps, rois))
        # the box maps assembled the same way and averaged: the parts vote on the box (R-FCN), as the
        # authors average the R x R samples
        box_deltas = self.assemble_maps(box_maps.float(), rois).flatten(1, 2).mean(dim=(-2, -1))  # [N,4]
        return RoIOutputs(class_logits, mask_logits, box_deltas)

    def assemble_maps(self, maps: torch.Tensor, rois: list[torch.Tensor]) -> torch.Tensor:
        """:func:`assemble`, by one ``grid_sample`` where it computes the same (:func:`assemble_sampled`)."""
        cfg = self.config
        scale = 1.0 / self.backbone.output_stride  # the padded images are multiples of 32: the maps exactly 1/16
        if cfg.sampling_ratio == 1 and cfg.roi_size % cfg.group_size == 0:
            return assemble_sampled(maps, rois, cfg.roi_size, cfg.group_size, scale).unflatten(1, (-1, 2))
        return assemble(maps, rois, cfg.roi_size, cfg.group_size, scale, cfg.sampling_ratio)

    # -- training -------------------------------------------------------------------------------

    def losses(self, maps: tuple[torch.Tensor, torch.Tensor], proposals: list[torch.Tensor],
               targets: list[dict]) -> dict[str, torch.Tensor]:
        """All proposals plus the ground-truth boxes scored, then OHEM: :func:`fcis_losses`'s numbers.

        In two passes, as the paper's OHEM: every RoI is scored without gradient and ranked, then the
        kept ones are scored again with it. The second pass costs a third of the first (32 RoIs of
        about 100 in the shapes settings), while a backward pass visits every RoI it was given, kept or
        not (with torchvision's ``ps_roi_align``, half of a one-pass training step).
        """
        cfg = self.config
        rois = [with_ground_truth(p, t["boxes"]) for p, t in zip(proposals, targets)]
        labels, mask_targets, box_targets = self.roi_targets(rois, targets)
        counts = [len(r) for r in rois]
        with torch.no_grad():
            ranked = roi_losses(self.score_rois(maps, rois), labels, mask_targets, box_targets)
            kept = hardest_rois(total_roi_loss(ranked, cfg.mask_loss_weight), counts, cfg.ohem_rois)  # image by image
        kept_counts = [min(cfg.ohem_rois, count) for count in counts]
        kept_rois = list(torch.cat(rois)[kept].split(kept_counts))
        positive_rank = torch.cumsum(labels > 0, 0) - 1  # a positive RoI's row in mask_targets and box_targets
        kept_labels = labels[kept]
        kept_positive = positive_rank[kept[kept_labels > 0]]
        return fcis_losses(self.score_rois(maps, kept_rois), kept_labels, mask_targets[kept_positive],
                           box_targets[kept_positive], kept_counts, cfg.ohem_rois, cfg.mask_loss_weight)

    def roi_targets(self, rois: list[torch.Tensor], targets: list[dict]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels ``[N]`` of all RoIs (0: background); mask ``[P,R,R]`` and box ``[P,4]`` targets of the positives.

        The mask target is the object's part inside the RoI, in the RoI's R x R frame (Mask R-CNN's).
        """
        cfg = self.config
        labels, mask_targets, box_targets = [], [], []
        for image_rois, target in zip(rois, targets):
            image_labels = torch.zeros(len(image_rois), dtype=torch.int64, device=image_rois.device)
            if len(target["boxes"]):
                matches = match_boxes(box_iou(target["boxes"], image_rois), cfg.box_fg_iou_thresh,
                                      cfg.box_fg_iou_thresh, allow_low_quality=False)
                positive = torch.nonzero(matches >= 0).squeeze(1)
                objects, boxes = matches[positive], image_rois[positive]
                image_labels[positive] = target["labels"][objects].to(torch.int64)
                mask_targets.append(project_masks_on_boxes(target["masks"], boxes, objects, cfg.roi_size))
                box_targets.append(self.box_coder.encode_single(target["boxes"][objects].to(boxes), boxes))
            labels.append(image_labels)
        empty = rois[0].new_zeros(0, cfg.roi_size, cfg.roi_size)  # no object in the batch
        return (torch.cat(labels), torch.cat([empty, *mask_targets]).float(),
                torch.cat([empty[:, 0, :4], *box_targets]).float())

    # -- inference ------------------------------------------------------------------------------

    def detect(self, maps: tuple[torch.Tensor, torch.Tensor], proposals: list[torch.Tensor],
               image_sizes: list[tuple[int, int]]) -> list[dict]:
        """The RoIs and their regressed boxes both scored (the paper's union of the two), then :meth:`select`."""
        counts = [len(p) for p in proposals]
        first = self.score_rois(maps, proposals)
        # decoded in the proposals' float32, not in the maps' float16 under autocast
        regressed = self.box_coder.decode(first.box_deltas.to(proposals[0].dtype), proposals)[:, 0].split(counts)
        regressed = [clip_boxes_to_image(boxes, size) for boxes, size in zip(regressed, image_sizes)]
        second = self.score_rois(maps, regressed)

        def per_image(of_rois: torch.Tensor, of_regressed: torch.Tensor) -> list[torch.Tensor]:
            return [torch.cat(pair) for pair in zip(of_rois.split(counts), of_regressed.split(counts))]

        boxes = [torch.cat(pair) for pair in zip(proposals, regressed)]
        class_logits = per_image(first.class_logits, second.class_logits)
        mask_logits = per_image(first.mask_logits, second.mask_logits)
        return [self.select(*candidates) for candidates in zip(boxes, class_logits, mask_logits)]

    def select(self, boxes: torch.Tensor, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> dict:
        """One image's candidates ``[M,4]`` -> detections: per-class NMS, the best 100, voted binary masks."""
        cfg = self.config
        keep = remove_small_boxes(boxes, 1e-2)  # a regressed box may collapse against the image border
        boxes, scores, mask_logits = boxes[keep], F.softmax(class_logits[keep].float(), -1), mask_logits[keep]
        candidate, label = torch.nonzero(scores[:, 1:] > cfg.box_score_thresh, as_tuple=True)
        label = label + 1  # every (candidate, class) pair above the threshold; the background column is left out
        keep = batched_nms(boxes[candidate], scores[candidate, label], label, cfg.box_nms_thresh)
        candidate, label = candidate[keep[:cfg.box_detections_per_img]], label[keep[:cfg.box_detections_per_img]]
        if cfg.mask_voting:
            masks = vote_masks(boxes[candidate], label, boxes, scores, mask_logits, cfg.voting_iou_thresh)
        else:
            masks = mask_logits[candidate, label].float().sigmoid()
        if cfg.mask_threshold is not None:
            masks = (masks >= cfg.mask_threshold).to(masks.dtype)
        return {"boxes": boxes[candidate], "labels": label, "scores": scores[candidate, label], "masks": masks[:, None]}


# ----------------------------------------------------------------------------------------------
# Small settings and the builder
# ----------------------------------------------------------------------------------------------

# The book's settings on the 128-pixel shapes benchmark for a 2-core CPU. The stride-16 map of a
# 128-pixel image is 8 x 8 cells and the objects (40-70 pixels) span 2.5 to 4.5 of them. The paper's
# k = 7 and R = 21 stay: the k x k parts are what give a mask detail finer than the map (each part
# reads its own maps), and 2 k^2 (C+1) = 588 maps of 8 x 8 cost nothing. The anchors are the paper's
# four sizes scaled with the image (64-512 pixels on a 600-pixel short side, so 16-128 here); the
# 1x1 head is 256 wide, as Mask R-CNN's box head in these settings. An image holds one or two
# objects, not COCO's seven: 100 RoIs per image in training, 32 of them back-propagated (Mask R-CNN's
# sample count here), and 50 RoIs (100 candidates with their regressed boxes) in inference. The body
# starts from the small ResNet that minis ships (pretrained on other shapes images, minis.pretrain), as
# the paper starts from ImageNet and as the two-stage chapters' settings do. Mask AP on the shapes val
# set, seed 0, 6 epochs of SHAPES_RECIPE: 0.459 from scratch, 0.540 pretrained (box AP 0.683); 4
# epochs 0.496 (seed 1: 0.538), 5 epochs 0.519; 4 epochs with a 100-iteration warm-up 0.459. With the
# two-pass OHEM of FCIS.losses (same losses, 188 s instead of 258 s for 6 epochs on 2 cores), seeds
# 0, 1, 2: mask AP 0.532, 0.560, 0.552, box AP 0.645, 0.696, 0.686; with assemble_sampled instead of
# torchvision's ps_roi_align, seed 0: mask AP 0.543, box AP 0.684, in 128 s.
SHAPES_SETTINGS: dict = {
    "backbone": "small", "pretrained_backbone": True, "min_size": 128, "max_size": 256, "head_channels": 256,
    "anchor_sizes": (16, 32, 64, 128), "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 50, "ohem_rois": 32,
}
# The training recipe: Mask R-CNN's (rcnn.SHAPES_RECIPE), so that the two compare on one budget.
SHAPES_RECIPE: dict = rcnn.SHAPES_RECIPE


def fcis_backbone(name: str, pretrained: bool, trainable_layers: int | None) -> nn.Module:
    """A ResNet with its last stage dilated (output stride 16), frozen as :func:`minis.nn.fpn.backbone_fpn`
    freezes it: with ImageNet weights, frozen batch norm and three trainable stages (the authors fix
    conv1 and res2 too); from scratch, everything trains."""
    body = build_backbone(name, output_stride=OUTPUT_STRIDE, frozen_bn=pretrained, pretrained=pretrained)
    freeze_stages(body, (3 if pretrained else 5) if trainable_layers is None else trainable_layers)
    return body


@register("fcis")
def fcis(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
         trainable_layers: int | None = None, **config) -> FCIS:
    """FCIS on a dilated ResNet; ``config`` overrides :class:`FCISConfig` fields (e.g. ``min_size=512``)."""
    settings = config_from_kwargs(FCISConfig, config, "FCIS")
    return FCIS(fcis_backbone(backbone, pretrained_backbone, trainable_layers), num_classes, settings)
