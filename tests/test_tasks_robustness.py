"""Attacks, fooling rate and PGD adversarial training (dfkd_fast.tasks.robustness)."""
from __future__ import annotations

import copy

import pytest
import torch
from tasks_helpers import data, tiny_model

from dfkd_fast.tasks.robustness import NormalizedModel, adversarial_train, attack, fgsm, pgd, robustness


def test_pgd_beats_fgsm_at_same_eps():
    model = tiny_model()
    x, y = data(n=200)
    r_fgsm = robustness(model, x, y, "fgsm", eps=0.1)
    r_pgd = robustness(model, x, y, "pgd", eps=0.1, steps=10)
    r_i = robustness(model, x, y, "ifgsm", eps=0.1, steps=10)
    assert r_fgsm.natural_acc == r_pgd.natural_acc > 0.75
    assert r_pgd.adversarial_acc < r_fgsm.adversarial_acc < r_fgsm.natural_acc
    assert r_i.adversarial_acc < r_fgsm.natural_acc
    assert r_pgd.fooling_rate > r_fgsm.fooling_rate > 0.0


def test_attack_respects_ball_box_and_normalization():
    model = tiny_model()
    x, y = data()
    x, y = x[:40], y[:40]
    eps = 0.05
    for method in ("fgsm", "ifgsm", "pgd"):
        xa = attack(model, x, y, method, eps, steps=3)
        assert float((xa - x).abs().max()) <= eps + 1e-6
        assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    # with mean/std given, the attack acts on raw pixels of the wrapped model: same result as pre-wrapping
    mean, std = [0.5], [0.25]
    inner = copy.deepcopy(model)
    wrapped = NormalizedModel(inner, mean, std)
    a = fgsm(inner, x, y, eps, mean=mean, std=std)
    b = fgsm(wrapped, x, y, eps)
    assert torch.equal(a, b)


def test_fooling_rate_counts_every_changed_prediction():
    """The paper's fooling rate (Table 4): every sample whose prediction changed, correct or not, over all N.

    At eps 0.1 some misclassified images change their (wrong) label, so this differs both from "changed among the
    correct ones" and from "wrong after the attack" (1 - adversarial accuracy).
    """
    model = tiny_model()
    x, y = data(n=200)
    eps = 0.1
    xa = attack(model, x, y, "fgsm", eps)
    with torch.no_grad():
        p_clean, p_adv = model(x).argmax(1), model(xa).argmax(1)
    changed, correct = p_adv != p_clean, p_clean == y
    assert int((changed & ~correct).sum()) >= 1  # the definitions really differ at this eps
    r = robustness(model, x, y, "fgsm", eps)
    assert r.fooling_rate == pytest.approx(float(changed.float().mean()))
    assert r.fooling_rate != pytest.approx(float((changed & correct).sum() / correct.sum()))
    assert r.fooling_rate != pytest.approx(1.0 - r.adversarial_acc)
    # on the misclassified images alone the rate is the fraction of them whose label changed (not nan, not 0)
    wrong = ~correct
    r_wrong = robustness(model, x[wrong], y[wrong], "fgsm", eps)
    assert r_wrong.natural_acc == 0.0
    assert r_wrong.fooling_rate == pytest.approx(float(changed[wrong].float().mean())) and r_wrong.fooling_rate > 0
    r0 = robustness(model, x, y, "pgd", eps=0.0, steps=2)
    assert r0.fooling_rate == 0.0 and r0.adversarial_acc == r0.natural_acc


def test_adversarial_training_improves_pgd_accuracy():
    model = tiny_model()
    x, y = data("digits", "train", 600)
    xt, yt = data(n=200)
    before = robustness(model, xt, yt, "pgd", eps=0.1, steps=5, seed=1).adversarial_acc
    robust = copy.deepcopy(model)
    hist = adversarial_train(robust, x, y, eps=0.1, steps=3, epochs=3, lr=2e-3, clean_weight=0.5, seed=0)
    after = robustness(robust, xt, yt, "pgd", eps=0.1, steps=5, seed=1)
    assert len(hist.loss) == 3
    assert after.adversarial_acc > before + 0.05
    assert after.natural_acc > 0.6


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -0.1}, "eps"),
    ({"eps": 0.1, "steps": 0}, "steps"),
])
def test_bad_attack_args(kwargs, match):
    model = tiny_model()
    x, y = data()
    with pytest.raises(ValueError, match=match):
        pgd(model, x[:4], y[:4], **kwargs)


def test_bad_inputs():
    model = tiny_model()
    x, y = data()
    with pytest.raises(ValueError, match="one per image"):
        robustness(model, x[:4], y[:3], "fgsm", 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robustness(model, x[:4] * 5, y[:4], "fgsm", 0.1)
    with pytest.raises(ValueError, match="empty"):
        robustness(model, x[:0], y[:0], "fgsm", 0.1)
    with pytest.raises(ValueError, match="attack"):
        robustness(model, x[:4], y[:4], "cw", 0.1)
    with pytest.raises(ValueError, match="labels must be in"):
        robustness(model, x[:4], y[:4] + 20, "fgsm", 0.1)
