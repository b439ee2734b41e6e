"""Batched bilinear crop-resize + horizontal flip + normalize (SPEC §3.2 convention).

Reference section only so far; Triton kernels and host launchers follow below it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _out_hw(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, int):
        return out_size, out_size
    oh, ow = out_size
    return int(oh), int(ow)


def crop_flip_grid(boxes: torch.Tensor, flip: torch.Tensor, in_hw: tuple[int, int],
                   out_hw: tuple[int, int]) -> torch.Tensor:
    """``grid_sample`` grid (N, oh, ow, 2), align_corners=False, for boxes (x0, y0, x1, y1) in pixels."""
    H, W = in_hw
    oh, ow = out_hw
    b = boxes.to(torch.float64)
    j = torch.arange(ow, dtype=torch.float64, device=boxes.device)
    i = torch.arange(oh, dtype=torch.float64, device=boxes.device)
    # pixel coordinate x = x0 + (j + 0.5) * w / ow - 0.5  ->  normalized gx = (2x + 1) / W - 1
    xs = b[:, 0:1] + (j + 0.5) * (b[:, 2:3] - b[:, 0:1]) / ow - 0.5  # (N, ow)
    ys = b[:, 1:2] + (i + 0.5) * (b[:, 3:4] - b[:, 1:2]) / oh - 0.5  # (N, oh)
    xs = torch.where(flip.view(-1, 1).bool(), xs.flip(-1), xs)
    gx = (2 * xs + 1) / W - 1
    gy = (2 * ys + 1) / H - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return grid


def crop_flip_ref(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int | Sequence[int],
                  mean: Sequence[float] | torch.Tensor | None = None,
                  std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Crop box n of image n, resize bilinearly to out_size (zeros outside), flip if flip[n], normalize.

    Shape: x (N, C, H, W), boxes (N, 4) float (x0, y0, x1, y1) in input pixels, flip (N,) bool
    -> (N, C, oh, ow) in x's dtype (computed in fp32). Differentiable w.r.t. x.
    """
    xf = x.float() if x.dtype != torch.float64 else x
    grid = crop_flip_grid(boxes, flip, (x.shape[2], x.shape[3]), _out_hw(out_size)).to(xf.dtype)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mean is not None:
        out = out - torch.as_tensor(mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    if std is not None:
        out = out / torch.as_tensor(std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    return out.to(x.dtype)
