"""Impression-Space translation, selection and one-shot synthesis (dfkd_fast.tasks.impression)."""
from __future__ import annotations

import os

import pytest
import torch
from tasks_helpers import data, tiny_model

from dfkd_fast.tasks.impression import distill_on_selection, impression_select, impression_translate, one_shot


def test_select_ranks_same_class_first():
    model = tiny_model()
    pool, pool_y = data("digits", "test")
    lab_x, lab_y = data("digits", "train")
    hits = []
    for c in range(10):
        r = impression_select(pool, lab_x[lab_y == c][:5], model, k=20)
        assert r.indices.shape == (20,) and r.distances.shape == (len(pool),)
        assert torch.all(r.distances[r.indices].diff() >= 0)
        hits.append(float((pool_y[r.indices] == c).float().mean()))
    assert sum(hits) / 10 > 0.3  # chance is 0.1


def test_distill_on_selection_runs():
    from dfkd_fast.models import build_model

    teacher = tiny_model()
    pool, _ = data("digits", "test", 100)
    sel = impression_select(pool, pool[:5], teacher, k=40)
    res = distill_on_selection(build_model("lenet5_half", 10, 1, 16), teacher, pool, sel, epochs=1, lr=0.01,
                               batch_size=20)
    assert res.images == 40


def test_translate_reduces_impression_distance(tmp_path):
    model = tiny_model()
    xs, _ = data("mnist", "test", 16)
    xt, _ = data("digits", "test", 64)
    r = impression_translate(xs, xt, model, lam=1.0, steps=30, out_dir=tmp_path)
    assert r.images.shape == xs.shape
    assert r.distance_after < 0.7 * r.distance_before
    assert all(os.path.isfile(p) for p in r.paths.values())


def test_one_shot_varied_images(tmp_path):
    model = tiny_model()
    x, _ = data("digits", "test", 1)
    r = one_shot(x[0], model, n=4, steps=30, lr=0.05, padding=2, out_dir=tmp_path)
    assert r.images.shape == (4, 1, 16, 16)
    assert sum(r.losses[-5:]) < 0.7 * sum(r.losses[:5])  # noisy per step (random crops): compare windows
    assert float((r.images[0] - r.images[1]).abs().mean()) > 1e-3  # varied
    assert os.path.isfile(r.paths["samples"])


def test_bad_input():
    model = tiny_model()
    x, _ = data(n=4)
    with pytest.raises(ValueError, match="same"):
        impression_select(x, torch.rand(2, 1, 20, 20), model, k=2)
    with pytest.raises(ValueError, match="k must be"):
        impression_select(x, x, model, k=10)
    with pytest.raises(ValueError, match="empty"):
        impression_translate(x[:0], x, model)
    with pytest.raises(ValueError, match="same"):
        impression_translate(x, torch.rand(2, 1, 20, 20), model)
    with pytest.raises(ValueError, match="exactly one"):
        one_shot(x, model)
