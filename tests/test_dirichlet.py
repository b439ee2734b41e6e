"""class_similarity (Triton forward vs reference, reference gradient), dirichlet_targets and beta_mixture."""
from __future__ import annotations

import pytest
import torch
from backend_ran import ran
from dfkd_fast.kernels.dirichlet import class_similarity_ref

from dfkd_fast import kernels
from dfkd_fast.ops import class_similarity, dirichlet_targets, soft_target_cross_entropy
from dfkd_fast.ops.dirichlet import beta_mixture

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="no triton")


@needs_triton
@pytest.mark.parametrize("shape", [
    (1, 3),  # K=1: the single similarity normalizes to 0
    (10, 64),  # CIFAR-10 head
    (37, 50),  # odd K and F, several row / column blocks
])
def test_class_similarity_triton_matches_reference(shape):
    w = torch.randn(*shape)
    before = kernels.LAUNCHES["class_similarity_fwd"]
    got = class_similarity(w, backend="triton")
    assert kernels.LAUNCHES["class_similarity_fwd"] == before + 1
    torch.testing.assert_close(got, class_similarity_ref(w), rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.min() >= 0 and got.max() <= 1


@needs_triton
def test_class_similarity_triton_strided_lowp_and_grad():
    w = torch.randn(12, 40)[:, ::2]  # non-contiguous
    with ran("triton", ("class_similarity_fwd",)):  # each case runs the kernel, no fallback to the reference
        got = class_similarity(w, backend="triton")
    torch.testing.assert_close(got, class_similarity_ref(w), rtol=1e-5, atol=1e-6)
    wb = torch.randn(9, 20).bfloat16()
    with ran("triton", ("class_similarity_fwd",)):
        got = class_similarity(wb, backend="triton")
    torch.testing.assert_close(got, class_similarity_ref(wb), rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 6)
    with ran("triton", ("class_similarity_fwd",)):
        out = class_similarity(x, backend="triton")
    (gt,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(class_similarity_ref(x), x, g)
    torch.testing.assert_close(gt, gr)


def test_class_similarity_reference_gradcheck_and_checks():
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(class_similarity_ref, (w,))
    with pytest.raises(ValueError, match="NaN or Inf"):
        class_similarity(torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="2 dims"):
        class_similarity(torch.randn(3))
    with pytest.raises(ValueError, match="K, F >= 1"):
        class_similarity(torch.randn(0, 4))


def _peakedness(y: torch.Tensor) -> tuple[float, float]:
    entropy = -(y.clamp_min(1e-30) * y.clamp_min(1e-30).log()).sum(-1).mean().item()
    return y.max(-1).values.mean().item(), entropy


def test_beta_really_changes_concentration():
    """beta=0.1 must give much more peaked targets than beta=1 for the same class (not re-normalized away)."""
    sim = class_similarity(torch.randn(10, 32), backend="torch")
    classes = torch.full((400,), 3)
    gen = torch.Generator().manual_seed(0)
    y1 = dirichlet_targets(sim, classes, 1.0, generator=gen)
    y01 = dirichlet_targets(sim, classes, 0.1, generator=gen)
    for y in (y1, y01):
        assert y.shape == (400, 10) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(-1), torch.ones(400), rtol=0, atol=1e-5)
    max1, ent1 = _peakedness(y1)
    max01, ent01 = _peakedness(y01)
    assert max01 > max1 + 0.2, (max01, max1)
    assert ent01 < 0.5 * ent1, (ent01, ent1)
    # a per-sample beta from the mixture reproduces both regimes in one call
    betas = beta_mixture(400)
    y_mix = dirichlet_targets(sim, classes, betas, generator=gen)
    assert _peakedness(y_mix[200:])[0] > _peakedness(y_mix[:200])[0] + 0.2


def test_dirichlet_soft_ce_temperature_once():
    """The loss on Dirichlet targets at tau=20 is -sum y log softmax(z/20) (tau applied once)."""
    sim = class_similarity(torch.randn(5, 8), backend="torch")
    y = dirichlet_targets(sim, torch.arange(5), 1.0, generator=torch.Generator().manual_seed(1))
    z = torch.randn(5, 5) * 10
    got = soft_target_cross_entropy(z, y, 20.0, backend="torch")
    torch.testing.assert_close(got, -(y * torch.log_softmax(z / 20.0, -1)).sum(-1).mean())


def test_beta_mixture_split():
    b = beta_mixture(5, (1.0, 0.1))
    assert b.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1])
    assert beta_mixture(0).numel() == 0
    assert beta_mixture(6, (2.0, 1.0, 0.5)).tolist() == pytest.approx([2, 2, 1, 1, 0.5, 0.5])
    for bad in [dict(n=-1), dict(n=4, betas=()), dict(n=4, betas=(1.0, 0.0)), dict(n=2.5)]:
        with pytest.raises(ValueError):
            beta_mixture(**bad)


def test_dirichlet_targets_input_checks():
    sim = class_similarity(torch.randn(4, 6), backend="torch")
    cls = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="square"):
        dirichlet_targets(sim[:3], cls)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dirichlet_targets(sim * 2, cls)
    with pytest.raises(ValueError, match="NaN or Inf"):
        dirichlet_targets(sim.masked_fill(sim > 0.5, float("nan")), cls)
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        dirichlet_targets(sim, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="int64"):
        dirichlet_targets(sim, cls.float())
    for bad_beta in (0.0, -1.0, float("inf"), torch.tensor([1.0, -1.0]), torch.ones(3)):
        with pytest.raises(ValueError, match="beta"):
            dirichlet_targets(sim, cls, bad_beta)
