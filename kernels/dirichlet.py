"""Class similarity and Dirichlet soft targets (SPEC §3.3, Data Impressions / ZSKD).

Reference section only so far; the Triton class-similarity kernel follows below it.
"""
from __future__ import annotations

import torch

DIRICHLET_FLOOR = 1e-4


def class_similarity_ref(weight: torch.Tensor) -> torch.Tensor:
    """C(i, j) = w_i.w_j / (|w_i| |w_j|), then each row min-max normalized to [0, 1].

    Shape: weight (K, F) -> (K, K), fp32.
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = wn @ wn.t()
    lo = c.min(dim=1, keepdim=True).values
    hi = c.max(dim=1, keepdim=True).values
    return (c - lo) / (hi - lo).clamp_min(1e-12)


def dirichlet_targets_ref(similarity: torch.Tensor, classes: torch.Tensor, beta: float | torch.Tensor = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample y_n ~ Dir(beta_n * C[classes_n] + 1e-4). Shape: (K, K), (N,), beta scalar or (N,) -> (N, K).

    beta scales the concentration (no re-normalization afterwards: beta really changes the spread).
    """
    alpha = similarity.float()[classes]
    beta_t = torch.as_tensor(beta, dtype=alpha.dtype, device=alpha.device)
    if beta_t.dim() == 1:
        beta_t = beta_t.view(-1, 1)
    alpha = beta_t * alpha + DIRICHLET_FLOOR
    return torch._sample_dirichlet(alpha.double(), generator=generator).to(alpha.dtype)
