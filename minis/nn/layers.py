"""Small layers used by several architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        return (images - self.mean).div_(self.std)  # in place on the new tensor: one image-sized copy, not two


class PooledBatchNorm2d(nn.BatchNorm2d):
    """Batch norm for globally pooled ``[B,C,1,1]`` maps that also trains with one image.

    After global pooling each channel holds one number per image, so a training batch of one
    image has a single value per channel and no variance: :class:`torch.nn.BatchNorm2d` refuses
    it ("Expected more than 1 value per channel"). With a single value this layer normalises with
    the running statistics instead (and leaves them unchanged); otherwise it is ordinary batch norm.
    Same parameters and state-dict keys as :class:`torch.nn.BatchNorm2d`. Used by DeepLab v3's
    image pooling and PSPNet's pyramid pooling.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution -> batch norm -> ReLU; padding keeps the size (divided by ``stride``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def bilinear_upsampling_weight(channels: int, factor: int) -> torch.Tensor:
    """The bilinear ("tent") kernel FCN initialises its upsampling layers with: ``[C, C, k, k]``.

    ``k = 2 * factor - factor % 2`` (``2 * factor`` for the usual even factors). The kernel is
    the outer product of a 1-D tent ``1 - |i - centre| / factor`` with itself, and it sits on the
    diagonal (channel ``c`` -> channel ``c``): each class map is upsampled on its own, nothing is
    mixed between classes.

    Used in :func:`bilinear_upsampling` (a ``ConvTranspose2d`` with ``stride=factor`` and
    ``padding=factor // 2``) it computes exactly
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)`` except in a
    border of ``factor // 2`` output pixels: the transposed convolution treats the pixels
    outside the map as zeros (values fade towards the border), ``F.interpolate`` repeats the
    edge pixel instead.
    """
    size = 2 * factor - factor % 2
    centre = (size - 1) / 2
    taps = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor  # [k]
    kernel = taps[:, None] * taps[None, :]  # [k, k]
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = kernel
    return weight


def bilinear_upsampling(channels: int, factor: int = 2, learnable: bool = True) -> nn.ConvTranspose2d:
    """A transposed convolution that starts as bilinear upsampling by ``factor``.

    ``[B,C,h,w] -> [B,C,factor*h,factor*w]``. FCN's "deconvolution" layers: initialised to
    bilinear interpolation (see :func:`bilinear_upsampling_weight`) and, with ``learnable=True``,
    free to learn a better upsampling during training; ``learnable=False`` freezes the weight.
    """
    size = 2 * factor - factor % 2
    layer = nn.ConvTranspose2d(channels, channels, size, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_upsampling_weight(channels, factor))
    layer.weight.requires_grad_(learnable)
    return layer
