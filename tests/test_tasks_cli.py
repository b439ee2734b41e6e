"""Each task subcommand runs end to end on a tiny setup (16x16 digits, a LeNet-5 saved by the test)."""
from __future__ import annotations

import json
import os

import pytest
from tasks_helpers import tiny_model

from dfkd_fast.cli import main
from dfkd_fast.models import save_model

COMMON = ["--teacher", "lenet5", "--dataset", "digits", "--image-size", "16", "--num-images", "60",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "lenet5_digits16.safetensors"
    save_model(tiny_model(), path)
    return str(path)


@pytest.mark.parametrize("argv", [
    ["robustness", "--attacks", "fgsm,pgd", "--eps", "0.1", "--steps", "2"],
    ["uap", "--num-impressions", "40", "--iterations", "5", "--epochs", "1"],
    ["class-incremental", "--epochs", "1", "--num-impressions", "20", "--iterations", "5"],
    ["impression", "--mode", "select", "--top-k", "10", "--num-source", "3"],
])
def test_task_subcommands(argv, weights, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(argv + COMMON + ["--weights", weights, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "result" in printed
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f)["config"]["dataset"] == "digits"


def test_uda_subcommand(weights, tmp_path, capsys):
    out = str(tmp_path / "uda")
    argv = ["uda", "--direction", "digits->mnist", "--num-impressions", "20", "--iterations", "5", "--steps", "3"]
    assert main(argv + COMMON + ["--weights", weights, "--out", out]) == 0
    assert "source-only" in capsys.readouterr().out


def test_task_subcommand_errors(weights, tmp_path, capsys):
    assert main(["robustness", "--attacks", "cw"] + COMMON + ["--weights", weights]) == 2
    assert "--attacks" in capsys.readouterr().err
    assert main(["uda", "--direction", "a->b"] + COMMON + ["--weights", weights]) == 2
    assert main(["robustness", "--dataset", "cifar", "--weights", weights]) == 2
