"""ResNet and VGG-16 backbones with a chosen output stride, written out so the dilation trick is visible.

A classification ResNet halves the resolution five times (output stride 32). Segmentation
wants finer maps, and DeepLab's answer (Chen et al., 2017) is to *remove* the stride of the last
one or two stages and dilate their 3x3 convolutions instead: the receptive field grows as
before, the maps stop shrinking, and the pretrained weights still fit because no weight changes
shape. Output stride 16 dilates stage 4 (``layer4``) by 2; output stride 8 dilates stage 3 by 2
and stage 4 by 4.

Parameter names follow torchvision's ``resnet18/50/101`` and ``vgg16`` exactly, so its ImageNet
weights load unchanged, and with the same weights the features are the same numbers (tests check
it). VGG-16, the backbone of FCN and DeepLab v1, gets the same treatment: its last pooling
layers stop striding and the convolutions after them are dilated (see :class:`VGG16`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

# stage -> dilation of its 3x3 convolutions for each output stride (stages 1 and 2 never change)
DILATIONS = {32: (1, 1), 16: (1, 2), 8: (2, 4)}  # (layer3, layer4)
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters: ``y = x * scale + shift``.

    Detection and segmentation batches hold one or two large images per GPU, too few for
    reliable batch statistics, so the pretrained ImageNet statistics are kept as they are.
    Same buffers (and so the same state-dict keys) as :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d has it; we do not
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # the shift is added in place to the product: one activation-sized buffer fewer per layer
        # (fewer page faults per call on the CPU), the same numbers
        return (x * scale[None, :, None, None]).add_(shift[None, :, None, None])


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34). ``[B,Cin,H,W] -> [B,C,H/s,W/s]``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, dilation: int, norm: Callable) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride, dilation)
        self.bn1 = norm(channels)
        self.conv2 = _conv3x3(channels, channels, 1, dilation)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place: no new buffer (BN's backward needs its input, not its output)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided/dilated) -> 1x1 expand, plus a shortcut (ResNet-50/101).

    The stride sits on the 3x3 convolution ("ResNet v1.5", as in torchvision).
    ``[B,Cin,H,W] -> [B,4C,H/s,W/s]``.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, dilation: int, norm: Callable) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = _conv3x3(channels, channels, stride, dilation)
        self.bn2 = norm(channels)
        self.conv3 = nn.Conv2d(channels, channels * self.expansion, 1, bias=False)
        self.bn3 = norm(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels * self.expansion, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: no new buffer (BN's backward needs its input, not its output)
        return self.relu(out)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: Callable) -> nn.Module | None:
    """A 1x1 projection when the shape changes; the identity (``None``) otherwise."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))


class ResNet(nn.Module):
    """ResNet feature extractor: ``images [B,3,H,W] -> {"c2", "c3", "c4", "c5"}``.

    ``c2`` is at stride 4 (``layer1``), ``c3`` at 8, ``c4`` at 16 and ``c5`` at 32 - or at the
    ``output_stride`` when that is 16 or 8 (``c4``/``c5`` then keep the finer size).
    ``channels`` gives each map's channel count. Images are expected normalised (see
    :class:`minis.nn.ImageNormalizer`); the model that owns the backbone does that.
    """

    def __init__(self, depth: int = 50, output_stride: int = 32, frozen_bn: bool = False, width: int = 64) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.depth, self.output_stride = depth, output_stride

        # ``width`` scales every stage (64 in the paper); a narrow ResNet is the book's CPU backbone.
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        d3, d4 = DILATIONS[output_stride]
        self.in_channels = width
        self.layer1 = self._stage(block, width, blocks[0], stride=1, dilation=1, first_dilation=1, norm=norm)
        self.layer2 = self._stage(block, 2 * width, blocks[1], stride=2, dilation=1, first_dilation=1, norm=norm)
        # A dilated stage drops its stride; its first block still sees the previous dilation
        # (the input has not been spread out yet), the following blocks the new one.
        self.layer3 = self._stage(block, 4 * width, blocks[2], stride=2 if d3 == 1 else 1, dilation=d3,
                                  first_dilation=1, norm=norm)
        self.layer4 = self._stage(block, 8 * width, blocks[3], stride=2 if d4 == 1 else 1, dilation=d4,
                                  first_dilation=d3 if d4 > 1 else 1, norm=norm)
        e = block.expansion
        self.channels = {"c2": width * e, "c3": 2 * width * e, "c4": 4 * width * e, "c5": 8 * width * e}

    def _stage(self, block, channels: int, count: int, stride: int, dilation: int, first_dilation: int,
               norm: Callable) -> nn.Sequential:
        layers = [block(self.in_channels, channels, stride, first_dilation, norm)]
        self.in_channels = channels * block.expansion
        layers += [block(self.in_channels, channels, 1, dilation, norm) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # stride 4
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def resnet(depth: int = 50, output_stride: int = 32, frozen_bn: bool = False, pretrained: bool = False) -> ResNet:
    """A :class:`ResNet`; ``pretrained=True`` loads torchvision's ImageNet weights (downloaded once).

    Raises:
        RuntimeError: the weights were asked for but cannot be downloaded (no internet); the
            message says so instead of showing urllib's traceback.
    """
    model = ResNet(depth, output_stride, frozen_bn)
    if pretrained:
        model.load_state_dict(_imagenet_state_dict(depth), strict=True)
    return model


def _imagenet_state_dict(depth: int) -> dict[str, torch.Tensor]:
    state = _download_imagenet_weights(f"resnet{depth}", f"ResNet-{depth}")
    return {key: value for key, value in state.items() if not key.startswith("fc.")}  # no classifier here


def _download_imagenet_weights(torchvision_name: str, title: str) -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 state dict of ``torchvision_name``, with a clear error offline."""
    import urllib.error

    from torchvision import models

    weights = models.get_model_weights(torchvision_name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(
            f"could not download the ImageNet weights of {title} from {weights.url} ({error}). "
            "They need internet once (then torch caches them); without it use pretrained=False."
        ) from error


# --- VGG-16 ---------------------------------------------------------------------------------
# Five stages of 3x3 convolutions (channels, how many), each closed by a 2x2 max-pool.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# Stages whose pooling keeps the size at each output stride (DeepLab v1 on VGG-16).
VGG_STRIDE_FREE_POOLS = {32: (), 16: (5,), 8: (4, 5)}
VGG_TAPS = {"pool2": "c2", "pool3": "c3", "pool4": "c4"}  # pooling output -> feature name


class VGG16(nn.Module):
    """VGG-16 (Simonyan & Zisserman, 2015) as FCN and DeepLab v1 used it: ``images -> {"c2".."c5"}``.

    ``c2`` is the output of ``pool2`` (stride 4, 128 channels), ``c3`` of ``pool3`` (stride 8,
    256), ``c4`` of ``pool4`` (stride 16, 512). With ``fc_layers=True`` (FCN), ``c5`` is the
    output of fc7 (4096 channels): the classifier's fully connected layers rewritten as
    convolutions, fc6 a 7x7 convolution over pool5 and fc7 a 1x1 convolution, so the network
    accepts any image size and outputs a map of "classifier" features instead of one vector
    (the FCN paper's central observation; see :func:`fc_to_conv`). With ``fc_layers=False``,
    ``c5`` is ``pool5`` (stride 32, 512 channels).

    ``output_stride`` 16 or 8 is DeepLab v1's VGG: pool5 (and for 8 also pool4) becomes a 3x3
    max-pool with stride 1, and every convolution after a removed stride is dilated by 2 (then
    4) so it sees the same neighbourhood of the image as before; the weights keep their shapes.

    Layer names are torchvision's (``features.0`` ... ``features.28``), so its ImageNet weights
    load by name; fc6/fc7 come from its ``classifier.0``/``classifier.3`` (see
    :func:`convert_torchvision_vgg16`). The pools round up (``ceil_mode=True``, like the Caffe
    VGG of the papers; torchvision rounds down): a map at stride ``s`` has ``ceil(H / s)`` rows,
    as in the ResNets, so a 2x upsampled map is never smaller than the finer one. With sizes
    divisible by 32 both conventions agree. VGG has no batch norm.
    """

    def __init__(self, output_stride: int = 32, fc_layers: bool = True, fc_channels: int = 4096) -> None:
        super().__init__()
        if output_stride not in VGG_STRIDE_FREE_POOLS:
            raise ValueError(f"output_stride must be one of {sorted(VGG_STRIDE_FREE_POOLS)}, got {output_stride}")
        self.output_stride = output_stride
        layers: list[nn.Module] = []
        self._taps: dict[int, str] = {}  # index in ``features`` -> name of its output
        in_channels, dilation = 3, 1
        for stage, (channels, convs) in enumerate(VGG16_STAGES, start=1):
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation),
                           nn.ReLU(inplace=True)]
                in_channels = channels
            if stage in VGG_STRIDE_FREE_POOLS[output_stride]:
                # max over a 3x3 window without shrinking; what follows is spread out to match
                layers.append(nn.MaxPool2d(3, stride=1, padding=1))
                dilation *= 2
            else:
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            self._taps[len(layers) - 1] = f"pool{stage}"
        self.features = nn.Sequential(*layers)
        self.channels = {"c2": 128, "c3": 256, "c4": 512, "c5": 512}

        self.fc6 = self.fc7 = None
        if fc_layers:
            # fc6 was a fully connected layer on the 7x7x512 pool5 map of a 224x224 image: as a
            # convolution it is a 7x7 kernel. The paper left it unpadded and padded the *image* by
            # 100 pixels instead, so that small images still gave fc6 a 7x7 window; the score maps
            # then no longer lined up with the image and had to be cropped back (FCN-8s crops its
            # maps at offsets 5, 9 and 31). Padding fc6 by 3 keeps every map aligned with the image
            # (same top-left corner) at ceil(H / stride) rows - the same numbers wherever the
            # whole window lies inside the map.
            self.fc6 = nn.Conv2d(512, fc_channels, 7, padding=3 * dilation, dilation=dilation)
            self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
            self.relu = nn.ReLU(inplace=True)
            self.dropout = nn.Dropout(0.5)
            self.channels["c5"] = fc_channels
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation (He et al. for the convolutions, N(0, 0.01) for fc6/fc7)."""
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for module in (self.fc6, self.fc7):
            if module is not None:
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images [B,3,H,W]`` (normalised) -> ``{"c2": [B,128,H/4,W/4], ..., "c5": [B,C5,H/s,W/s]}``."""
        features: dict[str, torch.Tensor] = {}
        x = images
        for index, layer in enumerate(self.features):
            x = layer(x)
            name = self._taps.get(index)
            if name in VGG_TAPS:
                features[VGG_TAPS[name]] = x
        if self.fc6 is not None:
            x = self.dropout(self.relu(self.fc6(x)))
            x = self.dropout(self.relu(self.fc7(x)))
        features["c5"] = x
        return features


def fc_to_conv(linear: nn.Linear, in_channels: int, kernel_size: int) -> nn.Conv2d:
    """The convolution that computes what ``linear`` computes on a flattened ``[C,k,k]`` map.

    A fully connected layer on a ``[B, C, k, k]`` input flattened to ``[B, C*k*k]`` is a ``k x k``
    convolution without padding evaluated at the one position where the kernel fits; on a larger
    map the same convolution slides, giving the classifier's answer at every position. The
    weight is only reshaped: ``[out, C*k*k] -> [out, C, k, k]`` (``torch.flatten`` order is
    channel, row, column - the same order as a convolution kernel).
    """
    if linear.in_features != in_channels * kernel_size**2:
        raise ValueError(f"a Linear with {linear.in_features} inputs does not take a "
                         f"{in_channels}x{kernel_size}x{kernel_size} map")
    conv = nn.Conv2d(in_channels, linear.out_features, kernel_size, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(_fc_weight_as_conv(linear.weight, in_channels, kernel_size))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def _fc_weight_as_conv(weight: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    return weight.reshape(weight.shape[0], in_channels, kernel_size, kernel_size)


def convert_torchvision_vgg16(state_dict: dict[str, torch.Tensor], fc_layers: bool = True) -> dict[str, torch.Tensor]:
    """torchvision ``vgg16`` state dict -> :class:`VGG16`'s: ``features.*`` as they are, fc6/fc7
    from ``classifier.0``/``classifier.3`` reshaped to convolution kernels, the 1000-class layer dropped."""
    converted = {key: value for key, value in state_dict.items() if key.startswith("features.")}
    if fc_layers:
        converted["fc6.weight"] = _fc_weight_as_conv(state_dict["classifier.0.weight"], 512, 7)
        converted["fc6.bias"] = state_dict["classifier.0.bias"]
        fc6_channels = state_dict["classifier.0.weight"].shape[0]
        converted["fc7.weight"] = _fc_weight_as_conv(state_dict["classifier.3.weight"], fc6_channels, 1)
        converted["fc7.bias"] = state_dict["classifier.3.bias"]
    return converted


def vgg16(output_stride: int = 32, frozen_bn: bool = False, pretrained: bool = False, fc_layers: bool = True) -> VGG16:
    """A :class:`VGG16`; ``pretrained=True`` loads torchvision's ImageNet weights (downloaded once).

    ``frozen_bn`` is accepted so that every backbone has the same signature, and ignored: VGG-16
    has no batch norm.

    Raises:
        RuntimeError: the weights were asked for but cannot be downloaded (no internet).
    """
    model = VGG16(output_stride, fc_layers)
    if pretrained:
        state = _download_imagenet_weights("vgg16", "VGG-16")
        model.load_state_dict(convert_torchvision_vgg16(state, fc_layers), strict=True)
    return model


SMALL_WIDTH = 16  # the "small" backbone: ResNet-18's layout at a quarter of its width (~0.7 M parameters)
# Its pretrained weights, which minis ships: see minis/pretrain.py for how they were made.
SMALL_PRETRAINED_PATH = Path(__file__).resolve().parent.parent / "weights" / "small_shapes.pt"
BACKBONES = ("small", "resnet18", "resnet34", "resnet50", "resnet101", "vgg16")


def small_pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The small backbone's shipped weights (``minis/weights/small_shapes.pt``), made by
    ``python -m minis pretrain``; the file also records how (``torch.load(path)["meta"]``)."""
    if not SMALL_PRETRAINED_PATH.is_file():
        raise FileNotFoundError(f"{SMALL_PRETRAINED_PATH} is missing (minis ships it); "
                                "`python -m minis pretrain` makes it again")
    return torch.load(SMALL_PRETRAINED_PATH, map_location="cpu", weights_only=True)["backbone"]


def build_backbone(name: str, output_stride: int = 32, frozen_bn: bool = False, pretrained: bool = False) -> nn.Module:
    """A backbone by name: ``images [B,3,H,W] (normalised) -> {"c2"?, "c3", "c4", "c5"}``.

    Every backbone has a ``channels`` dict (feature name -> channel count) and an
    ``output_stride`` attribute. ``"small"`` is a narrow ResNet-18 that trains from scratch on a
    laptop CPU in minutes (the book's default); with ``pretrained=True`` it loads the weights minis
    ships, pretrained on other images of the shapes world (:mod:`minis.pretrain`). The ResNets and
    VGG-16 are the papers' backbones, with ImageNet weights from torchvision when
    ``pretrained=True`` (downloaded on request). Dilation adds no parameter, so one set of
    weights loads at every output stride.
    """
    if name == "small":
        model = ResNet(18, output_stride, frozen_bn, width=SMALL_WIDTH)
        if pretrained:
            model.load_state_dict(small_pretrained_state_dict(), strict=True)
        return model
    if name.startswith("resnet") and name[len("resnet"):].isdigit():
        return resnet(int(name[len("resnet"):]), output_stride, frozen_bn, pretrained)
    if name == "vgg16":
        return vgg16(output_stride, frozen_bn, pretrained)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
