"""Public ``class_similarity``, ``dirichlet_targets`` and ``beta_mixture`` (Data Impressions / ZSKD, SPEC §3.3)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import dirichlet as _k
from dfkd_fast.kernels.dirichlet import class_similarity_ref, dirichlet_targets_ref

__all__ = ["class_similarity", "dirichlet_targets", "beta_mixture", "ClassSimilarityFunction"]


class ClassSimilarityFunction(torch.autograd.Function):
    """Triton forward; the backward differentiates :func:`class_similarity_ref` (autograd through the reference).

    The similarity is computed once per teacher (K x K, K <= a few thousand), so a fused backward would buy
    nothing; recomputing the reference under autograd keeps the gradient exactly the reference's.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _k.class_similarity_fwd(weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        with torch.enable_grad():
            w = weight.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(class_similarity_ref(w), w, grad_output)
        return grad.to(weight.dtype)


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
    return ClassSimilarityFunction.apply(weight)


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
    counts = torch.tensor([n // m + (1 if i < n % m else 0) for i in range(m)], device=device)
    return torch.tensor(betas, dtype=torch.float32, device=device).repeat_interleave(counts)


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
    if _checks.checks_enabled() and bool(((similarity < 0) | (similarity > 1)).any()):
        raise ValueError(f"{op}: 'similarity' must lie in [0, 1]; pass the output of class_similarity(weight)")
    if not isinstance(classes, torch.Tensor) or classes.dtype not in (torch.int64, torch.int32) or classes.dim() != 1:
        raise ValueError(f"{op}: 'classes' must be a 1-D int64 tensor of class indices, got "
                         f"{getattr(classes, 'dtype', type(classes).__name__)} with shape "
                         f"{tuple(getattr(classes, 'shape', ()))}")
    k = similarity.shape[0]
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= k):
        raise ValueError(f"{op}: 'classes' must be in [0, {k}) (num_classes of the similarity matrix), got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    if isinstance(beta, torch.Tensor):
        if beta.dim() not in (0, 1) or (beta.dim() == 1 and beta.shape[0] != classes.shape[0]):
            raise ValueError(f"{op}: 'beta' must be a scalar or shape ({classes.shape[0]},), got {tuple(beta.shape)}")
        if not bool(torch.isfinite(beta).all()) or bool((beta <= 0).any()):
            raise ValueError(f"{op}: 'beta' must be finite and > 0")
        beta = beta.to(similarity.device)
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{op}: 'beta' must be a finite number > 0 or a (N,) tensor, got {beta!r}")
    return dirichlet_targets_ref(similarity, classes.long().to(similarity.device), beta, generator)
