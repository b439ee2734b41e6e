"""BatchNorm-statistic matching (SPEC §3.1): per-channel mean / biased variance and the prior loss.

Reference section only so far; Triton kernels and host launchers follow below it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

KL_EPS = 1e-5  # added to both variances in kind="kl" (log and division)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def bn_stats_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dim but 1, accumulated in fp32.

    Shape: x (N, C) | (N, C, L) | (N, C, H, W) -> mean (C,), var (C,) in float32 (float64 for float64 x).
    """
    xf = x.float() if x.dtype != torch.float64 else x
    dims = _reduce_dims(xf)
    mean = xf.mean(dim=dims)
    shape = [1, -1] + [1] * (xf.dim() - 2)
    var = ((xf - mean.view(shape)) ** 2).mean(dim=dims)
    return mean, var


def instance_mean_ref(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean per (sample, channel): CMI's instance feature. Shape: (N, C, *) -> (N, C), fp32."""
    xf = x.float() if x.dtype != torch.float64 else x
    return xf.flatten(2).mean(-1) if xf.dim() > 2 else xf


def layer_loss_ref(mean: torch.Tensor, var: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor,
                   kind: str) -> torch.Tensor:
    """One layer's term L_l from batch stats (mean, var) and running stats (rmean, rvar)."""
    rmean = rmean.to(mean.dtype)
    rvar = rvar.to(var.dtype)
    if kind == "l2":
        return torch.linalg.vector_norm(var - rvar, 2) + torch.linalg.vector_norm(mean - rmean, 2)
    if kind == "mse":
        return ((mean - rmean) ** 2).mean() + ((var - rvar) ** 2).mean()
    if kind == "kl":  # sum_c KL(N(mean, var) || N(rmean, rvar))
        v1, v2 = var + KL_EPS, rvar + KL_EPS
        return (0.5 * torch.log(v2 / v1) + (v1 + (mean - rmean) ** 2) / (2 * v2) - 0.5).sum()
    raise ValueError(f"bn_stat_loss: kind must be 'l2', 'kl' or 'mse', got {kind!r}")


def bn_stat_loss_ref(feats: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                     running_vars: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None = None,
                     kind: str = "l2", momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                     momentum: float = 0.0) -> torch.Tensor:
    """Total BN-prior loss L = sum_l w_l L_l over layers (SPEC §3.1), fp32 scalar.

    With ``momentum_stats[l] = (mean_bar, var_bar)`` the batch stats are blended first:
    mean <- (1 - momentum) mean + momentum mean_bar (same for var) -- FastDFKD.
    """
    total = None
    for i, (x, rm, rv) in enumerate(zip(feats, running_means, running_vars, strict=True)):
        mean, var = bn_stats_ref(x)
        if momentum_stats is not None and momentum_stats[i] is not None:
            mb, vb = momentum_stats[i]
            mean = (1 - momentum) * mean + momentum * mb.to(mean.dtype)
            var = (1 - momentum) * var + momentum * vb.to(var.dtype)
        term = layer_loss_ref(mean, var, rm, rv, kind)
        if weights is not None:
            term = term * weights[i]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("bn_stat_loss: got no layers")
    return total
