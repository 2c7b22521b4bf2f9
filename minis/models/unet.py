"""U-Net: an encoder that sees context, a decoder that recovers detail, joined level by level.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015.

FCN adds coarse class scores to finer ones at the very end. U-Net makes the upsampling path as
deep as the downsampling path: the *contracting* path halves the resolution ``depth`` times
(two 3x3 convolutions, then a 2x2 max-pool, doubling the channels each time); the *expanding*
path undoes it one level at a time (a 2x2 transposed convolution that doubles the size and halves
the channels) and, at each level, **concatenates** the encoder's feature map of the same size
before two more 3x3 convolutions. The decoder thus sees the full-resolution features themselves,
not a one-channel-per-class summary of them, and can place boundaries precisely - which made
U-Net the standard for biomedical images, where training sets are tiny and cells touch.

Two changes from the paper, both now usual:

* The paper's convolutions are unpadded: each 3x3 convolution loses a pixel on every side, a
  572x572 input gives a 388x388 output, and the encoder's maps are cropped before being
  concatenated; large images are segmented tile by tile ("overlap-tile"), the missing context at
  the image border filled by mirroring. Padded convolutions keep every map at its level's size:
  the skip needs no crop and the output has the input's size. The mirroring survives in
  :func:`pad_to_multiple`.
* Batch norm after every convolution (it appeared the same year). The paper trained from scratch
  with careful He initialisation, batches of one tile and momentum 0.99; batch norm makes plain
  AdamW training from scratch robust, which is what the book does on a CPU.

The paper's width is 64 channels at the first level (1024 at the bottom); the default here is
32 (``width=64`` for the paper's), a quarter of the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minis.models import register
from minis.nn import ImageNormalizer, conv_bn_relu, resize_to, semantic_losses


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers, U-Net's unit at every level: ``[B,Cin,h,w] -> [B,Cout,h,w]``."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


def up_layer(in_channels: int, out_channels: int, bilinear: bool) -> nn.Module:
    """2x upsampling that halves the channels: ``[B,Cin,h,w] -> [B,Cout,2h,2w]``.

    The paper's 2x2 transposed convolution ("up-convolution"), or with ``bilinear=True`` a fixed
    bilinear upsampling followed by a 1x1 convolution - a common variant that avoids the
    checkerboard patterns a stride-2 transposed convolution can leave.
    """
    if bilinear:
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                             nn.Conv2d(in_channels, out_channels, 1))
    return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``[B,C,H,W]`` at the bottom and right to sizes divisible by ``multiple``.

    Every level halves the size, so the input must divide by ``2 ** depth`` for the decoder's maps
    to match the encoder's exactly. The padding mirrors the image (the paper's way of filling in
    context beyond the border); an image smaller than the padding repeats its edge instead.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)


class UNet(nn.Module):
    """U-Net: ``images [B,3,H,W] in 0..1 -> logits [B,K,H,W]``, any ``H, W``.

    ``depth`` downsamplings (the paper: 4); level ``l`` has ``width * 2**l`` channels. In training
    mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns ``{"loss_ce"}``.

    ``aux_weight > 0`` adds *deep supervision* (not in the paper): a 1x1 classifier on the bottom
    of the U whose upsampled scores get their own cross-entropy, weighted by ``aux_weight``
    (``{"loss_aux"}``). Trained from scratch, the decoder can fit most pixels from the
    full-resolution skips - local colour and edges - long before the bottom has learned which
    shape an object is; the extra loss makes the bottom learn the classes from the start. It
    costs nothing at inference.
    """

    task = "semantic"

    def __init__(self, num_classes: int, depth: int = 4, width: int = 32, bilinear: bool = False,
                 aux_weight: float = 0.0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net needs at least one downsampling, got depth={depth}")
        self.depth = depth
        channels = [width * 2**level for level in range(depth + 1)]  # e.g. 32, 64, 128, 256, 512
        self.normalize = ImageNormalizer()
        # encoder[l] works at 1/2**l of the input; encoder[depth] is the bottom of the "U"
        self.encoder = nn.ModuleList([double_conv(3, channels[0])])
        self.encoder.extend(double_conv(channels[level - 1], channels[level]) for level in range(1, depth + 1))
        self.pool = nn.MaxPool2d(2)
        # up[l] brings level l+1 up to level l; decoder[l] fuses it with encoder[l]'s map:
        # the concatenation doubles the channels, and the two convolutions bring them back.
        self.up = nn.ModuleList([up_layer(channels[level + 1], channels[level], bilinear) for level in range(depth)])
        self.decoder = nn.ModuleList([double_conv(2 * channels[level], channels[level]) for level in range(depth)])
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)
        self.aux_weight = aux_weight
        self.aux_classifier = nn.Conv2d(channels[depth], num_classes, 1) if aux_weight > 0 else None

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        height, width = images.shape[-2:]
        x = pad_to_multiple(self.normalize(images), 2**self.depth)

        skips = []  # the encoder's map at each level, [B, width*2**l, H'/2**l, W'/2**l]
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)

        x = skips.pop()  # the bottom: [B, width*2**depth, H'/2**depth, W'/2**depth]
        bottom = x
        for level in reversed(range(self.depth)):
            x = self.up[level](x)
            x = self.decoder[level](torch.cat([skips[level], x], dim=1))

        logits = self.classifier(x)[..., :height, :width]  # drop the padding again
        if self.training and targets is not None:
            aux_logits = None
            if self.aux_classifier is not None:
                aux_logits = resize_to(self.aux_classifier(bottom), x.shape[-2:])[..., :height, :width]
            return semantic_losses(logits, targets, aux_logits, self.aux_weight)
        return logits


@register("unet")
def unet(num_classes: int, depth: int = 4, width: int = 32, bilinear: bool = False, aux_weight: float = 0.0) -> UNet:
    """U-Net (paper: ``depth=4``, ``width=64``, transposed-convolution upsampling)."""
    return UNet(num_classes, depth=depth, width=width, bilinear=bilinear, aux_weight=aux_weight)
