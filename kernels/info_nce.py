"""InfoNCE with the positive on the same row (SPEC §3.2, CMI's contrastive loss).

Reference section only so far; Triton kernels (tiled, online log-sum-exp) follow below it.
"""
from __future__ import annotations

import torch


def info_nce_ref(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """loss_i = logsumexp_j(q_i . k_j / T) - q_i . k_i / T. Shape: (M, D), (M, D) -> (M,), fp32.

    Materializes the (M, M) logits: this is the eager baseline, not the fast path.
    """
    q = query.float() if query.dtype != torch.float64 else query
    k = keys.to(q.dtype)
    logits = q @ k.t() / temperature
    return torch.logsumexp(logits, dim=1) - logits.diagonal()
