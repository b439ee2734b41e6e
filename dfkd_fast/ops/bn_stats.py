"""Public BN-statistic ops: ``bn_stats``, ``bn_stat_loss`` (dispatch: triton | cpp | torch)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dfkd_fast.kernels.bn_stats import bn_stat_loss_ref, bn_stats_ref

__all__ = ["bn_stats", "bn_stat_loss"]


def bn_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32). Shape: (N, C, *) -> (C,), (C,)."""
    return bn_stats_ref(x)


def bn_stat_loss(feats: Sequence[torch.Tensor] | torch.Tensor, running_means, running_vars, weights=None,
                 kind: str = "l2", momentum_stats=None, momentum: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Sum over layers of w_l * L_l(batch stats of feats[l], running stats) -- SPEC §3.1."""
    if isinstance(feats, torch.Tensor):
        feats, running_means, running_vars = [feats], [running_means], [running_vars]
    return bn_stat_loss_ref(feats, running_means, running_vars, weights, kind, momentum_stats, momentum)
