"""``dfkd-fast`` CLI: one-line errors (subprocess, no traceback), synthesize from a user factory, flags, YAML."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_models import tiny_cnn

from dfkd_fast.cli import all_flags, main
from dfkd_fast.config import TORCHRUN_OPTIONS

TESTS = os.path.dirname(os.path.abspath(__file__))
TINY = "cli_models:tiny_cnn"
BASE = ["--image-size", "1,8,8", "--num-images", "4", "--batch-size", "4", "--device", "cpu"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    env["TQDM_DISABLE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(tiny_cnn(10, 1, 8).state_dict(), path)
    return str(path)


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.setenv("TQDM_DISABLE", "1")


_DRIVER = """
import contextlib, io, json, sys
from dfkd_fast.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results[name] = [rc, err.getvalue()]
print(json.dumps(results))
"""


def test_bad_arguments_one_line_no_traceback(weights, tmp_path):
    out = str(tmp_path / "ts")
    syn = ["synthesize", *BASE]
    cases = {
        "unknown method": [*syn, "--teacher", TINY, "--weights", weights, "--method", "no_such_method", "--out", out],
        "num-classes mismatch": [*syn, "--teacher", TINY, "--weights", weights, "--num-classes", "5",
                                 "--method", "data_impressions", "--out", out],
        "missing weights": [*syn, "--teacher", TINY, "--weights", str(tmp_path / "absent.pt"),
                            "--method", "data_impressions", "--out", out],
        "BN method, BN-free teacher": [*syn, "--teacher", TINY, "--weights", weights, "--method", "deep_inversion",
                                       "--out", out],
        "malformed image size": [*syn, "--teacher", TINY, "--method", "data_impressions", "--out", out,
                                 "--image-size", "1x8"],
        "option of another method": [*syn, "--teacher", TINY, "--weights", weights, "--method", "data_impressions",
                                     "--out", out, "--bn", "3"],
        "missing required flag": [*syn, "--teacher", TINY, "--method", "data_impressions"],
        "unknown flag": [*syn, "--teacher", TINY, "--method", "data_impressions", "--out", out, "--num", "3"],
        "distill, missing transfer set": ["distill", "--transfer-set", str(tmp_path / "none"), "--teacher", TINY,
                                          "--student", TINY, "--image-size", "1,8,8", "--device", "cpu"],
    }
    expect = {"unknown method": "no_such_method", "num-classes mismatch": "num", "missing weights": "absent.pt",
              "BN method, BN-free teacher": "BatchNorm", "malformed image size": "image-size",
              "option of another method": "bn", "missing required flag": "--out", "unknown flag": "--num",
              "distill, missing transfer set": "not found"}
    # all cases through main() in one interpreter (an escaping exception would crash it with a traceback) ...
    driver = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert driver.returncode == 0 and "Traceback" not in driver.stderr, driver.stderr
    results = json.loads(driver.stdout.strip().splitlines()[-1])
    # ... and one through the real entry point
    entry = subprocess.run([sys.executable, "-m", "dfkd_fast", *cases["unknown method"]], env=_env(),
                           capture_output=True, text=True, timeout=300)
    results["entry point"] = [entry.returncode, entry.stderr]
    expect["entry point"] = "no_such_method"
    for name, (rc, stderr) in results.items():
        lines = stderr.strip().splitlines()
        assert rc != 0, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("dfkd-fast: error: "), (name, stderr)
        assert expect[name] in lines[0], (name, lines[0])
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_no_flag_is_a_torchrun_prefix():
    flags = all_flags()
    assert "--num-images" in flags and "--num-classes" in flags and "--lr-g" in flags
    clashes = [(f, t) for f in flags for t in TORCHRUN_OPTIONS if t.startswith(f)]
    assert not clashes


def test_synthesize_from_user_factory(weights, tmp_path, capsys):
    out = tmp_path / "ts"
    rc = main(["synthesize", "--teacher", TINY, "--weights", weights, "--num-classes", "10", "--image-size", "1,8,8",
               "--method", "data_impressions", "--num-images", "10", "--batch-size", "4", "--shard-size", "4",
               "--device", "cpu", "--out", str(out), "--seed", "3", "--iterations", "3", "--lr-schedule",
               "constant", "--opt", "beta=1.0,0.5", "--preview", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "images 10" in printed and "class histogram" in printed
    from dfkd_fast.transfer_set import TransferSet

    ts = TransferSet(str(out))
    assert len(ts) == 10
    manifest = json.loads((out / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "data_impressions" in text and '"iterations": 3' in text.replace("\n", "")
    assert os.path.getsize(out / "preview.png") > 0
    summary = manifest["summary"]
    assert summary["images"] == 10 and sum(summary["class_histogram"]) == 10
    assert 0.0 < summary["mean_confidence"] <= 1.0

    png = tmp_path / "png"
    assert main(["export-png", "--transfer-set", str(out), "--out", str(png)]) == 0
    files = [f for _, _, fs in os.walk(png) for f in fs if f.endswith(".png")]
    assert len(files) == 10

    capsys.readouterr()
    run = tmp_path / "distill"
    assert main(["distill", "--transfer-set", str(out), "--teacher", TINY, "--weights", weights, "--student",
                 "cli_models:tiny_student", "--image-size", "1,8,8", "--epochs", "2", "--batch-size", "4",
                 "--test-set", "digits", "--temperature", "4", "--device", "cpu", "--out", str(run)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    for name in ("student.safetensors", "checkpoint.pt", "curves.png", "metrics.jsonl"):
        assert os.path.getsize(run / name) > 0


def test_compile_and_precision_reach_the_synthesizer_and_manifest(weights, tmp_path, capsys, monkeypatch):
    import dfkd_fast.synthesis as synthesis

    seen = {}
    build = synthesis.build_synthesizer

    def spy(*a, **kw):
        seen.update(compile=kw.get("compile"), precision=kw.get("precision"))
        return build(*a, **kw)

    monkeypatch.setattr(synthesis, "build_synthesizer", spy)
    out = tmp_path / "bf16"
    argv = ["synthesize", "--teacher", TINY, "--weights", weights, *BASE, "--method", "class_impressions",
            "--iterations", "2", "--preview", "0", "--out", str(out)]
    assert main([*argv, "--precision", "bf16"]) == 0, capsys.readouterr().err
    assert seen == {"compile": "off", "precision": "bf16"}
    meta = json.loads((out / "manifest.json").read_text())["meta"]
    assert meta["precision"] == "bf16" and meta["compile"] == "off"
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "x"), "--compile", "fastest"]) != 0  # argparse choices
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"  # a YAML value is checked too, with the flag's name
    cfg.write_text("precision: fp8\n")
    assert main([*argv[:-1], str(tmp_path / "y"), "--config", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("dfkd-fast: error:") and "--precision must be one of fp32, bf16, fp16" in err


def test_yaml_config_and_override(weights, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"teacher: {TINY}\nweights: {weights}\nimage-size: 1,8,8\nmethod: class_impressions\n"
                   f"num_images: 4\nbatch_size: 4\ndevice: cpu\nout: {tmp_path / 'a'}\npreview: 0\n")
    rc = main(["synthesize", "--config", str(cfg), "--out", str(tmp_path / "b"), "--iterations", "2"])
    assert rc == 0, capsys.readouterr().err
    assert os.path.exists(tmp_path / "b" / "manifest.json") and not os.path.exists(tmp_path / "a")
    capsys.readouterr()
    cfg.write_text("teacher: [unclosed\n")
    assert main(["synthesize", "--config", str(cfg)]) != 0
    assert capsys.readouterr().err.startswith("dfkd-fast: error:")


def test_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("torch", "kd_kl_div", "bn_stat_loss", "dfkd_fast._C", "build_info.json", "data_impressions"):
        assert word in text


@pytest.fixture(scope="module")
def bn_weights(tmp_path_factory) -> str:
    from cli_models import tiny_bn_cnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wbn") / "tiny_bn.safetensors"
    from dfkd_fast.models import save_model

    save_model(tiny_bn_cnn(10, 1, 8), str(path))
    return str(path)


def _all_methods() -> list[str]:
    import dfkd_fast.synthesis as synthesis

    return synthesis.list_methods()


@pytest.mark.parametrize("method", _all_methods())
def test_every_method_synthesizes_from_cli_with_user_factory(method, bn_weights, tmp_path, capsys):
    """Every registered method runs end to end from the CLI on a user `module:factory` teacher (with BN) and a
    user student (needed by zskt, used by the adversarial terms of the others)."""
    out = tmp_path / method
    argv = ["synthesize", "--teacher", "cli_models:tiny_bn_cnn", "--weights", bn_weights, "--method", method,
            "--out", str(out), "--image-size", "1,8,8", "--num-images", "6", "--batch-size", "3", "--device", "cpu",
            "--iterations", "2", "--preview", "0", "--student", "cli_models:tiny_student"]
    if method in ("cmi", "fast_meta", "dafl", "zskt", "dfq"):
        argv += ["--nz", "8", "--ngf", "4"]
    if method == "impression_space":  # imitates given images: a folder of PNGs
        from PIL import Image

        ref = tmp_path / "ref"
        ref.mkdir()
        for i in range(3):
            Image.fromarray((torch.rand(8, 8) * 255).byte().numpy(), mode="L").save(ref / f"{i}.png")
        argv += ["--reference-images", str(ref)]
    assert main(argv) == 0, capsys.readouterr().err
    from dfkd_fast.transfer_set import TransferSet

    ts = TransferSet(str(out), verify=True)
    assert len(ts) == 6
    img = ts[0][0]
    assert img.shape == (1, 8, 8) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert json.loads((out / "manifest.json").read_text())["meta"]["method"] == method


def test_student_weights_without_student_is_an_error(bn_weights, tmp_path, capsys):
    rc = main(["synthesize", "--teacher", "cli_models:tiny_bn_cnn", "--weights", bn_weights, "--method", "zskt",
               "--out", str(tmp_path / "o"), *BASE, "--student-weights", bn_weights])
    assert rc != 0
    assert "--student-weights needs --student" in capsys.readouterr().err


def test_impression_space_needs_reference_images(bn_weights, tmp_path, capsys):
    rc = main(["synthesize", "--teacher", "cli_models:tiny_bn_cnn", "--weights", bn_weights, "--method",
               "impression_space", "--out", str(tmp_path / "o"), *BASE])
    assert rc != 0
    assert "--reference-images" in capsys.readouterr().err
