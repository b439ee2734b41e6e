"""Pixel-optimization synthesis: DataImpressions, ClassImpressions, DeepInversion (+ADI), ImpressionSpace.

Tiny seeded teachers built here (one with BatchNorm, one without), images 3x8x8, a few iterations.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.synthesis import REGISTRY, build_synthesizer
from dfkd_fast.synthesis.data_impressions import ClassImpressions, DataImpressions
from dfkd_fast.synthesis.losses import (
    adversarial_decision_loss,
    competition_loss,
    js_divergence,
    l2_prior,
    soft_target_ce,
    tv_loss,
)

K = 5
IMG = (3, 8, 8)  # tiny CIFAR-like input


def _teacher(bn: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), norm(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, K))
    for m in net.modules():  # "trained" running statistics, not the identity defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only add contention


@pytest.fixture
def bn_teacher() -> nn.Module:
    return _teacher(bn=True)


@pytest.fixture
def plain_teacher() -> nn.Module:
    return _teacher(bn=False)


def _check_result(res, n: int, soft: bool) -> None:
    assert res.images.shape == (n, *IMG)
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert not res.images.requires_grad
    assert res.teacher_logits.shape == (n, K)
    if soft:
        assert res.targets.shape == (n, K)
        torch.testing.assert_close(res.targets.sum(1), torch.ones(n), rtol=0, atol=1e-4)
    else:
        assert res.targets.shape == (n,) and res.targets.dtype == torch.long
    assert all(math.isfinite(v) for v in res.losses)
    assert res.seconds > 0


# ---------------------------------------------------------------- shared losses
def test_tv_and_l2_priors():
    flat = torch.full((2, 3, 5, 4), 0.3)  # constant image: no variation
    assert float(tv_loss(flat, "l1")) == 0.0 and float(tv_loss(flat, "l2")) == 0.0
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # one bright pixel: |diff| = 1 on 1 of 2 right pairs, 1 of 2 down pairs, 1/1 diag, 0/1 anti
    assert float(tv_loss(x, "l1")) == pytest.approx(0.5 + 0.5 + 1.0 + 0.0)
    assert float(tv_loss(x, "l2")) == pytest.approx(3.0)
    assert float(l2_prior(x)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind"):
        tv_loss(x, "l3")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        tv_loss(torch.zeros(3, 3), "l1")


def test_js_competition_and_adversarial():
    t = torch.randn(6, K) * 3
    s = torch.randn(6, K) * 3
    js = js_divergence(t, s, 3.0, reduction="none")
    p, q = F.softmax(t / 3, 1), F.softmax(s / 3, 1)
    m = (p + q) / 2
    ref = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    torch.testing.assert_close(js, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(js_divergence(s, t, 3.0, reduction="none"), js)  # symmetric
    assert float(js_divergence(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(js.max()) <= math.log(2) + 1e-6
    assert float(competition_loss(t, s)) == pytest.approx(1.0 - float(js.mean()), abs=1e-6)
    big = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0]])  # stable for huge logits
    assert math.isfinite(float(js_divergence(big, -big)))
    agree = t * 0.5  # same argmax as t on every row
    adv = adversarial_decision_loss(agree, t, temperature=1.0)
    p1 = F.softmax(t, 1)
    kl = (p1 * (p1.log() - F.log_softmax(agree, 1))).sum(1)
    torch.testing.assert_close(adv, -kl.mean(), rtol=1e-5, atol=1e-6)
    flipped = -t  # argmax becomes argmin: never agrees
    assert float(adversarial_decision_loss(flipped, t)) == 0.0


def test_soft_target_ce_index_targets_are_one_hot():
    z = torch.randn(4, K)
    y = torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(soft_target_ce(z, y, 20.0), soft_target_ce(z, F.one_hot(y, K).float(), 20.0))
    torch.testing.assert_close(soft_target_ce(z, y, 1.0), F.cross_entropy(z, y))


# ---------------------------------------------------------------- Data / Class Impressions
def test_registry_names():
    for name in ("data_impressions", "class_impressions", "deep_inversion", "impression_space"):
        assert name in REGISTRY


def test_data_impressions_bn_free_teacher_loss_decreases(plain_teacher):
    syn = build_synthesizer("data_impressions", plain_teacher, K, IMG, batch_size=6, iterations=25, lr=0.1,
                            lr_schedule="constant")
    assert syn.config.temperature == 20.0 and syn.config.beta == (1.0, 0.1)
    res = syn.synthesize()
    _check_result(res, 6, soft=True)
    assert len(res.losses) == 25
    assert res.losses[-1] < res.losses[0]
    cfg = DataImpressions.Config()  # published 1500 steps; lr / init for [0, 1] pixels (see the module docstring)
    assert cfg.iterations == 1500 and cfg.lr == 0.05 and cfg.init_scale == 0.1


def test_data_impressions_beta_changes_concentration(plain_teacher):
    syn = DataImpressions(plain_teacher, K, IMG, batch_size=4, iterations=1)
    classes = torch.arange(4000) % K
    sharp = syn.sample_targets(classes, beta=0.1)
    smooth = syn.sample_targets(classes, beta=1.0)
    # beta = 0.1 concentrates the mass on the simplex edges (near one-hot); beta = 1 spreads it
    assert float(sharp.max(1).values.mean()) > float(smooth.max(1).values.mean()) + 0.05
    ent = lambda y: float(-(y * y.clamp_min(1e-12).log()).sum(1).mean())  # noqa: E731
    assert ent(sharp) < ent(smooth) - 0.1
    betas = syn.batch_betas(6)  # the published half/half mixture
    assert betas.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])


def test_data_impressions_tau_applied_once(plain_teacher):
    y = torch.softmax(torch.randn(4, K, generator=torch.Generator().manual_seed(3)), 1)
    syn = DataImpressions(plain_teacher, K, IMG, batch_size=4, iterations=2, seed=11)
    res = syn.synthesize(y)
    x0 = torch.rand(4, *IMG, generator=torch.Generator().manual_seed(11)) * syn.config.init_scale  # same init
    with torch.no_grad():
        z = plain_teacher(x0)
    once = float(-(y * F.log_softmax(z / 20.0, 1)).sum(1).mean())
    twice = float(-(y * F.log_softmax(z / 400.0, 1)).sum(1).mean())
    assert res.losses[0] == pytest.approx(once, rel=1e-5)
    assert abs(once - twice) > 1e-4  # the check can tell the two apart
    torch.testing.assert_close(res.targets, y)


def test_class_impressions(plain_teacher):
    syn = ClassImpressions(plain_teacher, K, IMG, batch_size=5, iterations=20, lr=0.1, lr_schedule="constant")
    res = syn.synthesize(torch.tensor([4, 3, 2, 1, 0]))
    _check_result(res, 5, soft=False)
    assert res.targets.tolist() == [4, 3, 2, 1, 0]
    assert res.losses[-1] < res.losses[0]
    logit = ClassImpressions(plain_teacher, K, IMG, batch_size=5, iterations=20, lr=0.1, loss="logit",
                             lr_schedule="constant").synthesize()
    assert logit.losses[-1] < logit.losses[0]
    with pytest.raises(ValueError, match="loss"):
        ClassImpressions(plain_teacher, K, IMG, loss="hinge")


def test_bad_inputs(plain_teacher):
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        DataImpressions(plain_teacher, K, IMG, tau=3)
    with pytest.raises(ValueError, match="beta"):
        DataImpressions(plain_teacher, K, IMG, beta=(1.0, -1.0))
    syn = DataImpressions(plain_teacher, K, IMG, batch_size=2, iterations=1)
    with pytest.raises(ValueError, match="soft targets"):
        syn.synthesize(torch.ones(2, K + 1) / (K + 1))
    with pytest.raises(ValueError, match="class indices"):
        syn.synthesize(torch.tensor([0, K]))


def test_data_impressions_runs_on_the_named_cpp_backend(plain_teacher):
    """backend="cpp": the hot ops use the extension; the one-off class similarity (no C++ kernel) its reference."""
    from dfkd_fast import _backend

    ext = _backend.extension()
    if ext is None or not hasattr(ext, "soft_ce_fwd"):
        pytest.skip("the C++ extension dfkd_fast._C is not built")
    before = ext.call_count("soft_ce_fwd")
    res = DataImpressions(plain_teacher, K, IMG, batch_size=2, iterations=2, backend="cpp").synthesize()
    _check_result(res, 2, soft=True)
    assert ext.call_count("soft_ce_fwd") > before


def test_data_impressions_needs_linear_classifier():
    conv_head = nn.Sequential(nn.Conv2d(3, K, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # no nn.Linear
    with pytest.raises(ValueError, match="class_impressions"):
        DataImpressions(conv_head, K, IMG, iterations=1)
    res = ClassImpressions(conv_head, K, IMG, batch_size=2, iterations=2).synthesize()  # the BN/linear-free fallback
    _check_result(res, 2, soft=False)


# ---------------------------------------------------------------- DeepInversion
def test_deep_inversion_needs_bn(plain_teacher):
    with pytest.raises(ValueError, match="data_impressions"):
        build_synthesizer("deep_inversion", plain_teacher, K, IMG, iterations=2)


def test_deep_inversion_loss_decreases_and_best_is_copy(bn_teacher):
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    class Spy(DeepInversion):
        def step_loss(self, x, targets, *view):
            self.pixels = x
            return super().step_loss(x, targets, *view)

    syn = Spy(bn_teacher, K, IMG, batch_size=6, iterations=20, seed=1)
    assert syn.max_shift == 1 and syn.config.betas == (0.5, 0.99)
    res = syn.synthesize()
    _check_result(res, 6, soft=False)
    assert min(res.losses[-5:]) < res.losses[0]
    kept = res.images.clone()
    assert res.images.data_ptr() != syn.pixels.data_ptr()
    with torch.no_grad():
        syn.pixels.fill_(0.123)  # mutate the optimized tensor afterwards
    torch.testing.assert_close(res.images, kept, rtol=0, atol=0)


class _Scripted:
    """Mixin: the loss of step k is ``script[k]`` exactly, with gradient 1 per pixel (Adam moves every pixel by
    about -lr per step, so each step's pixels differ); records a copy of the pixels each loss was computed on."""

    script: tuple[float, ...] = ()

    def step_loss(self, x, targets, *view):
        self.seen = getattr(self, "seen", [])
        self.seen.append(x.detach().clone())
        s = x.sum()
        return torch.tensor(self.script[len(self.seen) - 1]) + (s - s.detach())


@pytest.mark.parametrize("script", [(5.0, 3.0, 1.0, 4.0, 6.0), (2.0, 0.5, 0.5, 0.7, 9.0), (3.0, 2.0, 1.0)])
def test_deep_inversion_returns_lowest_loss_step_not_last(bn_teacher, script):
    """keep_best: the images are the pixels of the lowest-loss step (the first on ties), not the last ones."""
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    class Scripted(_Scripted, DeepInversion):
        pass

    Scripted.script = script
    syn = Scripted(bn_teacher, K, IMG, batch_size=3, iterations=len(script), lr=0.01, seed=0)
    res = syn.synthesize()
    assert res.losses == pytest.approx(script)
    best = min(range(len(script)), key=lambda i: (script[i], i))
    assert len(syn.seen) == len(script)
    torch.testing.assert_close(res.images, syn.seen[best], rtol=0, atol=0)
    for i, x in enumerate(syn.seen):
        if i != best:
            assert not torch.equal(res.images, x), i
    torch.testing.assert_close(res.teacher_logits, bn_teacher(syn.normalize(syn.seen[best])))


def test_data_impressions_returns_last_step(plain_teacher):
    """Without keep_best (Data Impressions) the result is the pixels after the last step, even if worse."""

    class Scripted(_Scripted, DataImpressions):
        script = (1.0, 2.0, 3.0)

    syn = Scripted(plain_teacher, K, IMG, batch_size=3, iterations=3, lr=0.01, seed=0)
    res = syn.synthesize()
    assert res.losses == pytest.approx(Scripted.script)
    assert not any(torch.equal(res.images, x) for x in syn.seen)  # one Adam step past the last recorded pixels
    assert float((res.images - syn.seen[-1]).mean()) < 0  # moved down the gradient (+1) once more


def test_deep_inversion_diverging_lr_keeps_best_batch(bn_teacher):
    """A real loss at an lr that makes it oscillate: the returned pixels are the argmin step's."""
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    class Spy(DeepInversion):
        def step_loss(self, x, targets, *view):
            self.seen = getattr(self, "seen", [])
            self.seen.append(x.detach().clone())
            return super().step_loss(x, targets, *view)

    syn = Spy(bn_teacher, K, IMG, batch_size=4, iterations=12, lr=0.5, seed=3)
    res = syn.synthesize()
    best = min(range(len(res.losses)), key=lambda i: (res.losses[i], i))
    assert best != len(res.losses) - 1 and res.losses[-1] > res.losses[best], res.losses
    torch.testing.assert_close(res.images, syn.seen[best], rtol=0, atol=0)


def test_deep_inversion_keeps_one_probe_paused_outside_batches(bn_teacher):
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    syn = DeepInversion(bn_teacher, K, IMG, batch_size=2, iterations=2, seed=1)
    probe = syn.probe
    hooks = len(bn_teacher._forward_pre_hooks)
    syn.synthesize()
    syn.synthesize()
    assert syn.probe is probe and len(bn_teacher._forward_pre_hooks) == hooks  # reused, not re-registered
    with torch.no_grad():
        bn_teacher(torch.rand(2, *IMG))  # another user of the teacher outside a batch: not captured
    assert all(s is None for s in probe._stats)
    del syn
    import gc

    from dfkd_fast.synthesis.base import remove_dead_probes

    gc.collect()
    assert len(bn_teacher._forward_pre_hooks) == hooks  # never removed inside a garbage collection ...
    remove_dead_probes()  # ... but at the next safe point (the next pixel batch or probe)
    assert len(bn_teacher._forward_pre_hooks) == hooks - 1


@pytest.mark.parametrize("name", ["class_impressions", "deep_inversion", "impression_space"])
def test_non_finite_loss_names_method_and_first_bad_step(name, bn_teacher):
    """The loss stays on the device; the batch end reads it once and names the first non-finite step."""
    cls = REGISTRY[name]

    class Exploding(cls):
        calls = 0

        def step_loss(self, x, targets, *view):
            loss = super().step_loss(x, targets, *view)
            Exploding.calls += 1
            return loss * float("nan") if Exploding.calls >= 3 else loss

    extra = {"reference_images": torch.rand(4, *IMG)} if name == "impression_space" else {}
    syn = Exploding(bn_teacher, K, IMG, batch_size=2, iterations=5, **extra)
    with pytest.raises(ValueError, match=rf"{name}: the loss became nan at step 2 of batch 0 .*; lower lr"):
        syn.synthesize()


def test_adi_competition_with_student(bn_teacher):
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    student = _teacher(bn=True, seed=5).train()
    kw = dict(batch_size=4, iterations=3, seed=2)
    with_s = DeepInversion(bn_teacher, K, IMG, student=student, **kw).synthesize()
    assert student.training  # mode restored
    assert all(p.grad is None for p in student.parameters())  # no gradient reached the student
    without = DeepInversion(bn_teacher, K, IMG, **kw).synthesize()
    gap = with_s.losses[0] - without.losses[0]  # same seed -> same init and view: the gap is 1 - JS
    assert 1.0 - math.log(2) - 1e-5 <= gap <= 1.0 + 1e-5
    off = DeepInversion(bn_teacher, K, IMG, student=student, adv=0.0, **kw).synthesize()
    assert off.losses[0] == pytest.approx(without.losses[0], rel=1e-6)


def test_deep_inversion_soft_targets(bn_teacher):
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    y = torch.softmax(torch.randn(3, K), 1)
    res = DeepInversion(bn_teacher, K, IMG, batch_size=3, iterations=2).synthesize(y)
    _check_result(res, 3, soft=True)
    with pytest.raises(ValueError, match="targets must be"):
        DeepInversion(bn_teacher, K, IMG, iterations=1).synthesize(torch.zeros(2, 2, 2))


def test_deep_inversion_backend_parity(bn_teacher):
    from dfkd_fast import _backend
    from dfkd_fast.synthesis.deep_inversion import DeepInversion

    ext = _backend.extension()
    fused = ext is not None and hasattr(ext, "bn_stats_fwd")  # the C++ BN-stats path (auto on CPU when built)
    before = ext.call_count("bn_stats_fwd") if fused else 0
    kw = dict(batch_size=4, iterations=6, seed=3)
    ref = DeepInversion(bn_teacher, K, IMG, backend="torch", **kw).synthesize()
    if fused:
        assert ext.call_count("bn_stats_fwd") == before  # the reference run stays on torch
    fast = DeepInversion(bn_teacher, K, IMG, **kw).synthesize()  # default backend ("auto")
    if fused:
        assert ext.call_count("bn_stats_fwd") > before  # the fast path really ran
    # tolerance: fp32 accumulation-order differences, amplified by at most a few Adam steps
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.images, ref.images, rtol=0, atol=1e-3)


def _triton_or_skip() -> None:
    from dfkd_fast import _backend

    ok, why = _backend.triton_available(torch.device("cpu"))
    if not ok:
        pytest.skip(f"Triton backend unavailable: {why}")


@pytest.mark.parametrize("name", ["deep_inversion", "impression_space"])
def test_triton_backend_parity(name, bn_teacher):
    """The Triton kernels (interpreter on CPU) give the torch reference's loss curve and images."""
    from dfkd_fast import kernels

    _triton_or_skip()
    extra = {"reference_images": torch.rand(4, *IMG)} if name == "impression_space" else {}
    kw = dict(batch_size=4, iterations=3, seed=3, **extra)
    ref = build_synthesizer(name, bn_teacher, K, IMG, backend="torch", **kw).synthesize()
    before = kernels.LAUNCHES["bn_stats_fwd"]
    fast = build_synthesizer(name, bn_teacher, K, IMG, backend="triton", **kw).synthesize()
    assert kernels.LAUNCHES["bn_stats_fwd"] > before  # the fused stats kernel really ran
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.images, ref.images, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- ImpressionSpace
def test_impression_space_encode_decode(plain_teacher):
    from dfkd_fast.synthesis.impression_space import ImpressionSpace

    ref_images = torch.rand(6, *IMG, generator=torch.Generator().manual_seed(4))
    syn = ImpressionSpace(plain_teacher, K, IMG, batch_size=4, iterations=25, reference_images=ref_images, seed=0)
    assert syn.channels == [4, 6]
    assert syn.code.shape == (2 * (4 + 6),)
    torch.testing.assert_close(syn.encode(ref_images, batch_size=4), syn.code, rtol=1e-5, atol=1e-6)  # chunked
    torch.testing.assert_close(syn.encode(ref_images.repeat(2, 1, 1, 1)), syn.code, rtol=1e-5, atol=1e-6)
    mean0, var0 = syn.split_code(syn.code)[0]
    with torch.no_grad():
        r1 = plain_teacher[0](ref_images)
    torch.testing.assert_close(mean0, r1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var0, r1.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    res = syn.synthesize()
    _check_result(res, 4, soft=False)
    assert min(res.losses[-5:]) < res.losses[0]
    with pytest.raises(ValueError, match="not class-conditional"):
        syn.synthesize(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="code must be"):
        ImpressionSpace(plain_teacher, K, IMG, code=torch.zeros(3))
    with pytest.raises(ValueError, match="no code"):
        ImpressionSpace(plain_teacher, K, IMG, iterations=1).synthesize()


def test_impression_space_translation_keeps_content(plain_teacher):
    from dfkd_fast.synthesis.impression_space import ImpressionSpace

    syn = ImpressionSpace(plain_teacher, K, IMG, iterations=8)
    source = torch.rand(3, *IMG, generator=torch.Generator().manual_seed(7))
    code = syn.encode(torch.rand(5, *IMG, generator=torch.Generator().manual_seed(8)))
    free, _ = syn.match(source, code)
    kept, _ = syn.match(source, code, content=source, content_weight=1e3)
    assert float((kept - source).abs().mean()) < float((free - source).abs().mean())


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["data_impressions", "class_impressions", "deep_inversion", "impression_space"])
def test_state_dict_round_trip(name, bn_teacher):
    extra = {"reference_images": torch.rand(4, *IMG)} if name == "impression_space" else {}

    def make():
        return build_synthesizer(name, bn_teacher, K, IMG, batch_size=3, iterations=3, seed=9, **extra)

    a = make()
    a.synthesize()
    state = a.state_dict()
    nxt = a.synthesize()
    b = make()
    b.load_state_dict(state)
    again = b.synthesize()
    torch.testing.assert_close(again.images, nxt.images, rtol=0, atol=0)
    torch.testing.assert_close(again.targets, nxt.targets, rtol=0, atol=0)
    assert again.losses == nxt.losses
    fresh = make().synthesize()
    assert not torch.equal(fresh.images, nxt.images)  # the restored state, not a fresh start, produced it
