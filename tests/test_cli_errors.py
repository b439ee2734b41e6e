"""Issue 12: every bad invocation of ``dfkd-fast`` ends with exactly ONE stderr line that names what to change
(the flag, the key or the file), exit status 2 (130 for Ctrl-C), never a Python traceback.

All cases run in-process through :func:`dfkd_fast.cli.main` (an exception escaping ``main`` fails the test).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from cli_models import tiny_cnn

from dfkd_fast.cli import main

TESTS = os.path.dirname(os.path.abspath(__file__))
TINY = "cli_models:tiny_cnn"
M = "cli_errors_models"  # the module of bad user factories written by the fixture below

_BAD_MODELS = '''
import torch
from torch import nn
from cli_models import tiny_cnn


def needs_arg(depth):  # not callable with the offered keywords: TypeError on the call
    return tiny_cnn()


def divides(num_classes=10):
    return tiny_cnn(num_classes // 0)


def refuses(num_classes=10):
    raise ValueError("this factory only builds 7-class models")


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_cnn(10, 1, 8)

    def forward(self, x):
        return self.net(x), x


def returns_tuple(num_classes=10):
    return _Tuple()


class _Unsqueezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_cnn(10, 1, 8)

    def forward(self, x):
        return self.net(x).unsqueeze(1)  # (N, 1, 10)


def unsqueezed(num_classes=10):
    return _Unsqueezed()


def five_way(num_classes=10, in_channels=1, image_size=8):
    return tiny_cnn(5, in_channels, image_size)  # ignores num_classes: the wrong width
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Weights, user modules (one with a SyntaxError) and a finished 4-image transfer set to resume."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / f"{M}.py").write_text(_BAD_MODELS)
    (root / "cli_errors_syntax.py").write_text("def broken(:\n    pass\n")
    torch.manual_seed(0)
    w = root / "tiny.pt"
    torch.save(tiny_cnn(10, 1, 8).state_dict(), w)
    w2 = root / "tiny2.pt"
    torch.save(tiny_cnn(10, 1, 8).state_dict(), w2)
    nan = root / "nan.pt"
    torch.save({k: torch.full_like(v, float("nan")) for k, v in tiny_cnn(10, 1, 8).state_dict().items()}, nan)
    return {"root": root, "w": str(w), "w2": str(w2), "nan": str(nan)}


@pytest.fixture(autouse=True)
def _paths(monkeypatch, env):
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.syspath_prepend(str(env["root"]))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("DFKD_FAST_DEBUG", raising=False)


def _syn(env, out, *extra):
    return ["synthesize", "--teacher", TINY, "--weights", env["w"], "--image-size", "1,8,8", "--num-images", "4",
            "--batch-size", "4", "--device", "cpu", "--method", "data_impressions", "--iterations", "1",
            "--preview", "0", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def done_set(env):
    """A finished transfer set made by the CLI (the --resume cases change one setting of it)."""
    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    mp.syspath_prepend(TESTS)
    mp.setenv("TQDM_DISABLE", "1")
    out = env["root"] / "done"
    try:
        assert main(_syn(env, out)) == 0
    finally:
        mp.undo()
    return str(out)


def _no_weights(argv):
    i = argv.index("--weights")
    return argv[:i] + argv[i + 2:]


def _yaml(env, name, text):
    p = env["root"] / name
    p.write_text(text)
    return str(p)


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def _sigint_then(exc):
    """A library that turns the KeyboardInterrupt of a Ctrl-C into another error (torch: "initialization failed")."""
    def f(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except BaseException:  # noqa: BLE001
            raise exc from None
        raise AssertionError("SIGINT was not delivered")
    return f


def _swallowed_sigint(real):
    """A library that catches the KeyboardInterrupt of a Ctrl-C during startup and carries on (then works for
    up to 2 s of CPU time: the interrupt must be raised again in there, so the run never starts)."""
    def f(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        except BaseException:  # noqa: BLE001 - that is the point
            pass
        t0 = time.process_time()
        while time.process_time() - t0 < 2.0:
            pass
        return real(*a, **k)
    return f


def _cases(env, done, tmp):
    """(name, argv, names, setup, status): ``names`` must all appear in the one stderr line."""
    import safetensors

    import dfkd_fast.cli as cli
    import dfkd_fast.runner as runner

    out = str(tmp / "o")
    dis = ["distill", "--transfer-set", done, "--teacher", TINY, "--weights", env["w"], "--student",
           "cli_models:tiny_student", "--image-size", "1,8,8", "--device", "cpu", "--epochs", "1",
           "--out", str(tmp / "d")]
    res = [*_syn(env, done), "--resume"]
    bad_meta = tmp / "badmeta"
    bad_meta.mkdir()
    (bad_meta / "meta.json").write_text("{not json")
    bad_manifest = tmp / "badmanifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text('{"format": ')
    disk_full = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                             "data/0: file write failed")
    se_full = safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    def patch(obj, attr, value):
        return lambda mp: mp.setattr(obj, attr, value)

    return [
        # non-finite / out-of-range flag values
        ("std inf", _syn(env, out, "--std", "inf"), ["--std"], None, 2),
        ("std zero", _syn(env, out, "--std", "0.5,0"), ["--std"], None, 2),
        ("mean nan", _syn(env, out, "--mean", "nan"), ["--mean"], None, 2),
        ("std overflows the teacher", _syn(env, out, "--std", "1e-40"), ["--std 1e-40", "NaN/Inf"], None, 2),
        ("mean not numbers", _syn(env, out, "--mean", "a,b"), ["--mean"], None, 2),
        ("preview negative", _syn(env, out, "--preview", "-3"), ["--preview"], None, 2),
        ("num-images negative", _syn(env, out, "--num-images", "-4"), ["--num-images"], None, 2),
        ("distill lr nan", [*dis, "--lr", "nan"], ["--lr"], None, 2),
        ("distill epochs negative", [*dis, "--epochs", "-1"], ["--epochs"], None, 2),
        ("method option inf", _syn(env, out, "--lr", "inf"), ["lr"], None, 2),
        # YAML values of the wrong type
        ("yaml num_images abc", _syn(env, out, "--config", _yaml(env, "a.yaml", "num_images: abc\n")),
         ["num_images", "int"], None, 2),
        ("yaml batch_size string", _syn(env, out, "--config", _yaml(env, "b.yaml", 'batch_size: "4"\n')),
         ["batch_size", "int"], None, 2),
        ("yaml lr .nan", [*dis, "--config", _yaml(env, "c.yaml", "lr: .nan\n")], ["--lr"], None, 2),
        ("yaml opt string, bad value", _syn(env, out, "--config", _yaml(env, "d.yaml", "opt: iterations=abc\n")),
         ["iterations"], None, 2),
        ("yaml method option nan", _syn(env, out, "--config", _yaml(env, "f.yaml", "lr: .nan\n")), ["lr", "finite"],
         None, 2),
        ("yaml resume not a bool", _syn(env, out, "--config", _yaml(env, "e.yaml", "resume: maybe\n")),
         ["resume"], None, 2),
        # user modules and factories
        ("teacher SyntaxError", _syn(env, out, "--teacher", "cli_errors_syntax:broken"),
         ["--teacher", "SyntaxError"], None, 2),
        ("factory TypeError", _syn(env, out, "--teacher", f"{M}:needs_arg"), ["--teacher", "TypeError"], None, 2),
        ("factory ZeroDivisionError", _syn(env, out, "--teacher", f"{M}:divides"), ["--teacher", "ZeroDivision"],
         None, 2),
        ("factory ValueError", _syn(env, out, "--teacher", f"{M}:refuses"), ["--teacher", "7-class"], None, 2),
        ("forward returns a tuple", _no_weights(_syn(env, out, "--teacher", f"{M}:returns_tuple")),
         ["--teacher", "tuple"], None, 2),
        ("(N,1,10) outputs", _no_weights(_syn(env, out, "--teacher", f"{M}:unsqueezed")),
         ["--teacher", "(2, 1, 10)"], None, 2),
        ("NaN weights", _syn(env, out, "--weights", env["nan"]), ["--weights", "NaN"], None, 2),
        ("student of the wrong width", [*_syn(env, out, "--method", "zskt"), "--student", f"{M}:five_way",
                                        "--nz", "4", "--ngf", "2"], ["--student"], None, 2),
        # --resume with changed settings / damaged files
        ("resume batch size", [*res, "--batch-size", "2"], ["--batch-size", "was 4", "now 2"], None, 2),
        ("resume seed", [*res, "--seed", "5"], ["--seed", "was 0", "now 5"], None, 2),
        ("resume iterations", [*res, "--iterations", "3"], ["--iterations", "was 1", "now 3"], None, 2),
        ("resume method", [*res, "--method", "class_impressions"], ["--method", "data_impressions"], None, 2),
        ("resume teacher weights", [*res, "--weights", env["w2"]], ["--weights", "tiny2.pt"], None, 2),
        ("resume damaged meta.json", [*_syn(env, bad_meta), "--resume"], ["meta.json"], None, 2),
        ("distill damaged manifest.json", [*dis[:2], str(bad_manifest), *dis[3:]], ["manifest.json"], None, 2),
        # disk full while writing (torch.save / safetensors errors are not OSError)
        ("disk full saving the state", _syn(env, tmp / "full1"), [str(tmp / "full1"), "disk"],
         patch(torch, "save", _raise(disk_full)), 2),
        ("disk full writing a shard", _syn(env, tmp / "full2"), [str(tmp / "full2"), "disk"],
         patch(safetensors.torch, "save_file", _raise(se_full)), 2),
        # Ctrl-C during startup: one line, 130, never ignored
        ("Ctrl-C while building the parser", _syn(env, out), ["interrupted"],
         patch(cli, "build_parser", _raise(KeyboardInterrupt())), 130),
        ("Ctrl-C turned into an ImportError", _syn(env, out), ["interrupted"],
         patch(runner, "resolve_device", _sigint_then(ImportError("initialization failed"))), 130),
        ("Ctrl-C swallowed by a library", _syn(env, tmp / "swallowed"), ["interrupted"],
         patch(runner, "resolve_device", _swallowed_sigint(runner.resolve_device)), 130),
    ]


def test_bad_invocations_one_line_naming_the_flag(env, done_set, tmp_path, capsys):
    cases = _cases(env, done_set, tmp_path)
    assert len(cases) >= 25
    failures = []
    for name, argv, names, setup, status in cases:
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as mp:
            if setup is not None:
                setup(mp)
            try:
                rc = main(argv)
            except BaseException as e:  # noqa: BLE001 - an escaping exception is a failure of this case
                failures.append(f"{name}: escaped {type(e).__name__}: {e}")
                continue
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        ok = (rc == status and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("dfkd-fast: ")
              and all(n in lines[0] for n in names))
        if not ok:
            failures.append(f"{name}: rc={rc} (want {status}) stderr={err!r} (want {names})")
    assert not failures, "\n".join(failures)
    assert not os.path.exists(tmp_path / "swallowed" / "manifest.json")  # the interrupted run did not complete


def test_yaml_opt_string_and_mapping_are_one_option_each():
    from dfkd_fast.config import SynthesizeConfig, merge_config

    base = {"teacher": "t", "method": "m", "num_images": 4, "out": "o"}
    assert merge_config(SynthesizeConfig, base, {"opt": "iterations=2"}).opt == ["iterations=2"]
    assert merge_config(SynthesizeConfig, base, {"opt": {"iterations": 2, "lr": 0.1}}).opt == \
        ["iterations=2", "lr=0.1"]
    assert merge_config(SynthesizeConfig, base, {"mean": 0.5, "std": [0.25]}).mean == "0.5"


def test_error_line_starts_on_its_own_line_after_a_progress_bar(env, tmp_path, capsys, monkeypatch):
    """A failure mid-run with the tqdm bar on screen: the error is a line of its own (the bar line is ended)."""
    import tqdm.auto
    import tqdm.std

    from dfkd_fast.transfer_set import TransferSetWriter

    class _Shown(tqdm.std.tqdm):  # TQDM_DISABLE is read when tqdm is imported: force this bar on
        def __init__(self, *a, **k):
            k["disable"] = False
            super().__init__(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", _Shown)
    monkeypatch.setattr(TransferSetWriter, "add", _raise(OSError("cannot write the shard")))
    rc = main(_syn(env, tmp_path / "bar"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "synthesize" in err  # the bar was drawn
    last = err.rstrip("\n").split("\n")[-1]
    assert last == "dfkd-fast: error: cannot write the shard", err


def test_internal_bug_is_one_line_with_a_debug_hint(env, tmp_path, capsys, monkeypatch):
    import dfkd_fast.runner as runner

    monkeypatch.setattr(runner, "run_meta", _raise(TypeError("unsupported operand")))
    rc = main(_syn(env, tmp_path / "bug"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "internal error" in lines[0] and "DFKD_FAST_DEBUG=1" in lines[0]
    monkeypatch.setenv("DFKD_FAST_DEBUG", "1")
    with pytest.raises(TypeError):
        main(_syn(env, tmp_path / "bug2"))


def test_resume_meta_unchanged_passes(env, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(_syn(env, out, "--num-images", "8", "--shard-size", "4")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["meta"]["batch_size"] == 4
    capsys.readouterr()
    assert main([*_syn(env, out, "--num-images", "8", "--shard-size", "4"), "--resume"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_at_any_moment_of_startup_is_one_line(delay, tmp_path):
    """A real SIGINT to ``python -m dfkd_fast synthesize`` while it is still starting (importing torch happens
    inside ``main()`` now that the package is lazy) or already running: exit 130, one line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    argv = [sys.executable, "-m", "dfkd_fast", "synthesize", "--teacher", "cli_models:tiny_cnn", "--image-size",
            "1,8,8", "--num-images", "8", "--batch-size", "4", "--device", "cpu", "--method", "data_impressions",
            "--iterations", "100000", "--preview", "0", "--out", str(tmp_path / "out")]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["dfkd-fast: interrupted"], err
