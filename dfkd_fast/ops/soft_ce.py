"""Public soft-target losses: ``soft_target_cross_entropy``, ``kd_kl_div`` (dispatch: triton | cpp | torch)."""
from __future__ import annotations

import torch

from dfkd_fast.kernels.soft_ce import kd_kl_div_ref, soft_target_cross_entropy_ref

__all__ = ["soft_target_cross_entropy", "kd_kl_div"]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                              reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """-sum_j y_j log softmax(z/T)_j per row. Shape: (N, K), (N, K) -> () or (N,)."""
    return soft_target_cross_entropy_ref(logits, targets, temperature, reduction)


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2. Shape: (N, K), (N, K) -> () or (N,)."""
    return kd_kl_div_ref(student_logits, teacher_logits, temperature, reduction)
