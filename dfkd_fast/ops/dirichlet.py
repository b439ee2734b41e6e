"""Public ``class_similarity`` and ``dirichlet_targets``."""
from __future__ import annotations

import torch

from dfkd_fast.kernels.dirichlet import class_similarity_ref, dirichlet_targets_ref

__all__ = ["class_similarity", "dirichlet_targets"]


def class_similarity(weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Row-min-max-normalized cosine similarity of the classifier's weight rows. (K, F) -> (K, K)."""
    return class_similarity_ref(weight)


def dirichlet_targets(similarity: torch.Tensor, classes: torch.Tensor, beta=1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """y_n ~ Dir(beta_n * C[classes_n] + 1e-4). (K, K), (N,) -> (N, K)."""
    return dirichlet_targets_ref(similarity, classes, beta, generator)
