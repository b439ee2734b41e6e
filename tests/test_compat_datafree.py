"""dfkd_fast.compat.datafree: the reference ``datafree`` API on dfkd_fast.

Values are checked against eager re-implementations of the reference semantics written here (BN-prior hook,
``F.kl_div``-style reductions, JS divergence, normalization), and the synthesizers are driven by a loop written
the way the reference ``datafree_kd.py`` is (synthesize -> sample -> KD with ``kldiv``) on tiny BN teachers.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_fast.compat import datafree
from dfkd_fast.models import build_model, last_linear, list_models

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


# ------------------------------------------------------------------ eager reference semantics (written here)
def ref_bn_prior(x, bn, mmt=None, rate=0.0):
    """r_feature = ||v_run - v||_2 + ||m_run - m||_2 with (m, v) blended with mmt at ``rate``; also (mean, var)."""
    c = x.shape[1]
    mean = x.mean(dim=(0, 2, 3))
    var = x.transpose(0, 1).reshape(c, -1).var(dim=1, unbiased=False)
    m, v = (mean, var) if mmt is None else ((1 - rate) * mean + rate * mmt[0], (1 - rate) * var + rate * mmt[1])
    return torch.linalg.vector_norm(bn.running_var - v) + torch.linalg.vector_norm(bn.running_mean - m), mean, var


def _reduce(elem, reduction):
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    if reduction == "mean":
        return elem.sum() / elem.numel()
    return elem.sum() / elem.shape[0]  # batchmean


def ref_kldiv(logits, targets, T, reduction):
    """T^2 * p (log p - log q) element-wise with p = softmax(t/T), q = softmax(s/T) over dim 1, then reduced."""
    log_q = torch.log_softmax(logits.double() / T, dim=1)
    p = torch.softmax(targets.double() / T, dim=1)
    return _reduce(torch.xlogy(p, p) - p * log_q, reduction) * T * T


def ref_jsdiv(logits, targets, T, reduction):
    p, q = torch.softmax(logits.double() / T, 1), torch.softmax(targets.double() / T, 1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * _reduce(m * (m.log() - p.log()), reduction) + 0.5 * _reduce(m * (m.log() - q.log()), reduction)


def _bn_with_stats(c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _teacher(name="lenet5_bn"):
    """A zoo BN teacher whose running statistics come from a few train-mode forwards (not the 0 / 1 defaults)."""
    torch.manual_seed(0)
    t = build_model(name, 10, 3, 32)
    with torch.no_grad():
        t.train()
        for _ in range(3):
            t(torch.rand(16, 3, 32, 32) * 2 - 0.5)
    return t.eval()


# ----------------------------------------------------------------------------------------------------- hooks
def test_deepinversion_hook_matches_reference_with_momentum():
    bn = _bn_with_stats()
    hook = datafree.hooks.DeepInversionHook(bn, 0.6)  # momentum passed positionally, as Fast-Datafree does
    assert hook.mmt_rate == 0.6 and hook.mmt is None and hook.tmp_val is None
    x1 = torch.randn(8, 4, 5, 5, requires_grad=True)
    bn(x1)
    want, mean1, var1 = ref_bn_prior(x1, bn)
    torch.testing.assert_close(hook.r_feature, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hook.tmp_val[0], mean1)
    torch.testing.assert_close(hook.tmp_val[1], var1)
    g, = torch.autograd.grad(hook.r_feature, x1)
    g_ref, = torch.autograd.grad(want, x1)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)

    hook.update_mmt()  # first call copies
    torch.testing.assert_close(hook.mmt[0], mean1.detach())
    x2 = torch.randn(8, 4, 5, 5) * 2 + 1
    bn(x2)
    want2, mean2, var2 = ref_bn_prior(x2, bn, (mean1.detach(), var1.detach()), 0.6)
    torch.testing.assert_close(hook.r_feature, want2.float(), rtol=1e-5, atol=1e-6)
    hook.update_mmt()  # mmt <- r mmt + (1 - r) new
    torch.testing.assert_close(hook.mmt[0], 0.6 * mean1.detach() + 0.4 * mean2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hook.mmt[1], 0.6 * var1.detach() + 0.4 * var2, rtol=1e-5, atol=1e-6)

    hook.remove()
    before = hook.r_feature
    bn(x1.detach())
    assert hook.r_feature is before


def test_deepinversion_hook_cmi_signature_on_a_zoo_teacher():
    teacher = _teacher()
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [datafree.DeepInversionHook(m) for m in bns]  # CMI's DeepInversionHook(module): no momentum
    feats = datafree.register_hooks(bns)
    inst = [datafree.InstanceMeanHook(m) for m in bns]
    x = torch.rand(6, 3, 32, 32)
    teacher(x)
    total = sum(h.r_feature for h in hooks)
    want = sum(ref_bn_prior(f.input, m)[0] for f, m in zip(feats, bns, strict=True))
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    for f, h in zip(feats, inst, strict=True):
        torch.testing.assert_close(h.instance_mean, f.input.mean(dim=(2, 3)))
        assert h.instance_mean.shape == f.input.shape[:2]
    for h in (*hooks, *feats, *inst):
        h.remove()
    with pytest.raises(ValueError, match="mmt_rate must be in"):
        hooks[0].mmt_rate = 1.5


# ------------------------------------------------------------------------------------------------ criterions
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kldiv_every_reduction_matches_reference(reduction, T):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(6, 10, generator=g) * 3).requires_grad_()
    t = (torch.randn(6, 10, generator=g) * 3).requires_grad_()
    got = datafree.criterions.kldiv(s, t, T=T, reduction=reduction)
    want = ref_kldiv(s, t, T, reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.rand(got.shape, generator=g, dtype=torch.float64)
    gs, gt = torch.autograd.grad((got.double() * w).sum(), [s, t])
    rs, rt = torch.autograd.grad((want * w).sum(), [s, t])
    torch.testing.assert_close(gs.double(), rs.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), rt.double(), rtol=1e-4, atol=1e-6)
    crit = datafree.KLDiv(T=T, reduction=reduction)
    torch.testing.assert_close(crit(s, t), got)


def test_kldiv_runs_the_fused_op_and_handles_spatial_logits(monkeypatch):
    calls = []
    fused = datafree.ops.kd_kl_div

    def spy(*a, **k):
        calls.append(a[3] if len(a) > 3 else k.get("reduction"))
        return fused(*a, **k)

    monkeypatch.setattr(datafree.ops, "kd_kl_div", spy)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for red in ("batchmean", "sum", "mean", "none"):
        datafree.kldiv(s, t, T=2.0, reduction=red)
    assert calls == ["batchmean", "sum", "sum"]  # 'mean' = fused sum / (N K); 'none' is element-wise, eager
    s4, t4 = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)  # segmentation-style logits, softmax over dim 1
    for red in ("batchmean", "mean"):
        torch.testing.assert_close(datafree.kldiv(s4, t4, T=2.0, reduction=red).double(), ref_kldiv(s4, t4, 2.0, red),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        datafree.kldiv(s, t, reduction="avg")


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_jsdiv_matches_reference(reduction):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g) * 4, torch.randn(5, 7, generator=g) * 4
    got = datafree.criterions.jsdiv(s, t, T=3, reduction=reduction)
    torch.testing.assert_close(got.double(), ref_jsdiv(s, t, 3, reduction), rtol=1e-5, atol=1e-6)


def test_other_criterions_match_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 6, 5, generator=g)
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    torch.testing.assert_close(datafree.criterions.get_image_prior_losses(x), sum(d.abs().mean() for d in diffs))
    logits = torch.randn(7, 4, generator=g)
    pbar = torch.softmax(logits.double(), 1).mean(0)
    torch.testing.assert_close(datafree.criterions.class_balance_loss(logits).double(), (pbar * pbar.log()).sum())
    nll = -torch.log_softmax(logits.double(), 1).max(1).values.mean()
    torch.testing.assert_close(datafree.criterions.onehot_loss(logits).double(), nll)


def test_reference_submodules_import():
    from dfkd_fast.compat.datafree.criterions import kldiv
    from dfkd_fast.compat.datafree.hooks import DeepInversionHook, InstanceMeanHook
    from dfkd_fast.compat.datafree.models.generator import Generator
    from dfkd_fast.compat.datafree.synthesis import CMISynthesizer, DeepInvSyntheiszer, FastMetaSynthesizer
    from dfkd_fast.compat.datafree.utils import Normalizer

    assert kldiv is datafree.kldiv and DeepInversionHook is datafree.DeepInversionHook
    assert InstanceMeanHook is datafree.InstanceMeanHook and Normalizer is datafree.Normalizer
    assert Generator is datafree.Generator and DeepInvSyntheiszer is datafree.DeepInvSynthesizer
    assert all(issubclass(c, datafree.BaseSynthesis) for c in (CMISynthesizer, FastMetaSynthesizer))


# ---------------------------------------------------------------------------------------------- normalizer
def test_normalizer_round_trip_and_values():
    x = torch.rand(2, 3, 4, 4)
    n = datafree.utils.Normalizer(MEAN, STD)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    y = n(x)
    torch.testing.assert_close(y, (x - m) / s)
    torch.testing.assert_close(n(y, True), x)  # the reference's positional reverse flag
    torch.testing.assert_close(datafree.Normalizer(MEAN, STD, reverse=True)(y), x)
    torch.testing.assert_close(datafree.normalize(y, MEAN, STD, reverse=True), x)
    with pytest.raises(ValueError, match="std must be > 0"):
        datafree.Normalizer(MEAN, (0.2, 0.0, 0.2))


# ------------------------------------------------------------------------------------- zoo return_features
@pytest.mark.parametrize("name", list_models())
def test_zoo_return_features(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        logits, feats = model(x, return_features=True)
    fc = last_linear(model)
    assert logits.shape == (2, 10) and feats.shape == (2, fc.in_features)
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(fc(feats), logits)  # penultimate = the classifier's input


# ------------------------------------------------------------------------- a datafree_kd.py-style driver
def _pil_transform(normalizer):
    """What a torchvision ``ToTensor() + Normalize`` pipeline does to a PIL image, written with numpy."""
    def transform(img):
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return normalizer(x[None])[0]
    return transform


def _make_synthesizer(method, teacher, student, normalizer, transform, save_dir):
    common = dict(num_classes=10, img_size=(3, 32, 32), iterations=3, synthesis_batch_size=8, sample_batch_size=6,
                  adv=0.5, bn=1, oh=1, save_dir=save_dir, transform=transform, normalizer=normalizer, device="cpu")
    if method == "deepinv":
        return datafree.synthesis.DeepInvSyntheiszer(teacher=teacher, student=student, lr_g=0.05, tv=1e-4, l2=0.0,
                                                     **common)
    generator = datafree.models.generator.Generator(nz=16, ngf=8, img_size=32, nc=3)
    if method == "cmi":
        return datafree.synthesis.CMISynthesizer(teacher, student, generator, nz=16, feature_layers=None,
                                                 bank_size=64, n_neg=16, head_dim=8, lr_g=1e-3, cr=0.8, cr_T=0.1,
                                                 **common)
    return datafree.synthesis.FastMetaSynthesizer(teacher, student, generator, nz=16, lr_g=5e-3, lr_z=0.015,
                                                  warmup=1, reset_l0=1, reset_bn=0, bn_mmt=0.9, is_maml=1, **common)


@pytest.mark.parametrize("method", ["deepinv", "cmi", "fast_meta"])
def test_datafree_kd_driver_loop(method, tmp_path):
    teacher, student = _teacher(), build_model("lenet5_half", 10, 3, 32)
    normalizer = datafree.utils.Normalizer(MEAN, STD)
    synthesizer = _make_synthesizer(method, teacher, student, normalizer, _pil_transform(normalizer),
                                    str(tmp_path / "pool"))
    criterion = datafree.criterions.KLDiv(T=4)
    optimizer = torch.optim.SGD(student.parameters(), 0.05, momentum=0.9)
    before = [p.detach().clone() for p in student.parameters()]
    meta_before = None if method != "fast_meta" else [p.detach().clone() for p in synthesizer.generator.parameters()]
    for _ in range(2):  # epochs
        if method == "fast_meta":  # Fast-Datafree convention: (vis_results, seconds)
            vis_results, cost = synthesizer.synthesize()
            assert cost > 0
        else:
            vis_results = synthesizer.synthesize()
        x = vis_results["synthetic"]
        assert x.shape == (8, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
        student.train()
        teacher.eval()
        for _ in range(3):  # kd_steps
            images = synthesizer.sample()
            with torch.no_grad():
                t_out, t_feat = teacher(images, return_features=True)
            s_out = student(images.detach())
            loss_s = criterion(s_out, t_out.detach())
            # fp32 against fp64: T^2 = 16 times the round-off of sum p (log p - log q) near 0
            torch.testing.assert_close(loss_s.double(), ref_kldiv(s_out, t_out, 4.0, "batchmean"), rtol=1e-5,
                                       atol=1e-5)
            optimizer.zero_grad()
            loss_s.backward()
            optimizer.step()
            assert images.shape[1:] == (3, 32, 32) and 1 <= images.shape[0] <= 6 and t_feat.shape[1] == 84
            # every sampled image is one of the kept images, through ToTensor + normalization
            kept = synthesizer.data_pool.images().float().div(255)
            d = torch.cdist(normalizer(images, reverse=True).flatten(1), kept.flatten(1))
            assert float(d.min(dim=1).values.max()) < 1e-3
    assert len(synthesizer.data_pool) == 16
    assert len(list((tmp_path / "pool").glob("*.png"))) == 16
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    if method == "fast_meta":  # the caller's generator is the meta generator, updated in place
        assert synthesizer.synth.netG is synthesizer.generator
        assert any(not torch.equal(a, b) for a, b in zip(meta_before, synthesizer.generator.parameters(), strict=True))
    if method == "cmi":
        assert synthesizer.synth.netG is synthesizer.generator


def test_sample_without_transform_is_normalized_and_one_pass_per_synthesis():
    teacher = _teacher()
    normalizer = datafree.Normalizer(MEAN, STD)
    synth = datafree.DeepInvSynthesizer(teacher, None, num_classes=10, img_size=(3, 32, 32), iterations=2,
                                        synthesis_batch_size=5, sample_batch_size=2, normalizer=normalizer)
    with pytest.raises(RuntimeError, match="call synthesize"):
        synth.sample()
    out = synth.synthesize()
    assert set(out) == {"synthetic"}
    batches = [synth.sample() for _ in range(3)]
    assert [b.shape[0] for b in batches] == [2, 2, 1]  # a DataLoader pass without drop_last
    seen = normalizer(torch.cat(batches), reverse=True)
    kept = synth.data_pool.images().float() / 255
    torch.testing.assert_close(seen.sort(dim=0).values, kept.sort(dim=0).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(kept, (out["synthetic"] * 255).floor() / 255)  # as a PNG round trip keeps them
    assert isinstance(synth.synthesize(), dict)
    assert isinstance(datafree.DeepInvSyntheiszer(teacher, None, 10, (3, 32, 32), iterations=1, synthesis_batch_size=2,
                                                  return_cost=True).synthesize(), tuple)


def test_fast_meta_reset_l0_and_warmup_follow_the_reference():
    teacher = _teacher()
    gen = datafree.Generator(nz=8, ngf=4, img_size=32, nc=3)
    with torch.no_grad():
        gen.l1[0].bias.fill_(1.0)
    synth = datafree.FastMetaSynthesizer(teacher, build_model("lenet5_half", 10, 3, 32), gen, nz=8, num_classes=10,
                                         img_size=(3, 32, 32), iterations=1, lr_g=1e-12, synthesis_batch_size=2,
                                         warmup=5, reset_l0=1, adv=1.0, normalizer=datafree.Normalizer(MEAN, STD))
    assert synth.synth.config.warmup == 4  # the reference's ep counts from 1: adversarial from its batch 5
    assert synth.synth.config.meta == "fomaml" and synth.synth.config.bn_mmt == 0
    synth.ep = 120 + 5 - 2
    synth.synthesize()  # ep 124: no reset
    assert torch.all(gen.l1[0].bias == 1.0)
    synth.synthesize()  # ep 125 = 120 + warmup: first layer re-drawn (lr_g ~ 0, so only the reset moves it)
    assert float(gen.l1[0].bias.detach().abs().max()) < 1e-9
    assert 0.01 < float(gen.l1[0].weight.detach().std()) < 0.03


def test_init_dataset_and_argument_errors(tmp_path):
    from PIL import Image

    teacher = _teacher()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    gen = datafree.Generator(nz=8, ngf=4, img_size=32, nc=3)
    synth = datafree.CMISynthesizer(teacher, None, gen, nz=8, num_classes=10, img_size=(3, 32, 32), iterations=1,
                                    synthesis_batch_size=2, init_dataset=str(tmp_path), head_dim=4, n_neg=4)
    assert len(synth.data_pool) == 3
    assert synth.sample().shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="feature_layers"):
        datafree.CMISynthesizer(teacher, None, gen, nz=8, num_classes=10, img_size=(3, 32, 32),
                                feature_layers=[teacher.features[1]])
    with pytest.raises(ValueError, match="nz=16 but the generator takes nz=8"):
        datafree.FastMetaSynthesizer(teacher, None, gen, nz=16, num_classes=10, img_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"img_size must be \(C, H, W\)"):
        datafree.DeepInvSyntheiszer(teacher, None, 10, (32, 32))


# ------------------------------------------------------------------------------------------ README example
def test_readme_datafree_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use dfkd_fast inside DataFree-style code", 1)
    assert len(section) == 2, "README.md lacks the section 'Use dfkd_fast inside DataFree-style code'"
    code = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert code is not None
    lines = [ln for ln in code.group(1).splitlines() if ln.strip()]
    assert len(lines) == 5, lines
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(code.group(1), "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    assert ns["vis"]["synthetic"].shape == (32, 3, 32, 32)
    assert ns["images"].shape == (16, 3, 32, 32)
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
    assert all(p.grad is not None for p in ns["student"].parameters())
