"""Transfer-set integrity under faults (issue 12) and ImageFolder-safe exports (issue 11 item 3).

Kills are deterministic: ``DFKD_FAST_TEST_KILL_AT=<point>`` SIGKILLs a real ``python -m dfkd_fast synthesize``
at a named point of the shard commit; the set is then resumed and compared bit-exactly with an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_models import tiny_cnn

from dfkd_fast._lock import OutputLock, OutputLockedError
from dfkd_fast.cli import main
from dfkd_fast.transfer_set import TransferSet, TransferSetWriter, export_png
from dfkd_fast.transfer_set.manifest import write_manifest

TESTS = os.path.dirname(os.path.abspath(__file__))
N, B = 8, 2


@pytest.fixture(autouse=True)
def _env(cli_env):
    yield


def _subprocess_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1",
                OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(tiny_cnn(10, 1, 8).state_dict(), path)
    return str(path)


def _args(weights: str, out: str, n: int = N) -> list[str]:
    return ["synthesize", "--teacher", "cli_models:tiny_cnn", "--weights", weights, "--image-size", "1,8,8",
            "--method", "data_impressions", "--num-images", str(n), "--batch-size", str(B), "--shard-size", str(B),
            "--seed", "5", "--device", "cpu", "--out", out, "--iterations", "2", "--lr-schedule", "constant",
            "--lr", "0.05", "--preview", "4"]


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "ts")
    assert main(_args(weights, out)) == 0
    return out


def _same_set(a: str, b: str) -> None:
    x, y = TransferSet(a, verify=True), TransferSet(b, verify=True)
    assert len(x) == len(y) == N
    assert torch.equal(x.images(), y.images())
    assert torch.equal(x.teacher_logits(), y.teacher_logits())
    assert torch.equal(x.targets(), y.targets()) and torch.equal(x.seeds(), y.seeds())
    assert x.manifest["summary"]["images"] == N and sum(x.manifest["summary"]["class_histogram"]) == N


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfkd-fast: error:"), err
    return err[0]


# ----------------------------------------------------------------------------- state durable with every shard
@pytest.mark.parametrize("point", ["state-written", "shard-committed"])
def test_sigkill_at_first_shard_commit_resumes_bit_exactly(weights, reference, tmp_path, point):
    """Killed during the first shard's commit (state saved, journal line not yet written / journal line
    written), the set resumes and equals an uninterrupted run (before: a kill after the journal line, before
    the state save, left a set neither --resume nor a rerun accepted). A kill before the state save
    (``shard-written``) leaves an uncommitted shard that resume deletes and regenerates, as before."""
    out = str(tmp_path / "ts")
    proc = subprocess.run([sys.executable, "-m", "dfkd_fast", *_args(weights, out)], capture_output=True,
                          env=_subprocess_env(DFKD_FAST_TEST_KILL_AT=point), timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert os.path.isfile(os.path.join(out, "shard-000-000000.safetensors"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert main([*_args(weights, out), "--resume"]) == 0
    _same_set(out, reference)
    summary = TransferSet(out).manifest["summary"]
    assert summary["resumed_from"] == B  # the shard saved with its state is kept, not regenerated


@pytest.mark.parametrize("where", ["state", "shard"])
def test_disk_full_during_commit_loses_nothing(weights, reference, tmp_path, monkeypatch, capsys, where):
    """ENOSPC while the state (torch.save) or a shard (safetensors) is written: one line naming the file, and
    --resume then completes the set bit-exactly."""
    import safetensors.torch

    out = str(tmp_path / "ts")
    calls = {"n": 0}
    real = torch.save if where == "state" else safetensors.torch.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second commit: one shard (and its state) is already durable
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(*a, **k)

    if where == "state":
        monkeypatch.setattr(torch, "save", failing)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", failing)
    capsys.readouterr()
    assert main(_args(weights, out)) == 2
    line = _one_error_line(capsys)
    assert ("cannot write synthesizer state" in line and "state-000.pt" in line) if where == "state" else (
        "cannot write shard" in line and "shard-000-000001.safetensors" in line)
    monkeypatch.undo()
    assert main([*_args(weights, out), "--resume"]) == 0
    _same_set(out, reference)


# ----------------------------------------------------------------------------- output lock
def test_second_run_on_same_out_is_refused_and_stale_lock_recovered(weights, tmp_path, capsys):
    out = tmp_path / "ts"
    import dfkd_fast._lock

    # the holder loads _lock.py alone (stdlib only): starts in milliseconds, without importing torch
    script = ("import importlib.util, sys, time\n"
              f"spec = importlib.util.spec_from_file_location('_lock', {dfkd_fast._lock.__file__!r})\n"
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              f"m.OutputLock({str(out)!r}, 'synthesize').acquire()\nprint('held', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=_subprocess_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        capsys.readouterr()
        assert main(_args(weights, str(out))) == 2
        line = _one_error_line(capsys)
        assert f"pid {holder.pid}" in line and str(out) in line and "in use" in line
        assert not os.path.exists(out / "meta.json")  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the holder died without releasing: its stale lock file remains, and the next run takes the lock
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    assert main(_args(weights, str(out))) == 0
    assert len(TransferSet(str(out))) == N
    with OutputLock(out, "distill") as lock:  # released after the run; and exclusive within one process too
        assert lock.held
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            OutputLock(out, "synthesize").acquire()


# ----------------------------------------------------------------------------- resume --num-images, preview
def test_resume_with_fewer_images_refused_and_bad_preview_rewritten(weights, reference, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(_args(weights, str(out))) == 0
    capsys.readouterr()
    assert main([*_args(weights, str(out), n=4), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "--num-images 4" in line and f"{N} images" in line
    assert len(TransferSet(str(out))) == N
    for bad in (b"", b"\x89PNG\r\n\x1a\n garbage"):  # 0-byte (killed mid-write) and truncated previews
        (out / "preview.png").write_bytes(bad)
        assert main([*_args(weights, str(out)), "--resume"]) == 0
        from PIL import Image

        with Image.open(out / "preview.png") as im:
            im.verify()
    _same_set(str(out), reference)


def test_preview_write_is_atomic(tmp_path, monkeypatch):
    """A crash while the figure is saved leaves the earlier preview untouched and no partial file."""
    import matplotlib.figure

    from dfkd_fast.viz import save_grid

    x = torch.rand(4, 1, 6, 6)
    path = tmp_path / "preview.png"
    save_grid(x, path)
    before = path.read_bytes()

    def crash(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash)
    with pytest.raises(OSError):
        save_grid(x, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["preview.png"]


# ----------------------------------------------------------------------------- shards verified by default
def _small_set(path, k: int = 10, n: int = 12, names: list[str] | None = None, classes: int | None = None):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % (classes or k)
    logits = torch.randn(n, k, generator=g) + 6 * torch.nn.functional.one_hot(labels, k)
    meta = {"method": "test", "num_classes": k, "image_size": [1, 8, 8]}
    if names is not None:
        meta["class_names"] = names
    w = TransferSetWriter(path, meta, shard_size=4)
    w.add(torch.rand(n, 1, 8, 8, generator=g), logits, labels)
    w.close()
    return logits


def _nan_logits_shard(path) -> str:
    """Rewrite shard 1 with a NaN logit and a matching sha256 / manifest checksum (only the finite check sees it)."""
    from safetensors.torch import load_file, save_file

    from dfkd_fast.transfer_set.manifest import sha256_file

    man = json.loads((path / "manifest.json").read_text())
    shard = path / man["shards"][1]["file"]
    d = load_file(str(shard))
    d["teacher_logits"][2, 3] = float("nan")
    save_file(d, str(shard))
    man["shards"][1]["sha256"] = sha256_file(shard)
    write_manifest(str(path / "manifest.json"), man)
    return str(shard)


def _flip_byte(path) -> str:
    man = json.loads((path / "manifest.json").read_text())
    shard = path / man["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    return str(shard)


@pytest.mark.parametrize("damage, match", [(_flip_byte, "is corrupted"), (_nan_logits_shard, "NaN or Inf")])
def test_bad_shard_fails_reads_distill_and_export_by_default(weights, tmp_path, capsys, damage, match):
    ts_dir = tmp_path / "ts"
    _small_set(ts_dir)
    shard = damage(ts_dir)
    ts = TransferSet(ts_dir)  # opening stays cheap: shard 0 still reads, shard 1 fails when first read
    assert ts[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=match) as e:
        ts[5]
    assert shard in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=match):
        TransferSet(ts_dir).images()
    assert TransferSet(ts_dir, verify=False).images().shape[0] == 12  # explicit opt-out
    capsys.readouterr()
    assert main(["export-png", "--transfer-set", str(ts_dir), "--out", str(tmp_path / "png")]) == 2
    line = _one_error_line(capsys)
    assert shard in line and match in line
    assert main(["distill", "--transfer-set", str(ts_dir), "--teacher", "cli_models:tiny_cnn", "--weights", weights,
                 "--student", "cli_models:tiny_student", "--image-size", "1,8,8", "--epochs", "1", "--batch-size",
                 "4", "--device", "cpu", "--out", str(tmp_path / "run"), "--test-set", "none"]) == 2
    line = _one_error_line(capsys)
    assert shard in line and match in line


# ----------------------------------------------------------------------------- teacher_logits, transform
def test_teacher_logits_field_old_name_and_transform(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    logits = _small_set(tmp_path / "ts")
    ts = TransferSet(tmp_path / "ts", transform=lambda x: 1 - x)
    with safe_open(os.path.join(ts.path, ts.manifest["shards"][0]["file"]), framework="pt") as f:
        assert "teacher_logits" in f.keys() and "soft_labels" not in f.keys()
    torch.testing.assert_close(ts.teacher_logits(), logits)
    img, lg, _ = ts[3]
    torch.testing.assert_close(img, 1 - ts.images()[3])  # transform applied per item, bulk images untouched
    torch.testing.assert_close(lg, logits[3])
    with pytest.raises(ValueError, match="transform must be callable"):
        TransferSet(tmp_path / "ts", transform=3)
    # a format-1 set: logits under "soft_labels", no manifest checksum -- still readable
    old = tmp_path / "ts"
    man = json.loads((old / "manifest.json").read_text())
    for s in man["shards"]:
        d = load_file(str(old / s["file"]))
        d["soft_labels"] = d.pop("teacher_logits")
        save_file(d, str(old / s["file"]))
        from dfkd_fast.transfer_set.manifest import sha256_file

        s["sha256"] = sha256_file(old / s["file"])
    man.pop("manifest_sha256")
    man["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(man))
    v1 = TransferSet(old)
    torch.testing.assert_close(v1.soft_labels(), logits)
    torch.testing.assert_close(v1[3][1], logits[3])


# ----------------------------------------------------------------------------- ImageFolder-safe export
def _image_folder(root) -> tuple[list[str], list[tuple[str, int]]]:
    """What torchvision's ImageFolder does: sorted class folders -> indices 0..; every image file in them."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = []
    for idx, c in enumerate(classes):
        for dp, _, fs in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(fs):
                if f.lower().endswith(".png"):
                    samples.append((os.path.relpath(os.path.join(dp, f), root).replace(os.sep, "/"), idx))
    return classes, samples


@pytest.mark.parametrize("names", [None, [f"c{i}/x" for i in range(12)]])
def test_export_12_classes_reads_back_with_image_folder(tmp_path, capsys, names):
    src = tmp_path / "ts"
    logits = _small_set(src, k=12, n=30, names=names, classes=10)  # classes 10 and 11 get no image
    out = tmp_path / "png"
    assert main(["export-png", "--transfer-set", str(src), "--out", str(out)]) == 0
    classes, samples = _image_folder(out)
    assert len(classes) == 12  # a folder for EVERY class, empty ones included
    assert classes[:3] == (["00", "01", "02"] if names is None else ["00_c0_x", "01_c1_x", "02_c2_x"])
    top1 = logits.argmax(1)
    assert len(samples) == 30
    for rel, idx in samples:
        assert idx == int(top1[int(os.path.basename(rel)[:-4])])  # ImageFolder label == teacher top-1
    with open(out / "labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label"]
    assert sorted((r[0], int(r[1])) for r in rows[1:]) == sorted(samples)
    np.testing.assert_array_equal(np.load(out / "logits.npy"), logits.numpy())
    # a non-empty destination is refused; --overwrite replaces the earlier export (no stale files)
    (out / classes[0] / "stale.png").write_bytes(b"x")
    capsys.readouterr()
    assert main(["export-png", "--transfer-set", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert main(["export-png", "--transfer-set", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / classes[0] / "stale.png").exists() and len(_image_folder(out)[1]) == 30
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="will not delete it"):
        export_png(src, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"


def test_nan_in_fp16_images_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from dfkd_fast.transfer_set.manifest import sha256_file

    w = TransferSetWriter(tmp_path, {"method": "test"}, shard_size=4, store="fp16")
    w.add(torch.rand(4, 1, 8, 8), torch.randn(4, 3))
    w.close()
    man = json.loads((tmp_path / "manifest.json").read_text())
    shard = tmp_path / man["shards"][0]["file"]
    d = load_file(str(shard))
    d["images"][1, 0, 2, 2] = float("inf")
    save_file(d, str(shard))
    man["shards"][0]["sha256"] = sha256_file(shard)
    write_manifest(str(tmp_path / "manifest.json"), man)
    with pytest.raises(ValueError, match=f"shard {shard} holds NaN or Inf images"):
        TransferSet(tmp_path)[0]
