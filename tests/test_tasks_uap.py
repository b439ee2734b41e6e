"""Data-free universal adversarial perturbations (dfkd_fast.tasks.uap)."""
from __future__ import annotations

import os

import pytest
import torch
from tasks_helpers import data, tiny_model

from dfkd_fast.tasks._common import synthesize_impressions
from dfkd_fast.tasks.uap import UAPGenerator, fooling_rate, uap


def test_fooling_rate_is_the_label_change_fraction():
    """fooling_rate on a hand-built case: a model that predicts argmax of the mean pixel over 2 classes."""

    class Half(torch.nn.Module):  # class 1 if the mean pixel > 0.5 else class 0
        def forward(self, x):
            m = x.flatten(1).mean(1)
            return torch.stack([0.5 - m, m - 0.5], 1)

    x = torch.tensor([0.1, 0.3, 0.45, 0.48, 0.6, 0.9]).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    delta = torch.full((1, 2, 2), 0.04)  # pushes 0.48 over 0.5 only; 0.9 + 0.04 stays in [0, 1] and class 1
    assert fooling_rate(Half(), x, delta) == pytest.approx(1 / 6)
    assert fooling_rate(Half(), x, torch.full((1, 2, 2), 0.25)) == pytest.approx(3 / 6)  # 0.3, 0.45, 0.48 flip
    assert fooling_rate(Half(), x, torch.full((1, 2, 2), -0.5)) == pytest.approx(2 / 6)  # 0.6, 0.9 flip (clamped)


def test_generator_shape_and_budget():
    for size in (16, 28, 32):
        g = UAPGenerator(nz=10, ngf=8, image_size=size, nc=1, eps=0.04)
        with torch.no_grad():
            d = g(torch.rand(3, 10) * 2 - 1)
        assert d.shape == (3, 1, size, size) and float(d.abs().max()) <= 0.04


def test_uap_from_impressions_beats_random_noise(tmp_path):
    model = tiny_model()
    # U[0, 1] init (the published one): with the dim default (0.1) this tiny model's UAP fooled 7% vs 5% random
    # (12% vs 5% at 1.0), too close to test the UAP mechanism reliably
    imp, _, _ = synthesize_impressions(model, 160, (1, 16, 16), iterations=60, batch_size=80, seed=0, init_scale=1.0)
    x, _ = data(n=200)
    r = uap(model, imp, x, eps=0.15, epochs=4, ngf=16, lr=1e-2, seed=0, out_png=tmp_path / "uap.png")
    assert r.linf_norm <= 0.15 + 1e-6
    assert r.fooling_rate > r.random_fooling_rate + 0.05
    assert os.path.getsize(r.path) > 0
    # the reported rate is the plain label-change fraction over all images, recomputed here by hand
    with torch.no_grad():
        changed = model(x).argmax(1) != model((x + r.perturbation).clamp(0, 1)).argmax(1)
    assert r.fooling_rate == pytest.approx(float(changed.float().mean()))
    assert r.transfer_fooling_rate == pytest.approx(
        float((model(imp).argmax(1) != model((imp + r.perturbation).clamp(0, 1)).argmax(1)).float().mean()))


def test_uap_bad_input():
    model = tiny_model()
    x, _ = data(n=8)
    with pytest.raises(ValueError, match="empty"):
        uap(model, x[:0], x)
    with pytest.raises(ValueError, match="at least 2"):
        uap(model, x[:1], x)
    with pytest.raises(ValueError, match="same size"):
        uap(model, x, torch.rand(4, 1, 20, 20))
    with pytest.raises(ValueError, match="eps"):
        UAPGenerator(eps=0.0)
