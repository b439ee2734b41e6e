"""``dfkd-fast demo --quick``: the README's first command end to end at tiny sizes (< 60 s on 2 cores)."""
from __future__ import annotations

import os

import pytest
import torch

from dfkd_fast.cli import main
from dfkd_fast.config import DemoConfig
from dfkd_fast.demo import QUICK, DemoResult, ratio_verdict, run_demo


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_quick_cli(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    rc = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    for word in ("teacher LeNet-5", "KD on the real 4,000", "Data Impressions (data-free)", "images/s"):
        assert word in table
    assert "SPEC" not in table
    assert (out / "results.md").read_text().strip() == table.strip()
    assert os.path.getsize(out / "transfer_set" / "preview.png") > 0
    for sub in ("student_synthetic", "student_real"):
        assert os.path.getsize(out / sub / "curves.png") > 0
        assert os.path.getsize(out / sub / "student.safetensors") > 0
    assert any(f.endswith(".safetensors") for f in os.listdir(cache))  # the teacher was cached

    # second run: the teacher comes from the cache (fast), the result type carries the numbers
    res = run_demo(DemoConfig(out=str(tmp_path / "again"), cache_dir=str(cache), device="cpu", quick=True),
                   progress=False)
    assert isinstance(res, DemoResult)
    assert res.num_images == QUICK["num_images"]
    assert res.teacher_acc > 0.5  # one epoch on 4,000 real images
    assert 0.0 <= res.student_synthetic_acc <= 1.0 and 0.0 <= res.student_real_acc <= 1.0
    assert res.seconds["teacher"] < res.seconds["total"] and res.synthesis_images_per_s > 0


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--num-images", "0"]) != 0
    assert capsys.readouterr().err.startswith("dfkd-fast: error:")


def _claims_met(text: str) -> bool:
    return " met" in text.replace("not met", "")


def test_table_never_claims_the_target_met_with_a_student_at_chance():
    both_at_chance = DemoResult(teacher_acc=0.95, student_real_acc=0.1135, student_synthetic_acc=0.1135,
                                synthesis_images_per_s=1.0, num_images=40).table()
    assert not _claims_met(both_at_chance) and "chance level" in both_at_chance and "SPEC" not in both_at_chance
    assert "data-free and real-data students are at chance" in both_at_chance
    synthetic_at_chance = ratio_verdict(0.15, 0.97)
    assert not _claims_met(synthetic_at_chance) and "data-free student is at chance" in synthetic_at_chance
    assert _claims_met(ratio_verdict(0.968, 0.97)) and "0.9979" in ratio_verdict(0.968, 0.97)
    assert not _claims_met(ratio_verdict(0.90, 0.97))
    assert not _claims_met(ratio_verdict(0.34, 0.34, num_classes=4))  # below 1/4 + 0.1: at chance for K = 4
