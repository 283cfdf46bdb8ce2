"""ResNets for small images (CIFAR stem) and ImageNet-sized ones, with a width multiplier.

The CIFAR variant follows the CP paper's backbone: a 3x3 stride-1 stem, no max-pool, four stages
of BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50), global average pooling. ``width`` is the
number of channels of the first stage (64 in the paper); CPU presets use 16 or 32.

Example::

    encoder = resnet18(width=16)            # CIFAR stem
    features = encoder(torch.rand(8, 3, 32, 32))   # (8, encoder.feature_dim) == (8, 128)
"""

from __future__ import annotations

import torch
from torch import nn

from clpoison.errors import ClpoisonError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet trunk that maps images (N,3,H,W) to features (N, feature_dim)."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: int = 64,
                 stem: str = "cifar"):
        super().__init__()
        if width < 1:
            raise ClpoisonError(f"ResNet width must be >= 1, got {width}; use 64 for the paper's model")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ClpoisonError(f"unknown stem {stem!r}; choose 'cifar' (32x32 images) or 'imagenet'")
        stages = []
        in_planes = width
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.feature_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


_ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def build_encoder(arch: str = "resnet18", width: int = 64, stem: str = "cifar") -> ResNet:
    """Build a backbone by name: ``resnet18``, ``resnet34`` or ``resnet50``."""
    if arch not in _ARCHS:
        raise ClpoisonError(f"unknown architecture {arch!r}; choose one of {sorted(_ARCHS)}")
    block, layers = _ARCHS[arch]
    return ResNet(block, layers, width=width, stem=stem)


def resnet18(width: int = 64, stem: str = "cifar") -> ResNet:
    return build_encoder("resnet18", width, stem)


def resnet34(width: int = 64, stem: str = "cifar") -> ResNet:
    return build_encoder("resnet34", width, stem)


def resnet50(width: int = 64, stem: str = "cifar") -> ResNet:
    return build_encoder("resnet50", width, stem)
