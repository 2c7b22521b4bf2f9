"""Building blocks shared by the architectures: layers, backbones, FPN, losses."""

from minis.nn.backbones import (VGG16, FrozenBatchNorm2d, ResNet, build_backbone, convert_torchvision_vgg16, fc_to_conv,
                                resnet, vgg16)
from minis.nn.layers import (ImageNormalizer, PooledBatchNorm2d, bilinear_upsampling, bilinear_upsampling_weight,
                             conv_bn_relu)
from minis.nn.segmentation import (IGNORE_INDEX, SEMANTIC_SHAPES_RECIPE, BackboneHeadModel, FCNHead, SemanticModel,
                                   median_frequency_weights, resize_to, semantic_losses)

__all__ = ["IGNORE_INDEX", "SEMANTIC_SHAPES_RECIPE", "BackboneHeadModel", "FCNHead", "FrozenBatchNorm2d", "ImageNormalizer", "PooledBatchNorm2d",
           "ResNet", "SemanticModel", "VGG16", "bilinear_upsampling", "bilinear_upsampling_weight", "build_backbone",
           "conv_bn_relu", "convert_torchvision_vgg16", "fc_to_conv", "median_frequency_weights", "resize_to", "resnet", "semantic_losses", "vgg16"]
