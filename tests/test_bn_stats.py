"""BN-statistic op (SPEC §3.1): values and gradients of every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from backend_ran import check_param_backend, ran
from dfkd_fast.kernels.bn_stats import bn_stat_loss_ref, bn_stats_ref, channel_stats_ref, stat_loss_terms_ref

from dfkd_fast import _backend, kernels
from dfkd_fast.ops import bn_stat_loss, bn_stats, channel_stats

CPP_OK, CPP_WHY = _backend.cpp_available("bn_stats_fwd")
TRITON_OK, TRITON_WHY = _backend.triton_available(torch.device("cpu"))
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not CPP_OK, reason=CPP_WHY or "")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY or "")),
]
FAST = BACKENDS[1:]
SHAPES = [
    (1, 1, 1, 1),  # minimal
    (3, 5, 7, 6),  # non-pow2 C and HW
    (2, 64, 1, 1),  # HW=1
    (2, 3, 9),  # (N, C, L)
    (5, 3),  # (N, C)
    (2, 1030, 2, 1),  # > 1024 channels
]
TOL = {torch.float32: (1e-5, 1e-5)}  # (rtol, atol) vs the float64 reference
FWD = {"triton": ("bn_stats_fwd", "stat_loss_fwd"), "cpp": ("bn_stats_fwd", "bn_stat_loss_terms")}
BWD = {"triton": ("bn_stats_bwd",), "cpp": ("bn_stats_bwd",), "torch": ()}


@pytest.fixture(autouse=True)
def _fused_path_ran(request):
    """Every test parametrized with a fused backend must launch that backend's kernels (no silent fallback)."""
    yield from check_param_backend(request, FWD, exempt=("test_bad_inputs_raise",))


def _make(shape, layout: str, dtype=torch.float32, offset: float = 3.0) -> torch.Tensor:
    x = (offset + torch.randn(shape)).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "slice":  # non-contiguous view: channel and last-dim slicing
        x = x[:, 1:, ..., ::2] if x.dim() > 2 else x[:, 1:]
    return x


def _layouts(shape):
    out = ["contiguous"]
    if len(shape) == 4:
        out.append("channels_last")
    if shape[1] > 1:
        out.append("slice")
    return out


CASES = [(s, lay) for s in SHAPES for lay in _layouts(s)]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_channel_stats_values_and_grads(backend, shape, layout):
    x = _make(shape, layout).requires_grad_()
    mean, var, inst = channel_stats(x, backend=backend)
    xd = x.detach().double().requires_grad_()
    rmean, rvar, rinst = channel_stats_ref(xd)
    rtol, atol = TOL[torch.float32]
    for a, b in ((mean, rmean), (var, rvar), (inst, rinst)):
        assert a.dtype == torch.float32
        _close(a, b, rtol, atol)
    grads = [torch.randn(t.shape) for t in (mean, var, inst)]
    with ran(backend, BWD[backend]):  # the backward is the fused kernel too
        torch.autograd.backward([mean, var, inst], grads)
    torch.autograd.backward([rmean, rvar, rinst], [g.double() for g in grads])
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    if layout == "channels_last":
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    _close(x.grad, xd.grad, rtol, atol)


@pytest.mark.parametrize("backend", FAST)
def test_partial_grads_only_mean(backend):
    x = _make((2, 4, 3, 3), "contiguous").requires_grad_()
    mean, _ = bn_stats(x, backend=backend)
    mean.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 18))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_is_stable(backend, layout):
    x = _make((4, 3, 8, 8), layout, offset=1e3)
    mean, var, _ = channel_stats(x, backend=backend)
    rmean, rvar = bn_stats_ref(x.double())
    torch.testing.assert_close(var.double(), rvar, rtol=2e-3, atol=0)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_vs_eager(backend, dtype, layout):
    """Error vs an fp32 reference at most 2x eager's error in the same dtype (+ small atol)."""
    x = _make((3, 6, 5, 4), layout, dtype).requires_grad_()
    ours = channel_stats(x, backend=backend)
    xf = x.detach().float().requires_grad_()
    ref = channel_stats_ref(xf)
    xe = x.detach().clone().requires_grad_()  # eager PyTorch computing in the low dtype
    em = xe.mean(dim=(0, 2, 3))
    ev = ((xe - em.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    ei = xe.mean(dim=(2, 3))
    eager = (em, ev, ei)
    grads = [torch.randn(t.shape) for t in ref]
    torch.autograd.backward(list(ours), grads)
    torch.autograd.backward(list(ref), grads)
    torch.autograd.backward(list(eager), [g.to(dtype) for g in grads])
    atol = 1e-3 if dtype == torch.float16 else 1e-2
    for a, r, e in [*zip(ours, ref, eager, strict=True), (x.grad, xf.grad, xe.grad)]:
        err = (a.float() - r).abs().max().item()
        err_eager = (e.float() - r).abs().max().item()
        assert err <= 2 * err_eager + atol, (err, err_eager)
    assert x.grad.dtype == dtype


def test_reference_gradcheck_float64():
    feats = [torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 4, dtype=torch.float64, requires_grad=True)]
    rms = [torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    rvs = [torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) + 0.5]
    mst = [(torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)), None]
    for kind in ("l2", "kl", "mse"):
        assert torch.autograd.gradcheck(lambda a, b: bn_stat_loss_ref([a, b], rms, rvs, [2.0, 1.0], kind, mst, 0.9),
                                        feats)
    assert torch.autograd.gradcheck(lambda a: channel_stats_ref(a), (feats[0],))


def _loss_inputs(dtypes=(torch.float32, torch.float32, torch.float32)):
    feats = [_make((4, 6, 5, 5), "channels_last", dtypes[0]), _make((4, 8, 3, 3), "slice", dtypes[1]),
             _make((4, 10), "contiguous", dtypes[2])]
    chans = [f.shape[1] for f in feats]
    rms = [torch.randn(c) for c in chans]
    rvs = [torch.rand(c) + 0.5 for c in chans]
    mst = [(torch.randn(c), torch.rand(c) + 0.1) for c in chans]
    mst[1] = None  # a layer without moving averages yet
    return [f.requires_grad_() for f in feats], rms, rvs, mst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["l2", "kl", "mse"])
@pytest.mark.parametrize("variant", ["plain", "weights+momentum"])
def test_bn_stat_loss_vs_reference(backend, kind, variant):
    feats, rms, rvs, mst = _loss_inputs()
    w, ms, mom = (None, None, 0.0) if variant == "plain" else ([3.0, 1.0, 0.5], mst, 0.9)
    loss = bn_stat_loss(feats, rms, rvs, w, kind, ms, mom, backend=backend)
    with ran(backend, BWD[backend], at_least=len(feats)):
        grads = torch.autograd.grad(loss, feats)
    fd = [f.detach().double().requires_grad_() for f in feats]
    ref = bn_stat_loss_ref(fd, rms, rvs, w, kind, ms, mom)
    rgrads = torch.autograd.grad(ref, fd)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    _close(loss, ref, 1e-5, 1e-5)
    for g, r in zip(grads, rgrads, strict=True):
        _close(g, r, 1e-4, 1e-6)


@pytest.mark.parametrize("backend", FAST)
def test_bn_stat_loss_mixed_dtypes(backend):
    feats, rms, rvs, _ = _loss_inputs((torch.bfloat16, torch.float16, torch.float32))
    loss = bn_stat_loss(feats, rms, rvs, kind="l2", backend=backend)
    grads = torch.autograd.grad(loss, feats)
    fd = [f.detach().double().requires_grad_() for f in feats]
    ref = bn_stat_loss_ref(fd, rms, rvs, kind="l2")
    rgrads = torch.autograd.grad(ref, fd)
    _close(loss, ref, 1e-5, 1e-5)
    for f, g, r in zip(feats, grads, rgrads, strict=True):
        assert g.dtype == f.dtype
        _close(g, r, 2e-2, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_zero_difference_has_zero_grad(backend):
    x = _make((3, 4, 2, 2), "contiguous").requires_grad_()
    mean, var = bn_stats(x.detach(), backend=backend)  # the backend's own stats: differences are exactly 0
    loss = bn_stat_loss([x], [mean], [var], kind="l2", backend=backend)
    (g,) = torch.autograd.grad(loss, [x])
    assert loss.item() == 0.0
    assert torch.isfinite(g).all() and g.abs().max() == 0.0  # norm'(0) := 0, as in torch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["l2", "kl", "mse"])
def test_stat_loss_terms_match_reference(backend, kind):
    """The one-kernel loss over concatenated stats vs autograd through the per-layer reference."""
    from dfkd_fast.ops.bn_stats import bn_stat_loss_from_stats

    chans = [3, 1, 7]
    means = [torch.randn(c, requires_grad=True) for c in chans]
    vars_ = [(torch.rand(c) + 0.2).requires_grad_() for c in chans]
    rms = [torch.randn(c) for c in chans]
    rvs = [torch.rand(c) + 0.5 for c in chans]
    terms = bn_stat_loss_from_stats(means, vars_, rms, rvs, [2.0, 1.0, 0.5], kind, backend=backend)
    assert terms.shape == (3,)
    from dfkd_fast.kernels.bn_stats import layer_loss_ref

    ref = torch.stack([w * layer_loss_ref(m, v, a, b, kind)
                       for w, m, v, a, b in zip([2.0, 1.0, 0.5], means, vars_, rms, rvs, strict=True)])
    torch.testing.assert_close(terms, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(terms.sum(), means + vars_)
    r = torch.autograd.grad(ref.sum(), means + vars_)
    for a, b in zip(g, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    offsets = torch.tensor([0, 3, 4, 11])
    vec = stat_loss_terms_ref(torch.cat(means).detach(), torch.cat(vars_).detach(), torch.cat(rms), torch.cat(rvs),
                              offsets, torch.tensor([2.0, 1.0, 0.5]), kind)[0]
    torch.testing.assert_close(vec, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY or "")
def test_triton_really_ran():
    before = dict(kernels.LAUNCHES)
    feats, rms, rvs, _ = _loss_inputs()
    loss = bn_stat_loss(feats, rms, rvs, backend="triton")
    loss.backward()
    for name in ("bn_stats_fwd", "bn_stats_bwd", "stat_loss_fwd"):
        assert kernels.LAUNCHES[name] > before.get(name, 0), name
    assert kernels.LAUNCHES["bn_stats_fwd"] - before.get("bn_stats_fwd", 0) == 3


@pytest.mark.skipif(not CPP_OK, reason=CPP_WHY or "")
def test_cpp_really_ran():
    ext = _backend.extension()
    before = {n: ext.call_count(n) for n in ("bn_stats_fwd", "bn_stats_bwd", "bn_stat_loss_terms")}
    feats, rms, rvs, _ = _loss_inputs()
    bn_stat_loss(feats, rms, rvs, backend="cpp").backward()
    assert ext.call_count("bn_stats_fwd") == before["bn_stats_fwd"] + 3
    assert ext.call_count("bn_stats_bwd") == before["bn_stats_bwd"] + 3
    assert ext.call_count("bn_stat_loss_terms") == before["bn_stat_loss_terms"] + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    feats, rms, rvs, _ = _loss_inputs()
    with pytest.raises(ValueError, match="empty"):
        bn_stat_loss([], [], [], backend=backend)
    with pytest.raises(ValueError, match="layer 1"):
        bn_stat_loss(feats, [rms[0], rms[0], rms[2]], rvs, backend=backend)
    with pytest.raises(ValueError, match="kind"):
        bn_stat_loss(feats, rms, rvs, kind="l1", backend=backend)
    with pytest.raises(ValueError, match="weights"):
        bn_stat_loss(feats, rms, rvs, weights=[1.0], backend=backend)
    for bad in (float("nan"), float("inf")):
        x = feats[0].detach().clone()
        x[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            bn_stat_loss([x, feats[1], feats[2]], rms, rvs, backend=backend)
        with pytest.raises(ValueError, match="NaN or Inf"):
            channel_stats(x, backend=backend)
    with pytest.raises(ValueError, match="momentum"):
        bn_stat_loss(feats, rms, rvs, momentum_stats=[(rms[0], rvs[0])], momentum=0.5, backend=backend)
    with pytest.raises(ValueError, match="float"):
        channel_stats(torch.ones(2, 3, dtype=torch.int64), backend=backend)


def test_auto_backend_float64_falls_back_to_reference():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    mean, var = bn_stats(x)
    assert mean.dtype == torch.float64
    torch.testing.assert_close(var, x.var(dim=(0, 2), unbiased=False))
