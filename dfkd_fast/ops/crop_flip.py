"""Public ``crop_flip`` (dispatch: triton | cpp | torch)."""
from __future__ import annotations

import torch

from dfkd_fast.kernels.crop_flip import crop_flip_ref

__all__ = ["crop_flip"]


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size, mean=None, std=None,
              backend: str = "auto") -> torch.Tensor:
    """Bilinear crop-resize + flip + normalize. Shape: (N, C, H, W), (N, 4), (N,) -> (N, C, oh, ow)."""
    return crop_flip_ref(x, boxes, flip, out_size, mean, std)
