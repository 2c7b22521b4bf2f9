"""FCN-32s, FCN-16s and FCN-8s: a classification network turned into a pixel classifier.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015.

Two ideas. First, the fully connected layers of a classifier are convolutions whose kernel
covers the whole input map (:func:`minis.nn.fc_to_conv`): rewritten that way, VGG-16 takes an
image of any size and returns a *map* of class scores, one per 32x32 cell, instead of one
vector. Upsampling that map to the image size is FCN-32s. Second, a map at stride 32 is coarse:
shallower layers are finer but know less about classes. FCN-16s adds class scores computed from
``pool4`` (stride 16) to the 2x upsampled stride-32 scores; FCN-8s adds ``pool3`` (stride 8) too.
These "skip" connections fuse *what* (deep, coarse) with *where* (shallow, fine), and each halving
of the stride sharpened the boundaries (mean IU 59.4 / 62.4 / 62.7 on a subset of PASCAL VOC
2011 val in the paper's Table 2).

The upsampling layers are transposed convolutions initialised to bilinear interpolation and
learnt with the rest (:func:`minis.nn.bilinear_upsampling`). The paper trained in stages - FCN-16s
starts from a trained FCN-32s, FCN-8s from FCN-16s - which is why the new skip layers start at zero.

One :class:`FCN` module covers the three: ``skips`` says which finer maps are fused. On a ResNet
(``backbone="resnet50"``, ``output_stride=8``, no skips) it is torchvision's ``fcn_resnet50``
layer for layer, and :func:`from_torchvision_fcn` loads its weights
(``minis.models.from_torchvision``).

Departures from the paper, and why:

* **No 100-pixel input padding, no crop offsets.** The paper pads the image by 100 pixels and
  leaves fc6 unpadded, so its maps overhang the image and Caffe's crop layers cut them at offsets
  5, 9 and 31. Here every convolution is padded (fc6 by 3, see :class:`minis.nn.VGG16`), every
  map starts at the image's top-left corner, and the crops take offset 0 (:func:`crop_to`): any
  image size works, and the numbers are the same wherever fc6's window lies inside the map.
* **The final upsampling is ``F.interpolate``** (bilinear, ``align_corners=False``), not a
  transposed convolution fixed to bilinear weights: the same values except in a border of
  ``stride / 2`` pixels, where the resize repeats the edge instead of fading towards zero
  (:func:`minis.nn.bilinear_upsampling_weight`). It is torchvision's convention, which the port
  needs, and needs no cropping. The 2x upsamplings between skips are the paper's learnable
  transposed convolutions.
* **One training run per model, no staging.** The paper trains FCN-16s from a trained FCN-32s and
  FCN-8s from FCN-16s; here each variant trains from its initialisation in one run (the engine
  trains one model; the zero-initialised skips make loading a coarser model's weights by hand
  behave as in the paper). Nor are ``pool3``/``pool4`` scaled by 1e-4/1e-2 as in the journal
  version's all-at-once training: the skips start at zero instead.
* **The loss is a mean** over the scored pixels (:func:`minis.nn.semantic_losses`), where the
  paper sums the per-pixel losses of each image; learning rates in minis are set for the mean.
* **Backbone and inputs.** The default backbone is the small CPU ResNet, trained from scratch (the
  book's budget); ``backbone="vgg16", pretrained_backbone=True`` is the paper's. Images are
  normalised with the ImageNet mean and standard deviation in RGB, as torchvision's VGG-16 weights
  expect, not by the Caffe model's BGR mean subtraction.
* **On a ResNet** the scores come from torchvision's :class:`minis.nn.FCNHead` (3x3 conv, BN,
  dropout) and ``aux=True`` adds its auxiliary head: torchvision's FCN-ResNet, not in the paper.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from minis.models import build, register
from minis.models.porting import register_port
from minis.nn import SEMANTIC_SHAPES_RECIPE, FCNHead, SemanticModel, bilinear_upsampling, build_backbone
from minis.nn.backbones import VGG16

# The skips, from coarse to fine: each is at half the stride of the map before it.
SKIP_ORDER = ("c4", "c3", "c2")


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The top-left ``size`` part of ``x [B,C,h,w]`` (``h, w >= size``): ``[B,C,*size]``.

    Every map in minis starts at the image's top-left corner (the convolutions are padded, and a
    map at stride ``s`` has ``ceil(H / s)`` rows). Upsampling a map of ``n`` rows by 2 gives ``2n``
    rows; the finer map has ``2n`` or, for an odd size, ``2n - 1``. The two maps then line up
    from the top-left, and aligning them means cutting the extra last row/column: offset 0.

    The paper needed offsets: it padded the image by 100 pixels and left its convolutions
    unpadded, so each map overhung the image by a different margin, and Caffe's crop layer cut
    them at offsets computed from the layers' padding and strides (in FCN-8s: 5 pixels for
    ``pool4``'s scores, 9 for ``pool3``'s, 31 for the final output).
    """
    return x[..., : size[0], : size[1]]


class FCN(SemanticModel):
    """Backbone -> class scores on ``c5`` -> fuse skips -> bilinear upsampling to the input size.

    ``images [B,3,H,W] in 0..1 -> logits [B,K,H,W]``. ``skips`` is ``()`` (FCN-32s), ``("c4",)``
    (FCN-16s) or ``("c4", "c3")`` (FCN-8s); ``("c4", "c3", "c2")`` continues the idea to stride 4.
    In training mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns ``{"loss_ce"}``,
    plus ``{"loss_aux"}`` when ``aux_classifier`` is set (an :class:`FCNHead` on ``c4``, weighted
    by ``aux_weight``; used in training only). The forward pass is :class:`minis.nn.SemanticModel`'s;
    FCN's own part is :meth:`scores`.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, num_classes: int, skips: Sequence[str] = (),
                 aux_classifier: nn.Module | None = None, aux_weight: float = 0.5) -> None:
        super().__init__(aux_weight)
        skips = tuple(skips)
        if skips != SKIP_ORDER[: len(skips)]:
            raise ValueError(f"skips must run from coarse to fine without gaps, e.g. ('c4', 'c3'); got {skips}")
        if skips and backbone.output_stride != 32:
            # With dilation c3, c4 and c5 share one size: there is nothing to upsample 2x.
            raise ValueError(f"skips need a backbone at output stride 32 (each skip halves the stride); got "
                             f"output_stride={backbone.output_stride}. FCN-32s at output stride 8 is what "
                             "torchvision calls FCN-ResNet")
        self.backbone = backbone
        self.classifier = classifier  # [B,C5,h,w] -> [B,K,h,w]
        self.skips = skips
        self.skip_classifiers = nn.ModuleDict({name: zero_conv1x1(backbone.channels[name], num_classes)
                                               for name in skips})
        self.upsamplers = nn.ModuleDict({name: bilinear_upsampling(num_classes, 2) for name in skips})
        self.aux_classifier = aux_classifier  # torchvision's name for it (its weights load by name)

    def scores(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class scores at the finest fused stride: ``[B,K,h,w]`` (stride 32, 16 or 8 for 32s/16s/8s)."""
        scores = self.classifier(features["c5"])
        for name in self.skips:
            finer = self.skip_classifiers[name](features[name])  # [B,K,2h or 2h-1,...]
            upsampled = self.upsamplers[name](scores)  # [B,K,2h,2w]
            scores = crop_to(upsampled, finer.shape[-2:]) + finer
        return scores

    def aux_scores(self, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """torchvision's auxiliary :class:`FCNHead` on ``c4`` (training only): ``[B,K,h4,w4]`` or ``None``."""
        return None if self.aux_classifier is None else self.aux_classifier(features["c4"])


def zero_conv1x1(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 scoring layer ``[B,Cin,h,w] -> [B,K,h,w]`` whose weights and bias start at zero.

    The paper initialises the new skip layers to zero: FCN-16s starts from a trained FCN-32s, and
    a skip that adds nothing keeps that network's predictions intact at the start; the skip then
    learns a correction. Random weights would add noise to good predictions (and ``pool4``'s
    features are on a much larger scale than the scores). The weights still get gradients at once
    (the gradient of a weight is its input times the output's gradient).
    """
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def fcn_classifier(backbone: nn.Module, num_classes: int) -> nn.Module:
    """What scores ``c5``: a 1x1 convolution on VGG's fc7 (the paper), an :class:`FCNHead` on a ResNet.

    VGG's fc6/fc7 already are two layers of "head"; a ResNet's ``c5`` gets torchvision's 3x3
    conv-BN-ReLU-dropout before the 1x1 scores. The paper zero-initialises the VGG score layer
    ("random initialization yielded neither better performance nor faster convergence").
    """
    if isinstance(backbone, VGG16) and backbone.fc6 is not None:
        return zero_conv1x1(backbone.channels["c5"], num_classes)
    return FCNHead(backbone.channels["c5"], num_classes)


def _fcn(num_classes: int, skips: tuple[str, ...], backbone: str, output_stride: int, aux: bool, aux_weight: float,
         pretrained_backbone: bool, frozen_bn: bool) -> FCN:
    features = build_backbone(backbone, output_stride, frozen_bn, pretrained_backbone)
    aux_classifier = FCNHead(features.channels["c4"], num_classes) if aux else None
    return FCN(features, fcn_classifier(features, num_classes), num_classes, skips, aux_classifier, aux_weight)


@register("fcn32s")
def fcn32s(num_classes: int, backbone: str = "small", output_stride: int = 32, aux: bool = False,
           aux_weight: float = 0.5, pretrained_backbone: bool = False, frozen_bn: bool = False) -> FCN:
    """FCN-32s: scores on ``c5``, upsampled to the image (paper: ``backbone="vgg16"``, pretrained).

    ``aux=True`` adds torchvision's auxiliary head on ``c4`` (its loss weighted ``aux_weight``,
    0.5 in torchvision's recipe); ``output_stride=8`` with a ResNet is torchvision's FCN-ResNet.
    """
    return _fcn(num_classes, (), backbone, output_stride, aux, aux_weight, pretrained_backbone, frozen_bn)


@register("fcn16s")
def fcn16s(num_classes: int, backbone: str = "small", output_stride: int = 32, aux: bool = False,
           aux_weight: float = 0.5, pretrained_backbone: bool = False, frozen_bn: bool = False) -> FCN:
    """FCN-16s: FCN-32s plus scores from ``c4`` (``pool4``) at stride 16."""
    return _fcn(num_classes, ("c4",), backbone, output_stride, aux, aux_weight, pretrained_backbone, frozen_bn)


@register("fcn8s")
def fcn8s(num_classes: int, backbone: str = "small", output_stride: int = 32, aux: bool = False,
          aux_weight: float = 0.5, pretrained_backbone: bool = False, frozen_bn: bool = False) -> FCN:
    """FCN-8s: FCN-16s plus scores from ``c3`` (``pool3``) at stride 8 - the paper's best."""
    return _fcn(num_classes, ("c4", "c3"), backbone, output_stride, aux, aux_weight, pretrained_backbone, frozen_bn)


# --------------------------------------------------------------------------- torchvision port

_RESNET_DEPTH_BY_LAYER3 = {6: 50, 23: 101}  # blocks in layer3 of torchvision's ResNet-50 / -101


@register_port("FCN")
def from_torchvision_fcn(tv_model: nn.Module) -> FCN:
    """torchvision ``fcn_resnet50/101`` -> minis ``fcn32s`` with the same weights and outputs.

    torchvision's FCN is FCN-32s on a ResNet dilated to output stride 8 (its layer3 and layer4
    trade their stride for dilation), scored by an :class:`FCNHead`. The parameter names are the
    same in both (``backbone.*``, ``classifier.*``, ``aux_classifier.*``), so the state dict
    loads as it is. torchvision's model takes ImageNet-normalised images, ours images in 0..1.
    The returned model is in the same train/eval mode as ``tv_model``.
    """
    layer3 = getattr(tv_model.backbone, "layer3", None)
    if layer3 is None or len(layer3) not in _RESNET_DEPTH_BY_LAYER3:
        raise TypeError("minis ports torchvision FCN on ResNet-50/101 only")
    if layer3[0].conv2.stride != (1, 1):
        raise ValueError("torchvision's FCN dilates layer3 and layer4 (output stride 8); this model does not")
    model = build(
        "fcn32s",
        tv_model.classifier[-1].out_channels,
        backbone=f"resnet{_RESNET_DEPTH_BY_LAYER3[len(layer3)]}",
        output_stride=8,
        aux=tv_model.aux_classifier is not None,
    )
    model.load_state_dict(tv_model.state_dict(), strict=True)
    return model.train(tv_model.training)


# The FCN chapter's recipe on the semantic shapes variant: the semantic chapters' (SEMANTIC_SHAPES_RECIPE),
# in the paper's stages: FCN-32s from scratch, then each finer net from the coarser one's weights. In
# channels_last memory (the same numbers up to float rounding): on 2 CPU cores 2 epochs of FCN-32s took
# 8.5-9.0 s instead of 11.1-11.6 s, of FCN-8s 8.5-9.3 s instead of 8.8-10.5 s.
SHAPES_RECIPE: dict = {**SEMANTIC_SHAPES_RECIPE, "channels_last": True}
# The chapter also trains an FCN-32s control through the two later stages (42 epochs in all), so the
# stages are short. FCN-8s mIoU over the four runs of bench stability: 16 + 8 + 8 epochs 0.839-0.847
# (chapter 216 s on 2 cores), 14 + 7 + 7 0.825-0.845 (mean 0.835), 12 + 6 + 6 0.806-0.831 (0.817).
SHAPES_STAGES: tuple[tuple[str, int], ...] = (("fcn32s", 14), ("fcn16s", 7), ("fcn8s", 7))  # (model, epochs)
