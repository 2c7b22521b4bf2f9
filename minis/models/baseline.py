"""A deliberately small fully convolutional network: the baseline the book starts from.

Three strided stages shrink the image by 8, a 1x1 convolution scores every class at every
remaining position, and bilinear upsampling brings the scores back to the input size. It is
FCN-32s's idea at toy scale, small enough to train on a laptop CPU in a couple of minutes, and
the model the engine's tests and the quick-start demo train. The real architectures (FCN,
U-Net, DeepLab, ...) have their own files.

It follows no paper, so it has no departures to list; the forward pass (normalise, encode,
score, bilinear resize, cross-entropy) is :class:`minis.nn.SemanticModel`'s, shared by every
semantic model.
"""

from __future__ import annotations

import torch
from torch import nn

from minis.models import register
from minis.nn import SemanticModel, conv_bn_relu


class BaselineFCN(SemanticModel):
    """Semantic segmentation: ``images [B,3,H,W] in 0..1 -> logits [B,C,H,W]``.

    In training mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns
    ``{"loss_ce": cross-entropy}`` instead, the same contract as every minis model.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            conv_bn_relu(3, width, stride=2),  # 1/2
            conv_bn_relu(width, width),
            conv_bn_relu(width, 2 * width, stride=2),  # 1/4
            conv_bn_relu(2 * width, 2 * width),
            conv_bn_relu(2 * width, 4 * width, stride=2),  # 1/8
            conv_bn_relu(4 * width, 4 * width, dilation=2),  # wider context at no cost in size
        )
        self.classifier = nn.Conv2d(4 * width, num_classes, kernel_size=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # [B, 4w, H/8, W/8]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # [B, C, H/8, W/8]; the forward pass resizes them to the image


@register("baseline_fcn")
def baseline_fcn(num_classes: int, width: int = 32) -> BaselineFCN:
    return BaselineFCN(num_classes, width=width)


# The foundations chapter's first run (TrainConfig fields): ten epochs on the default shapes benchmark,
# augmented by a horizontal flip alone, so that each image is seen ten times in about a minute.
SHAPES_RECIPE: dict = {"epochs": 10, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "warmup_iters": 20}
