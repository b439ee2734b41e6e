"""dfkd_fast.tasks.distill: offline KD from synthesized images, checkpoint resume, online KD, clear errors.

Real tiny setup: a BN-free conv teacher trained on scikit-learn digits (8x8, 1,438 train / 359 test),
Data Impressions synthesized from it, a smaller student distilled from them.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from cli_models import tiny_cnn, tiny_student

from dfkd_fast.datasets import digits
from dfkd_fast.synthesis import build_synthesizer
from dfkd_fast.tasks.distill import DistillResult, distill, distill_online, evaluate_accuracy

K, S = 10, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the CI box has 2 cores shared by several processes (much faster than 2 here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    x, y = digits("train", image_size=S)
    xt, yt = digits("test", image_size=S)
    return x, y, xt, yt


@pytest.fixture(scope="module")
def teacher(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    net = tiny_cnn(K, 1, S)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(60):  # full batch
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    assert evaluate_accuracy(net, xt, yt) > 0.85
    return net


@pytest.fixture(scope="module")
def impressions(teacher):
    synth = build_synthesizer("data_impressions", teacher, K, (1, S, S), batch_size=100, seed=0, iterations=40,
                              lr=0.1, lr_schedule="constant")
    return torch.cat([synth.synthesize().images for _ in range(3)])  # (300, 1, 8, 8)


def _student(seed: int = 1):
    torch.manual_seed(seed)
    return tiny_student(K, 1, S)


def test_offline_beats_untrained(teacher, impressions, data, tmp_path):
    _, _, xt, yt = data
    untrained = evaluate_accuracy(_student(), xt, yt)
    res = distill(_student(), teacher, impressions, epochs=12, lr=0.05, T=4.0, batch_size=32,
                  test_data=(xt, yt), out_dir=str(tmp_path), progress=False)
    assert isinstance(res, DistillResult)
    assert res.epochs == 12 and len(res.train_loss) == 12 and len(res.test_acc) == 12
    assert res.train_loss[-1] < res.train_loss[0]
    assert res.final_acc > untrained + 0.35, (untrained, res.test_acc)
    for name in ("checkpoint.pt", "student.pt", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 0
    assert res.images == impressions.shape[0]


def test_checkpoint_resume_continues_exactly(teacher, impressions, data, tmp_path):
    _, _, xt, yt = data
    kw = dict(epochs=4, lr=0.05, T=4.0, batch_size=64, test_data=(xt, yt), progress=False, curves=False,
              schedule="step")
    full = _student()
    ref = distill(full, teacher, impressions, out_dir=str(tmp_path / "a"), **kw)

    first = _student()
    part = distill(first, teacher, impressions, out_dir=str(tmp_path / "b"), on_epoch_end=lambda e, r: e == 2, **kw)
    assert part.epochs == 2
    resumed_model = _student(seed=7)  # different init: everything must come from the checkpoint
    resumed = distill(resumed_model, teacher, impressions, out_dir=str(tmp_path / "b"), resume=True, **kw)
    assert resumed.epochs == 4
    torch.testing.assert_close(torch.tensor(resumed.train_loss), torch.tensor(ref.train_loss), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(full.state_dict().items(), resumed_model.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_unreadable_checkpoint(teacher, impressions, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        distill(_student(), teacher, impressions, epochs=1, out_dir=str(tmp_path), resume=True, progress=False)


def test_clear_errors(teacher, impressions):
    with pytest.raises(ValueError, match="empty"):
        distill(_student(), teacher, torch.empty(0, 1, S, S), epochs=1, progress=False)
    with pytest.raises(ValueError, match="classes"):
        distill(tiny_student(5, 1, S), teacher, impressions, epochs=1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        distill(_student(), teacher, torch.rand(4, 3, S, S), epochs=1, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        distill(_student(), teacher, impressions, epochs=1, num_classes=7, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        distill(_student(), teacher, impressions, epochs=1, schedule="linear", progress=False)


def test_online_smoke(teacher, data, tmp_path):
    _, _, xt, yt = data
    student = _student()
    synth = build_synthesizer("data_impressions", teacher, K, (1, S, S), batch_size=16, seed=0, iterations=5,
                              lr=0.1, lr_schedule="constant")
    res = distill_online(student, teacher, synth, rounds=3, kd_steps_per_round=4, lr=0.05, T=4.0, batch_size=24,
                         warmup_rounds=1, augment=True, test_data=(xt, yt), out_dir=str(tmp_path), save_pool=True,
                         progress=False)
    assert synth.student is student
    assert res.images == 48 and res.epochs == 3
    assert len(res.train_loss) == 2  # the warm-up round trains nothing
    assert len(res.test_acc) == 3 and 0.0 <= res.final_acc <= 1.0
    assert 0 < res.synth_seconds <= res.seconds

    from dfkd_fast.transfer_set import TransferSet

    assert len(TransferSet(str(tmp_path / "transfer_set"))) == 48
