"""``dfkd-fast demo --quick``: the README's first command end to end at tiny sizes (< 60 s on 2 cores)."""
from __future__ import annotations

import os

import pytest
import torch

from dfkd_fast.cli import main
from dfkd_fast.config import DemoConfig
from dfkd_fast.demo import QUICK, DemoResult, run_demo


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
    assert (out / "results.md").read_text().strip() == table.strip()
    assert os.path.getsize(out / "transfer_set" / "preview.png") > 0
    for sub in ("student_synthetic", "student_real"):
        assert os.path.getsize(out / sub / "curves.png") > 0
        assert os.path.getsize(out / sub / "student.pt") > 0
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
