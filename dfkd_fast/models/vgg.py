"""VGG-11 with BatchNorm (Simonyan & Zisserman, 2015), CIFAR style: 8 convs, 5 max pools, one linear classifier.

Pools use ``ceil_mode=True`` and the head pools adaptively to 1x1, so inputs smaller than 32x32 also work
(identical to the usual CIFAR VGG at 32x32).
"""
from __future__ import annotations

import torch
from torch import nn

_CFG_11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm.

    Args:
        cfg: conv widths with ``"M"`` for 2x2 max pooling.
        num_classes: logits K.
        in_channels: input channels C.
        image_size: accepted for a uniform zoo signature; pooling is adaptive.

    Shape:
        x: (N, C, H, W) -> logits (N, K); with ``return_features=True`` -> (logits, features (N, F)).
    """

    def __init__(self, cfg: tuple[int | str, ...] = _CFG_11, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"VGG: image_size must be positive, got {image_size}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K); with ``return_features=True`` also the pooled penultimate features (N, 512):
        ``(logits, features)`` as in the DataFree model zoo."""
        feat = torch.flatten(self.avgpool(self.features(x)), 1)
        logits = self.classifier(feat)
        return (logits, feat) if return_features else logits


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    """VGG-11-BN."""
    return VGG(_CFG_11, num_classes, in_channels, image_size)
