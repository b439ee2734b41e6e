"""Public ``crop_flip``: batched differentiable crop-resize + horizontal flip + normalize (SPEC §3.2).

Dispatch: ``triton`` (CUDA, or the interpreter), ``cpp`` (CPU, OpenMP), ``torch`` (the ``grid_sample``
reference). Differentiable w.r.t. ``x`` only: boxes and flips are sampled augmentation parameters and
are treated as constants (no gradient flows into them, in every backend).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import crop_flip as _k
from dfkd_fast.kernels.crop_flip import crop_flip_ref
from dfkd_fast.ops._registry import fused_op

__all__ = ["crop_flip", "CropFlipFunction"]

_OP = "crop_flip"


def _crop_flip_fwd_impl(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_h: int, out_w: int,
                        mean: torch.Tensor | None, std: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _k.crop_flip_fwd(x, boxes, flip, (out_h, out_w), mean, std)
    return _backend.extension().crop_flip_fwd(x, boxes, flip, out_h, out_w, mean, std)


def _crop_flip_bwd_impl(grad_out: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, in_h: int, in_w: int,
                        std: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _k.crop_flip_bwd(grad_out, boxes, flip, (in_h, in_w), std, grad_out.dtype)
    return _backend.extension().crop_flip_bwd(grad_out, boxes, flip, in_h, in_w, std)


_crop_flip_fwd_op = torch.library.custom_op("dfkd_fast::crop_flip_fwd", mutates_args=())(_crop_flip_fwd_impl)
_crop_flip_bwd_op = torch.library.custom_op("dfkd_fast::crop_flip_bwd", mutates_args=())(_crop_flip_bwd_impl)


@_crop_flip_fwd_op.register_fake
def _(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_h: int, out_w: int,
      mean: torch.Tensor | None, std: torch.Tensor | None, backend: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


@_crop_flip_bwd_op.register_fake
def _(grad_out: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, in_h: int, in_w: int,
      std: torch.Tensor | None, backend: str) -> torch.Tensor:
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], in_h, in_w))


def _setup(ctx, inputs, output) -> None:
    x, boxes, flip, _, _, _, std, backend = inputs
    ctx.save_for_backward(boxes, flip, std)
    ctx.in_hw = (x.shape[2], x.shape[3])
    ctx.x_dtype = x.dtype
    ctx.backend = backend


def _backward(ctx, grad_out):
    """Scatters the bilinear weights back to x (boxes, flips and mean/std are constants: no gradient)."""
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    boxes, flip, std = ctx.saved_tensors
    bwd = _crop_flip_bwd_impl if ctx.eager else _crop_flip_bwd_op
    grad_x = bwd(grad_out, boxes, flip, ctx.in_hw[0], ctx.in_hw[1], std, ctx.backend)
    return (grad_x.to(ctx.x_dtype),) + (None,) * 7


_crop_flip_call = fused_op(_crop_flip_fwd_op, _crop_flip_fwd_impl, _setup, _backward, "CropFlipBackward")


class CropFlipFunction:
    """Fused crop_flip: ``apply(x, boxes, flip, out_hw, mean, std, backend)`` (``backend``: triton or cpp).

    The ``dfkd_fast::crop_flip_fwd`` / ``dfkd_fast::crop_flip_bwd`` custom ops (fake implementations, autograd
    registered on the forward) are what ``torch.compile`` traces; eager calls run the same code through an
    autograd.Function (:mod:`dfkd_fast.ops._registry`).
    """

    @staticmethod
    def apply(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_hw: tuple[int, int],
              mean: torch.Tensor | None, std: torch.Tensor | None, backend: str) -> torch.Tensor:
        return _crop_flip_call(x, boxes, flip, out_hw[0], out_hw[1], mean, std, backend)


def _out_hw(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, bool):
        raise ValueError(f"{_OP}: 'out_size' must be an int or (oh, ow), got {out_size!r}")
    if isinstance(out_size, int):
        hw = (out_size, out_size)
    else:
        try:
            vals = tuple(out_size)
        except TypeError:
            raise ValueError(f"{_OP}: 'out_size' must be an int or (oh, ow), got {out_size!r}") from None
        if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"{_OP}: 'out_size' must be an int or a pair of ints (oh, ow), got {out_size!r}")
        hw = (int(vals[0]), int(vals[1]))
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"{_OP}: 'out_size' must be positive, got {hw}")
    return hw


def _channel_param(v: Sequence[float] | torch.Tensor | None, name: str, C: int,
                   device: torch.device) -> torch.Tensor | None:
    if v is None:
        return None
    t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    if not t.is_floating_point():
        t = t.double()
    t = t.to(device=device).reshape(-1)
    if t.numel() != C:
        raise ValueError(f"{_OP}: '{name}' must have one entry per channel (C={C}), got {t.numel()}")
    _checks.check_finite(t, name, _OP)  # a device flag inside _checks.deferred(): no sync
    return t


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int | Sequence[int],
              mean: Sequence[float] | torch.Tensor | None = None, std: Sequence[float] | torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Crop box ``n`` of image ``n``, resize it bilinearly to ``out_size``, mirror it if ``flip[n]``, normalize.

    Output pixel (i, j) samples image n at

    .. math::
        x = x_0 + (j' + \\tfrac12)\\frac{x_1 - x_0}{o_w} - \\tfrac12, \\quad
        y = y_0 + (i + \\tfrac12)\\frac{y_1 - y_0}{o_h} - \\tfrac12, \\quad
        j' = o_w - 1 - j \\text{ if flip}_n \\text{ else } j,

    bilinearly with zeros outside the image (``grid_sample``, ``align_corners=False``, zeros padding),
    then returns :math:`(v - \\mu_c)/\\sigma_c`. A whole-pixel shift of a same-size box is a padded crop.

    Args:
        x: images, any strides (contiguous, channels_last, sliced); fp32/fp16/bf16/fp64.
        boxes: (x0, y0, x1, y1) per image in input pixel units (x1 - x0 is the crop width). Not differentiable.
        flip: horizontal flip per image (bool or 0/1). Not differentiable.
        out_size: ``oh`` (square) or ``(oh, ow)``.
        mean: per-channel mean subtracted after resampling, or None.
        std: per-channel std (> 0) divided after resampling, or None.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Returns:
        The augmented batch, contiguous NCHW, x's dtype (computed in fp32, fp64 for float64);
        differentiable w.r.t. ``x`` (the backward divides by :math:`\\sigma_c` and scatters the 4 weights).

    Shape:
        x (N, C, H, W), boxes (N, 4), flip (N,), mean/std (C,) -> (N, C, oh, ow).
    """
    _checks.check_float(x, "x", _OP)
    _checks.check_ndim(x, "x", _OP, (4,))
    if not isinstance(boxes, torch.Tensor) or not isinstance(flip, torch.Tensor):
        raise ValueError(f"{_OP}: 'boxes' and 'flip' must be torch.Tensors (see dfkd_fast.augment samplers)")
    N, C = x.shape[0], x.shape[1]
    if boxes.shape != (N, 4):
        raise ValueError(f"{_OP}: 'boxes' must have shape (N, 4) = ({N}, 4) as (x0, y0, x1, y1), "
                         f"got {tuple(boxes.shape)}")
    if flip.shape != (N,):
        raise ValueError(f"{_OP}: 'flip' must have shape (N,) = ({N},), got {tuple(flip.shape)}")
    if boxes.is_complex() or flip.is_complex() or flip.is_floating_point():
        raise ValueError(f"{_OP}: 'boxes' must be real and 'flip' bool or integer, got {boxes.dtype} and {flip.dtype}")
    _checks.check_same_device([x, boxes, flip], ["x", "boxes", "flip"], _OP)
    out_hw = _out_hw(out_size)
    boxes = boxes.detach()
    if not boxes.is_floating_point():
        boxes = boxes.double()
    _checks.check_finite(boxes, "boxes", _OP)
    if _checks.checks_enabled() and boxes.numel():
        _checks.expect(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all(),
                       f"{_OP}: every box must have x1 > x0 and y1 > y0 (boxes are (x0, y0, x1, y1) in input pixels); "
                       "got an inverted or zero-size box -- mirror with 'flip', not with x1 < x0")
    flip = flip.detach().bool()
    mean_t = _channel_param(mean, "mean", C, x.device)
    std_t = _channel_param(std, "std", C, x.device)
    if std_t is not None and _checks.checks_enabled():
        _checks.expect((std_t > 0).all(), f"{_OP}: 'std' must be > 0 for every channel (it divides the output)")
    _checks.check_finite(x, "x", _OP)
    b = _backend.resolve(_OP, backend, x.device, triton=True, cpp="crop_flip_fwd")
    if b == "torch":
        return crop_flip_ref(x, boxes, flip, out_hw, mean_t, std_t)
    return CropFlipFunction.apply(x, boxes, flip, out_hw, mean_t, std_t, b)
