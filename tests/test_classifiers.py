"""dfkd_fast.classifiers: the one normalization, accuracy and penultimate-feature tap every module uses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_fast.classifiers import PenultimateTap, accuracy, normalize, normalizer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


@pytest.mark.parametrize("mean,std", [(None, None), ((0.5,), (0.25,)), ((0.1, 0.2, 0.3), (0.5, 1.0, 2.0))])
def test_normalizer_and_normalize_agree(mean, std):  # identity, one value for all channels, per channel
    x = torch.rand(2, 3, 4, 4)
    want = x.clone()
    if mean is not None:
        want = (want - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(normalizer(mean, std, 3)(x), want)
    torch.testing.assert_close(normalize(x, mean, std), want)


def test_normalizer_errors():
    with pytest.raises(ValueError, match="mean must have 1 or 3 values"):
        normalizer((0.1, 0.2), None, 3)
    with pytest.raises(ValueError, match="std must be > 0"):
        normalizer(None, (1.0, 0.0, 1.0), 3)


def test_accuracy_matches_a_direct_count_and_restores_mode():
    net = _net().train()
    x, y = torch.rand(37, 3, 6, 6), torch.randint(0, 5, (37,))  # 37: not a multiple of the batch size
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    with torch.no_grad():
        net.eval()
        want = float((net(normalize(x, mean, std)).argmax(1) == y).float().mean())
        net.train()
    assert accuracy(net, x, y, mean, std, batch_size=8) == pytest.approx(want)
    assert net.training
    u8 = (x * 255).round().to(torch.uint8)  # uint8 images are scaled to [0, 1]
    assert accuracy(net, u8, y) == accuracy(net, u8.float() / 255, y)
    with pytest.raises(ValueError, match="same length"):
        accuracy(net, x, y[:3])
    with pytest.raises(ValueError, match="empty"):
        accuracy(net, x[:0], y[:0])


def test_penultimate_tap():
    net = _net()
    with PenultimateTap(net) as tap:
        out = net(torch.rand(2, 3, 6, 6))
        assert tap.features is not None and tap.features.shape == (2, 4)
        torch.testing.assert_close(net[-1](tap.features), out)
        assert tap.pop().shape == (2, 4) and tap.features is None
        with pytest.raises(RuntimeError, match="no features captured"):
            tap.pop()
    net(torch.rand(3, 3, 6, 6))
    assert tap.features is None  # removed: no longer captures
    with pytest.raises(ValueError, match="dafl: the activation term"):
        PenultimateTap(nn.Sequential(nn.Conv2d(3, 2, 1)), method="dafl")
