"""Pieces every semantic segmentation model shares: the forward pass, the FCN-style head, resizing
and the loss.

They live here once so that each model file (``minis/models/fcn.py``, ``deeplab.py``, ...) shows
only what is new in its paper: :class:`SemanticModel` is the pipeline every one of them runs
(normalise, features, class scores, bilinear resize to the image, cross-entropy plus an optional
deep-supervision loss), and a model fills in the steps its paper defines.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minis.data.coco import IGNORE_INDEX  # label of pixels that count neither in the loss nor in the metrics
from minis.nn.layers import ImageNormalizer


class SemanticModel(nn.Module, metaclass=ABCMeta):
    """The semantic model contract: ``images [B,3,H,W] in 0..1 -> logits [B,K,H,W]`` in eval mode.

    In training mode with ``targets`` (int64 ``[B,H,W]``, :data:`IGNORE_INDEX` = ignore) the
    forward pass returns ``{"loss_ce"}`` instead, plus ``{"loss_aux"}`` when the model has a
    deep-supervision classifier (:meth:`aux_scores`), weighted by ``aux_weight``; the Trainer sums
    the dict. ``class_weights [K]`` (optional) weight each pixel's cross-entropy by its true class
    (:func:`median_frequency_weights`). Every step of :meth:`forward` is a method, and a model
    overrides the ones its paper changes:

    - :meth:`features`: normalised images -> what the classifiers read (default: ``self.backbone``,
      whose ``{"c2", ..., "c5"}`` feature maps every ResNet/VGG backbone returns);
    - :meth:`scores`: features -> class scores ``[B,K,h,w]`` at the model's output stride;
    - :meth:`aux_scores`: features -> the auxiliary classifier's scores, or ``None`` (default);
    - :meth:`resize`: scores -> ``[B,K,H,W]`` (default: bilinear, :func:`resize_to`);
    - :meth:`losses`: logits and targets -> the loss dict (default: :func:`semantic_losses`).
    """

    task = "semantic"

    def __init__(self, aux_weight: float = 0.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.normalize = ImageNormalizer()
        self.aux_weight = aux_weight
        # a training setting, not a learned value: kept out of the state dict, so that weights
        # load into the model whether it was trained with class weights or without
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def features(self, images: torch.Tensor) -> Any:
        """Normalised ``images [B,3,H,W]`` -> the backbone's feature maps ``{"c2": ..., "c5": ...}``."""
        return self.backbone(images)

    @abstractmethod
    def scores(self, features: Any) -> torch.Tensor:
        """Class scores ``[B,K,h,w]`` at the model's output stride: every model defines it (an
        abstract method, so a subclass without it cannot be built)."""

    def aux_scores(self, features: Any) -> torch.Tensor | None:
        """The deep-supervision classifier's scores ``[B,K,h',w']`` (training only), or ``None``."""
        return None

    def resize(self, scores: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Scores ``[B,K,h,w]`` -> logits ``[B,K,*size]`` at the input image's size."""
        return resize_to(scores, size)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        size = images.shape[-2:]
        features = self.features(self.normalize(images))
        logits = self.resize(self.scores(features), size)
        if not (self.training and targets is not None):
            return logits
        aux_scores = self.aux_scores(features)  # only computed when it is trained
        aux_logits = None if aux_scores is None else self.resize(aux_scores, size)
        return self.losses(logits, targets, aux_logits)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor,
               aux_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"loss_ce"}`` (plus ``{"loss_aux"}``): :func:`semantic_losses` at the input resolution."""
        return semantic_losses(logits, targets, aux_logits, self.aux_weight, self.class_weights)


class BackboneHeadModel(SemanticModel):
    """A backbone, a head on its feature maps, and optionally an auxiliary head on ``c4``.

    ``head`` maps the backbone's feature dict to class scores ``[B,K,h,w]``; ``aux_head`` (usually
    an :class:`FCNHead`) scores ``c4`` for deep supervision, its loss weighted by ``aux_weight``,
    and is skipped at inference. DeepLab v1-v3+ and PSPNet are this model with their own heads.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None = None,
                 aux_weight: float = 0.4) -> None:
        super().__init__(aux_weight)
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def scores(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features)

    def aux_scores(self, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None if self.aux_head is None else self.aux_head(features["c4"])


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
    class_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Pixel-wise cross-entropy, ignoring label 255: ``{"loss_ce"}`` plus ``{"loss_aux"}`` if given.

    ``logits`` and ``aux_logits`` ``[B,C,H,W]`` at the resolution of ``targets`` (int64 ``[B,H,W]``).
    The auxiliary loss (PSPNet's deep supervision) is weighted by ``aux_weight``; the Trainer sums
    every entry of the dict. ``class_weights [C]``: each pixel's loss weighted by its true class,
    the mean taken over the weights (PyTorch's ``weight=``), so equal weights change nothing.
    """
    weight = None if class_weights is None else class_weights.to(logits.dtype)
    losses = {"loss_ce": F.cross_entropy(logits, targets, weight=weight, ignore_index=IGNORE_INDEX)}
    if aux_logits is not None:
        losses["loss_aux"] = aux_weight * F.cross_entropy(aux_logits, targets, weight=weight,
                                                          ignore_index=IGNORE_INDEX)
    return losses


def median_frequency_weights(dataset: Any, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Class weights ``[K]`` from the pixel frequencies of a semantic dataset: ``(median f / f_c) ** power``.

    Median frequency balancing (Eigen & Fergus, ICCV 2015; SegNet uses it): plain cross-entropy
    weighs every *pixel* the same, mIoU every *class*; where 90 % of the pixels are background,
    a rare class's few pixels barely move the loss. ``power=1`` is the paper's rule, ``0.5`` a
    milder one. ``dataset[i]`` gives ``(image, {"semantic": int64 [H,W]})`` (255 = ignore); a class
    without pixels gets the largest weight of the others.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for index in range(len(dataset)):
        labels = torch.as_tensor(dataset[index][1]["semantic"]).flatten()
        counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=num_classes)[:num_classes].double()
    if counts.sum() == 0:
        raise ValueError("median_frequency_weights: the dataset has no labelled pixel")
    frequency = counts / counts.sum()
    present = frequency > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = (frequency[present].median() / frequency[present]) ** power
    weights[~present] = weights[present].max()
    return weights.float()


# The semantic chapters' training recipe on the semantic shapes variant (TrainConfig fields; each
# model file adds its epochs): AdamW with a short linear warm-up, then the poly schedule, batch 16.
# The data is :data:`minis.data.shapes.SEMANTIC_SHAPES`, augmented by a horizontal flip alone.
SEMANTIC_SHAPES_RECIPE: dict = {"batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "warmup_iters": 50}
