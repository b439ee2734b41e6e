"""Temperature-softmax cross-entropy to soft targets and KD KL divergence (SPEC §3.3).

Reference section only so far; Triton kernels and host launchers follow below it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(loss: torch.Tensor, reduction: str, n: int, op: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean" or reduction == "batchmean":
        return loss.sum() / n
    raise ValueError(f"{op}: reduction must be 'mean', 'batchmean', 'sum' or 'none', got {reduction!r}")


def soft_target_cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                  reduction: str = "mean") -> torch.Tensor:
    """loss_i = -sum_j y_ij log softmax(z_i / T)_j; 'mean' averages over rows. fp32 result.

    Shape: logits (N, K), targets (N, K) -> () or (N,) for reduction='none'.
    Gradient: d/dz = (softmax(z/T) * sum_j y - y) / (T N) for 'mean'.
    """
    z = logits.float() if logits.dtype != torch.float64 else logits
    y = targets.to(z.dtype)
    loss = -(y * F.log_softmax(z / temperature, dim=-1)).sum(-1)
    return _reduce(loss, reduction, z.shape[0], "soft_target_cross_entropy")


def kd_kl_div_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2; 'batchmean' = sum / N. fp32 result.

    Shape: student (N, K), teacher (N, K) -> () or (N,) for reduction='none'. Differentiable in both.
    """
    s = student_logits.float() if student_logits.dtype != torch.float64 else student_logits
    t = teacher_logits.to(s.dtype)
    log_p = F.log_softmax(t / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    loss = (log_p.exp() * (log_p - log_q)).sum(-1) * (temperature * temperature)
    return _reduce(loss, reduction, s.shape[0], "kd_kl_div")
