"""DeepLab v1, v2, v3 and v3+: atrous convolution, from one dilated layer to an encoder-decoder.

Four papers by Liang-Chieh Chen and colleagues tell one story; each version keeps what worked
and changes one thing.

* **v1** - Chen, Papandreou, Kokkinos, Murphy, Yuille, "Semantic Image Segmentation with Deep
  Convolutional Nets and Fully Connected CRFs", ICLR 2015. A classification network shrinks the
  image 32 times; v1 removes the stride of VGG-16's last two poolings and *dilates* the
  convolutions after them (the "hole" algorithm, atrous convolution), so the features stay at
  1/8 of the input with the same receptive field and the same pretrained weights. The fully
  connected layers become convolutions; the "LargeFOV" variant makes fc6 a 3x3 convolution with
  dilation 12 and 1024 channels (instead of 7x7x4096), which is faster and sees as far. The
  logits are upsampled bilinearly. A fully connected CRF then sharpens the boundaries; it is not
  part of the network, and minis does not implement it (the chapter explains it).
* **v2** - Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets,
  Atrous Convolution, and Fully Connected CRFs", TPAMI 2018. Objects come at many scales, so v2
  runs several LargeFOV heads in parallel at dilation rates 6, 12, 18 and 24 - *atrous spatial
  pyramid pooling* (ASPP-L) - and sums their class scores.
* **v3** - Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image
  Segmentation", arXiv 2017. Summing scores mixes the scales late; v3 concatenates *features*
  instead: a 1x1 branch, three 3x3 atrous branches (rates 6, 12, 18 at output stride 16, doubled
  at 8), and an image-level branch (global average pooling) that supplies the context a very
  dilated 3x3 filter loses when most of its taps fall outside the image. Batch norm everywhere,
  a 1x1 projection, then the classifier. No CRF any more.
* **v3+** - Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable
  Convolution for Semantic Image Segmentation", ECCV 2018. v3's output at 1/16 is coarse at
  object boundaries; v3+ adds a light decoder that upsamples it 4x and fuses it with stride-4
  backbone features (reduced to 48 channels so they do not drown the semantics), and makes the
  atrous and decoder convolutions depthwise-separable to make them cheap (``separable=True``
  here; off by default, see below).

Every version is the same :class:`DeepLab` module - backbone, head, bilinear upsampling - with a
different head. ``build("deeplabv3", K, backbone="resnet101", output_stride=8, rates=(12, 24, 36),
aux=True)`` is torchvision's ``deeplabv3_resnet101`` layer for layer; :func:`from_torchvision_deeplabv3`
loads its weights (``minis.models.from_torchvision``).

Departures from the papers, and why. In all four: the default backbone is the small CPU ResNet
(the book's budget; ``backbone="vgg16"`` or ``"resnet101"`` with ``pretrained_backbone=True`` are
the papers'); with ``pretrained_backbone=True`` it starts from weights pretrained on other images of
the shapes world instead of ImageNet (:mod:`minis.pretrain`; the chapter's settings do, because from
scratch the chapter's runs ended anywhere between 0.38 and 0.86 mIoU), images are normalised with torchvision's ImageNet
mean and standard deviation (the papers' Caffe and TensorFlow models subtract their own means),
and inference is single-scale without flipping (the papers' best numbers average several input
scales and left-right flips).

* **v1 and v2: no fully connected CRF** (a post-processing step outside the network; the chapter
  explains it) **and the loss on upsampled logits.** v1 and v2 trained against ground truth
  subsampled 8 times; like v3 ("upsampling logits": thin structures survive in the targets),
  minis upsamples the logits to the image and keeps every label, the one loss of every semantic
  model (:func:`minis.nn.semantic_losses`).
* **v1:** LargeFOV only (not the paper's other fc6 sizes, nor its multi-scale "MSc" variant),
  and its fc6/fc7 start at random instead of being decimated from VGG-16's fully connected layers.
* **v2:** no training on several input scales fused by max ("MSC"). Each ASPP-L branch is the
  VGG one (fc6 3x3 with 1024 channels, fc7, fc8) on every backbone; the authors' released
  ResNet-101 model scores the classes with a single 3x3 convolution per rate instead.
* **v3:** the head is torchvision's ``DeepLabHead``: after ASPP's 1x1 projection come dropout 0.5
  and a 3x3 conv-BN-ReLU (``refine``) before the classifier, where the paper goes from the
  projection to the 1x1 classifier - kept so that torchvision's weights load and its outputs are
  reproduced. **No multi-grid by default** (torchvision's rates, same reason);
  ``multi_grid=(1, 2, 4)`` gives the paper's (:func:`apply_multi_grid`). The cascaded variant
  (blocks 5-7 without ASPP) is not implemented; ``aux=True`` (torchvision's auxiliary head) is
  not in the paper.
* **v3+: separable convolutions are off by default** (``separable=False``): the chapter compares
  v3 and v3+ with the same dense ASPP, so what it measures is the decoder;
  ``separable=True`` is the paper's (4-5x fewer head parameters). The Xception backbone is not
  implemented (the paper's ResNet-101 variant is ``backbone="resnet101"``). Dropout 0.1 after
  ASPP's projection is not in the paper's description. ``aux=True`` and the 3:16 scaling of
  ``low_level_channels`` for narrow heads are minis' (see :func:`deeplabv3plus`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minis.models import build, register
from minis.models.porting import register_port
from minis.nn import SEMANTIC_SHAPES_RECIPE, BackboneHeadModel, FCNHead, PooledBatchNorm2d, build_backbone, conv_bn_relu, resize_to
from minis.nn.backbones import DILATIONS, vgg16


# --------------------------------------------------------------------------- shared pieces


def conv1x1_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution -> batch norm -> ReLU: ``[B,Cin,h,w] -> [B,Cout,h,w]``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


def atrous_conv(in_channels: int, out_channels: int, rate: int, separable: bool = False) -> nn.Sequential:
    """3x3 convolution with dilation ``rate`` -> BN -> ReLU; the size is kept.

    ``separable=True`` (v3+) factorises it into a depthwise 3x3 convolution (one filter per input
    channel, dilated) and a pointwise 1x1 convolution that mixes channels, each followed by BN and
    ReLU as in the paper: ``9*Cin + Cin*Cout`` weights instead of ``9*Cin*Cout``.
    The 3x3 convolution is always ``[0]`` of the returned sequence.
    """
    if not separable:
        return conv_bn_relu(in_channels, out_channels, dilation=rate)
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=rate, dilation=rate, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def default_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP rates of v3: (6, 12, 18) at output stride 16, scaled with the feature resolution.

    At output stride 8 the map is twice as large, so the same field of view needs twice the
    dilation: (12, 24, 36).
    """
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


class ImagePooling(nn.Module):
    """v3's image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> broadcast back.

    ``[B,Cin,h,w] -> [B,Cout,h,w]``, the same vector at every position: the context of the whole
    image, which a filter with rate 36 on a 33x33 map no longer sees (most taps land on padding).
    The broadcast is a bilinear resize from 1x1, exactly as torchvision does it.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = PooledBatchNorm2d(out_channels)  # one value per channel and image: see its docstring
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1)  # [B,Cin,1,1]
        return resize_to(self.relu(self.bn(self.conv(pooled))), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of v3: parallel views at several rates, concatenated.

    Branches: a 1x1 convolution, one :func:`atrous_conv` per rate, and :class:`ImagePooling`;
    their ``out_channels``-channel outputs are concatenated and projected back to
    ``out_channels`` by 1x1 conv -> BN -> ReLU -> dropout. ``[B,Cin,h,w] -> [B,out_channels,h,w]``.
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256, separable: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [conv1x1_bn_relu(in_channels, out_channels)]
            + [atrous_conv(in_channels, out_channels, rate, separable) for rate in self.rates]
            + [ImagePooling(in_channels, out_channels)]
        )
        self.project = nn.Sequential(
            nn.Conv2d(len(self.branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


# --------------------------------------------------------------------------- the four heads
# Every head maps the backbone's feature dict to logits at the resolution of "c5".


def large_fov(in_channels: int, num_classes: int, channels: int, rate: int, dropout: float = 0.5) -> nn.Sequential:
    """v1's LargeFOV classifier (fc6 -> fc7 -> fc8 as convolutions): ``[B,Cin,h,w] -> [B,K,h,w]``.

    fc6 is a 3x3 convolution with dilation ``rate`` (12 in the paper), fc7 a 1x1 convolution,
    both ``channels`` wide (1024) with ReLU and dropout; fc8 scores the classes. No batch norm:
    VGG-era networks had none.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=rate, dilation=rate),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(channels, channels, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(channels, num_classes, 1),
    )


class LargeFOVHead(nn.Module):
    """DeepLab v1: one :func:`large_fov` classifier on ``c5``. ``features -> [B,K,h,w]``."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 1024, rate: int = 12,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.classifier = large_fov(in_channels, num_classes, channels, rate, dropout)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(features["c5"])


class SummedASPPHead(nn.Module):
    """DeepLab v2's ASPP-L: one :func:`large_fov` classifier per rate, their *logits* summed.

    Each branch sees the same ``c5`` through a different dilation (6, 12, 18, 24), i.e. a
    different object scale; summing the class scores fuses the scales. ``features -> [B,K,h,w]``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 1024,
                 rates: Sequence[int] = (6, 12, 18, 24), dropout: float = 0.5) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(large_fov(in_channels, num_classes, channels, rate, dropout)
                                      for rate in self.rates)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["c5"]
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)


class DeepLabV3Head(nn.Module):
    """DeepLab v3: :class:`ASPP` on ``c5`` -> 3x3 conv -> BN -> ReLU -> 1x1 classifier.

    The layout of torchvision's ``DeepLabHead`` (its weights load, see the port below).
    ``features -> [B,K,h,w]``.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, channels)
        self.refine = conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.refine(self.aspp(features["c5"])))


class DeepLabV3PlusHead(nn.Module):
    """DeepLab v3+: ASPP encoder on ``c5`` plus a decoder that brings back ``c2``'s detail.

    ``c2`` (stride 4) is reduced to ``low_level_channels`` by 1x1 conv -> BN -> ReLU - few
    channels, so the fused features stay dominated by the encoder's semantics - then concatenated
    with the ASPP output upsampled to ``c2``'s size, refined by two 3x3 convolutions and classified.
    ``features -> [B,K,h2,w2]`` at the resolution of ``c2``.

    ``low_level_channels`` defaults to the paper's 48 for 256 channels and keeps that 3:16 ratio for
    narrower heads (12 for 64). The paper's ablation found few low-level channels best; with as
    many low-level as encoder channels the decoder leans on local detail and, trained from
    scratch, learns the object classes far more slowly.
    """

    def __init__(self, in_channels: int, low_level_in: int, num_classes: int, rates: Sequence[int],
                 channels: int = 256, low_level_channels: int | None = None, separable: bool = False,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if low_level_channels is None:
            low_level_channels = max(1, channels * 3 // 16)
        self.aspp = ASPP(in_channels, rates, channels, separable, dropout)
        self.reduce = conv1x1_bn_relu(low_level_in, low_level_channels)
        self.fuse = nn.Sequential(
            atrous_conv(channels + low_level_channels, channels, 1, separable),
            atrous_conv(channels, channels, 1, separable),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low_level = self.reduce(features["c2"])  # [B,48,h2,w2]
        context = resize_to(self.aspp(features["c5"]), low_level.shape[-2:])  # x4 (x2 at stride 8)
        return self.classifier(self.fuse(torch.cat([context, low_level], dim=1)))


# --------------------------------------------------------------------------- the model


class DeepLab(BackboneHeadModel):
    """Backbone -> head -> bilinear upsampling: ``images [B,3,H,W] in 0..1 -> logits [B,K,H,W]``.

    In training mode with ``targets`` (int64 ``[B,H,W]``, 255 = ignore) it returns
    ``{"loss_ce"}`` (plus ``{"loss_aux"}`` when ``aux_head`` is set: an :class:`FCNHead` on ``c4``
    whose loss, weighted by ``aux_weight``, helps train the lower layers; unused at inference).
    The forward pass is :class:`minis.nn.SemanticModel`'s; a version of DeepLab is its head.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None = None,
                 aux_weight: float = 0.5) -> None:
        super().__init__(backbone, head, aux_head, aux_weight)


def deeplab_backbone(name: str, output_stride: int, frozen_bn: bool, pretrained: bool) -> nn.Module:
    """The backbone for a DeepLab head; VGG-16 comes without fc6/fc7, which the heads replace."""
    if name == "vgg16":
        return vgg16(output_stride, frozen_bn, pretrained, fc_layers=False)
    return build_backbone(name, output_stride, frozen_bn, pretrained)


def apply_multi_grid(backbone: nn.Module, unit_rates: Sequence[int]) -> None:
    """DeepLab v3's multi-grid: block ``i`` of the last ResNet stage dilates by ``rate * unit_rates[i]``.

    ``rate`` is the stage's dilation at the backbone's output stride (2 at 16, 4 at 8, 1 at 32), so
    the paper's ``(1, 2, 4)`` gives rates 2, 4, 8 at output stride 16: successive blocks see
    ever wider, interleaved grids instead of the same one. One unit rate per block (ResNet-50/101
    have 3; the small backbone and ResNet-18/34 have 2); in a basic block both 3x3 convolutions
    take the block's rate. Without multi-grid (torchvision's layout) the first block keeps the
    previous stage's rate and the others use ``rate``. Changes ``backbone.layer4`` in place
    (dilation and padding of its 3x3 convolutions; no weight changes shape).
    """
    stage = getattr(backbone, "layer4", None)
    if stage is None:
        raise ValueError("multi_grid needs a ResNet backbone (its last stage, layer4)")
    if len(unit_rates) != len(stage):
        raise ValueError(f"multi_grid needs one unit rate per block of the last stage: {len(stage)} for this "
                         f"backbone, got {tuple(unit_rates)}")
    rate = DILATIONS[backbone.output_stride][1]
    for block, unit in zip(stage, unit_rates):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation = conv.padding = (rate * unit, rate * unit)


@register("deeplabv1")
def deeplabv1(num_classes: int, backbone: str = "small", pretrained_backbone: bool = False, frozen_bn: bool = False,
              head_channels: int = 1024, rate: int = 12, dropout: float = 0.5) -> DeepLab:
    """DeepLab v1-LargeFOV at output stride 8 (paper: ``backbone="vgg16"``, 1024 channels, rate 12)."""
    features = deeplab_backbone(backbone, 8, frozen_bn, pretrained_backbone)
    head = LargeFOVHead(features.channels["c5"], num_classes, head_channels, rate, dropout)
    return DeepLab(features, head)


@register("deeplabv2")
def deeplabv2(num_classes: int, backbone: str = "small", pretrained_backbone: bool = False, frozen_bn: bool = False,
              head_channels: int = 1024, rates: Sequence[int] = (6, 12, 18, 24), dropout: float = 0.5) -> DeepLab:
    """DeepLab v2 with ASPP-L at output stride 8 (paper: ResNet-101 or VGG-16, rates 6/12/18/24)."""
    features = deeplab_backbone(backbone, 8, frozen_bn, pretrained_backbone)
    head = SummedASPPHead(features.channels["c5"], num_classes, head_channels, rates, dropout)
    return DeepLab(features, head)


@register("deeplabv3")
def deeplabv3(num_classes: int, backbone: str = "small", output_stride: int = 16, rates: Sequence[int] | None = None,
              head_channels: int = 256, aux: bool = False, aux_weight: float = 0.5, pretrained_backbone: bool = False,
              frozen_bn: bool = False, multi_grid: Sequence[int] | None = None) -> DeepLab:
    """DeepLab v3 (paper: ResNet-101, output stride 16 for training, 8 for the best results).

    ``rates`` default to :func:`default_rates` of ``output_stride``. ``aux=True`` adds
    torchvision's auxiliary :class:`FCNHead` on ``c4``, weighted 0.5 as in torchvision's recipe.
    ``multi_grid=(1, 2, 4)`` is the paper's multi-grid in the last ResNet stage
    (:func:`apply_multi_grid`); the default ``None`` keeps torchvision's rates.
    """
    features = deeplab_backbone(backbone, output_stride, frozen_bn, pretrained_backbone)
    if multi_grid is not None:
        apply_multi_grid(features, multi_grid)
    rates = default_rates(output_stride) if rates is None else rates
    head = DeepLabV3Head(features.channels["c5"], num_classes, rates, head_channels)
    aux_head = FCNHead(features.channels["c4"], num_classes) if aux else None
    return DeepLab(features, head, aux_head, aux_weight)


@register("deeplabv3plus")
def deeplabv3plus(num_classes: int, backbone: str = "small", output_stride: int = 16,
                  rates: Sequence[int] | None = None, head_channels: int = 256, low_level_channels: int | None = None,
                  separable: bool = False, aux: bool = False, aux_weight: float = 0.4,
                  pretrained_backbone: bool = False, frozen_bn: bool = False) -> DeepLab:
    """DeepLab v3+ (paper: Xception or ResNet-101 at output stride 16, ``separable=True``).

    ``aux=True`` adds an auxiliary :class:`FCNHead` on ``c4`` (deep supervision, weighted 0.4 as in
    PSPNet). The paper has none; it matters when training from scratch on little data, where the
    decoder's stride-4 features offer a shortcut that local cues can fit before the encoder has
    learned what the objects are (the chapter measures this).

    ``low_level_channels=None`` keeps the paper's 48:256 ratio to ``head_channels`` (see
    :class:`DeepLabV3PlusHead`).
    """
    features = deeplab_backbone(backbone, output_stride, frozen_bn, pretrained_backbone)
    if "c2" not in features.channels:
        raise ValueError(f"deeplabv3plus needs stride-4 features 'c2', which backbone {backbone!r} does not give")
    rates = default_rates(output_stride) if rates is None else rates
    head = DeepLabV3PlusHead(features.channels["c5"], features.channels["c2"], num_classes, rates, head_channels,
                             low_level_channels, separable)
    aux_head = FCNHead(features.channels["c4"], num_classes) if aux else None
    return DeepLab(features, head, aux_head, aux_weight)


# --------------------------------------------------------------------------- torchvision port

# torchvision's ResNet-50 has 6 blocks in layer3, ResNet-101 has 23
_RESNET_DEPTH_BY_LAYER3 = {6: 50, 23: 101}


def _torchvision_key_renames(num_rates: int) -> list[tuple[str, str]]:
    """(torchvision prefix, minis prefix) pairs; the first that matches a key renames it."""
    pooling = f"classifier.0.convs.{num_rates + 1}."  # the image-pooling branch comes last
    return [
        ("backbone.", "backbone."),
        (pooling + "1.", f"head.aspp.branches.{num_rates + 1}.conv."),  # [0] is the pooling layer
        (pooling + "2.", f"head.aspp.branches.{num_rates + 1}.bn."),
        ("classifier.0.convs.", "head.aspp.branches."),  # 1x1 and atrous: conv [0], BN [1] in both
        ("classifier.0.project.", "head.aspp.project."),
        ("classifier.1.", "head.refine.0."),
        ("classifier.2.", "head.refine.1."),
        ("classifier.4.", "head.classifier."),
        ("aux_classifier.", "aux_head."),  # FCNHead has torchvision's layer indices
    ]


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"torchvision DeepLabV3 key {key!r} has no counterpart in minis")


@register_port("DeepLabV3")
def from_torchvision_deeplabv3(tv_model: nn.Module) -> DeepLab:
    """torchvision ``deeplabv3_resnet50/101`` -> minis ``deeplabv3`` with the same weights and outputs.

    torchvision dilates ResNet's layer3 and layer4 (output stride 8) and uses rates (12, 24, 36);
    its model takes ImageNet-normalised images, ours images in 0..1 (it normalises inside).
    """
    layer3 = getattr(tv_model.backbone, "layer3", None)
    if layer3 is None or len(layer3) not in _RESNET_DEPTH_BY_LAYER3:
        raise TypeError("minis ports torchvision DeepLabV3 on ResNet-50/101 only (not MobileNetV3)")
    aspp = tv_model.classifier[0]
    rates = tuple(branch[0].dilation[0] for branch in aspp.convs[1:-1])
    model = build(
        "deeplabv3",
        tv_model.classifier[-1].out_channels,
        backbone=f"resnet{_RESNET_DEPTH_BY_LAYER3[len(layer3)]}",
        output_stride=8,
        rates=rates,
        aux=tv_model.aux_classifier is not None,
    )
    renames = _torchvision_key_renames(len(rates))
    model.load_state_dict({_rename(key, renames): value for key, value in tv_model.state_dict().items()}, strict=True)
    return model.train(tv_model.training)


# The DeepLab/PSPNet chapter's options for DeepLab v3 and v3+ on the semantic shapes variant (a 64-channel
# head, PSPNet's deep supervision so that the three compare alike, and the small backbone's shipped
# pretrained weights, as the papers start from ImageNet's: from scratch the runs were a lottery, see
# minis/pretrain.py) and its recipe: the semantic chapters' (SEMANTIC_SHAPES_RECIPE) for 6 epochs (8 gave
# DeepLab v3+ the same mIoU, 0.897 for seed 0, in a third more time than the chapter's budget allows).
# PSPNet's are in pspnet.py.
SHAPES_OPTIONS: dict = {"head_channels": 64, "aux": True, "aux_weight": 0.4, "pretrained_backbone": True}
SHAPES_RECIPE: dict = {**SEMANTIC_SHAPES_RECIPE, "epochs": 6, "channels_last": True}
