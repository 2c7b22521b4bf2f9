"""PSPNet: pool the feature map at several grid sizes so every pixel sees the whole scene.

Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network", CVPR 2017.

A dilated ResNet (output stride 8) gives detailed features, but the paper found that its
*effective* receptive field is much smaller than the theoretical one: the network mislabels a
boat as a car because it never looks at the water around it. The *pyramid pooling module* adds
that context explicitly. The feature map is average-pooled to 1x1, 2x2, 3x3 and 6x6 grids - the
whole image, its halves, thirds and sixths - each pooled map is reduced by a 1x1 convolution to
``1/4`` of the channels (so that the context does not outweigh the local features), upsampled
back, and concatenated with the features. A 3x3 convolution then mixes local evidence with the
scene's global layout, and a 1x1 convolution scores the classes.

Deep supervision: an auxiliary classifier on stage 4 (``c4``) adds a second loss, weighted 0.4,
which eases the optimisation of the deep ResNet; it is dropped at inference.

Departures from the paper, and why:

* **The ResNet stem.** The authors' ResNets begin with three 3x3 convolutions; minis' backbones
  keep torchvision's single 7x7 convolution, so that torchvision's ImageNet weights load
  (``backbone="resnet101", pretrained_backbone=True``). The default backbone is the small CPU
  ResNet (the book's budget), pretrained with ``pretrained_backbone=True`` on other images of the
  shapes world instead of ImageNet (:mod:`minis.pretrain`; the chapter's settings do, because from
  scratch its runs ended anywhere between 0.43 and 0.89 mIoU).
* **Adaptive pooling.** Each branch average-pools to its grid (``nn.AdaptiveAvgPool2d``) for any
  map size; the authors' Caffe model uses fixed kernel sizes and strides computed for the 60x60
  map of its 473-pixel crops, which is the same thing at that size.
* **Bilinear resizing with ``align_corners=False``** (torchvision's convention, as in every minis
  model) for the pooled maps and the logits; the authors' code aligns the corners.
* **Single-scale inference without flipping**; the paper's best numbers average several input
  scales and left-right flips. Images are normalised with torchvision's ImageNet mean and
  standard deviation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from minis.models import register
from minis.nn import SEMANTIC_SHAPES_RECIPE, BackboneHeadModel, FCNHead, PooledBatchNorm2d, build_backbone, resize_to


class PoolingBranch(nn.Module):
    """Average-pool to a ``bins x bins`` grid -> 1x1 conv -> BN -> ReLU -> upsample back.

    ``[B,Cin,h,w] -> [B,Cout,h,w]``: the average content of each grid cell, broadcast over that
    cell (bilinearly blended at the cell borders). With ``bins=1`` it is one global vector.
    """

    def __init__(self, in_channels: int, out_channels: int, bins: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = PooledBatchNorm2d(out_channels)  # the 1x1 grid of one image is a single value
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(self.relu(self.bn(self.conv(self.pool(x)))), x.shape[-2:])


class PyramidPooling(nn.Module):
    """The pyramid pooling module: ``[B,C,h,w] -> [B,2C,h,w]`` (for four bins).

    The features themselves, followed by one :class:`PoolingBranch` per grid size, each with
    ``C / len(bins)`` channels.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(PoolingBranch(in_channels, branch_channels, b) for b in bins)
        self.out_channels = in_channels + len(bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [branch(x) for branch in self.branches], dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling -> 3x3 conv (``channels``, 512 in the paper) -> BN -> ReLU -> dropout -> 1x1.

    ``[B,Cin,h,w] -> [B,K,h,w]``.
    """

    def __init__(self, in_channels: int, num_classes: int, bins: Sequence[int] = (1, 2, 3, 6),
                 channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.pyramid = PyramidPooling(in_channels, bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(self.pyramid.out_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(self.pyramid(x)))


class PSPNet(BackboneHeadModel):
    """Semantic segmentation: ``images [B,3,H,W] in 0..1 -> logits [B,K,H,W]``.

    In training mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns
    ``{"loss_ce"}``, plus ``{"loss_aux"}`` from the auxiliary head on ``c4`` when it has one.
    The forward pass is :class:`minis.nn.SemanticModel`'s; PSPNet's part is its head on ``c5``.
    """

    def __init__(self, backbone: nn.Module, head: PSPHead, aux_head: nn.Module | None = None,
                 aux_weight: float = 0.4) -> None:
        super().__init__(backbone, head, aux_head, aux_weight)

    def scores(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["c5"])


@register("pspnet")
def pspnet(num_classes: int, backbone: str = "small", bins: Sequence[int] = (1, 2, 3, 6), head_channels: int = 512,
           dropout: float = 0.1, aux: bool = True, aux_weight: float = 0.4, pretrained_backbone: bool = False,
           frozen_bn: bool = False) -> PSPNet:
    """PSPNet at output stride 8 (paper: dilated ResNet-50/101, bins 1/2/3/6, 512 channels, aux 0.4)."""
    features = build_backbone(backbone, 8, frozen_bn, pretrained_backbone)
    head = PSPHead(features.channels["c5"], num_classes, bins, head_channels, dropout)
    aux_head = FCNHead(features.channels["c4"], num_classes) if aux else None
    return PSPNet(features, head, aux_head, aux_weight)


# The DeepLab/PSPNet chapter's options for PSPNet (its auxiliary loss is on by default; the small
# backbone's shipped pretrained weights, as for DeepLab) and its recipe: the semantic chapters'
# (SEMANTIC_SHAPES_RECIPE) for 6 epochs, as for DeepLab v3 and v3+.
SHAPES_OPTIONS: dict = {"head_channels": 64, "pretrained_backbone": True}
SHAPES_RECIPE: dict = {**SEMANTIC_SHAPES_RECIPE, "epochs": 6, "channels_last": True}
