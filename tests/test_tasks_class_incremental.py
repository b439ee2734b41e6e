"""Exemplar-free class-incremental learning (dfkd_fast.tasks.class_incremental)."""
from __future__ import annotations

import pytest
import torch
from tasks_helpers import data

from dfkd_fast.models import build_model
from dfkd_fast.tasks.class_incremental import class_incremental, grow_classifier


def test_data_impressions_keep_old_classes_better_than_finetuning():
    x, y = data("digits", "train")
    xt, yt = data("digits", "test")
    r = class_incremental(x, y, xt, yt, epochs_old=8, epochs_new=8, epochs_combined=8, lr=5e-3, max_shift=0,
                          num_impressions=200, impression_iterations=80, seed=0)
    assert set(r.rows) == {"finetune", "lwf", "data_impressions"}
    assert r.step1.old_acc > 0.85
    di, ft = r.rows["data_impressions"], r.rows["finetune"]
    assert di.old_acc > ft.old_acc + 0.3
    assert di.all_acc > ft.all_acc
    assert r.num_impressions == 200
    assert "data_impressions" in r.table()


def test_grow_classifier_keeps_old_logits():
    m = build_model("lenet5", 5, 1, 16).eval()
    g = grow_classifier(m, 3).eval()
    x = torch.rand(4, 1, 16, 16)
    out = g(x)
    assert out.shape == (4, 8)
    torch.testing.assert_close(out[:, :5], m(x))


def test_bad_class_sets():
    x, y = data("digits", "test")
    with pytest.raises(ValueError, match="overlap"):
        class_incremental(x, y, x, y, old_classes=(0, 1), new_classes=(1, 2))
    with pytest.raises(ValueError, match="no images"):
        class_incremental(x, y, x, y, old_classes=(0, 1), new_classes=(2, 11))
    with pytest.raises(ValueError, match="3 outputs but 2 old_classes"):
        class_incremental(x, y, x, y, old_classes=(0, 1), new_classes=(2, 3), old_model=build_model("lenet5", 3, 1, 16))
    with pytest.raises(ValueError, match="methods"):
        class_incremental(x, y, x, y, methods=("icarl",))
