"""SOLO (Wang, Kong, Shen, Jiang & Li, ECCV 2020): segmenting objects by locations.

Mask R-CNN first finds a box, then segments inside it; YOLACT and CondInst still start from a
detector. SOLO needs neither boxes nor embeddings. The image is divided into an ``S x S`` grid,
and the cell that holds an object's centre is responsible for it: it predicts the object's
category, and the whole image's mask of that object. Two objects are told apart by *where* they
are, as semantic segmentation tells pixels apart by *what* they are: "instance categories".

* **Category branch**: each FPN level's features are resized to ``S x S`` and a tower of 3x3
  convolutions predicts, per cell, a score for each class (sigmoid, focal loss).
* **Mask branch**: the same level's features, with two extra channels holding each pixel's
  normalised x and y (CoordConv: a convolution is translation-invariant, so without them it
  cannot say *where* a pixel is, and location is what selects the instance), go through another
  tower and end in ``S^2`` channels at twice the level's resolution. Channel ``k = i S + j`` is
  the mask of the object whose centre falls in cell ``(i, j)``.
* **Levels**: FPN levels P2-P6, P2 resized to P3's size and P6 to P5's (strides 8, 8, 16, 32,
  32), grids ``S = 40, 36, 24, 16, 12``; an object belongs to the levels whose range holds
  ``sqrt(w h)`` of its box, and neighbouring ranges overlap (an object at a boundary trains both).
* **Targets**: the cells near the object's centre of mass are positive: within ``0.2`` of its
  half-width and half-height around the centre (``center_radius``), and never farther than one
  cell from the centre's own cell. Every positive cell predicts the whole mask.
* **Losses**: focal loss on the categories; the Dice loss (weight 3) on the masks of the
  positive cells only, against the ground truth at the mask's stride.
* **Inference**: category scores above 0.1 that are local maxima of their map ("points NMS",
  a 2x2 max-pool as in the released code); the candidates' masks, thresholded at 0.5; each score
  multiplied by its mask's *maskness* (the mean probability inside the binary mask); the best 500
  through :func:`minis.ops.matrix_nms`; scores above 0.05, the best 100 kept (``suppression="greedy"``:
  greedy NMS on the masks instead, as the first version of the paper). Boxes are the binary
  masks' boxes (:func:`minis.ops.mask_boxes`): SOLO predicts none.

:class:`DecoupledSOLO` replaces the ``S^2`` mask channels, which cost memory quadratic in ``S``
(1600 maps at stride 4 for ``S = 40``), by two branches of ``S`` channels each, one per axis:
``mask(i, j) = sigmoid(Y_i) * sigmoid(X_j)``. The ``X`` branch sees the x coordinate, ``Y`` the y
coordinate. ``minis.models.solov2`` goes further: a predicted kernel per cell.

Departures from the paper (and from the authors' released code where it fills in what the paper
leaves open):

* **The 1x1 convolution to S^2 channels runs before the 2x upsampling**, not after: both are
  linear and act on different axes (channels, space), so the order does not change the output,
  and the convolution then costs a quarter.
* **Ground-truth masks at the mask's stride are the fraction of each cell the object covers**
  (:func:`minis.nn.detection.mask_targets`, as in CondInst), not a rescaled binary mask.
* **A cell claimed by two objects belongs to the smaller one** (the larger has other cells); the
  released code lets the object processed last win, an order the annotation file decides.
* **The centre of mass is taken at pixel centres** (``x + 0.5``), the convention of the rest of the
  book; an object whose mask vanished when the image was resized (tiny objects) is not a
  positive anywhere, since there is no mask to learn. The first level's range starts at 0 (the
  paper's at 1), so every object with a mask reaches some level.
* **Group norm** in every tower, as in the released code (the paper leaves it open).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.models.fcos import tower
from minis.models.rcnn import SHAPES_RECIPE as RCNN_SHAPES_RECIPE
from minis.nn.detection import (DetectionTransform, ImageBatch, mask_targets, pad_to, postprocess_image_masks,
                                training_targets)
from minis.nn.fpn import BackboneFPN, backbone_fpn
from minis.nn.losses import dice_loss, sigmoid_focal_loss
from minis.ops import batched_mask_nms, mask_boxes, matrix_nms


@dataclass
class SOLOConfig:
    """SOLO's settings; defaults are the paper's COCO recipe (R-50-FPN)."""

    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # heads
    head_channels: int = 256
    coordinates: bool = True  # CoordConv: the mask branch sees each pixel's normalised x and y (False: the ablation)
    head_convs: int = 7  # 3x3 conv + group norm + ReLU layers in each branch (SOLOv2: 4)
    prior_probability: float = 0.01
    # levels: P2 (resized to P3's size), P3, P4, P5, P6 (resized to P5's)
    grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    scale_ranges: tuple[tuple[float, float], ...] = ((0, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # targets and losses
    center_radius: float = 0.2  # positive cells: within this fraction of the half-size around the centre
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_loss_weight: float = 3.0
    # inference
    score_thresh: float = 0.1
    mask_thresh: float = 0.5
    pre_nms: int = 500
    suppression: str = "matrix"  # or "greedy": greedy NMS on the masks (SOLO's first version), for comparison
    nms_kernel: str = "gaussian"  # Matrix NMS's decay function
    nms_sigma: float = 2.0
    update_thresh: float = 0.05  # decayed scores below this are dropped
    nms_thresh: float = 0.5  # greedy NMS: mask IoU above which the lower-scored mask goes
    detections_per_img: int = 100


# ----------------------------------------------------------------------------------------------
# Inputs of the branches
# ----------------------------------------------------------------------------------------------


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """CoordConv's two extra channels for ``x [B,C,H,W]``: ``[B,2,H,W]``, each pixel's x then y, in -1..1."""
    batch, _, height, width = x.shape
    ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)


def with_coordinates(x: torch.Tensor, axes: Sequence[int] = (0, 1)) -> torch.Tensor:
    """``[B,C,H,W] -> [B,C+len(axes),H,W]``: the features and their coordinates along ``axes`` (0: x, 1: y;
    none: the features alone, the ablation without CoordConv)."""
    if not axes:
        return x
    return torch.cat([x, coordinate_channels(x)[:, list(axes)]], dim=1)


def solo_levels(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """FPN ``[P2..P6]`` -> SOLO's five inputs at strides 8, 8, 16, 32, 32.

    P2 is halved (stride 4 would make the mask branch's maps four times larger for the smallest
    objects, which a grid of 40 cells already separates) and P6 brought to P5's size (its own
    1/64 resolution is too coarse for masks).
    """
    p2, p3, p4, p5, p6 = features
    return [F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False), p3, p4, p5,
            F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)]


def resize_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B,C,H,W] -> [B,C,S,S]``: one feature vector per grid cell (bilinear)."""
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


def prediction_layer(in_channels: int, out_channels: int, kernel_size: int = 3, bias_prior: float | None = None
                     ) -> nn.Conv2d:
    """The last convolution of a branch, initialised small (and at the focal-loss prior for classes)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    if bias_prior is not None:
        nn.init.constant_(conv.bias, -math.log((1 - bias_prior) / bias_prior))
    return conv


class CategoryBranch(nn.Module):
    """Per level ``[B,C,H,W]`` -> class logits ``[B,S,S,K-1]`` (the background has no output)."""

    def __init__(self, channels: int, head_channels: int, convs: int, num_foreground: int, prior: float) -> None:
        super().__init__()
        self.tower = tower(head_channels, convs, in_channels=channels)
        self.logits = prediction_layer(head_channels, num_foreground, bias_prior=prior)

    def forward(self, level: torch.Tensor, grid: int) -> torch.Tensor:
        return self.logits(self.tower(resize_to_grid(level, grid))).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Targets: which cell is responsible for which object
# ----------------------------------------------------------------------------------------------


def centre_of_mass(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``masks [M,H,W]`` -> ``(centres [M,2] (x, y) in pixels, has_pixels [M] bool)``; pixel centres at ``+0.5``."""
    weights = masks.float()
    total = weights.sum(dim=(1, 2))
    ys = torch.arange(masks.shape[1], device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(masks.shape[2], device=masks.device, dtype=torch.float32) + 0.5
    centre_y = (weights.sum(dim=2) * ys).sum(dim=1) / total.clamp(min=1)
    centre_x = (weights.sum(dim=1) * xs).sum(dim=1) / total.clamp(min=1)
    return torch.stack([centre_x, centre_y], dim=1), total > 0


def grid_cell(coordinate: torch.Tensor, extent: int, grid: int) -> torch.Tensor:
    """The grid index (0..S-1) of an image coordinate along a side of ``extent`` pixels."""
    return (coordinate / extent * grid).floor().long().clamp(0, grid - 1)


def assign_cells(boxes: torch.Tensor, masks: torch.Tensor, padded_size: tuple[int, int], grids: Sequence[int],
                 scale_ranges: Sequence[tuple[float, float]], radius: float) -> list[torch.Tensor]:
    """For one image, per level, the object each cell is responsible for: ``[S,S]`` int64, -1 for none.

    ``boxes [M,4]`` and ``masks [M,H,W]`` at the padded input size. On a level, an object takes part
    when ``sqrt(w h)`` of its box lies in the level's scale range and its mask has pixels; it
    claims the cells whose index lies within ``radius`` times its half-size of its centre of mass,
    clipped to the 3 x 3 cells around the centre's own cell. All objects at once: a ``[M,S,S]``
    claim map, and the smallest claiming object owns a cell.
    """
    height, width = padded_size
    if len(boxes) == 0:
        return [torch.full((grid, grid), -1, dtype=torch.long, device=boxes.device) for grid in grids]
    sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # [M,2] (w, h)
    scale = sizes.prod(dim=1).sqrt()
    centres, has_pixels = centre_of_mass(masks)
    area = masks.flatten(1).sum(dim=1).float()
    half = 0.5 * radius * sizes  # [M,2]
    extent = (width, height)
    owners = []
    for grid, (low_scale, high_scale) in zip(grids, scale_ranges):
        low, high = [], []
        for axis in (0, 1):  # x (columns), then y (rows)
            centre_cell = grid_cell(centres[:, axis], extent[axis], grid)
            low.append(torch.maximum(grid_cell(centres[:, axis] - half[:, axis], extent[axis], grid), centre_cell - 1))
            high.append(torch.minimum(grid_cell(centres[:, axis] + half[:, axis], extent[axis], grid), centre_cell + 1))
        cells = torch.arange(grid, device=boxes.device)
        in_columns = (cells >= low[0][:, None]) & (cells <= high[0][:, None])  # [M,S]
        in_rows = (cells >= low[1][:, None]) & (cells <= high[1][:, None])
        takes_part = has_pixels & (scale >= low_scale) & (scale <= high_scale)
        claims = in_rows[:, :, None] & in_columns[:, None, :] & takes_part[:, None, None]  # [M,S,S]
        claimed_area = torch.where(claims, area[:, None, None], torch.full_like(area[:, None, None], math.inf))
        smallest, owner = claimed_area.min(dim=0)
        owners.append(torch.where(torch.isinf(smallest), -1, owner))
    return owners


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class SOLO(nn.Module):
    """``model(images: list[[3,H,W]] in 0..1, targets=None)``: losses in training, detections in eval.

    Detections per image: ``boxes [N,4]`` (the masks' boxes), ``labels [N]`` (1..K-1), ``scores [N]``
    and ``masks [N,1,H,W]`` probabilities at the input's size.

    Subclasses change only the mask side: :meth:`mask_outputs` (what the mask branch computes for
    the whole batch), :meth:`instance_masks` (the masks of chosen cells from it) and
    :meth:`mask_strides` (the stride of those masks per level).
    """

    task = "instance"

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: SOLOConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SOLOConfig()
        if len(config.grids) != 5 or len(config.scale_ranges) != 5:
            raise ValueError(f"SOLO has five levels: got {len(config.grids)} grids and "
                             f"{len(config.scale_ranges)} scale ranges")
        if config.suppression not in ("matrix", "greedy"):
            raise ValueError(f"suppression must be 'matrix' or 'greedy', got {config.suppression!r}")
        if config.nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel must be 'gaussian' or 'linear', got {config.nms_kernel!r}")
        self.num_classes = num_classes
        self.transform = DetectionTransform(config.min_size, config.max_size, config.image_mean, config.image_std)
        self.backbone = backbone
        self.strides = (8, 8, 16, 32, 32)  # of solo_levels' outputs
        self.category = CategoryBranch(backbone.channels, config.head_channels, config.head_convs, num_classes - 1,
                                       config.prior_probability)
        self.build_mask_branch(backbone.channels)

    # -- the mask branch (what subclasses change) -------------------------------------------------

    def build_mask_branch(self, channels: int) -> None:
        cfg = self.config
        self.mask_tower = tower(cfg.head_channels, cfg.head_convs, in_channels=channels + 2 * cfg.coordinates)
        # one 1x1 convolution per level: S^2 output channels, one per cell
        self.mask_logits = nn.ModuleList(prediction_layer(cfg.head_channels, s * s, kernel_size=1) for s in cfg.grids)

    def mask_strides(self) -> tuple[int, ...]:
        """The stride of the masks :meth:`instance_masks` returns, per level: twice the level's resolution."""
        return tuple(s // 2 for s in self.strides)

    def mask_outputs(self, features: list[torch.Tensor], levels: list[torch.Tensor]) -> Any:
        """Per level ``[B,S^2,H_l,W_l]`` mask logits (``H_l = H / mask stride``): every cell's mask."""
        axes = (0, 1) if self.config.coordinates else ()
        return [upsample2(conv(self.mask_tower(with_coordinates(level, axes))))
                for level, conv in zip(levels, self.mask_logits)]

    def instance_masks(self, outputs: Any, level: int, image_index: torch.Tensor, cell_index: torch.Tensor
                       ) -> torch.Tensor:
        """Mask probabilities ``[P,H_l,W_l]`` of cells ``cell_index [P]`` (``i S + j``) of images ``image_index [P]``."""
        return outputs[level][image_index, cell_index].float().sigmoid()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if self.training:
            targets = training_targets(targets, len(images))  # checked, crowd regions removed
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)  # [P2..P6]
        levels = solo_levels(features)
        class_logits = [self.category(level, grid) for level, grid in zip(levels, self.config.grids)]
        outputs = self.mask_outputs(features, levels)
        if self.training:
            return self.losses(batch, targets, class_logits, outputs)
        detections = [self.detect_image(image, class_logits, outputs, batch) for image in range(len(images))]
        return postprocess_image_masks(detections, batch.image_sizes, original_sizes)

    # -- training -------------------------------------------------------------------------------

    def assign(self, targets: list[dict], padded_size: tuple[int, int]) -> list[torch.Tensor]:
        """Per level, ``[B,S,S]``: the object (index within its image) each cell is responsible for, -1 none."""
        cfg = self.config
        per_image = [assign_cells(t["boxes"], pad_to(t["masks"], padded_size), padded_size, cfg.grids,
                                  cfg.scale_ranges, cfg.center_radius) for t in targets]
        return [torch.stack(level) for level in zip(*per_image)]

    def losses(self, batch: ImageBatch, targets: list[dict], class_logits: list[torch.Tensor], outputs: Any
               ) -> dict[str, torch.Tensor]:
        """Focal loss over every cell of every level; Dice loss on the positive cells' masks."""
        cfg = self.config
        for index, target in enumerate(targets):
            if "masks" not in target:
                raise ValueError(f"image id {target.get('image_id', f'#{index}')}: SOLO needs 'masks' in its targets")
        padded_size = tuple(batch.tensors.shape[-2:])
        owners = self.assign(targets, padded_size)
        first_object = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=batch.tensors.device).cumsum(0)
        all_labels = torch.cat([t["labels"] for t in targets])
        all_masks = torch.cat([pad_to(t["masks"], padded_size) for t in targets])  # [M,H,W]
        class_targets, dice, num_positive = [], [], 0
        for level, (logits, owner) in enumerate(zip(class_logits, owners)):
            positive = owner >= 0  # [B,S,S]
            image_index, row, column = positive.nonzero(as_tuple=True)
            objects = first_object[image_index] + owner[image_index, row, column]  # among the batch's objects
            one_hot = torch.zeros_like(logits)
            one_hot[image_index, row, column, all_labels[objects] - 1] = 1.0
            class_targets.append(one_hot.flatten(1, 2))
            num_positive += len(objects)
            if len(objects):
                predicted = self.instance_masks(outputs, level, image_index, row * cfg.grids[level] + column)
                truth = mask_targets(all_masks[objects], self.mask_strides()[level])[:, 0]
                dice.append(dice_loss(predicted, truth))
        flat_logits = torch.cat([logits.flatten(1, 2) for logits in class_logits], dim=1)  # [B, sum S^2, K-1]
        loss_cls = sigmoid_focal_loss(flat_logits, torch.cat(class_targets, dim=1), cfg.focal_alpha, cfg.focal_gamma,
                                      reduction="sum") / max(1, num_positive)
        if dice:
            loss_mask = torch.cat(dice).mean()
        else:  # no object in the batch: a zero that still reaches every mask parameter
            loss_mask = sum(o.sum() for o in flatten_outputs(outputs)) * 0.0 + 0.0  # + 0.0: not -0.0
        return {"loss_category": loss_cls, "loss_mask": cfg.mask_loss_weight * loss_mask}

    # -- inference ------------------------------------------------------------------------------

    def detect_image(self, image: int, class_logits: list[torch.Tensor], outputs: Any, batch: ImageBatch) -> dict:
        """One image's detections: candidates, their masks and maskness, Matrix NMS, the best kept.

        ``masks [D,1,h,w]`` probabilities at the resized image's size ``(h, w)``.
        """
        cfg = self.config
        height, width = batch.image_sizes[image]
        padded = batch.tensors.shape[-2:]
        base = (padded[0] // self.mask_strides()[0], padded[1] // self.mask_strides()[0])  # the finest masks' size
        # A cell's mask does not depend on the class: one mask per candidate cell, shared by its classes.
        scores, labels, strides, masks, mask_of = [], [], [], [], []
        count = 0
        for level, logits in enumerate(class_logits):
            probabilities = points_nms(logits[image].float().sigmoid()).flatten(0, 1)  # [S*S,K-1]
            cell, label = (probabilities > cfg.score_thresh).nonzero(as_tuple=True)
            if len(cell) == 0:
                continue
            cells, which = cell.unique(return_inverse=True)
            level_masks = self.instance_masks(outputs, level, torch.full_like(cells, image), cells)
            masks.append(F.interpolate(level_masks[:, None], size=base, mode="bilinear", align_corners=False)[:, 0])
            mask_of.append(which + count)
            count += len(cells)
            scores.append(probabilities[cell, label])
            labels.append(label + 1)
            strides.append(torch.full_like(cell, self.strides[level]))
        device = batch.tensors.device
        if not scores:
            return {"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.long, device=device),
                    "scores": torch.zeros(0, device=device), "masks": torch.zeros(0, 1, height, width, device=device)}
        scores, labels, strides, masks, mask_of = (torch.cat(scores), torch.cat(labels), torch.cat(strides),
                                                   torch.cat(masks), torch.cat(mask_of))
        binary = masks > cfg.mask_thresh
        area = binary.flatten(1).sum(dim=1)
        maskness = (masks * binary).flatten(1).sum(dim=1) / area.clamp(min=1)  # mean probability inside the mask
        keep = area[mask_of] > strides  # a mask smaller than its level's stride is noise
        scores, labels, mask_of = (scores * maskness[mask_of])[keep], labels[keep], mask_of[keep]
        order = scores.argsort(descending=True)[: cfg.pre_nms]
        scores, labels, masks, binary = scores[order], labels[order], masks[mask_of[order]], binary[mask_of[order]]
        if cfg.suppression == "matrix":
            scores = matrix_nms(binary, labels, scores, cfg.nms_kernel, cfg.nms_sigma)
            order = scores.argsort(descending=True)
            order = order[scores[order] >= cfg.update_thresh][: cfg.detections_per_img]
        else:
            order = batched_mask_nms(binary, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        full = F.interpolate(masks[order][:, None], size=tuple(padded), mode="bilinear",
                             align_corners=False)[..., :height, :width]  # [D,1,h,w]
        return {"boxes": mask_boxes(full[:, 0] > cfg.mask_thresh), "labels": labels[order], "scores": scores[order],
                "masks": full}


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W] -> [B,C,2H,2W]``, bilinear (pixel centres kept, ``align_corners=False``)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def points_nms(probabilities: torch.Tensor) -> torch.Tensor:
    """Keep a cell's class score only where it is a local maximum: ``[S,S,K] -> [S,S,K]``, zeros elsewhere.

    Neighbouring cells often find the same object; the released code compares each cell with the
    cells above, to the left and above-left of it (a 2x2 max-pool), which is what is done here.
    """
    maps = probabilities.permute(2, 0, 1)[None]  # [1,K,S,S]
    local_max = F.max_pool2d(maps, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return (maps * (local_max == maps))[0].permute(1, 2, 0)


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in a mask branch's outputs (nested lists and tuples)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in flatten_outputs(item)]


class DecoupledSOLO(SOLO):
    """SOLO with ``2S`` mask channels per level instead of ``S^2``: ``mask(i, j) = sigmoid(Y_i) * sigmoid(X_j)``.

    Two towers: the X tower sees the features and their x coordinate and predicts ``S`` maps, one
    per grid column; the Y tower the same with y, one map per row. The mask of the object in
    cell ``(i, j)`` is the product of row ``i``'s and column ``j``'s probabilities: inside an
    object, both are high. The paper's insight: ``S^2`` maps are redundant, since a mask is
    already pinned down by its cell's row and column.
    """

    def build_mask_branch(self, channels: int) -> None:
        cfg = self.config
        self.mask_tower_x = tower(cfg.head_channels, cfg.head_convs, in_channels=channels + cfg.coordinates)
        self.mask_tower_y = tower(cfg.head_channels, cfg.head_convs, in_channels=channels + cfg.coordinates)
        self.mask_logits_x = nn.ModuleList(prediction_layer(cfg.head_channels, s, kernel_size=1) for s in cfg.grids)
        self.mask_logits_y = nn.ModuleList(prediction_layer(cfg.head_channels, s, kernel_size=1) for s in cfg.grids)

    def mask_outputs(self, features: list[torch.Tensor], levels: list[torch.Tensor]) -> Any:
        """Per level ``(X [B,S,H_l,W_l], Y [B,S,H_l,W_l])`` logits."""
        outputs = []
        for level, conv_x, conv_y in zip(levels, self.mask_logits_x, self.mask_logits_y):
            on = self.config.coordinates
            x = upsample2(conv_x(self.mask_tower_x(with_coordinates(level, (0,) if on else ()))))
            y = upsample2(conv_y(self.mask_tower_y(with_coordinates(level, (1,) if on else ()))))
            outputs.append((x, y))
        return outputs

    def instance_masks(self, outputs: Any, level: int, image_index: torch.Tensor, cell_index: torch.Tensor
                       ) -> torch.Tensor:
        grid = self.config.grids[level]
        x, y = outputs[level]
        row, column = torch.div(cell_index, grid, rounding_mode="floor"), cell_index % grid
        return y[image_index, row].float().sigmoid() * x[image_index, column].float().sigmoid()


# The settings the book trains on the 128-pixel shapes benchmark with a 2-core CPU: the small backbone,
# pretrained as for the other instance chapters, 64 channels, two convolutions per tower, and grids a
# third of COCO's (a 128-pixel image holds at most two objects of 38 to 70 pixels). In trial runs of
# SOLOv2 (6 epochs, seed 0): grids (24, 20, 16, 12, 8) mask AP 0.677 in 150 s of training, these grids
# 0.713 in 109 s; from scratch (the larger grids) 0.647. With these settings SOLO reached 0.556 (110 s)
# and Decoupled SOLO 0.675 (87 s).
SHAPES_SETTINGS: dict = {"backbone": "small", "pretrained_backbone": True, "fpn_channels": 64, "min_size": 128,
                         "max_size": 256, "head_convs": 2, "head_channels": 64, "grids": (12, 10, 8, 6, 4)}
# The instance chapters' budget (rcnn.SHAPES_RECIPE): AdamW, warm-up, cosine decay, clipping.
SHAPES_RECIPE: dict = RCNN_SHAPES_RECIPE


def build_solo_backbone(backbone: str, pretrained_backbone: bool, fpn_channels: int,
                        trainable_layers: int | None) -> BackboneFPN:
    """A ResNet with an FPN on ``c2..c5`` plus a max-pooled ``P6``: ``[P2..P6]`` (Mask R-CNN's)."""
    return backbone_fpn(backbone, fpn_channels, pretrained=pretrained_backbone, trainable_layers=trainable_layers)


@register("solo")
def solo(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False, fpn_channels: int = 256,
         trainable_layers: int | None = None, **config) -> SOLO:
    """SOLO with a ResNet-FPN (P2-P6); ``config`` overrides :class:`SOLOConfig` fields."""
    settings = config_from_kwargs(SOLOConfig, config, "SOLO")
    return SOLO(build_solo_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                settings)


@register("decoupled_solo")
def decoupled_solo(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
                   fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> DecoupledSOLO:
    """Decoupled SOLO with a ResNet-FPN (P2-P6); ``config`` overrides :class:`SOLOConfig` fields."""
    settings = config_from_kwargs(SOLOConfig, config, "Decoupled SOLO")
    return DecoupledSOLO(build_solo_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers),
                         num_classes, settings)
