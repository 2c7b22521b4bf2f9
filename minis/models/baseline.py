"""A deliberately small fully convolutional network: the baseline the book starts from.

Three strided stages shrink the image by 8, a 1x1 convolution scores every class at every
remaining position, and bilinear upsampling brings the scores back to the input size. It is
FCN-32s's idea at toy scale, small enough to train on a laptop CPU in a couple of minutes, and
the model the engine's tests and the quick-start demo train. The real architectures (FCN,
U-Net, DeepLab, ...) have their own files.

It follows no paper, so it has no departures to list; the forward pass (normalise, encode,
score, bilinear resize, cross-entropy) is :class:`minis.nn.SemanticModel`'s, shared by every
semantic model. On the default (textured) benchmark the foundations chapter weights the
cross-entropy by class (:func:`minis.nn.median_frequency_weights` with :data:`SHAPES_CLASS_WEIGHT_POWER`):
90 % of the pixels are background, and with plain cross-entropy the five shape classes stay
confused for most of a short run, each seed telling them apart at its own time (the trial runs
are listed next to :data:`SHAPES_RECIPE`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from minis.models import register
from minis.nn import SemanticModel, conv_bn_relu


class BaselineFCN(SemanticModel):
    """Semantic segmentation: ``images [B,3,H,W] in 0..1 -> logits [B,C,H,W]``.

    In training mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns
    ``{"loss_ce": cross-entropy}`` instead, the same contract as every minis model.
    """

    def __init__(self, num_classes: int, width: int = 32, class_weights: Sequence[float] | None = None) -> None:
        super().__init__(class_weights=class_weights)
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
def baseline_fcn(num_classes: int, width: int = 32, class_weights: Sequence[float] | None = None) -> BaselineFCN:
    return BaselineFCN(num_classes, width=width, class_weights=class_weights)


# The foundations chapter's first run (TrainConfig fields): 24 epochs on the default shapes benchmark,
# augmented by a horizontal flip alone, in about three minutes on two cores (channels_last: the same
# numbers, 10-20 % faster), with the cross-entropy weighted by median_frequency_weights(train set,
# power=SHAPES_CLASS_WEIGHT_POWER). Val mIoU of seeds 0, 1, 2 at 2 threads (and seed 0 at 1 thread):
# 10 epochs unweighted 0.288, 0.195, 0.277 (0.275); 10 epochs weighted 0.416, 0.385, 0.506; weights
# with power 1 (background 0.02) 0.268, 0.244, 0.343; 20 epochs weighted 0.619, 0.571, 0.622 (0.608);
# 24 epochs weighted 0.637, 0.593, 0.634 (0.637), spread 0.045 (python -m minis bench stability).
SHAPES_RECIPE: dict = {"epochs": 24, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "warmup_iters": 20,
                       "channels_last": True}
SHAPES_CLASS_WEIGHT_POWER = 0.5
