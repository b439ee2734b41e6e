"""Generator-based synthesis: DAFL, ZSKT, DFQ, CMI, FastMeta.

Tiny seeded teachers built here (one with BatchNorm, one without), a tiny student, images 3x8x8, K = 4,
generators with nz = 16, ngf = 8, a few steps each.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_fast import _backend
from dfkd_fast.synthesis import REGISTRY, build_synthesizer
from dfkd_fast.synthesis.cmi import CMI
from dfkd_fast.synthesis.dafl import DAFL
from dfkd_fast.synthesis.dfq import DFQ
from dfkd_fast.synthesis.fast_meta import FastMeta
from dfkd_fast.synthesis.zskt import ZSKT, attention_map, attention_transfer_loss

K = 4
IMG = (3, 8, 8)  # tiny CIFAR-like input
TINY = {"nz": 16, "ngf": 8}
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only add contention


def _teacher(bn: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))
    for m in net.modules():  # "trained" running statistics, not the identity defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, K))


def _check_result(res, n: int) -> None:
    assert res.images.shape == (n, *IMG)
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert not res.images.requires_grad
    assert res.teacher_logits.shape == (n, K)
    assert res.targets.shape == (n,) and res.targets.dtype == torch.long
    assert all(map(lambda v: v == v, res.losses))  # no NaN


def _mean(v) -> float:
    return sum(v) / len(v)


def _curve(synth, batches: int) -> list[float]:
    """Last-step loss of each batch (persistent generators: the loss must fall across batches)."""
    return [synth.synthesize().losses[-1] for _ in range(batches)]


def _roundtrip(make, batches_before: int = 1) -> None:
    """state_dict after a batch, loaded into a fresh instance, reproduces the next batch exactly."""
    a = make()
    for _ in range(batches_before):
        a.synthesize()
    state = a.state_dict()
    expected = a.synthesize()
    b = make()
    b.load_state_dict(state)
    got = b.synthesize()
    torch.testing.assert_close(got.images, expected.images, rtol=0, atol=0)
    torch.testing.assert_close(got.teacher_logits, expected.teacher_logits, rtol=0, atol=0)
    assert got.losses == expected.losses


def test_registry_and_builder():
    for name, cls in (("dafl", DAFL), ("zskt", ZSKT), ("dfq", DFQ), ("cmi", CMI), ("fast_meta", FastMeta)):
        assert REGISTRY[name] is cls
    s = build_synthesizer("fast-meta", _teacher(True), K, IMG, batch_size=4, g_steps=2, **TINY)
    assert isinstance(s, FastMeta) and s.config.iterations == 2 and s.config.g_steps == 2


# ---------------------------------------------------------------- DAFL
def test_dafl_loss_falls_across_batches_on_bn_free_teacher():
    synth = DAFL(_teacher(False), K, IMG, batch_size=16, mean=MEAN, std=STD, iterations=2, **TINY)
    first = synth.synthesize()
    _check_result(first, 16)
    curve = [first.losses[-1], *_curve(synth, 14)]
    assert _mean(curve[-3:]) < _mean(curve[:3]) - 0.05, curve


def test_dafl_roundtrip_and_errors():
    _roundtrip(lambda: DAFL(_teacher(True), K, IMG, batch_size=8, **TINY))
    synth = DAFL(_teacher(True), K, IMG, batch_size=8, **TINY)
    with pytest.raises(ValueError, match="not class-conditional"):
        synth.synthesize(torch.zeros(8, dtype=torch.long))
    no_linear = nn.Sequential(nn.Conv2d(3, K, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="act=0"):
        DAFL(no_linear, K, IMG, batch_size=8, **TINY)
    DAFL(no_linear, K, IMG, batch_size=8, act=0.0, **TINY).synthesize()  # works without the activation term
    with pytest.raises(ValueError, match="square"):
        DAFL(_teacher(False), K, (3, 8, 12), batch_size=8, **TINY)


# ---------------------------------------------------------------- ZSKT
def test_zskt_requires_student():
    with pytest.raises(ValueError, match="student is required"):
        ZSKT(_teacher(True), K, IMG, batch_size=8, **TINY)
    t = _teacher(True)
    with pytest.raises(ValueError, match="not the teacher"):
        ZSKT(t, K, IMG, batch_size=8, student=t, **TINY)


def test_zskt_generator_maximizes_disagreement():
    student = _student()
    before = [p.detach().clone() for p in student.parameters()]
    synth = ZSKT(_teacher(False), K, IMG, batch_size=16, student=student, lr_g=0.01, iterations=2, **TINY)
    curve = _curve(synth, 12)
    assert all(v <= 0 for v in curve)  # -KL
    assert _mean(curve[-3:]) < _mean(curve[:3]), curve
    for p, q in zip(student.parameters(), before, strict=False):  # the generator step leaves the student untouched
        assert p.grad is None
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert student.training  # mode restored


def test_zskt_student_loss_with_attention_transfer():
    teacher, student = _teacher(True), _student()
    synth = ZSKT(teacher, K, IMG, batch_size=4, student=student, at_layers=(("2", "1"),), beta=250.0, **TINY)
    x = synth.synthesize().images
    loss = synth.student_loss(x)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    plain = ZSKT(teacher, K, IMG, batch_size=4, student=student, at_layers=(), **TINY).student_loss(x)
    assert float(loss.detach()) > float(plain.detach())  # the AT term adds a positive amount
    a = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(attention_map(a).norm(dim=1), torch.ones(2))
    assert float(attention_transfer_loss([a], [a * 3])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no submodule"):
        ZSKT(teacher, K, IMG, batch_size=4, student=student, at_layers=(("nope", "1"),), **TINY).student_loss(x)


# ---------------------------------------------------------------- DFQ
def test_dfq_needs_bn():
    with pytest.raises(ValueError, match="no BatchNorm"):
        DFQ(_teacher(False), K, IMG, batch_size=8, **TINY)


def test_dfq_loss_falls_with_student_ensemble():
    students = nn.ModuleList([_student(1), _student(2)])
    synth = DFQ(_teacher(True), K, IMG, batch_size=16, student=students, mean=MEAN, std=STD, lr_g=0.01,
                iterations=2, **TINY)
    first = synth.synthesize()
    _check_result(first, 16)
    curve = [first.losses[-1], *_curve(synth, 11)]
    assert _mean(curve[-3:]) < _mean(curve[:3]), curve
    _roundtrip(lambda: DFQ(_teacher(True), K, IMG, batch_size=8, student=_student(), **TINY))


# ---------------------------------------------------------------- CMI
def _cmi(**kw) -> CMI:
    args = {"batch_size": 8, "mean": MEAN, "std": STD, "iterations": 12, "bank_size": 64, "n_neg": 16,
            "head_dim": 8, **TINY}
    args.update(kw)
    return CMI(_teacher(True), K, IMG, **args)


def test_cmi_needs_bn():
    with pytest.raises(ValueError, match="no BatchNorm"):
        CMI(_teacher(False), K, IMG, batch_size=8, **TINY)


def test_cmi_loss_falls_within_batch_and_bank_keeps_pairs():
    student = _student()
    synth = _cmi(student=student, lr_g=0.01)
    d = synth.feature_dim
    assert d == 6 + 8  # channels of the two probed BN inputs
    head_before = [p.detach().clone() for p in synth.head.parameters()]
    res = synth.synthesize()
    _check_result(res, 8)
    assert len(res.losses) == 12
    assert min(res.losses[-3:]) < res.losses[0], res.losses
    assert torch.equal(res.targets, torch.arange(8) % K)  # balanced default targets
    assert len(synth.bank) == 8
    local, global_ = synth.bank.entries()
    assert local.shape == (8, d) and global_.shape == (8, d)
    assert not torch.equal(local, global_)  # two different views of each image
    # the head trained
    assert any(not torch.equal(p, q) for p, q in zip(synth.head.parameters(), head_before, strict=False))
    assert all(p.grad is None for p in student.parameters())
    res2 = synth.synthesize(torch.full((8,), 3))  # the second batch contrasts against the bank
    assert len(synth.bank) == 16 and synth.bank.n_updates == 2
    assert torch.equal(res2.targets, torch.full((8,), 3))
    assert not torch.equal(res2.images, res.images)
    synth.synthesize()
    synth.synthesize()
    assert len(synth.bank) == 32


def test_cmi_state_roundtrip():
    _roundtrip(lambda: _cmi(iterations=3, student=_student()))
    synth = _cmi(iterations=2)
    with pytest.raises(ValueError, match="targets"):
        synth.synthesize(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="soft targets"):
        synth.synthesize(torch.full((8, K + 1), 0.2))
    soft = torch.softmax(torch.randn(8, K), 1)
    res = synth.synthesize(soft)  # soft targets: CE to probabilities
    assert torch.equal(res.targets, soft) and len(synth.bank) == 8


# ---------------------------------------------------------------- FastMeta
def _fast(**kw) -> FastMeta:
    args = {"batch_size": 8, "mean": MEAN, "std": STD, "g_steps": 3, **TINY}
    args.update(kw)
    return FastMeta(_teacher(True), K, IMG, **args)


def test_fast_meta_needs_bn_and_valid_meta():
    with pytest.raises(ValueError, match="no BatchNorm"):
        FastMeta(_teacher(False), K, IMG, batch_size=8, **TINY)
    with pytest.raises(ValueError, match="fomaml"):
        _fast(meta="maml2")
    with pytest.raises(ValueError, match="disagree"):
        _fast(iterations=4)


@pytest.mark.parametrize("meta", ["fomaml", "reptile"])
def test_fast_meta_updates_meta_generator(meta):
    synth = _fast(meta=meta, lr_g=0.01, lr_z=0.05)
    before = [p.detach().clone() for p in synth.netG.parameters()]
    curve = _curve(synth, 10)
    changed = [not torch.equal(p, q) for p, q in zip(synth.netG.parameters(), before, strict=False)]
    assert all(changed), changed
    assert _mean(curve[-3:]) < _mean(curve[:3]), curve
    assert synth.batches_done == 10
    assert [tuple(m.shape) for m, _ in synth.momentum_stats] == [(6,), (8,)]  # one moving average per BN layer
    assert all(bool((v > 0).all()) for _, v in synth.momentum_stats)


def test_fast_meta_warmup_disables_adversarial_term():
    plain = _fast().synthesize()
    warm = _fast(student=_student(), adv=5.0, warmup=1).synthesize()  # batch 0 is inside the warm-up
    assert warm.losses == plain.losses
    torch.testing.assert_close(warm.images, plain.images, rtol=0, atol=0)
    near = _teacher(True)  # agrees with the teacher on most samples, so the decision-adversarial term is active
    with torch.no_grad():
        near[-1].weight.add_(0.3 * torch.randn_like(near[-1].weight))
    hot = _fast(student=near, adv=5.0, warmup=0).synthesize()
    assert hot.losses[0] < plain.losses[0]  # -KL on agreeing samples lowers the loss


def test_fast_meta_state_roundtrip():
    _roundtrip(lambda: _fast(student=_student(), warmup=1), batches_before=2)
    _roundtrip(lambda: _fast(meta="reptile"), batches_before=1)


def test_best_tracker_keeps_lowest_loss_step():
    from dfkd_fast.synthesis._generator_common import BestTracker

    tr = BestTracker()
    for i, v in enumerate([3.0, 1.0, float("nan"), 2.0, 1.0]):
        tr.update(torch.tensor(v), torch.full((2,), float(i)))
    assert tr.best[0].tolist() == [1.0, 1.0]  # strict: the later tie and the NaN step do not win
    assert tr.losses()[:2] == (3.0, 1.0) and len(tr.losses()) == 5


# ---------------------------------------------------------------- fused backends
_CPP_OK, _CPP_WHY = _backend.cpp_available("crop_flip_fwd")


@pytest.mark.skipif(not _CPP_OK, reason=f"compiled extension: {_CPP_WHY}")
@pytest.mark.parametrize("method", ["cmi", "fast_meta"])
def test_fused_backend_runs_and_matches_torch_loss_curve(method):
    ext = _backend.extension()
    names = ("crop_flip_fwd", "crop_flip_bwd", "bn_stat_loss_terms")
    before = [ext.call_count(n) for n in names]
    make = _cmi if method == "cmi" else _fast
    kw = {"iterations": 4} if method == "cmi" else {"g_steps": 4}
    fused = make(backend="auto", student=_student(), **kw)  # auto on CPU: the extension where it has the op
    ref = make(backend="torch", student=_student(), **kw)
    for _ in range(2):
        a, b = fused.synthesize(), ref.synthesize()
        # same RNG stream, so only float rounding of the fused ops separates the curves
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-3, atol=1e-4)
    after = [ext.call_count(n) for n in names]
    counts = dict(zip(names, zip(before, after, strict=True), strict=True))
    assert all(x > y for x, y in zip(after, before, strict=True)), counts


# ---------------------------------------------------------------- the generator base
def test_non_finite_loss_names_method_batch_and_step():
    teacher = _teacher(False)
    with torch.no_grad():
        teacher[-1].bias[0] = float("inf")  # logits +inf -> the CE becomes NaN
    synth = DAFL(teacher, K, IMG, batch_size=8, iterations=3, **TINY)
    with pytest.raises(ValueError, match=r"dafl: the loss became nan at step 0 of batch 0"):
        synth.synthesize()


def test_persistent_probe_captures_only_inside_a_batch():
    """The probe is built once; between batches the teacher's forward costs what the bare teacher costs."""
    from dfkd_fast.profiling import SyncCounter

    synth = _cmi(iterations=2)
    x = torch.rand(4, *IMG)

    def teacher_ops() -> int:
        with torch.no_grad(), SyncCounter() as sc:
            synth.teacher(x)
        return sc.aten_ops

    probe = synth.probe
    with probe.paused():
        bare = teacher_ops()
    plain = _teacher(True)
    with torch.no_grad(), SyncCounter() as sc:
        plain(x)
    assert bare == sc.aten_ops  # paused hooks run no op
    assert teacher_ops() == bare
    synth.synthesize()
    assert synth.probe is probe and teacher_ops() == bare
    with synth.batch():
        assert teacher_ops() > bare  # capturing: one stats pass per BN input


def test_adversarial_loss_kinds():
    from dfkd_fast import ops
    from dfkd_fast.synthesis.losses import adversarial_decision_loss

    students = nn.ModuleList([_student(1), _student(2)])
    synth = DFQ(_teacher(True), K, IMG, batch_size=8, student=students, **TINY)
    x, t = torch.rand(8, *IMG), torch.randn(8, K)
    kl = sum(ops.kd_kl_div(s(x), t, 2.0) for s in students) / 2
    torch.testing.assert_close(synth.adversarial_loss(x, t, "kl", 2.0), -kl)
    dec = sum(adversarial_decision_loss(s(x), t, 2.0) for s in students) / 2
    torch.testing.assert_close(synth.adversarial_loss(x, t, "decision", 2.0), dec)
    with pytest.raises(ValueError, match="'kl' or 'decision'"):
        synth.adversarial_loss(x, t, "js")
    with pytest.raises(ValueError, match="needs a student"):
        DFQ(_teacher(True), K, IMG, batch_size=8, **TINY).adversarial_loss(x, t)


@pytest.mark.parametrize("meta", ["fomaml", "reptile"])
def test_fast_meta_meta_gradient(meta):
    """FOMAML: the meta-gradient is the sum of the inner gradients of theta'; Reptile: theta - theta'."""
    synth = _fast(meta=meta, bn_mmt=0.0)
    inner: list[list[torch.Tensor]] = []
    step = synth._step

    def recording(*args):
        out = step(*args)
        inner.append([g.clone() for g in out[-1][:len(synth._fast_params)]])
        return out

    synth._step_fn = recording
    theta = [p.detach().clone() for p in synth.netG.parameters()]
    seen = {}
    synth.meta_optimizer.step = lambda: seen.update(grads=[p.grad.clone() for p in synth.netG.parameters()])
    synth.synthesize()
    assert len(inner) == 3
    if meta == "fomaml":
        expected = [sum(gs) for gs in zip(*inner, strict=True)]
    else:
        expected = [a - b for a, b in zip(theta, synth.fast.parameters(), strict=True)]
    for got, want in zip(seen["grads"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
