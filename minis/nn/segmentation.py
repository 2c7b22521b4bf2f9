"""Pieces every semantic segmentation model shares: the FCN-style head, resizing and the loss.

They live here once so that each model file (``minis/models/fcn.py``, ``deeplab.py``, ...) shows
only what is new in its paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255  # label of pixels that count neither in the loss nor in the metrics


class FCNHead(nn.Sequential):
    """3x3 conv (to ``in_channels // 4``) -> BN -> ReLU -> dropout -> 1x1 conv to ``out_channels``.

    The classifier torchvision puts on a dilated ResNet for FCN, and the auxiliary head that
    PSPNet and torchvision's models attach to stage 4 (the layer indices ``0`` and ``4`` match
    torchvision's, so its weights load by name). ``[B,Cin,h,w] -> [B,out_channels,h,w]``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1) -> None:
        inner = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inner, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(inner, out_channels, 1),
        )


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of ``[B,C,h,w]`` to ``[B,C,*size]`` (``align_corners=False``, as torchvision)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def semantic_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    aux_logits: torch.Tensor | None = None,
    aux_weight: float = 0.4,
) -> dict[str, torch.Tensor]:
    """Pixel-wise cross-entropy, ignoring label 255: ``{"loss_ce"}`` plus ``{"loss_aux"}`` if given.

    ``logits`` and ``aux_logits`` ``[B,C,H,W]`` at the resolution of ``targets`` (int64 ``[B,H,W]``).
    The auxiliary loss (PSPNet's deep supervision) is weighted by ``aux_weight``; the Trainer sums
    every entry of the dict.
    """
    losses = {"loss_ce": F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)}
    if aux_logits is not None:
        losses["loss_aux"] = aux_weight * F.cross_entropy(aux_logits, targets, ignore_index=IGNORE_INDEX)
    return losses
