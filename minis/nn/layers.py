"""Small layers used by several architectures."""

from __future__ import annotations

import torch
from torch import nn

# ImageNet statistics: every torchvision backbone was trained on images normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalizer(nn.Module):
    """Maps images in 0..1 to zero mean, unit variance per channel.

    Models take images in 0..1 (the model interface) and normalise inside, so a checkpoint
    carries its own normalisation and callers never have to remember it.
    Shape: ``[B, 3, H, W] -> [B, 3, H, W]``.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution -> batch norm -> ReLU; padding keeps the size (divided by ``stride``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
