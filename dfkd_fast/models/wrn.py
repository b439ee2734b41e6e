"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis, 2016), the CIFAR teachers/students of CMI and FastDFKD.

Pre-activation blocks (BN-ReLU-conv), widths 16, 16k, 32k, 64k, (d - 4) / 6 blocks per group, final BN-ReLU and
adaptive average pooling. The BN layers of WRN-40-2 have 2,704 input channels in total (the CMI feature size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + (1x1 projected) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen.

    Args:
        depth: 6n + 4 (16, 28, 40, ...).
        widen: width multiplier k.
        num_classes: logits K.
        in_channels: input channels C.
        image_size: accepted for a uniform zoo signature; pooling is adaptive.
        drop_rate: dropout inside blocks (0 in the DFKD papers).

    Shape:
        x: (N, C, H, W) -> logits (N, K); with ``return_features=True`` -> (logits, features (N, F)).
    """

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet: depth must be 6n + 4 (e.g. 16, 40), got {depth}")
        if image_size < 1:
            raise ValueError(f"WideResNet: image_size must be positive, got {image_size}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(w[0], w[1], n, 1, drop_rate)
        self.block2 = self._group(w[1], w[2], n, 2, drop_rate)
        self.block3 = self._group(w[2], w[3], n, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(cin: int, cout: int, n: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                               for i in range(n)])

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K); with ``return_features=True`` also the pooled penultimate features (N, 64 k):
        ``(logits, features)`` as in the DataFree model zoo."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        feat = torch.flatten(self.avgpool(out), 1)
        logits = self.fc(feat)
        return (logits, feat) if return_features else logits


def wrn16_1(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, in_channels, image_size)


def wrn16_2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_channels, image_size)


def wrn40_1(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, in_channels, image_size)


def wrn40_2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-40-2 (the CMI / FastDFKD CIFAR teacher)."""
    return WideResNet(40, 2, num_classes, in_channels, image_size)
