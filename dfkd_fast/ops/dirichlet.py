"""Public ``class_similarity``, ``dirichlet_targets`` and ``beta_mixture`` (Data Impressions / ZSKD, SPEC §3.3)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import dirichlet as _k
from dfkd_fast.kernels.dirichlet import class_similarity_ref, dirichlet_targets_ref

__all__ = ["class_similarity", "dirichlet_targets", "beta_mixture", "ClassSimilarityFunction"]


@torch.library.custom_op("dfkd_fast::class_similarity", mutates_args=())
def _class_similarity_op(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """Triton forward (the only fused backend of this op); ``backend`` is kept for the op's schema."""
    return _k.class_similarity_fwd(weight)


@_class_similarity_op.register_fake
def _(weight: torch.Tensor, backend: str) -> torch.Tensor:
    k = weight.shape[0]
    return weight.new_empty((k, k), dtype=torch.float32)


def _class_similarity_grad(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of :func:`class_similarity_ref` w.r.t. the weight (plain torch ops: traceable).

    With n_i = max(|w_i|, eps), u_i = w_i / n_i, C = U U^T, lo/hi the row min/max (at torch's own argmin /
    argmax, like the reference's autograd) and d = max(hi - lo, eps), out = (C - lo) / d:
    dC = G / d, plus at (i, argmin) sum_j G_ij (-1/d + (C_ij - lo_i)/d^2) and at (i, argmax)
    -sum_j G_ij (C_ij - lo_i)/d^2 (both only when d is not clamped, else just -sum_j G_ij / d at argmin);
    dU = (dC + dC^T) U; dw_i = (dU_i - (u_i . dU_i) u_i) / n_i (or dU_i / n_i where the norm is clamped).
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    g = grad.to(w.dtype)
    norm = w.norm(dim=1, keepdim=True)
    n = norm.clamp_min(1e-12)
    u = w / n
    c = u @ u.t()
    lo, lo_idx = c.min(dim=1, keepdim=True)
    hi, hi_idx = c.max(dim=1, keepdim=True)
    span = hi - lo
    d = span.clamp_min(1e-12)
    free = (span > 1e-12).to(w.dtype)  # d = hi - lo (not the clamp): lo and hi also act through d
    rel = (c - lo) / (d * d)
    g_lo = (g * (-1.0 / d + free * rel)).sum(1, keepdim=True)
    g_hi = -(g * free * rel).sum(1, keepdim=True)
    dc = (g / d).scatter_add(1, lo_idx, g_lo).scatter_add(1, hi_idx, g_hi)
    du = (dc + dc.t()) @ u
    radial = (u * du).sum(1, keepdim=True) * u * (norm > 1e-12).to(w.dtype)
    return ((du - radial) / n).to(weight.dtype)


def _class_similarity_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _class_similarity_backward(ctx, grad_output):
    (weight,) = ctx.saved_tensors
    if grad_output is None or not ctx.needs_input_grad[0]:
        return None, None
    return _class_similarity_grad(weight, grad_output), None


_class_similarity_op.register_autograd(_class_similarity_backward, setup_context=_class_similarity_setup)


class ClassSimilarityFunction:
    """Front of the registered op ``dfkd_fast::class_similarity`` (Triton forward; the backward differentiates
    :func:`class_similarity_ref`, exactly the reference's gradient). The similarity is computed once per teacher
    (K x K, K <= a few thousand), so a fused backward would buy nothing."""

    @staticmethod
    def apply(weight: torch.Tensor) -> torch.Tensor:
        return _class_similarity_op(weight, "triton")


def class_similarity(weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Row-min-max-normalized cosine similarity of the classifier's weight rows (Data Impressions).

    .. math::
        C_{ij} = \\frac{w_i^\\top w_j}{\\lVert w_i\\rVert \\lVert w_j\\rVert},\\qquad
        \\hat C_{ij} = \\frac{C_{ij} - \\min_j C_{ij}}{\\max_j C_{ij} - \\min_j C_{ij}} \\in [0, 1]

    Shape: weight (K, F) -> (K, K) fp32 (fp64 for fp64 weight on the torch path). Differentiable; the Triton
    path's gradient is that of the reference. No cpp implementation (``auto`` on CPU uses the reference).
    """
    op = "class_similarity"
    _checks.check_float(weight, "weight", op)
    _checks.check_ndim(weight, "weight", op, (2,))
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{op}: 'weight' must be (K, F) with K, F >= 1 (the final linear layer's weight), "
                         f"got shape {tuple(weight.shape)}")
    _checks.check_finite(weight, "weight", op)
    chosen = _backend.resolve(op, backend, weight.device, triton=True, cpp=None)
    if chosen == "torch" or weight.dtype == torch.float64:
        return class_similarity_ref(weight)
    return _class_similarity_op(weight, chosen)


def beta_mixture(n: int, betas: Sequence[float] = (1.0, 0.1), device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """Per-sample Dirichlet scales: ``n`` values split as evenly as possible over ``betas`` (ZSKD: half 1, half 0.1).

    Shape: -> (n,) float32; the first ``ceil`` share gets ``betas[0]``, and so on (deterministic order).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"beta_mixture: n must be an int >= 0, got {n!r}")
    betas = [float(b) for b in betas]
    if not betas or any(not math.isfinite(b) or b <= 0 for b in betas):
        raise ValueError(f"beta_mixture: betas must be a non-empty sequence of finite values > 0, got {betas}")
    m = len(betas)
    counts = [n // m + (1 if i < n % m else 0) for i in range(m)]
    idx = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.long, device=device)
    return torch.tensor(betas, dtype=torch.float32, device=device).index_select(0, idx)


def dirichlet_targets(similarity: torch.Tensor, classes: torch.Tensor, beta: float | torch.Tensor = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample soft targets ``y_n ~ Dir(beta_n * C[classes_n] + 1e-4)`` (Data Impressions).

    ``beta`` scales the concentration and is *not* re-normalized away (unlike the official ZSKD code), so a
    small beta gives peaked, near one-hot targets and beta = 1 spread-out ones. Sampling uses torch's gamma
    sampler (no Triton primitive exists); sampling runs in float64 for tiny concentrations.

    Shape: similarity (K, K) with entries in [0, 1] (from :func:`class_similarity`), classes (N,) int64 in
    [0, K), beta scalar or (N,) (e.g. :func:`beta_mixture`) -> (N, K) fp32, rows summing to 1.
    """
    op = "dirichlet_targets"
    _checks.check_float(similarity, "similarity", op)
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 1:
        raise ValueError(f"{op}: 'similarity' must be a square (K, K) matrix, got shape {tuple(similarity.shape)}")
    _checks.check_finite(similarity, "similarity", op)
    if _checks.checks_enabled():
        _checks.expect(((similarity >= 0) & (similarity <= 1)).all(),
                       f"{op}: 'similarity' must lie in [0, 1]; pass the output of class_similarity(weight)")
    if not isinstance(classes, torch.Tensor) or classes.dtype not in (torch.int64, torch.int32) or classes.dim() != 1:
        raise ValueError(f"{op}: 'classes' must be a 1-D int64 tensor of class indices, got "
                         f"{getattr(classes, 'dtype', type(classes).__name__)} with shape "
                         f"{tuple(getattr(classes, 'shape', ()))}")
    k = similarity.shape[0]
    if classes.numel() and _checks.checks_enabled():
        _checks.expect(((classes >= 0) & (classes < k)).all(),
                       f"{op}: 'classes' must be in [0, {k}) (num_classes of the similarity matrix)")
    if isinstance(beta, torch.Tensor):
        if beta.dim() not in (0, 1) or (beta.dim() == 1 and beta.shape[0] != classes.shape[0]):
            raise ValueError(f"{op}: 'beta' must be a scalar or shape ({classes.shape[0]},), got {tuple(beta.shape)}")
        if _checks.checks_enabled():
            _checks.expect((torch.isfinite(beta) & (beta > 0)).all(), f"{op}: 'beta' must be finite and > 0")
        beta = beta.to(similarity.device)
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{op}: 'beta' must be a finite number > 0 or a (N,) tensor, got {beta!r}")
    return dirichlet_targets_ref(similarity, classes.long().to(similarity.device), beta, generator)
