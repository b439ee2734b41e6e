"""Data Impressions robustness experiment (paper Table 4): ``dfkd-fast robust-distill`` end to end, tiny setup."""
from __future__ import annotations

import json
import os

import pytest
import torch
from tasks_helpers import SIZE, tiny_model

from dfkd_fast.cli import main
from dfkd_fast.datasets import digits
from dfkd_fast.models import load_model, save_model
from dfkd_fast.tasks.robustness import ATTACKS, ROBUST_DISTILL_MODELS, robust_distill, robustness

EPS, STEPS, N_TEST = 0.2, 5, 200
ARGV = ["robust-distill", "--teacher", "lenet5", "--student", "lenet5_half", "--dataset", "digits",
        "--image-size", str(SIZE), "--num-images", str(N_TEST), "--device", "cpu", "--eps", str(EPS),
        "--steps", str(STEPS), "--adv-train-epochs", "5", "--adv-train-steps", "3", "--num-impressions", "400",
        "--iterations", "100", "--kd-epochs", "40"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """One CLI run (about 5 s on one core): the result.json, the output folder and the natural teacher."""
    root = tmp_path_factory.mktemp("robust_distill")
    weights = str(root / "teacher.safetensors")
    save_model(tiny_model(), weights)
    out = str(root / "out")
    assert main(ARGV + ["--weights", weights, "--out", out]) == 0
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f), out, weights


def _test_set():
    x, y = digits("test", image_size=SIZE)
    return x[:N_TEST], y[:N_TEST]


def test_table_has_four_models_by_three_attacks(run, capsys):
    res, out, _ = run
    assert [r["model"] for r in res["rows"]] == list(ROBUST_DISTILL_MODELS)
    assert res["attacks"] == list(ATTACKS) and res["num_images"] == N_TEST
    for r in res["rows"]:
        for key in ["natural_acc"] + [f"{a}_{m}" for a in ATTACKS for m in ("acc", "fooling_rate")]:
            assert 0.0 <= r[key] <= 1.0, (r["model"], key, r[key])
            # accuracies on N_TEST images are multiples of 1/N_TEST
            assert abs(r[key] * N_TEST - round(r[key] * N_TEST)) < 1e-3
    with open(os.path.join(out, "robust_distill.md")) as f:
        md = f.read()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and all(line.count("|") == 2 + 1 + 2 * len(ATTACKS) for line in table)
    for label in ROBUST_DISTILL_MODELS.values():
        assert label in md


def test_values_are_the_real_attacks(run):
    res, out, weights = run
    rows = {r["model"]: r for r in res["rows"]}
    x, y = _test_set()
    nat = rows["teacher"]
    # a large eps: iterative attacks are at least as strong as one FGSM step, which hurts the clean accuracy
    assert nat["pgd_acc"] <= nat["fgsm_acc"] < nat["natural_acc"] - 0.3
    assert nat["ifgsm_acc"] <= nat["fgsm_acc"]
    # recomputed with the real attacks on the saved models: the same numbers
    teacher = load_model("lenet5", weights, 10, 1, SIZE).eval()
    for key, model in [("teacher", teacher),
                       ("robust_student", load_model("lenet5_half", os.path.join(out, "robust_student.safetensors"),
                                                     10, 1, SIZE).eval())]:
        r = robustness(model, x, y, "fgsm", EPS, STEPS)
        assert r.natural_acc == pytest.approx(rows[key]["natural_acc"])
        assert r.adversarial_acc == pytest.approx(rows[key]["fgsm_acc"])
        assert r.fooling_rate == pytest.approx(rows[key]["fgsm_fooling_rate"])
    # PGD training worked and the students learned from the impressions alone (chance: 0.1)
    assert rows["robust_teacher"]["pgd_acc"] > nat["pgd_acc"] + 0.03
    assert rows["student"]["natural_acc"] > 0.25 and rows["robust_student"]["natural_acc"] > 0.2
    assert res["student_kd_loss"]["student"] > 0


def test_bad_arguments(tmp_path, capsys):
    weights = str(tmp_path / "t.safetensors")
    save_model(tiny_model(), weights)
    common = ["--dataset", "digits", "--image-size", str(SIZE), "--weights", weights, "--out", str(tmp_path)]
    assert main(["robust-distill", "--attacks", "cw"] + common) == 2
    assert "--attacks" in capsys.readouterr().err
    assert main(["robust-distill", "--robust-weights", str(tmp_path / "missing.safetensors")] + common) == 2
    assert "--robust-weights" in capsys.readouterr().err
    x, y = _test_set()
    with pytest.raises(ValueError, match="train_data"):
        robust_distill(tiny_model(), lambda: torch.nn.Linear(1, 1), None, (x, y))


def test_given_robust_teacher_is_used_as_is():
    """With ``robust_teacher`` no adversarial training runs (no training data needed): here the "robust" teacher
    is the natural one, so both teacher rows and both student rows are identical."""
    import copy

    from dfkd_fast.models import build_model

    teacher = tiny_model()
    r = robust_distill(teacher, lambda: build_model("lenet5_half", 10, 1, SIZE), None, _test_set(),
                       robust_teacher=copy.deepcopy(teacher), attacks=("fgsm", "pgd"), eps=EPS, steps=2,
                       num_impressions=40, impression_iterations=5, kd_epochs=1)
    assert r.seconds["adv_train"] == 0.0 and r.attacks == ("fgsm", "pgd")
    strip = lambda row: {k: v for k, v in row.items() if k not in ("model", "label")}  # noqa: E731
    assert strip(r.row("teacher")) == strip(r.row("robust_teacher"))
    assert strip(r.row("student")) == strip(r.row("robust_student"))
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored after KD froze them
    assert "| PGD acc % | PGD F.R. % |" in r.table() and "iFGSM acc" not in r.table()
