"""Public ``info_nce`` (dispatch: triton | torch)."""
from __future__ import annotations

import torch

from dfkd_fast.kernels.info_nce import info_nce_ref

__all__ = ["info_nce"]


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.1, backend: str = "auto") -> torch.Tensor:
    """Per-row InfoNCE loss, positive on the same row. Shape: (M, D), (M, D) -> (M,)."""
    return info_nce_ref(query, keys, temperature)
