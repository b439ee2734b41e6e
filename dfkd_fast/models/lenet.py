"""LeNet-5 family: the MNIST teacher/student pair of Data Impressions / ZSKD (Nayak et al., ICML 2019).

LeNet-5: conv(5x5, 6) - ReLU - maxpool 2 - conv(5x5, 16) - ReLU - maxpool 2 - fc 120 - fc 84 - fc K.
LeNet-5-half halves the filters of each convolution (3 / 8) and keeps the fully connected widths; that is the
configuration whose parameter counts the paper reports (61,706 and 35,820 for a 1x32x32 input and 10 classes).
"""
from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling, optional BatchNorm after every conv / hidden fc layer.

    Args:
        num_classes: number of output logits K.
        in_channels: input channels C.
        image_size: input height = width (>= 14). The feature map before the classifier is adaptively
            average-pooled to 5x5, which is the identity at the native 32x32.
        widths: (conv1, conv2) filters.
        fc: hidden widths of the two fully connected layers.
        batch_norm: insert ``BatchNorm2d`` / ``BatchNorm1d`` before each ReLU (``lenet5_bn``).

    Shape:
        x: (N, C, H, W) -> logits (N, K); with ``return_features=True`` -> (logits, features (N, F)).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 widths: tuple[int, int] = (6, 16), fc: tuple[int, int] = (120, 84), batch_norm: bool = False) -> None:
        super().__init__()
        if image_size < 14:
            raise ValueError(f"LeNet5: image_size must be >= 14 (two 5x5 convs and two 2x2 pools), got {image_size}")
        c1, c2 = widths
        f1, f2 = fc

        def conv(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        def dense(fin: int, fout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(fin, fout, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(fout))
            return layers + [nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(in_channels, c1), *conv(c1, c2))
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.classifier = nn.Sequential(*dense(c2 * 25, f1), *dense(f1, f2))
        self.fc = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K); with ``return_features=True`` also the penultimate features (N, fc[1]) (the input of
        ``fc``), as the DataFree model zoo returns them: ``(logits, features)``."""
        x = self.pool(self.features(x))
        feat = self.classifier(torch.flatten(x, 1))
        out = self.fc(feat)
        return (out, feat) if return_features else out


def lenet5(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """LeNet-5 (6/16 conv filters, 120/84 fc): the ZSKD MNIST teacher."""
    return LeNet5(num_classes, in_channels, image_size)


def lenet5_half(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """LeNet-5-half (3/8 conv filters, 120/84 fc): the ZSKD MNIST student."""
    return LeNet5(num_classes, in_channels, image_size, widths=(3, 8))


def lenet5_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """LeNet-5 with BatchNorm after each conv and hidden fc layer (a teacher for BN-prior methods)."""
    return LeNet5(num_classes, in_channels, image_size, batch_norm=True)
