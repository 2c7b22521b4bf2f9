"""CondInst (Tian, Shen & Chen, ECCV 2020): a mask head whose weights are generated per instance.

Mask R-CNN crops every object out of the feature map (RoIAlign) and segments the crop with the
same heavy head. The paper names three costs of that: the box contains other objects and
background that the head must learn to ignore; the head runs once per RoI with four 256-channel
convolutions; and the mask is fixed at 28x28, coarse for large objects.

CondInst segments on the whole image instead. Next to FCOS's class and box outputs, a
*controller* convolution predicts at every location the weights of a tiny fully convolutional
network: three 1x1 convolutions with 8 channels, 169 numbers in all (:func:`dynamic_layer_shapes`).
That network runs on a shared 8-channel feature map at stride 8 (the *mask branch*, computed
once per image), extended with two channels of coordinates relative to the instance's
location. Because the weights differ per instance, the same pixels give a different mask for
each instance: the head only has to tell "my object" from everything else, which few
parameters can do when they are conditioned on the instance. The relative coordinates tell the
head *where* its instance is; without them two objects of the same kind look alike to it.

* Training: every positive FCOS location (capped at ``max_proposals``) predicts the mask of the
  object it was assigned, compared with it at stride 4 by the dice loss.
* Inference: FCOS's boxes go through NMS first; only the kept instances run the mask head, all
  at once as one grouped convolution (:func:`run_dynamic_heads`), and their masks are
  upsampled to the image.
* Optionally (``semantic_loss_weight > 0``, the paper's auxiliary loss) a 1x1 convolution on
  the mask branch predicts each pixel's class, which gives the branch extra supervision.

The detector is :class:`minis.models.fcos.FCOS`, unchanged; this file adds the controller, the
mask branch, the dynamic heads and the mask loss.

Departures from the paper (and from the authors' code, AdelaiDet, where it fills in what the paper
leaves open):

* **Masks at stride 4, not 2.** The paper upsamples the dynamic heads' stride-8 output by 4, to
  stride 2; here by 2 (``mask_out_stride=4``, as AdelaiDet's released models do). Stride 2 holds
  four times the pixels per instance in the heads' upsampling and the dice loss, which the CPU
  budget of the chapters cannot pay; ``mask_out_stride=2`` gives the paper's.
* **Averaged ground truth.** The target at stride 4 is the fraction of each 4x4 cell the object
  covers, where the authors' code samples one pixel per cell. A sampled target aliases: an edge
  or a part thinner than the stride appears or vanishes depending on where it falls in its
  cell, and the dice loss takes soft targets as they are. ``sampled_mask_targets=True`` samples
  as the authors do.
* **Group norm in the mask branch** instead of the paper's batch norm (synchronised across GPUs):
  a CPU batch of 8 images, or 2 per GPU, gives poor batch statistics.
* **The mask branch reads P3 alone**, as the paper describes it; AdelaiDet's adds upsampled P4
  and P5.
* **The detector is this library's FCOS**, with the departures listed in
  :mod:`minis.models.fcos`, except that its locations sit at the cells' centres
  (``location_offset=0.5``, the paper's): they are also the origin of the relative coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.models.fcos import SHAPES_RECIPE as FCOS_SHAPES_RECIPE
from minis.models.fcos import (FCOS, FCOSConfig, HeadOutputs, Locations, build_fcos_backbone,
                               first_object_index, make_locations)
from minis.nn.detection import ImageBatch, mask_targets, pad_to, postprocess_image_masks
from minis.nn.fpn import BackboneFPN
from minis.nn.losses import dice_loss, sigmoid_focal_loss


@dataclass
class CondInstConfig(FCOSConfig):
    """FCOS's settings plus the mask branch, the dynamic head and the mask loss."""

    location_offset: float = 0.5  # locations at cell centres: they are also the origin of the relative coordinates
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    mask_channels: int = 8  # the mask branch's output, the dynamic head's input (plus 2 coordinates)
    dynamic_channels: int = 8
    dynamic_layers: int = 3
    relative_coords: bool = True
    mask_out_stride: int = 4  # masks are predicted and compared with the ground truth at this stride
    max_proposals: int = 500  # positive locations per batch that train the mask (a random subset if more)
    mask_loss_weight: float = 1.0
    semantic_loss_weight: float = 0.0  # > 0 turns the auxiliary semantic segmentation loss on
    sampled_mask_targets: bool = False  # True: one ground-truth pixel per cell (AdelaiDet's), not the cell's mean


def dynamic_layer_shapes(in_channels: int, channels: int, layers: int) -> list[tuple[int, int]]:
    """``(out, in)`` of each 1x1 convolution of the dynamic head; the last one outputs the mask logit."""
    shapes, previous = [], in_channels
    for layer in range(layers):
        out = 1 if layer == layers - 1 else channels
        shapes.append((out, previous))
        previous = out
    return shapes


def count_dynamic_params(shapes: list[tuple[int, int]]) -> int:
    """Weights and biases of the dynamic head: ``sum(out x in + out)``; 169 for CondInst's defaults.

    (8 + 2) x 8 + 8 = 88, then 8 x 8 + 8 = 72, then 8 x 1 + 1 = 9.
    """
    return sum(out * inp + out for out, inp in shapes)


def split_dynamic_params(params: torch.Tensor, shapes: list[tuple[int, int]]
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``params [N,P]`` -> per layer ``(weight [N*out, in, 1, 1], bias [N*out])``, ready for a grouped convolution."""
    count, layers, start = len(params), [], 0
    for out, inp in shapes:
        weight = params[:, start:start + out * inp].reshape(count * out, inp, 1, 1)
        start += out * inp
        bias = params[:, start:start + out].reshape(count * out)
        start += out
        layers.append((weight, bias))
    return layers


def run_dynamic_heads(inputs: torch.Tensor, params: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Every instance's own mask head on its own input, all at once: ``[N,C,H,W]``, ``[N,P]`` -> ``[N,1,H,W]`` logits.

    The ``N`` inputs are stacked along the channels of one image (``[1, N*C, H, W]``) and each
    layer is a convolution with ``groups=N``: group ``n`` sees only instance ``n``'s channels and
    uses only instance ``n``'s weights. One call per layer, whatever the number of instances.
    """
    count, _, height, width = inputs.shape
    if count == 0:  # no instance (an image without detections): no mask, and no zero-group convolution
        return inputs.new_zeros(0, 1, height, width) + params.sum() * 0
    x = inputs.reshape(1, -1, height, width)
    layers = split_dynamic_params(params, shapes)
    for index, (weight, bias) in enumerate(layers):
        x = F.conv2d(x, weight, bias, groups=count)
        if index < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(count, 1, height, width)


def upsample_aligned(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[N,C,H,W] -> [N,C,factor*H,factor*W]``, bilinear, every output pixel sampled at its own centre.

    A pixel of a stride-``s`` map covers ``[s*i, s*(i+1))`` and stands for its centre
    ``s*(i+0.5)``, like the locations (``location_offset=0.5``) and the ground truth at stride 4
    (4x4 averages). ``align_corners=False`` keeps exactly that convention; ``align_corners=True``
    would pin the corner pixels' centres to each other and stretch the map about its centre,
    moving content near the borders by up to a quarter of an input pixel (2 image pixels from
    stride 8 to 4): a position-dependent error the dice loss would then have to fight.
    """
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class MaskBranch(nn.Module):
    """``P3 [B,C,H,W] -> (mask features [B,mask_channels,H,W], hidden [B,hidden,H,W])``.

    Four 3x3 convolutions with 128 channels, then a 1x1 to 8: the mask features are shared by
    all instances, so they can be few; the dynamic heads do the instance-specific work. Group
    norm rather than the paper's (synchronised) batch norm: a CPU batch of 8 or a GPU batch of 2
    gives poor batch statistics.
    """

    def __init__(self, in_channels: int, channels: int, convs: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(convs):
            conv = nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1, bias=False)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            layers += [conv, nn.GroupNorm(32, channels), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.out.weight, a=1)
        nn.init.zeros_(self.out.bias)

    def forward(self, p3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(p3)
        return self.out(hidden), hidden


class CondInst(FCOS):
    """FCOS plus per-instance masks: detections also carry ``masks [N,1,H,W]`` probabilities at input resolution."""

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: CondInstConfig | None = None) -> None:
        config = config or CondInstConfig()
        super().__init__(backbone, num_classes, config)
        self.dynamic_shapes = dynamic_layer_shapes(config.mask_channels + 2 * config.relative_coords,
                                                   config.dynamic_channels, config.dynamic_layers)
        self.num_dynamic_params = count_dynamic_params(self.dynamic_shapes)
        # the controller sits on the box tower, beside the distances and centre-ness: like them,
        # the mask parameters describe the one instance a location was assigned to
        self.controller = nn.Conv2d(backbone.channels, self.num_dynamic_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)
        self.mask_branch = MaskBranch(backbone.channels, config.mask_branch_channels, config.mask_branch_convs,
                                      config.mask_channels)
        if config.semantic_loss_weight > 0:
            self.semantic_logits = nn.Conv2d(config.mask_branch_channels, num_classes - 1, 1)
            nn.init.normal_(self.semantic_logits.weight, std=0.01)
            nn.init.constant_(self.semantic_logits.bias, self.head.cls_logits.bias[0].item())

    # -- the masks ------------------------------------------------------------------------------

    def mask_logits(self, mask_features: torch.Tensor, image_index: torch.Tensor, points: torch.Tensor,
                    strides: torch.Tensor, params: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits ``[N,1,H/4,W/4]`` (stride ``mask_out_stride``) for ``N`` instances.

        ``mask_features [B,C,H/8,W/8]``; per instance: its image, its location ``points [N,2]``,
        the stride of its level ``strides [N]`` and its head's ``params [N,P]``.
        """
        cfg = self.config
        inputs = mask_features[image_index]  # [N,C,h,w]
        if cfg.relative_coords:
            grid = make_locations([mask_features], padded_size, [self.backbone.strides[0]], cfg.location_offset)
            # offsets from the instance's location to every pixel, in units of the sizes its level
            # handles (8 x stride), so that objects of every size see coordinates of similar range
            relative = (points[:, None, :] - grid.points[None]) / (8 * strides[:, None, None])  # [N,hw,2]
            relative = relative.transpose(1, 2).reshape(len(points), 2, *mask_features.shape[-2:])
            inputs = torch.cat([relative.to(inputs.dtype), inputs], dim=1)
        logits = run_dynamic_heads(inputs, params, self.dynamic_shapes)
        return upsample_aligned(logits, self.backbone.strides[0] // cfg.mask_out_stride)

    def controller_params(self, outputs: HeadOutputs) -> torch.Tensor:
        """``[B,N,P]``: every location's mask-head parameters, in the order of the head's outputs."""
        return torch.cat([self.controller(f).flatten(2).transpose(1, 2) for f in outputs.box_features], dim=1)

    # -- training -------------------------------------------------------------------------------

    def branch_losses(self, batch: ImageBatch, features: list[torch.Tensor], outputs: HeadOutputs,
                      locations: Locations, matched: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        cfg = self.config
        for index, target in enumerate(targets):
            if "masks" not in target:
                raise ValueError(f"image id {target.get('image_id', f'#{index}')}: CondInst needs 'masks' in its "
                                 f"targets")
        mask_features, hidden = self.mask_branch(features[0])
        padded_size = tuple(batch.tensors.shape[-2:])
        gt_masks = [pad_to(t["masks"], padded_size) for t in targets]  # [M_i,H,W] at the padded size
        truth = mask_targets(torch.cat(gt_masks), cfg.mask_out_stride, cfg.sampled_mask_targets)  # [M,1,H/4,W/4]
        losses = {}
        matched = torch.stack(matched)
        image_index, location_index = (matched >= 0).nonzero(as_tuple=True)
        if cfg.max_proposals >= 0 and len(image_index) > cfg.max_proposals:
            chosen = torch.randperm(len(image_index), device=image_index.device)[: cfg.max_proposals]
            image_index, location_index = image_index[chosen], location_index[chosen]
        params = self.controller_params(outputs)[image_index, location_index]  # [N,P]
        if len(image_index) == 0:  # no object in the batch: a zero that still reaches every parameter
            losses["loss_mask"] = params.sum() * 0 + mask_features.sum() * 0
        else:
            logits = self.mask_logits(mask_features, image_index, locations.points[location_index],
                                      locations.strides[location_index], params, padded_size)
            objects = first_object_index(targets, image_index) + matched[image_index, location_index]
            losses["loss_mask"] = cfg.mask_loss_weight * dice_loss(logits.sigmoid(), truth[objects]).mean()
        if cfg.semantic_loss_weight > 0:
            losses["loss_semantic"] = cfg.semantic_loss_weight * self.semantic_loss(hidden, gt_masks, targets)
        return losses

    def semantic_loss(self, hidden: torch.Tensor, gt_masks: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
        """Focal loss of every pixel's class at stride 8 (the smallest object covering it wins)."""
        logits = self.semantic_logits(hidden)  # [B,K-1,h,w]
        stride = self.backbone.strides[0]
        classes = []
        for masks, target in zip(gt_masks, targets):
            coverage = F.avg_pool2d(masks[:, None].float(), stride)[:, 0] >= 0.5 if len(masks) else None
            pixel_class = torch.zeros(logits.shape[-2:], dtype=torch.int64, device=logits.device)
            if coverage is not None:
                boxes = target["boxes"]
                area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                area = torch.where(coverage, area[:, None, None], torch.full_like(area[:, None, None], float("inf")))
                smallest, owner = area.min(dim=0)
                pixel_class = torch.where(torch.isinf(smallest), pixel_class, target["labels"][owner])
            classes.append(pixel_class)
        classes = torch.stack(classes)  # [B,h,w], 0 = background
        one_hot = F.one_hot(classes, self.num_classes)[..., 1:].permute(0, 3, 1, 2).to(logits.dtype)
        return sigmoid_focal_loss(logits, one_hot, reduction="sum") / max(1, int((classes > 0).sum()))

    # -- inference ------------------------------------------------------------------------------

    def add_branch_outputs(self, batch: ImageBatch, features: list[torch.Tensor], outputs: HeadOutputs,
                           locations: Locations, detections: list[dict], kept: list[torch.Tensor]) -> None:
        """Masks for the detections NMS kept, and only for them: ``masks [D,1,h,w]`` at the resized image's size."""
        mask_features, _ = self.mask_branch(features[0])
        padded_size = tuple(batch.tensors.shape[-2:])
        image_index = torch.cat([torch.full_like(k, i) for i, k in enumerate(kept)])
        location_index = torch.cat(kept)
        params = self.controller_params(outputs)[image_index, location_index]
        logits = self.mask_logits(mask_features, image_index, locations.points[location_index],
                                  locations.strides[location_index], params, padded_size)
        probabilities = upsample_aligned(logits.float().sigmoid(), self.config.mask_out_stride)
        for detection, masks, (height, width) in zip(detections, probabilities.split([len(k) for k in kept]),
                                                     batch.image_sizes):
            detection["masks"] = masks[..., :height, :width]

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict]:
        """Boxes and whole-image masks back to the original image's pixels."""
        return postprocess_image_masks(detections, image_sizes, original_sizes)


# The book's settings on the 128-pixel shapes benchmark for a 2-core CPU (see fcos.SHAPES_SETTINGS),
# with a lighter mask branch (64 channels, two convolutions).
SHAPES_SETTINGS: dict = {"backbone": "small", "fpn_channels": 64, "min_size": 128, "max_size": 256, "head_convs": 2,
                         "score_thresh": 0.05, "mask_branch_channels": 64, "mask_branch_convs": 2}
# The training recipe: FCOS's, which is Mask R-CNN's (rcnn.SHAPES_RECIPE): one budget for the three.
SHAPES_RECIPE: dict = FCOS_SHAPES_RECIPE


@register("condinst")
def condinst(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False,
             fpn_channels: int = 256, trainable_layers: int | None = None, **config) -> CondInst:
    """CondInst on FCOS with a ResNet-FPN (P3-P7); ``config`` overrides :class:`CondInstConfig` fields."""
    settings = config_from_kwargs(CondInstConfig, config, "CondInst")
    return CondInst(build_fcos_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                    settings)
