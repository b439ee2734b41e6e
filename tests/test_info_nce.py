"""info_nce: Triton (interpreter) and torch paths vs the reference, values and gradients, O(M D) memory."""
from __future__ import annotations

import pytest
import torch
from backend_ran import check_param_backend, ran
from dfkd_fast.kernels.info_nce import info_nce_ref
from torch.utils._python_dispatch import TorchDispatchMode

from dfkd_fast import kernels
from dfkd_fast.ops import info_nce

CASES = [  # (M, D, temperature)
    (1, 3, 0.1),  # minimal: M=1 (loss 0), D < 16
    (37, 3, 0.05),  # M not a multiple of the block, tiny D, sharp softmax
    (37, 3, 10.0),  # near-uniform softmax
    (37, 130, 0.05),  # D > 128: two D chunks, masked tail
    (37, 130, 1.0),
    (70, 16, 0.1),  # three row/key blocks
    (70, 16, 10.0),
]
# fp32 tolerances relative to the problem's conditioning: with L = max |q.k| / T, a logit carries an fp32
# rounding error ~ eps * L, so the loss is off by ~ eps * L and a gradient by ~ eps * L * max|grad|.
# The fp32 reference itself is off from float64 by up to ~5e-7 * L (measured); we allow 4x that.
LOSS_TOL = 2e-6
GRAD_TOL = 1e-6
FWD, BWD = ("info_nce_fwd",), ("info_nce_bwd_dq", "info_nce_bwd_dk")
#: tests that name backend="triton" without a ``backend`` parameter: forward and backward kernels must launch
TRITON_TESTS = ("test_single_row_is_zero", "test_large_logits_stable", "test_low_precision_within_2x_eager",
                "test_dk_only_when_keys_require_grad", "test_keys_only_grad", "test_non_contiguous_inputs",
                "test_no_m_by_m_buffer", "test_torch_compile_fullgraph")


@pytest.fixture(autouse=True)
def _fused_path_ran(request):
    """A test that asks for Triton must launch the Triton kernels (no silent fallback to torch)."""
    if getattr(request.node, "originalname", request.node.name) in TRITON_TESTS:
        with ran("triton", FWD), ran("triton", BWD):
            yield
    else:
        yield from check_param_backend(request, {"triton": FWD}, exempt=("test_bad_input",))


def _inputs(m: int, d: int, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    q = (torch.randn(m, d) * scale).to(dtype).requires_grad_()
    k = (torch.randn(m, d) * scale).to(dtype).requires_grad_()
    return q, k


def _ref_grads(q, k, t, g):
    """Reference loss and gradients in float64 (from the same, possibly rounded, inputs), returned as fp32."""
    qr = q.detach().double().requires_grad_()
    kr = k.detach().double().requires_grad_()
    loss = info_nce_ref(qr, kr, t)
    dq, dk = torch.autograd.grad(loss, (qr, kr), g.double())
    return loss.detach().float(), dq.float(), dk.float()


def _assert_fp32_close(q, k, t, loss, dq, dk, lr, dqr, dkr):
    cond = 1.0 + (q.detach().double() @ k.detach().double().t()).abs().max().item() / t
    torch.testing.assert_close(loss, lr, rtol=0, atol=LOSS_TOL * cond)
    torch.testing.assert_close(dq, dqr, rtol=0, atol=GRAD_TOL * cond * dqr.abs().max().item() + 1e-7)
    torch.testing.assert_close(dk, dkr, rtol=0, atol=GRAD_TOL * cond * dkr.abs().max().item() + 1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m,d,t", CASES)
def test_matches_reference_fp32(backend, m, d, t):
    shape = (m, d)
    q, k = _inputs(*shape)
    g = torch.randn(shape[0])
    before = kernels.LAUNCHES["info_nce_fwd"]
    loss = info_nce(q, k, t, backend=backend)
    with ran(backend, ("info_nce_bwd_dq",)), ran(backend, ("info_nce_bwd_dk",)):
        dq, dk = torch.autograd.grad(loss, (q, k), g)
    assert kernels.LAUNCHES["info_nce_fwd"] == before + (backend == "triton")
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    _assert_fp32_close(q, k, t, loss, dq, dk, *_ref_grads(q, k, t, g))


def test_single_row_is_zero():
    q, k = _inputs(1, 5)
    loss = info_nce(q, k, 0.1, backend="triton")
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    dq, dk = torch.autograd.grad(loss.sum(), (q, k))
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


def test_large_logits_stable():
    """|q.k/T| ~ 1e4: online LSE must not overflow."""
    q, k = _inputs(37, 20, scale=30.0)
    t = 0.05
    g = torch.rand(37)
    loss = info_nce(q, k, t, backend="triton")
    dq, dk = torch.autograd.grad(loss, (q, k), g)
    lr, dqr, dkr = _ref_grads(q, k, t, g)
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert lr.abs().max() > 1e3  # the case really has huge logits
    _assert_fp32_close(q, k, t, loss, dq, dk, lr, dqr, dkr)


def _eager_lowp(q, k, t, g):
    """The naive computation entirely in the low precision: the baseline error (flash-attention's rule)."""
    ql = q.detach().clone().requires_grad_()
    kl = k.detach().clone().requires_grad_()
    logits = ql @ kl.t() / t
    loss = torch.logsumexp(logits, dim=1) - logits.diagonal()
    dq, dk = torch.autograd.grad(loss, (ql, kl), g.to(loss.dtype))
    return loss.detach(), dq, dk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 3), (37, 130)])
@pytest.mark.parametrize("t", [0.1, 1.0])
def test_low_precision_within_2x_eager(dtype, shape, t):
    q, k = _inputs(*shape, dtype=dtype, scale=0.5)
    g = torch.randn(shape[0])
    loss = info_nce(q, k, t, backend="triton")
    dq, dk = torch.autograd.grad(loss, (q, k), g)
    assert loss.dtype == torch.float32 and dq.dtype == dtype and dk.dtype == dtype
    lr, dqr, dkr = _ref_grads(q, k, t, g)
    le, dqe, dke = _eager_lowp(q, k, t, g)
    for ours, ref, eager in ((loss, lr, le), (dq, dqr, dqe), (dk, dkr, dke)):
        err = (ours.float() - ref).abs().max().item()
        base = (eager.float() - ref).abs().max().item()
        # output rounding alone is ~1 ulp of the low precision at the result's magnitude
        ulp = torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * base + ulp, (err, base, ulp)


def test_dk_only_when_keys_require_grad():
    q, _ = _inputs(37, 8)
    k = torch.randn(37, 8)
    before = dict(kernels.LAUNCHES)
    loss = info_nce(q, k, 0.1, backend="triton")
    (dq,) = torch.autograd.grad(loss.mean(), (q,))
    assert kernels.LAUNCHES["info_nce_bwd_dq"] == before.get("info_nce_bwd_dq", 0) + 1
    assert kernels.LAUNCHES["info_nce_bwd_dk"] == before.get("info_nce_bwd_dk", 0)
    _, dqr, _ = _ref_grads(q, k, 0.1, torch.full((37,), 1 / 37))
    torch.testing.assert_close(dq, dqr, rtol=1e-4, atol=1e-6)


def test_keys_only_grad():
    q = torch.randn(20, 8)
    k = torch.randn(20, 8, requires_grad=True)
    before = kernels.LAUNCHES["info_nce_bwd_dq"]
    (dk,) = torch.autograd.grad(info_nce(q, k, 0.2, backend="triton").sum(), (k,))
    assert kernels.LAUNCHES["info_nce_bwd_dq"] == before
    _, _, dkr = _ref_grads(q, k, 0.2, torch.ones(20))
    torch.testing.assert_close(dk, dkr, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs():
    base_q = torch.randn(16, 37, requires_grad=True)
    base_k = torch.randn(16, 37, requires_grad=True)
    q, k = base_q.t(), base_k.t()  # (37, 16) with strides (1, 37)
    g = torch.randn(37)
    dq, dk = torch.autograd.grad(info_nce(q, k, 0.3, backend="triton"), (q, k), g)
    _, dqr, dkr = _ref_grads(q, k, 0.3, g)
    torch.testing.assert_close(dq, dqr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk, dkr, rtol=1e-4, atol=1e-5)


def test_gradcheck_reference_float64():
    q = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce_ref(a, b, 0.3), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.3, backend="torch"), (q, k))


class _AllocLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_no_m_by_m_buffer():
    """Memory O(M D): no (M, M) tensor is saved for backward or created anywhere in forward + backward."""
    m, d = 96, 8  # M*M = 9216 > every O(M D) buffer (M*D = 768)
    q, k = _inputs(m, d)
    loss = info_nce(q, k, 0.1, backend="triton")
    saved = loss.grad_fn.saved_tensors
    assert {tuple(s.shape) for s in saved} == {(m, d), (m,)}
    with _AllocLog() as log:
        loss = info_nce(q, k, 0.1, backend="triton")
        torch.autograd.grad(loss.sum(), (q, k))
    assert log.numels and max(log.numels) < m * m
    with _AllocLog() as log_ref:  # the check can fail: the reference does allocate (M, M)
        torch.autograd.grad(info_nce(q, k, 0.1, backend="torch").sum(), (q, k))
    assert max(log_ref.numels) >= m * m


def test_auto_on_cpu_uses_torch():
    q, k = _inputs(5, 4)
    before = kernels.LAUNCHES["info_nce_fwd"]
    torch.testing.assert_close(info_nce(q, k, 0.1), info_nce_ref(q, k, 0.1))
    assert kernels.LAUNCHES["info_nce_fwd"] == before


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input(backend):
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(q, torch.randn(5, 3), backend=backend)
    with pytest.raises(ValueError, match="2 dims"):
        info_nce(torch.randn(4), torch.randn(4), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, 0.0, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, -1.0, backend=backend)
    bad = q.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        info_nce(bad, q, backend=backend)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        info_nce(q, bad, backend=backend)
    with pytest.raises(ValueError, match="share a dtype"):
        info_nce(q, q.half(), backend=backend)
    with pytest.raises(ValueError, match="at least one row"):
        info_nce(torch.randn(0, 3), torch.randn(0, 3), backend=backend)


def test_float64_on_triton_raises():
    q = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        info_nce(q, q, backend="triton")


def test_torch_compile_fullgraph():
    """Custom ops with fake implementations: compiles without graph breaks, same values and gradients."""
    q, k = _inputs(37, 8)
    fn = torch.compile(lambda a, b: info_nce(a, b, 0.2, backend="triton").mean(), backend="aot_eager",
                       fullgraph=True)
    before = kernels.LAUNCHES["info_nce_fwd"]
    out = fn(q, k)
    dq, dk = torch.autograd.grad(out, (q, k))
    assert kernels.LAUNCHES["info_nce_fwd"] > before
    lr, dqr, dkr = _ref_grads(q, k, 0.2, torch.full((37,), 1 / 37))
    torch.testing.assert_close(out, lr.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, dqr, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dk, dkr, rtol=1e-4, atol=1e-6)
