"""SOLOv2 (Wang, Zhang, Kong, Li & Shen, NeurIPS 2020): SOLO with dynamic kernels and Matrix NMS.

SOLO's mask branch ends in a 1x1 convolution with ``S^2`` filters: one fixed filter per grid
cell, applied to every image. Most of those ``S^2`` maps are never used (a cell holds an object
rarely), yet all are computed, and the filters cannot adapt to what is in the cell. SOLOv2
splits the mask into two parts:

* a **mask kernel** per cell, *predicted* from the cell's features (the *kernel branch*: the
  level's features and their coordinates resized to ``S x S``, a tower of 3x3 convolutions,
  ``E`` outputs per cell), and
* one **mask feature** map ``F [E, H/4, W/4]`` per image, shared by all instances (the *feature
  branch*: P2-P5, each brought to stride 4 by 3x3 convolutions and 2x upsamplings, summed, and a
  1x1 convolution; the coarsest level, P5, gets the two coordinate channels, so that ``F`` knows
  where each pixel is).

The mask of the object in cell ``(i, j)`` is ``sigmoid(F * G_ij)``: a 1x1 convolution of ``F``
with the cell's kernel ``G_ij`` (``E`` weights, no bias). Masks are computed only for the cells
that need one, the positives in training and the candidates at inference, all at once as one
matrix product per image (:meth:`SOLOv2.instance_masks`). It is CondInst's idea (instance-aware
weights, generated per location) reached from the other side: CondInst generates a three-layer
head per *location of a detector*, SOLOv2 a single linear filter per *grid cell*, which is
enough because the feature map already carries the coordinates.

Everything else is SOLO's (:mod:`minis.models.solo`): the levels and grids, the category branch,
the targets, focal and Dice losses, and the inference with maskness and Matrix NMS
(:func:`minis.ops.matrix_nms`, which the paper introduces).

Departures from the paper: those of :mod:`minis.models.solo` that apply (targets as the covered
fraction of each cell, the smaller object owning a shared cell, centres at pixel centres); the
kernels are 1x1 (the paper's default; it also tries 3x3); group norm throughout, as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minis.models import register
from minis.models.config import config_from_kwargs
from minis.models.fcos import tower
from minis.models.solo import (SOLO, SOLOConfig, build_solo_backbone, prediction_layer, resize_to_grid,
                               with_coordinates)
from minis.models.solo import SHAPES_RECIPE as SOLO_SHAPES_RECIPE
from minis.models.solo import SHAPES_SETTINGS as SOLO_SHAPES_SETTINGS
from minis.nn.fpn import BackboneFPN


@dataclass
class SOLOv2Config(SOLOConfig):
    """SOLO's settings with SOLOv2's heads (the released R-50-FPN COCO configuration)."""

    head_channels: int = 512
    head_convs: int = 4
    kernel_channels: int = 256  # E: channels of the mask feature, weights of each dynamic 1x1 kernel
    feature_channels: int = 128  # the feature branch's width before its last 1x1 convolution


def upsampling() -> nn.Upsample:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)


class MaskFeatureBranch(nn.Module):
    """``[P2, P3, P4, P5]`` (``[B,C,H/s,W/s]``) -> the unified mask feature ``F [B,E,H/4,W/4]``.

    Level ``l`` (0 = P2) goes through ``max(1, l)`` 3x3 convolutions, each but P2's followed by a
    2x upsampling, so all four arrive at stride 4; they are summed and mapped to ``E`` channels.
    """

    def __init__(self, in_channels: int, channels: int, out_channels: int, coordinates: bool = True) -> None:
        super().__init__()
        self.axes = (0, 1) if coordinates else ()
        self.levels = nn.ModuleList()
        for level in range(4):
            extra = len(self.axes) if level == 3 else 0  # P5 carries the coordinates
            layers: list[nn.Module] = [tower(channels, 1, in_channels=in_channels + extra)]
            if level > 0:
                layers.append(upsampling())
            for _ in range(level - 1):
                layers += [tower(channels, 1), upsampling()]
            self.levels.append(nn.Sequential(*layers))
        self.out = nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False), nn.GroupNorm(32, out_channels),
                                 nn.ReLU(inplace=True))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        p2, p3, p4, p5 = features[:4]
        total = self.levels[0](p2) + self.levels[1](p3) + self.levels[2](p4) + self.levels[3](with_coordinates(p5, self.axes))
        return self.out(total)


class SOLOv2(SOLO):
    """SOLO whose masks are ``sigmoid(F * G_ij)``: the mask feature ``F`` and a predicted kernel per cell."""

    def __init__(self, backbone: BackboneFPN, num_classes: int, config: SOLOv2Config | None = None) -> None:
        super().__init__(backbone, num_classes, config or SOLOv2Config())

    def build_mask_branch(self, channels: int) -> None:
        cfg = self.config
        self.kernel_tower = tower(cfg.head_channels, cfg.head_convs, in_channels=channels + 2 * cfg.coordinates)
        self.kernels = prediction_layer(cfg.head_channels, cfg.kernel_channels)
        self.mask_feature = MaskFeatureBranch(channels, cfg.feature_channels, cfg.kernel_channels, cfg.coordinates)

    def mask_strides(self) -> tuple[int, ...]:
        return (4,) * len(self.strides)  # every level's masks come from the one stride-4 feature

    def mask_outputs(self, features: list[torch.Tensor], levels: list[torch.Tensor]) -> Any:
        """``(F [B,E,H/4,W/4], per level kernels [B,E,S,S])``: no mask is computed yet."""
        axes = (0, 1) if self.config.coordinates else ()
        kernels = [self.kernels(self.kernel_tower(resize_to_grid(with_coordinates(level, axes), grid)))
                   for level, grid in zip(levels, self.config.grids)]
        return self.mask_feature(features), kernels

    def instance_masks(self, outputs: Any, level: int, image_index: torch.Tensor, cell_index: torch.Tensor
                       ) -> torch.Tensor:
        """``[P,H/4,W/4]``: each chosen cell's kernel applied to its image's mask feature.

        One matrix product per image of the batch, ``[P_b,E] @ [E,H/4*W/4]``, for all its cells at
        once (gathering ``F`` per cell instead would copy it ``P`` times).
        """
        feature, kernels = outputs
        chosen = kernels[level].flatten(2)[image_index, :, cell_index].float()  # [P,E]
        height, width = feature.shape[-2:]
        logits = chosen.new_zeros(len(chosen), height * width)
        for image in image_index.unique().tolist():
            rows = image_index == image
            logits[rows] = chosen[rows] @ feature[image].flatten(1).float()
        return logits.view(-1, height, width).sigmoid()


# The shapes settings of SOLO (minis.models.solo.SHAPES_SETTINGS) with narrower SOLOv2 heads.
SHAPES_SETTINGS: dict = {**SOLO_SHAPES_SETTINGS, "kernel_channels": 64, "feature_channels": 64}
SHAPES_RECIPE: dict = SOLO_SHAPES_RECIPE


@register("solov2")
def solov2(num_classes: int, backbone: str = "resnet50", pretrained_backbone: bool = False, fpn_channels: int = 256,
           trainable_layers: int | None = None, **config) -> SOLOv2:
    """SOLOv2 with a ResNet-FPN (P2-P6); ``config`` overrides :class:`SOLOv2Config` fields."""
    settings = config_from_kwargs(SOLOv2Config, config, "SOLOv2")
    return SOLOv2(build_solo_backbone(backbone, pretrained_backbone, fpn_channels, trainable_layers), num_classes,
                  settings)
