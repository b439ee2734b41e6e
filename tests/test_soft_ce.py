"""soft_target_cross_entropy / kd_kl_div: fused Triton (interpreter) and C++ paths vs the fp32/fp64 reference."""
from __future__ import annotations

import pytest
import torch
from backend_ran import check_param_backend, ran
from dfkd_fast.kernels.soft_ce import kd_kl_div_fwd, kd_kl_div_ref, soft_target_cross_entropy_ref

from dfkd_fast import _backend, kernels
from dfkd_fast.ops import kd_kl_div, soft_target_cross_entropy

HAS_CPP, CPP_WHY = _backend.cpp_available("soft_ce_fwd")
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason=CPP_WHY)),
    pytest.param("triton", marks=pytest.mark.skipif(not kernels.HAS_TRITON, reason="no triton")),
]
FUSED = BACKENDS[1:]
LOSSES = {"ce": (soft_target_cross_entropy, soft_target_cross_entropy_ref),
          "kl": (kd_kl_div, kd_kl_div_ref)}
TOL = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-10, 1e-12)}  # (rtol, atol) for loss and grads
FWD = {"triton": ("soft_ce_fwd", "kd_kl_fwd"), "cpp": ("soft_ce_fwd", "kd_kl_fwd")}


@pytest.fixture(autouse=True)
def _fused_path_ran(request):
    """Every test parametrized with a fused backend must launch that backend's kernel (no silent fallback)."""
    yield from check_param_backend(request, FWD)

SHAPES = [
    (1, 1),  # minimal: N=1, K=1 (loss and gradient are exactly 0 for normalized targets)
    (1, 10),  # N=1
    (5, 17),  # odd K
    (3, 1000),  # ImageNet-size K in one tile
]


def _inputs(kind: str, n: int, k: int, dtype: torch.dtype = torch.float32, scale: float = 4.0):
    a = torch.randn(n, k, dtype=torch.float64) * scale
    if kind == "ce":
        b = torch.distributions.Dirichlet(torch.full((k,), 0.3, dtype=torch.float64)).sample((n,))
    else:
        b = torch.randn(n, k, dtype=torch.float64) * scale
    return a.to(dtype), b.to(dtype)


def _run(kind, backend, a, b, temperature, reduction, grad_b=True):
    fn = LOSSES[kind][0] if backend != "ref" else LOSSES[kind][1]
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(grad_b)
    kwargs = {} if backend == "ref" else {"backend": backend}
    out = fn(a, b, temperature, reduction, **kwargs)
    # a non-trivial upstream gradient (per row for reduction='none'), the same for every backend
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [a, b] if grad_b else [a], g)
    return out.detach(), grads


def _counter(backend: str, kind: str) -> int:
    if backend == "triton":
        return kernels.LAUNCHES["soft_ce_fwd" if kind == "ce" else "kd_kl_fwd"]
    if backend == "cpp":
        return _backend.extension().call_count("soft_ce_fwd" if kind == "ce" else "kd_kl_fwd")
    return 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_grads_fp32(backend, kind, shape):
    a, b = _inputs(kind, *shape)
    reductions = ["mean", "none"] if kind == "ce" else ["batchmean", "sum"]
    for reduction in reductions:
        before = _counter(backend, kind)
        out, grads = _run(kind, backend, a, b, 2.0, reduction)
        if backend != "torch":
            assert _counter(backend, kind) == before + 1, "the fused path did not run"
        ref_out, ref_grads = _run(kind, "ref", a.double(), b.double(), 2.0, reduction)
        rtol, atol = TOL[torch.float32]
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref_out.float(), rtol=rtol, atol=atol * max(1.0, ref_out.abs().max().item()))
        for g, rg in zip(grads, ref_grads, strict=False):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, rg.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 20.0, 1e4])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_extreme_temperatures_and_logits(backend, kind, temperature):
    """|z| up to 1e4 (|z/T| up to 1e7 at T=1e-3): finite, and as close to float64 as the fp32 reference is."""
    a, b = _inputs(kind, 4, 9, scale=1.0)
    a = a * 1e4 / a.abs().max()
    if kind == "kl":
        b = b * 1e4 / b.abs().max()
    out, grads = _run(kind, backend, a, b, temperature, "mean")
    ref_out, ref_grads = _run(kind, "ref", a.double(), b.double(), temperature, "mean")
    f32_out, f32_grads = _run(kind, "ref", a, b, temperature, "mean")
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for got, f32, ref in zip((out, *grads), (f32_out, *f32_grads), (ref_out, *ref_grads), strict=False):
        err = (got.double() - ref).abs().max().item()
        f32_err = (f32.double() - ref).abs().max().item()
        assert err <= 2 * f32_err + 1e-6 * max(1.0, ref.abs().max().item()), (err, f32_err)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_low_precision_within_2x_of_eager(backend, kind, dtype):
    """Error vs an fp64 reference at most ~2x eager PyTorch's error in the same low precision."""
    a, b = _inputs(kind, 6, 33, dtype=dtype)
    out, grads = _run(kind, backend, a, b, 3.0, "mean")
    ref_out, ref_grads = _run(kind, "ref", a.double(), b.double(), 3.0, "mean")
    assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)

    def eager(x, y):  # how research code writes it, natively in the low precision
        x = x.detach().clone().requires_grad_(True)
        y = y.detach().clone().requires_grad_(True)
        if kind == "ce":
            o = -(y * torch.log_softmax(x / 3.0, dim=-1)).sum(-1).mean()
        else:
            o = torch.nn.functional.kl_div(torch.log_softmax(x / 3.0, -1), torch.softmax(y / 3.0, -1),
                                           reduction="batchmean") * 9.0
        return o, torch.autograd.grad(o, [x, y], torch.ones_like(o))

    e_out, e_grads = eager(a, b)
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref_out).abs().item() <= 2 * (e_out.double() - ref_out).abs().item() + eps
    for g, eg, rg in zip(grads, e_grads, ref_grads, strict=False):
        err = (g.double() - rg).abs().max().item()
        e_err = (eg.double() - rg).abs().max().item()
        assert err <= 2 * e_err + eps * rg.abs().max().item(), (err, e_err)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_non_contiguous_and_teacher_grad_only_when_needed(backend, kind):
    a, b = _inputs(kind, 7, 12)
    a_t, b_t = a.t().contiguous().t(), b[:, ::1].t().contiguous().t()  # column-major views
    a_s = torch.randn(7, 24)[:, ::2].copy_(a)  # strided view (stride 2 along K)
    for x, y in [(a_t, b_t), (a_s, b)]:
        out, grads = _run(kind, backend, x, y, 1.5, "mean", grad_b=False)
        ref_out, ref_grads = _run(kind, "ref", a, b, 1.5, "mean", grad_b=False)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(grads[0], ref_grads[0])
    # the second input gets no gradient unless it requires one
    x = a.clone().requires_grad_(True)
    LOSSES[kind][0](x, b, 2.0, backend=backend).backward()
    assert b.grad is None and x.grad is not None


def test_triton_multi_tile_online_lse():
    """K spread over several tiles (online max / log-sum-exp across tiles), with both gradients."""
    if not kernels.HAS_TRITON:
        pytest.skip("no triton")
    from dfkd_fast.kernels.soft_ce import soft_target_cross_entropy_fwd

    cases = [("kl", kd_kl_div_fwd, kd_kl_div_ref, (3, 50), 0.7), ("ce", soft_target_cross_entropy_fwd,
                                                                  soft_target_cross_entropy_ref, (2, 70), 0.5)]
    for kind, fwd, ref_fn, shape, temperature in cases:
        a, b = _inputs(kind, *shape, scale=30.0)
        before = _counter("triton", kind)
        got = fwd(a, b, temperature, 1.0, True, True, block_k=16)
        assert _counter("triton", kind) == before + 1
        results = []
        for dt in (torch.float64, torch.float32):
            x, y = a.to(dt).requires_grad_(), b.to(dt).requires_grad_()
            loss = ref_fn(x, y, temperature, "none")
            results.append((loss.detach(), *torch.autograd.grad(loss.sum(), [x, y])))
        for g, ref, f32 in zip(got, *results, strict=False):
            err = (g.double() - ref).abs().max().item()
            f32_err = (f32.double() - ref).abs().max().item()
            assert err <= 2 * f32_err + 1e-6 * max(1.0, ref.abs().max().item()), (kind, err, f32_err)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_reference_gradcheck_float64(kind):
    a, b = _inputs(kind, 2, 4, dtype=torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for reduction in ("mean",):
        assert torch.autograd.gradcheck(lambda x, y: LOSSES[kind][1](x, y, 1.7, reduction), (a, b))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_fused_gradcheck_float64(backend, kind):
    """The fused paths accept float64 (fp64 accumulation), so their saved gradients pass gradcheck too."""
    a, b = _inputs(kind, 2, 3, dtype=torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for reduction in ("none",):
        assert torch.autograd.gradcheck(lambda x, y: LOSSES[kind][0](x, y, 1.3, reduction, backend=backend), (a, b))


def test_temperature_applied_once():
    """SPEC §3.3: CE at T equals -sum y log softmax(z/T) (not z/T^2 as in a popular port)."""
    z = torch.randn(4, 6) * 3
    y = torch.softmax(torch.randn(4, 6), -1)
    for backend in ["torch"] + (["cpp"] if HAS_CPP else []):
        with ran(backend, ("soft_ce_fwd",)):
            got = soft_target_cross_entropy(z, y, 20.0, backend=backend)
        want = -(y * torch.log_softmax(z / 20.0, -1)).sum(-1).mean()
        wrong = -(y * torch.log_softmax(z / 400.0, -1)).sum(-1).mean()
        torch.testing.assert_close(got, want)
        assert (got - wrong).abs() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [soft_target_cross_entropy, kd_kl_div])
def test_non_finite_inputs(fn, backend):
    """Every backend rejects NaN / +Inf / -Inf in either input (fused paths: via the row losses)."""
    z, y = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i, j in ((0, 0), (2, 3)):
            zb, yb = z.clone(), y.clone()
            zb[i, j] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                fn(zb.requires_grad_(), y, backend=backend)
            yb[i, j] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                fn(z, yb, backend=backend)


@pytest.mark.parametrize("fn", [soft_target_cross_entropy, kd_kl_div])
def test_bad_inputs(fn):
    z, y = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="same shape"):
        fn(z, y[:, :3])
    with pytest.raises(ValueError, match="2 dims"):
        fn(z[0], y[0])
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fn(z, y, bad_t)
    with pytest.raises(ValueError, match="reduction"):
        fn(z, y, 1.0, "avg")
    with pytest.raises(ValueError, match="float32"):
        fn(z.long(), y)
    with pytest.raises(ValueError, match="at least one row"):
        fn(z[:, :0], y[:, :0])
