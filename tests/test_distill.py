"""dfkd_fast.tasks.distill: offline KD from synthesized images, checkpoint resume, online KD, clear errors.

Real tiny setup: a BN-free conv teacher trained on scikit-learn digits (8x8, 1,438 train / 359 test),
Data Impressions synthesized from it, a smaller student distilled from them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os

import numpy as np
import pytest
import torch
from cli_models import tiny_cnn, tiny_student, train_on_digits

from dfkd_fast.config import DistillConfig
from dfkd_fast.datasets import load_test_set
from dfkd_fast.models import load_model
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
def teacher(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    net = train_on_digits(tiny_cnn(K, 1, S), image_size=S)
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


def res_student_state(res, out):
    """The student's final weights as the checkpoint holds them."""
    return torch.load(out / "checkpoint.pt", weights_only=True)["student"]


def test_offline_beats_untrained(teacher, impressions, data, tmp_path):
    _, _, xt, yt = data
    untrained = evaluate_accuracy(_student(), xt, yt)
    res = distill(_student(), teacher, impressions, epochs=12, lr=0.05, T=4.0, batch_size=32,
                  test_data=(xt, yt), out_dir=str(tmp_path), progress=False)
    assert isinstance(res, DistillResult)
    assert res.epochs == 12 and len(res.train_loss) == 12 and len(res.test_acc) == 12
    assert res.train_loss[-1] < res.train_loss[0]
    assert res.final_acc > untrained + 0.35, (untrained, res.test_acc)
    for name in ("checkpoint.pt", "student.safetensors", "curves.png", "metrics.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
    assert res.images == impressions.shape[0]
    assert res.teacher_acc == evaluate_accuracy(teacher, xt, yt)
    saved = load_model(tiny_student(K, 1, S), weights=str(tmp_path / "student.safetensors"))
    for (k, a), b in zip(saved.state_dict().items(), res_student_state(res, tmp_path).values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert [r["kd_loss"] for r in rows] == res.train_loss and [r["test_acc"] for r in rows] == res.test_acc
    assert [r["images_seen"] for r in rows] == [e * impressions.shape[0] for e in range(1, 13)]
    assert rows[0]["lr"] == 0.05 and rows[-1]["lr"] < rows[0]["lr"]  # cosine, lr at each epoch's first step
    assert all(r["seconds"] > 0 for r in rows) and rows[0]["teacher_test_acc"] == res.teacher_acc


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
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # appended after the resume, no duplicates
    torch.testing.assert_close(torch.tensor([r["kd_loss"] for r in rows]), torch.tensor(ref.train_loss))
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


def test_library_defaults_are_the_cli_defaults():
    """distill() takes epochs / lr / T / batch size / schedule / weight decay / seed from DistillConfig."""
    params = inspect.signature(distill).parameters
    cli = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    for arg, field in (("epochs", "epochs"), ("lr", "lr"), ("T", "temperature"), ("batch_size", "batch_size"),
                       ("schedule", "schedule"), ("weight_decay", "weight_decay"), ("seed", "seed"),
                       ("grad_clip", "grad_clip")):
        assert params[arg].default == cli[field], (arg, params[arg].default, cli[field])
        if arg != "epochs":
            assert inspect.signature(distill_online).parameters[arg].default == cli[field], arg


def test_curves_have_loss_and_percent_accuracy_axes_with_teacher_line():
    from dfkd_fast.tasks.distill.common import _curves_figure

    fig = _curves_figure([2.0, 1.5, 1.0], [0.5, 0.6, 0.75], "epoch", teacher_acc=0.9)
    ax_loss, ax_acc = fig.axes
    assert "loss" in ax_loss.get_ylabel() and "%" in ax_acc.get_ylabel()
    assert list(ax_loss.lines[0].get_ydata()) == [2.0, 1.5, 1.0]
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [50.0, 60.0, 75.0])
    teacher_line = ax_acc.lines[1]
    np.testing.assert_allclose(teacher_line.get_ydata(), [90.0, 90.0])  # horizontal at the teacher's %
    assert "teacher" in teacher_line.get_label()
    assert len(_curves_figure([1.0], [], "epoch").axes) == 1  # no accuracy axes without a test set


def _write_png_folder(root, x, y, names):
    from PIL import Image

    for c in names:
        (root / c).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        a = (img[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a, mode="L").save(root / names[int(label)] / f"{i:04d}.png")


def test_test_set_from_image_folder_and_tensor_files(data, tmp_path):
    from safetensors.torch import save_file

    _, _, xt, yt = data
    x, y = xt[:60], yt[:60] % 10
    # 12 class folders, sorted by name -> labels (class_10 and class_11 empty, as export-png writes them)
    names = [f"class_{c:02d}" for c in range(12)]
    _write_png_folder(tmp_path / "folder", x, y, names)
    fx, fy = load_test_set(str(tmp_path / "folder"), (1, S, S))
    order = torch.argsort(y, stable=True)
    torch.testing.assert_close(fy, y[order])
    torch.testing.assert_close(fx, (x[order] * 255).round() / 255)
    assert load_test_set(str(tmp_path / "folder"), (3, S, S))[0].shape == (60, 3, S, S)  # L -> RGB

    torch.save({"images": x, "labels": y}, tmp_path / "t.pt")
    save_file({"images": (x * 255).round().to(torch.uint8), "labels": y}, str(tmp_path / "t.safetensors"))
    px, py = load_test_set(str(tmp_path / "t.pt"), (1, S, S))
    torch.testing.assert_close(px, x)
    torch.testing.assert_close(py, y)
    sx, _ = load_test_set(str(tmp_path / "t.safetensors"), (1, S, S))
    torch.testing.assert_close(sx, (x * 255).round() / 255)

    bad = {"keys": {"x": x, "labels": y}, "size": {"images": x, "labels": y}, "labels": {"images": x, "labels": y[:5]},
           "range": {"images": x * 4 - 2, "labels": y}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    checks = [("keys", (1, S, S), "'images'"), ("size", (1, 16, 16), "--image-size is 1,16,16"),
              ("labels", (1, S, S), r"labels have shape \(5,\)"), ("range", (1, S, S), r"\[0, 1\]")]
    for name, size, match in checks:
        with pytest.raises(ValueError, match=match) as e:
            load_test_set(str(tmp_path / f"{name}.pt"), size)
        assert "--test-set" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="--test-set: cannot read .*junk.safetensors"):
        load_test_set(str(tmp_path / "junk.safetensors"), (1, S, S))
    with pytest.raises(ValueError, match="--image-size"):
        load_test_set(str(tmp_path / "folder"), (1, 16, 16))
    with pytest.raises(ValueError, match="--test-set must be"):
        load_test_set("cifar10", (1, S, S))


def test_distill_leaves_the_callers_teacher_as_it_was(teacher, impressions):
    """distill() freezes the teacher while it runs and gives it back unchanged: training flags and requires_grad."""
    teacher.train()
    for p in teacher.parameters():
        p.requires_grad_(True)
    try:
        distill(_student(), teacher, impressions[:64], epochs=1, lr=0.01, T=4, batch_size=32, progress=False)
        assert teacher.training and all(m.training for m in teacher.modules())
        assert all(p.requires_grad for p in teacher.parameters())
    finally:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)


class _Loud(torch.nn.Module):
    """A teacher whose logits are 50x the real one's: an over-confident set (Class Impressions reached 42)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * self.inner(x)


@pytest.mark.parametrize("online", [False, True])
def test_grad_clip_bounds_every_student_step(teacher, impressions, online):
    """With ``grad_clip`` c (no momentum, no weight decay) one SGD step moves the student by at most lr * c; without
    it the over-confident teacher's KD gradient moves it much further."""
    loud = _Loud(teacher).eval()
    moved = {}
    for clip in (0.0, 0.05):
        student = _student()
        before = torch.cat([q.detach().flatten().clone() for q in student.parameters()])
        kw = dict(lr=0.1, T=1.0, batch_size=64, momentum=0.0, weight_decay=0.0, grad_clip=clip, augment=False,
                  schedule="constant", progress=False)
        if online:
            synth = build_synthesizer("data_impressions", loud, K, (1, S, S), batch_size=64, seed=0, iterations=1)
            distill_online(student, loud, synth, rounds=1, kd_steps_per_round=1, **kw)
        else:
            distill(student, loud, impressions[:64], epochs=1, curves=False, **kw)
        after = torch.cat([q.detach().flatten() for q in student.parameters()])
        moved[clip] = float((after - before).norm())
    assert moved[0.05] <= 0.1 * 0.05 * (1 + 1e-4), moved
    assert moved[0.0] > 5 * moved[0.05], moved


def test_grad_clip_is_part_of_the_resumed_schedule(teacher, impressions, tmp_path):
    kw = dict(epochs=2, lr=0.05, T=4.0, batch_size=64, progress=False, curves=False, out_dir=str(tmp_path))
    distill(_student(), teacher, impressions, on_epoch_end=lambda e, r: e == 1, grad_clip=5.0, **kw)
    with pytest.raises(ValueError, match="--grad-clip is 1.0 but .* was trained with 5.0"):
        distill(_student(), teacher, impressions, resume=True, grad_clip=1.0, **kw)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        distill(_student(), teacher, impressions, epochs=1, grad_clip=-1.0, progress=False)
