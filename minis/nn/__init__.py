"""Building blocks shared by the architectures: layers, backbones, FPN, losses."""

from minis.nn.backbones import FrozenBatchNorm2d, ResNet, resnet
from minis.nn.layers import ImageNormalizer, conv_bn_relu

__all__ = ["FrozenBatchNorm2d", "ImageNormalizer", "ResNet", "conv_bn_relu", "resnet"]
