"""Feature Pyramid Network (Lin et al., 2017): strong features at every scale from one backbone pass.

A ResNet's deep maps (``c5``, stride 32) know *what* is in the image but are coarse; its early
maps (``c2``, stride 4) are sharp but semantically weak. FPN adds a top-down path: starting
from the coarsest map, it upsamples (nearest neighbour, x2) and adds a 1x1 "lateral" projection
of the next finer backbone map, so every level gets the deep semantics *and* its own
resolution. A 3x3 convolution on each sum removes the upsampling's aliasing. Detectors then
look for small objects on the fine levels and large ones on the coarse levels, all with one
set of head weights because every level has the same channel count.

Coarser levels come in two flavours. For Faster R-CNN, ``P6`` (stride 64), used only by the
RPN for the largest anchors, is ``P5`` max-pooled with stride 2, as in the FPN paper. One-stage
detectors (RetinaNet, FCOS) start at ``P3`` and need real features for large objects: ``P6`` is a
3x3 stride-2 convolution of ``P5`` and ``P7`` another one after a ReLU (``top="p6p7"``).

Parameter shapes and the computation follow torchvision's ``FeaturePyramidNetwork`` (with its
``LastLevelMaxPool`` or ``LastLevelP6P7`` block) and ``BackboneWithFPN`` so that
:mod:`minis.models.porting` can load its weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minis.nn.backbones import build_backbone

FPN_LEVELS = ("c2", "c3", "c4", "c5")


EXTRA_LEVELS = {"pool": 1, "p6p7": 2, "none": 0}  # FPN levels each ``top`` adds above the backbone's
TOPS = tuple(EXTRA_LEVELS)


class FPN(nn.Module):
    """Backbone maps (e.g. ``[c2..c5]``) -> one output per map plus the ``top`` levels, all with ``channels`` channels.

    Shapes: input level ``l`` is ``[B, in_channels[l], H/s_l, W/s_l]``; output ``P_l`` is
    ``[B, channels, H/s_l, W/s_l]``. ``top="pool"`` adds one level (the last output max-pooled
    with stride 2), ``top="p6p7"`` two (stride-2 convolutions), ``top="none"`` nothing.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256, top: str = "pool") -> None:
        super().__init__()
        if top not in TOPS:
            raise ValueError(f"top must be one of {TOPS}, got {top!r}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.top = top
        self.channels = channels
        extra = []
        if top == "p6p7":
            self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            extra = [self.p6, self.p7]
        for conv in [*self.lateral, *self.smooth, *extra]:
            # kaiming-uniform with a=1 (the gain of a linear layer: no ReLU follows these convolutions)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        top_down = self.lateral[-1](features[-1])
        outputs = [self.smooth[-1](top_down)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            # nearest-neighbour upsampling to the lateral's exact size (odd sizes do not double evenly)
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.smooth[level](top_down))
        if self.top == "pool":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))  # P6: subsample P5
        elif self.top == "p6p7":
            p6 = self.p6(outputs[-1])
            outputs += [p6, self.p7(F.relu(p6))]
        return outputs


class BackboneFPN(nn.Module):
    """A backbone and its FPN: ``images [B,3,H,W] (normalised) -> [P2, P3, P4, P5, P6]`` by default.

    ``levels`` names the backbone maps the FPN reads (``("c3", "c4", "c5")`` with ``top="p6p7"``
    gives FCOS's ``[P3..P7]``). ``strides`` gives each output's stride; ``channels`` their common
    channel count.
    """

    def __init__(self, body: nn.Module, channels: int = 256, levels: Sequence[str] = FPN_LEVELS,
                 top: str = "pool") -> None:
        super().__init__()
        self.body = body
        self.levels = tuple(levels)
        self.fpn = FPN([body.channels[name] for name in self.levels], channels, top)
        self.channels = channels
        first = int(self.levels[0][1:])  # "c3" -> stride 2**3
        count = len(self.levels) + EXTRA_LEVELS[top]
        self.strides = tuple(2 ** (first + i) for i in range(count))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(images)
        return self.fpn([features[name] for name in self.levels])


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze the stem and the first ``5 - trainable_layers`` stages of a ResNet body.

    With ImageNet weights, Mask R-CNN trains only ``layer2``..``layer4`` (``trainable_layers=3``):
    the first filters are generic edges and colours, and fine-tuning them on detection batches
    of one or two images brings nothing but noise.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be between 0 and 5, got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)


def backbone_fpn(name: str = "resnet50", channels: int = 256, pretrained: bool = False, frozen_bn: bool | None = None,
                 trainable_layers: int | None = None, levels: Sequence[str] = FPN_LEVELS,
                 top: str = "pool") -> BackboneFPN:
    """A ResNet (or the small CPU ResNet) with an FPN on ``levels`` (``c2..c5`` by default).

    Defaults follow torchvision's detection models: with ImageNet weights, frozen batch norm
    and three trainable stages; from scratch, ordinary batch norm and every stage trainable
    (there are no statistics worth freezing yet).
    """
    if name == "vgg16":
        raise ValueError("FPN needs a ResNet backbone (c2..c5); vgg16 has no stride-4 stage")
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    body = build_backbone(name, output_stride=32, frozen_bn=frozen_bn, pretrained=pretrained)
    freeze_stages(body, (3 if pretrained else 5) if trainable_layers is None else trainable_layers)
    return BackboneFPN(body, channels, levels, top)
