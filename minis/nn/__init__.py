"""Building blocks shared by the architectures: layers, backbones, FPN, losses."""

from minis.nn.backbones import FrozenBatchNorm2d, ResNet, build_backbone, resnet
from minis.nn.layers import ImageNormalizer, conv_bn_relu
from minis.nn.segmentation import IGNORE_INDEX, FCNHead, resize_to, semantic_losses

__all__ = ["IGNORE_INDEX", "FCNHead", "FrozenBatchNorm2d", "ImageNormalizer", "ResNet", "build_backbone",
           "conv_bn_relu", "resize_to", "resnet", "semantic_losses"]
