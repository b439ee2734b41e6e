"""Tiny user models for the CLI / runner / distill tests, loaded by ``module:factory`` spec (tests/ on sys.path)."""
from __future__ import annotations

from torch import nn


def tiny_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """BN-free conv net: (N, C, S, S) -> (N, K)."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, num_classes))


def tiny_student(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """Smaller BN-free student."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * (image_size // 2) ** 2, num_classes))


def tiny_bn_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """Conv net with BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def train_on_digits(net: nn.Module, image_size: int = 8, steps: int = 60, lr: float = 2e-2) -> nn.Module:
    """``net`` trained full-batch with Adam on the sklearn digits train split at ``image_size`` (a few seconds,
    deterministic given ``net``'s initialization); returned in eval mode. The tests' small real teacher."""
    import torch
    import torch.nn.functional as F

    from dfkd_fast.datasets import digits

    x, y = digits("train", image_size=image_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
