"""Backbones and heads. Knows nothing of attacks or SSL methods."""

from clpoison.models.fuse import fuse_conv_bn
from clpoison.models.heads import Classifier, MLPHead
from clpoison.models.resnet import ResNet, build_encoder, resnet18, resnet34, resnet50

__all__ = ["Classifier", "MLPHead", "fuse_conv_bn", "ResNet", "build_encoder", "resnet18", "resnet34", "resnet50"]
