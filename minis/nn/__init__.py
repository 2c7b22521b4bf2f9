"""Building blocks shared by the architectures: layers, backbones, FPN, losses."""

from minis.nn.layers import ImageNormalizer, conv_bn_relu

__all__ = ["ImageNormalizer", "conv_bn_relu"]
