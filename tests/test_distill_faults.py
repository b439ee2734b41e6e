"""``dfkd-fast distill`` against bad input and reruns (issue 12): the transfer set's manifest vs the flags, the
teacher's fingerprint, ``--seed`` reproducibility, ``--resume`` with a changed schedule, the ``--out`` lock, and
the test set given as an image folder.

A real tiny setup: a BN-free conv teacher trained on scikit-learn digits (8x8), a transfer set of 64 real
digits with the teacher's logits written by ``TransferSetWriter(..., teacher=...)`` (so its manifest holds the
teacher's fingerprint, 10 classes and image shape 1,8,8).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from cli_models import tiny_cnn

from dfkd_fast._lock import OutputLock, OutputLockedError
from dfkd_fast.cli import main
from dfkd_fast.datasets import digits
from dfkd_fast.models import load_state_dict_file
from dfkd_fast.tasks.distill import distill
from dfkd_fast.transfer_set import TransferSet, TransferSetWriter

TESTS = os.path.dirname(os.path.abspath(__file__))
K, S = 10, 8


@pytest.fixture(autouse=True)
def _env(cli_env):
    yield


@pytest.fixture(scope="module")
def teacher():
    x, y = digits("train", image_size=S)
    torch.manual_seed(0)
    net = tiny_cnn(K, 1, S)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(40):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def files(teacher, tmp_path_factory):
    """Teacher weights, another teacher's weights, and a transfer set made by the first."""
    d = tmp_path_factory.mktemp("distill_faults")
    torch.save(teacher.state_dict(), d / "teacher.pt")
    torch.manual_seed(5)
    torch.save(tiny_cnn(K, 1, S).state_dict(), d / "other.pt")
    x = digits("test", image_size=S)[0][:64]
    with torch.no_grad():
        logits = teacher(x)
    with TransferSetWriter(d / "ts", {"method": "real_digits"}, shard_size=32, teacher=teacher) as w:
        w.add(x, logits)
    return d


def _argv(files, out, *extra):
    return ["distill", "--transfer-set", str(files / "ts"), "--teacher", "cli_models:tiny_cnn", "--weights",
            str(files / "teacher.pt"), "--student", "cli_models:tiny_student", "--image-size", "1,8,8",
            "--num-classes", "10", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--temperature", "4",
            "--device", "cpu", "--out", str(out), *extra]


def _fails(capsys, argv, *words):
    """The run exits 2 with one stderr line that contains every word."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_manifest_num_classes_and_image_size_must_match(files, tmp_path, capsys):
    manifest = TransferSet(files / "ts").manifest
    assert manifest["layout"]["num_classes"] == 10 and manifest["layout"]["image_shape"] == [1, 8, 8]
    argv = _argv(files, tmp_path / "k")
    k = argv.index("--num-classes") + 1
    _fails(capsys, [*argv[:k], "5", *argv[k + 1:]], "--num-classes", "5", "10", "manifest")
    i = argv.index("--image-size") + 1
    _fails(capsys, [*argv[:i], "1,16,16", *argv[i + 1:]], "--image-size", "1,16,16", "1,8,8", "manifest")
    assert not (tmp_path / "k").exists()  # refused before anything was written


def test_other_teacher_is_refused_unless_allowed_and_then_recorded(files, tmp_path, capsys):
    argv = _argv(files, tmp_path / "m")
    w = argv.index("--weights") + 1
    argv[w] = str(files / "other.pt")
    _fails(capsys, argv, "fingerprint", "--allow-teacher-mismatch")
    assert main([*argv, "--allow-teacher-mismatch"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]  # (+ progress bar)
    assert len(warned) == 1 and "fingerprint" in warned[0] and "--allow-teacher-mismatch" in warned[0], warned
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("teacher_mismatch" in r for r in rows)
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert ckpt["teacher_mismatch"]["transfer_set"] == TransferSet(files / "ts").meta["teacher"]
    assert ckpt["teacher_mismatch"]["teacher"] != ckpt["teacher_mismatch"]["transfer_set"]
    # the teacher that made the set: no warning, nothing recorded
    assert main(_argv(files, tmp_path / "ok")) == 0
    assert "warning" not in capsys.readouterr().err
    assert torch.load(tmp_path / "ok" / "checkpoint.pt", weights_only=True)["teacher_mismatch"] is None


def test_seed_reproduces_the_student_exactly(files, tmp_path, capsys):
    students = {}
    for name, seed, rng in (("a", "3", 11), ("b", "3", 99), ("c", "4", 11)):
        torch.manual_seed(rng)  # whatever state the process is in before the run must not matter
        assert main([*_argv(files, tmp_path / name), "--seed", seed]) == 0
        students[name] = load_state_dict_file(tmp_path / name / "student.safetensors")
    assert students["a"].keys() == students["b"].keys()
    for k in students["a"]:
        assert torch.equal(students["a"][k], students["b"][k]), k
    assert any(not torch.equal(students["a"][k], students["c"][k]) for k in students["a"])


def test_resume_refuses_a_changed_schedule(files, tmp_path, capsys):
    out = tmp_path / "r"
    argv = _argv(files, out)
    assert main([*argv, "--schedule", "cosine"]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def changed(flag, value):
        i = argv.index(flag) + 1 if flag in argv else None
        new = [*argv[:i], value, *argv[i + 1:]] if i else [*argv, flag, value]
        return [*new, "--resume"]

    for flag, new, old in (("--lr", "0.1", "0.05"), ("--epochs", "4", "2"), ("--batch-size", "32", "16"),
                           ("--temperature", "8", "4.0"), ("--schedule", "step", "cosine")):
        _fails(capsys, changed(flag, new), "resume", flag, new, old)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing trained on the refused runs
    assert main([*argv, "--resume"]) == 0  # the same schedule resumes (already finished: no new epochs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_resume_of_an_old_checkpoint_without_config_checks_lr_and_length(files, teacher, tmp_path):
    from cli_models import tiny_student

    data = TransferSet(files / "ts")
    kw = dict(epochs=2, lr=0.05, T=4.0, batch_size=16, out_dir=str(tmp_path), progress=False, curves=False)
    distill(tiny_student(K, 1, S), teacher, data, **kw)
    st = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del st["config"]  # as written before the schedule was stored
    torch.save(st, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"--lr is 0\.1 .* 0\.05"):
        distill(tiny_student(K, 1, S), teacher, data, resume=True, **{**kw, "lr": 0.1})
    with pytest.raises(ValueError, match="--epochs"):
        distill(tiny_student(K, 1, S), teacher, data, resume=True, **{**kw, "epochs": 3})
    assert distill(tiny_student(K, 1, S), teacher, data, resume=True, **kw).epochs == 2


def test_resume_without_checkpoint_starts_from_a_saved_student_pt(files, teacher, tmp_path):
    from cli_models import tiny_student

    torch.manual_seed(2)
    old = tiny_student(K, 1, S)
    torch.save(old.state_dict(), tmp_path / "student.pt")  # what older versions wrote
    fresh = tiny_student(K, 1, S)
    with pytest.warns(UserWarning, match="student.pt"):
        distill(fresh, teacher, TransferSet(files / "ts"), epochs=0, out_dir=str(tmp_path), resume=True,
                progress=False)
    saved = load_state_dict_file(tmp_path / "student.safetensors")
    for k, v in old.state_dict().items():
        assert torch.equal(saved[k], v), k


def test_out_directory_is_locked(files, teacher, tmp_path, capsys):
    from cli_models import tiny_student

    out = tmp_path / "locked"
    with OutputLock(out, "another distill"):
        err = _fails(capsys, _argv(files, out), str(out), f"pid {os.getpid()}", "another distill")
        assert "in use" in err
        with pytest.raises(OutputLockedError):
            distill(tiny_student(K, 1, S), teacher, TransferSet(files / "ts"), epochs=1, out_dir=str(out),
                    progress=False)
        assert not (out / "checkpoint.pt").exists()
    assert main(_argv(files, out)) == 0  # released: the next run takes it


def test_cli_test_set_from_an_image_folder(files, tmp_path, capsys):
    from PIL import Image

    x, y = digits("test", image_size=S)
    x, y = x[:40], y[:40]
    for c in range(K):
        (tmp_path / "imgs" / f"{c:02d}").mkdir(parents=True)
    for i in range(len(y)):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), mode="L").save(
            tmp_path / "imgs" / f"{int(y[i]):02d}" / f"{i}.png")
    out = tmp_path / "f"
    assert main([*_argv(files, out), "--test-set", str(tmp_path / "imgs")]) == 0
    assert "test accuracy" in capsys.readouterr().out and "teacher" in (out / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows) and rows[0]["teacher_test_acc"] > 0.5
    _fails(capsys, [*_argv(files, tmp_path / "g"), "--test-set", str(tmp_path / "nope.pt")], "--test-set", "nope.pt")
