"""Resumable synthesis: SIGKILL a real ``python -m dfkd_fast synthesize`` mid-run, resume, compare.

After ``--resume`` the transfer set must hold exactly N images, every shard's checksum must verify, no
shard may be duplicated, and the images must equal those of an uninterrupted run (per-batch seeds).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_models import tiny_cnn

from dfkd_fast.cli import main
from dfkd_fast.runner import batch_seed
from dfkd_fast.transfer_set import TransferSet

TESTS = os.path.dirname(os.path.abspath(__file__))
N, B = 16, 2


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(tiny_cnn(10, 1, 8).state_dict(), path)
    return str(path)


def _args(weights: str, out: str, iterations: int) -> list[str]:
    return ["synthesize", "--teacher", "cli_models:tiny_cnn", "--weights", weights, "--image-size", "1,8,8",
            "--method", "data_impressions", "--num-images", str(N), "--batch-size", str(B), "--shard-size", str(B),
            "--seed", "5", "--device", "cpu", "--out", out, "--iterations", str(iterations), "--lr-schedule",
            "constant", "--lr", "0.05", "--preview", "4"]


def _committed(out: str) -> int:
    path = os.path.join(out, "journal-000.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def test_sigkill_then_resume(weights, tmp_path):
    out = str(tmp_path / "killed")
    iterations = 60  # ~2 ms per step: a batch takes long enough to be killed mid-run
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dfkd_fast", *_args(weights, out, iterations)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _committed(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _committed(out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert 2 <= killed_at < N // B, killed_at  # interrupted mid-way, after >= 1 finished shard
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    assert main([*_args(weights, out, iterations), "--resume"]) == 0
    ts = TransferSet(out, verify=True)  # every shard's sha256 checks out
    assert len(ts) == N
    files = [s["file"] for s in ts.manifest["shards"]]
    assert len(files) == len(set(files)) == N // B
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == sorted(files)  # no stray shard
    x = ts.images()
    assert torch.unique(x.flatten(1), dim=0).shape[0] == N  # N distinct images
    expected_seeds = torch.tensor([batch_seed(5, i // B) for i in range(N)])
    assert torch.equal(ts.seeds(), expected_seeds)  # each batch exactly once, in order
    summary = ts.manifest["summary"]
    assert summary["images"] == N and sum(summary["class_histogram"]) == N
    # every committed shard was saved with its state: none is regenerated (one more if the kill fell between
    # the state save and the journal line of the next shard, which resume then commits)
    assert summary["resumed_from"] in (killed_at * B, (killed_at + 1) * B)

    ref_out = str(tmp_path / "uninterrupted")
    assert main(_args(weights, ref_out, iterations)) == 0
    ref = TransferSet(ref_out)
    assert torch.equal(ref.images(), x)
    torch.testing.assert_close(ref.soft_labels(), ts.soft_labels())
    torch.testing.assert_close(ref.targets(), ts.targets())

    # resuming a finished run is a no-op that keeps every shard
    assert main([*_args(weights, out, iterations), "--resume"]) == 0
    assert len(TransferSet(out, verify=True)) == N


def test_corrupted_shard_detected(weights, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(_args(weights, str(out), 2)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        TransferSet(str(out), verify=True)
    capsys.readouterr()
    assert main([*_args(weights, str(out), 2), "--resume"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfkd-fast: error:") and manifest["shards"][1]["file"] in err[0]
