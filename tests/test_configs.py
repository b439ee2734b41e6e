"""Shipped recipes (``configs/*.yaml``) and config files with the method options at the top level.

Each recipe is loaded by ``dfkd-fast synthesize --config`` and dry-run for one optimization step on a tiny
random-init teacher of the recipe's input size (num_images / batch_size 2); the manifest must record the
recipe's hyper-parameters. ``--print-config`` prints the merged configuration as YAML that loads back.
"""
from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from dfkd_fast.cli import main

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
#: one recipe per published setting named in the issue
EXPECTED = {"cmi_cifar10_wrn40_2_wrn16_1", "fastdfkd_cifar10_wrn40_2_wrn16_1_fast2",
            "fastdfkd_cifar10_wrn40_2_wrn16_1_fast5", "fastdfkd_cifar10_wrn40_2_wrn16_1_fast10",
            "deepinversion_cifar10_resnet34_resnet18", "zskd_mnist_lenet5", "zskd_cifar10_alexnet",
            "dafl_mnist_lenet5"}
TINY = "cli_models:tiny_bn_cnn"  # random init, BatchNorm and a final nn.Linear: fits every method
#: fields of SynthesizeConfig a dry run overrides (everything else comes from the recipe)
DRY = {"teacher", "num_images", "batch_size", "out", "device", "preview", "iterations", "weights"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_every_published_recipe_is_shipped():
    assert {p.stem for p in RECIPES} == EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_runs_one_step(path, tmp_path, capsys):
    recipe = yaml.safe_load(path.read_text())
    assert recipe["method"] and recipe["num_images"] >= 1000 and "opt" not in recipe  # options at the top level
    out = tmp_path / "ts"
    rc = main(["synthesize", "--config", str(path), "--teacher", TINY, "--num-images", "2", "--batch-size", "2",
               "--iterations", "1", "--out", str(out), "--device", "cpu", "--preview", "0"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "manifest.json").read_text())["meta"]
    assert meta["method"] == recipe["method"]
    assert meta["hparams"]["iterations"] == 1
    for key, value in recipe.items():
        if key in meta["hparams"] and key != "iterations":
            want = list(value) if isinstance(value, list) else value
            got = meta["hparams"][key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == want, key


def _print_config(*argv: str, capsys) -> dict:
    assert main(list(argv) + ["--print-config"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert text.startswith("# dfkd-fast ")
    return yaml.safe_load(text)


def test_print_config_merges_file_flags_and_opt_and_loads_back(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: cli_models:tiny_bn_cnn\nmethod: cmi\nnum_images: 4\nout: x\nbn: 2.0\nlr: 0.01\n"
                   "cr_T: 0.3\nopt: ['oh=0.25']\n")
    merged = _print_config("synthesize", "--config", str(cfg), "--cr-T", "0.4", capsys=capsys)
    assert merged["bn"] == 2.0 and merged["lr_g"] == 0.01 and merged["oh"] == 0.25  # top level, alias, opt:
    assert merged["cr_T"] == 0.4  # a flag beats the file
    assert merged["n_neg"] == 4096 and merged["betas"] == [0.5, 0.999] and merged["opt"] == []  # defaults shown
    assert merged["teacher"] == "cli_models:tiny_bn_cnn" and merged["batch_size"] == 64
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(merged))
    assert _print_config("synthesize", "--config", str(again), capsys=capsys) == merged
    assert not (tmp_path / "x").exists() and not pathlib.Path("x").exists()  # nothing ran


def test_print_config_on_distill(tmp_path, capsys):
    merged = _print_config("distill", "--transfer-set", "ts", "--teacher", "lenet5", "--student", "lenet5_half",
                           "--epochs", "3", capsys=capsys)
    assert merged["epochs"] == 3 and merged["transfer_set"] == "ts" and "temperature" in merged


def test_distill_online_config_takes_method_options_at_the_top_level(tmp_path, capsys):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("online: true\nmethod: fast_meta\nteacher: lenet5\nstudent: lenet5_half\nlr: 0.05\n"
                   "lr_z: 0.02\nbn: 3.0\n")
    merged = _print_config("distill", "--config", str(cfg), capsys=capsys)
    assert merged["lr"] == 0.05 and merged["lr_z"] == 0.02 and merged["bn"] == 3.0  # lr: the student's (distill)
    cfg.write_text("transfer_set: ts\nteacher: lenet5\nstudent: lenet5_half\nbn: 3.0\n")  # no method: an error
    assert main(["distill", "--config", str(cfg), "--print-config"]) == 2
    assert "'bn'" in capsys.readouterr().err


def test_unknown_top_level_key_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: cli_models:tiny_bn_cnn\nmethod: deep_inversion\nnum_images: 4\nout: x\nnz: 3\n")
    assert main(["synthesize", "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfkd-fast: error:") and "'nz'" in err and "\n" not in err
    cfg.write_text("teacher: cli_models:tiny_bn_cnn\nmethod: deep_inversion\nnum_images: 4\nout: x\nlr: abc\n")
    assert main(["synthesize", "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dfkd-fast: error:") and "deep_inversion" in err and "lr" in err and "float" in err
