"""CIFAR-style ResNets (He et al., 2016) with BasicBlocks: 3x3 stem, no max pool, four stages 64-128-256-512.

``resnet8`` is the small one-block-per-stage network of the CMI / DataFree model zoo; ``resnet18`` and
``resnet34`` use (2, 2, 2, 2) and (3, 4, 6, 3) blocks. Global average pooling is adaptive, so any
``image_size`` >= 1 works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + (projected) shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet.

    Args:
        num_blocks: blocks per stage (4 stages, widths 64/128/256/512, strides 1/2/2/2).
        num_classes: logits K.
        in_channels: input channels C.
        image_size: accepted for a uniform zoo signature; pooling is adaptive.

    Shape:
        x: (N, C, H, W) -> logits (N, K); with ``return_features=True`` -> (logits, features (N, F)).
    """

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"ResNet: image_size must be positive, got {image_size}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K); with ``return_features=True`` also the pooled penultimate features (N, 512):
        ``(logits, features)`` as in the DataFree model zoo."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        feat = torch.flatten(self.avgpool(out), 1)
        logits = self.linear(feat)
        return (logits, feat) if return_features else logits


def resnet8(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-8 (one BasicBlock per stage)."""
    return ResNet((1, 1, 1, 1), num_classes, in_channels, image_size)


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-18 (2, 2, 2, 2)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size)


def resnet34(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-34 (3, 4, 6, 3)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, image_size)
