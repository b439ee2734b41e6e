"""Batched, differentiable augmentation for data-free synthesis (SPEC §3.2).

Box samplers give per-image crop boxes ``(x0, y0, x1, y1)`` in input pixels for
:func:`dfkd_fast.ops.crop_flip`, which resamples every image of the batch in one launch and passes
gradients back to the pixels (the generator or the image batch is trained through the views):

- CMI global view: 4-pixel zero-padded random crop (a same-size box shifted by whole pixels) + flip.
- CMI local view: random resized crop, area scale [0.25, 1], aspect ratio [3/4, 4/3], sampled as
  torchvision's ``RandomResizedCrop.get_params`` does (10 tries, then a center crop), + flip. Resizing
  is plain bilinear (no antialias), like ``grid_sample``.
- DeepInversion: :func:`jitter_flip`, a random roll by (dy, dx) plus a flip, the same for the whole batch as
  in the reference code; the parameters stay on the device (:func:`sample_jitter`, :func:`roll_flip`).

All samplers are vectorized over the batch and draw from an optional ``torch.Generator`` (on the
generator's device; results are moved to ``device``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dfkd_fast.ops.crop_flip import crop_flip

__all__ = ["sample_crop_boxes", "sample_resized_crop_boxes", "sample_flips", "CropFlip", "jitter_flip", "sample_jitter",
           "roll_flip"]

_RRC_TRIES = 10  # torchvision RandomResizedCrop attempts before the center-crop fallback


def _hw(in_hw: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(in_hw, int):
        h, w = in_hw, in_hw
    else:
        vals = tuple(int(v) for v in in_hw)
        if len(vals) < 2:
            raise ValueError(f"{name}: 'in_hw' must be an int or (H, W), got {in_hw!r}")
        h, w = vals[-2], vals[-1]
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: 'in_hw' must be positive, got {(h, w)}")
    return h, w


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _check_n(n: int, name: str) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"{name}: 'n' must be a non-negative int, got {n!r}")


def sample_crop_boxes(n: int, in_hw: int | Sequence[int], padding: int = 4, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes of a zero-padded random crop of the input's own size (``RandomCrop(size, padding)``).

    The image is (virtually) padded by ``padding`` zeros on each side and an (H, W) window is cut at a
    uniform whole-pixel offset, i.e. the box is the image frame shifted by ``(dx, dy)``:

    .. math:: (x_0, y_0, x_1, y_1) = (d_x, d_y, d_x + W, d_y + H), \\quad d_x, d_y \\in \\{-p, \\dots, p\\}.

    Args:
        n: number of boxes.
        in_hw: input size ``(H, W)`` (or an int, or a full shape ending in ``H, W``).
        padding: zero padding ``p`` per side (>= 0).
        generator: random source (its device is used for sampling).
        device: device of the result (default: the generator's).

    Returns:
        float32 boxes with integer-valued entries.

    Shape: (n, 4).
    """
    _check_n(n, "sample_crop_boxes")
    h, w = _hw(in_hw, "sample_crop_boxes")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"sample_crop_boxes: 'padding' must be a non-negative int, got {padding!r}")
    gdev = _gen_device(generator)
    shift = torch.randint(-padding, padding + 1, (n, 2), generator=generator, device=gdev).float()
    # (dx, dy, dx + W, dy + H) with Python-scalar offsets: no host->device copy per call
    boxes = torch.cat([shift, shift[:, :1] + w, shift[:, 1:] + h], dim=1)
    return boxes.to(device if device is not None else gdev)


def sample_resized_crop_boxes(n: int, in_hw: int | Sequence[int], scale: tuple[float, float] = (0.25, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes of torchvision's ``RandomResizedCrop``, vectorized over the batch.

    Per image, up to 10 tries draw an area fraction :math:`s \\sim U(\\text{scale})` and an aspect
    :math:`r = e^{u}, u \\sim U(\\log \\text{ratio})`; :math:`w = \\mathrm{round}(\\sqrt{sHWr})`,
    :math:`h = \\mathrm{round}(\\sqrt{sHW/r})`; the first try with :math:`0 < w \\le W, 0 < h \\le H` is
    placed at a uniform integer offset. Images with no valid try get the central crop of the largest
    box whose aspect is clamped into ``ratio``.

    Args:
        n: number of boxes.
        in_hw: input size ``(H, W)``.
        scale: range of the crop area as a fraction of H*W (0 < lo <= hi).
        ratio: range of the aspect ratio w/h (0 < lo <= hi).
        generator: random source (its device is used for sampling).
        device: device of the result (default: the generator's).

    Returns:
        float32 boxes (x0, y0, x1, y1) with integer-valued entries, inside the image.

    Shape: (n, 4).
    """
    _check_n(n, "sample_resized_crop_boxes")
    h, w = _hw(in_hw, "sample_resized_crop_boxes")
    s_lo, s_hi = float(scale[0]), float(scale[1])
    r_lo, r_hi = float(ratio[0]), float(ratio[1])
    if not (0 < s_lo <= s_hi):
        raise ValueError(f"sample_resized_crop_boxes: 'scale' must satisfy 0 < lo <= hi, got {scale}")
    if not (0 < r_lo <= r_hi):
        raise ValueError(f"sample_resized_crop_boxes: 'ratio' must satisfy 0 < lo <= hi, got {ratio}")
    gdev = _gen_device(generator)
    area = float(h * w)
    u = torch.rand(n, _RRC_TRIES, 2, generator=generator, device=gdev, dtype=torch.float64)
    target = area * (s_lo + (s_hi - s_lo) * u[..., 0])
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # index of the first valid try (0 when none)
    any_ok = ok.any(dim=1)
    cw = cw.gather(1, first[:, None]).squeeze(1)
    ch = ch.gather(1, first[:, None]).squeeze(1)
    # fallback: torchvision's central crop
    in_ratio = w / h
    if in_ratio < r_lo:
        fw, fh = w, int(round(w / r_lo))
    elif in_ratio > r_hi:
        fw, fh = int(round(h * r_hi)), h
    else:
        fw, fh = w, h
    cw = torch.where(any_ok, cw, torch.full_like(cw, fw))
    ch = torch.where(any_ok, ch, torch.full_like(ch, fh))
    pos = torch.rand(n, 2, generator=generator, device=gdev, dtype=torch.float64)
    x0 = torch.floor(pos[:, 0] * (w - cw + 1)).clamp_max(w - cw)
    y0 = torch.floor(pos[:, 1] * (h - ch + 1)).clamp_max(h - ch)
    x0 = torch.where(any_ok, x0, torch.full_like(x0, (w - fw) // 2))
    y0 = torch.where(any_ok, y0, torch.full_like(y0, (h - fh) // 2))
    boxes = torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1).float()
    return boxes.to(device if device is not None else gdev)


def sample_flips(n: int, p: float = 0.5, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Independent horizontal flips, each True with probability ``p``.

    Shape: (n,) bool.
    """
    _check_n(n, "sample_flips")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"sample_flips: 'p' must be in [0, 1], got {p}")
    gdev = _gen_device(generator)
    flips = torch.rand(n, generator=generator, device=gdev) < float(p)
    return flips.to(device if device is not None else gdev)


class CropFlip(nn.Module):
    """Batched, differentiable crop (+resize) + horizontal flip + normalization (kornia-style).

    Each call samples new per-image boxes and flips, then runs :func:`dfkd_fast.ops.crop_flip` once for
    the whole batch. ``mode="pad_crop"``: zero-padded random crop (whole-pixel shifts up to ``padding``);
    ``mode="resized_crop"``: random resized crop (``scale``, ``ratio``). The parameters of the last call
    are kept in ``last_boxes`` / ``last_flip``. Gradients flow to the input pixels.

    Args:
        out_size: output ``oh`` or ``(oh, ow)``; ``None`` keeps the input size.
        mode: ``"pad_crop"`` or ``"resized_crop"``.
        padding: pad-crop shift range in pixels.
        scale: resized-crop area range.
        ratio: resized-crop aspect range.
        p_flip: flip probability.
        mean: per-channel mean of the normalization (or None).
        std: per-channel std of the normalization (or None).
        backend: crop_flip backend.
        generator: random source (default: the global RNG).

    Shape: (N, C, H, W) -> (N, C, oh, ow).
    """

    def __init__(self, out_size: int | Sequence[int] | None, mode: str = "pad_crop", padding: int = 4,
                 scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 p_flip: float = 0.5, mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if mode not in ("pad_crop", "resized_crop"):
            raise ValueError(f"CropFlip: mode must be 'pad_crop' or 'resized_crop', got {mode!r}")
        if not 0.0 <= float(p_flip) <= 1.0:
            raise ValueError(f"CropFlip: 'p_flip' must be in [0, 1], got {p_flip}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"CropFlip: 'padding' must be a non-negative int, got {padding!r}")
        self.out_size = None if out_size is None else (
            (int(out_size), int(out_size)) if isinstance(out_size, int) else tuple(int(v) for v in out_size))
        self.mode = mode
        self.padding = padding
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.p_flip = float(p_flip)
        self.backend = backend
        self.generator = generator
        self.register_buffer("mean", None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1),
                             persistent=False)
        self.last_boxes: torch.Tensor | None = None
        self.last_flip: torch.Tensor | None = None

    def sample_params(self, n: int, in_hw: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (n, 4) and flips (n,) for a batch of n images of size ``in_hw`` (not stored)."""
        if self.mode == "pad_crop":
            boxes = sample_crop_boxes(n, in_hw, self.padding, generator=self.generator, device=device)
        else:
            boxes = sample_resized_crop_boxes(n, in_hw, self.scale, self.ratio, generator=self.generator,
                                              device=device)
        return boxes, sample_flips(n, self.p_flip, generator=self.generator, device=device)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None,
                flip: torch.Tensor | None = None) -> torch.Tensor:
        """Augment ``x`` with freshly sampled parameters (or the given ``boxes`` / ``flip``)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"CropFlip: expected x of shape (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        n, _, h, w = x.shape
        if boxes is None or flip is None:
            sb, sf = self.sample_params(n, (h, w), x.device)
            boxes = sb if boxes is None else boxes
            flip = sf if flip is None else flip
        self.last_boxes, self.last_flip = boxes, flip
        out_size = self.out_size if self.out_size is not None else (h, w)
        return crop_flip(x, boxes, flip, out_size, self.mean, self.std, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, mode={self.mode!r}, padding={self.padding}, scale={self.scale}, "
                f"ratio={self.ratio}, p_flip={self.p_flip}, backend={self.backend!r}")


def sample_jitter(max_shift: int | Sequence[int], p_flip: float = 0.5, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of one DeepInversion jitter, drawn on the device (no host read).

    .. math:: d_y \\sim U\\{-m_y..m_y\\},\\ d_x \\sim U\\{-m_x..m_x\\},\\ f \\sim \\mathrm{Bernoulli}(p)

    Three draws from ``generator``, in this order: ``randint`` for d_y, ``randint`` for d_x, ``rand`` for the
    flip (the flip is drawn even when ``p_flip`` is 0 or 1, so the random stream does not depend on it).

    Returns:
        ``shift``: (2,) int64 ``(d_y, d_x)``; ``flip``: () bool.
    """
    my, mx = (max_shift, max_shift) if isinstance(max_shift, int) else (int(max_shift[0]), int(max_shift[1]))
    if my < 0 or mx < 0:
        raise ValueError(f"jitter_flip: 'max_shift' must be non-negative, got {max_shift!r}")
    if not 0.0 <= float(p_flip) <= 1.0:
        raise ValueError(f"jitter_flip: 'p_flip' must be in [0, 1], got {p_flip}")
    gdev = _gen_device(generator)
    dy = torch.randint(-my, my + 1, (1,), generator=generator, device=gdev)
    dx = torch.randint(-mx, mx + 1, (1,), generator=generator, device=gdev)
    flip = torch.rand(1, generator=generator, device=gdev) < float(p_flip)
    dev = device if device is not None else gdev
    return torch.cat([dy, dx]).to(dev), flip.reshape(()).to(dev)


def roll_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``torch.roll(x, (d_y, d_x), dims=(2, 3))``, then mirrored along W when ``flip``, with on-device parameters.

    One gather with an index built on the device, so the shift never becomes a Python int (no host sync,
    traceable by ``torch.compile(fullgraph=True)``); the gradient is the inverse permutation (exact):

    .. math:: x'_{n,c,i,j} = x_{n,c,\\,(i - d_y) \\bmod H,\\,(j' - d_x) \\bmod W},\\quad
              j' = W - 1 - j \\text{ if } f \\text{ else } j.

    Shape: x (N, C, H, W), shift (2,) integer, flip () bool -> (N, C, H, W).
    """
    n, c, h, w = x.shape
    rows = torch.remainder(torch.arange(h, device=x.device) - shift[0], h)
    j = torch.arange(w, device=x.device)
    cols = torch.remainder(torch.where(flip, (w - 1) - j, j) - shift[1], w)
    index = (rows[:, None] * w + cols[None, :]).reshape(-1)
    return x.reshape(n, c, h * w).index_select(2, index).view(n, c, h, w)


def jitter_flip(x: torch.Tensor, max_shift: int | Sequence[int], p_flip: float = 0.5,
                generator: torch.Generator | None = None, return_params: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """DeepInversion jitter: roll the whole batch by a random (dy, dx), then flip it with probability ``p_flip``.

    .. math:: d_y \\sim U\\{-m_y..m_y\\},\\ d_x \\sim U\\{-m_x..m_x\\};\\quad
              x' = \\mathrm{roll}(x, (d_y, d_x), \\text{dims}=(2, 3)),\\ \\text{then mirrored along W}.

    One shift and one flip for the whole batch, as in the reference implementation (the roll wraps around;
    it is differentiable). :func:`sample_jitter` draws the parameters on the device and :func:`roll_flip`
    applies them, so no value is read on the host.

    Args:
        x: batch of images.
        max_shift: ``m`` or ``(m_y, m_x)``, non-negative (DeepInversion uses H/8 on CIFAR, 30 on ImageNet).
        p_flip: flip probability.
        generator: random source (its device is used for sampling).
        return_params: also return ``(dy, dx, flipped)`` as 0-dim device tensors (int64, int64, bool).

    Shape: (N, C, H, W) -> (N, C, H, W).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("jitter_flip: x must be a (N, C, H, W) tensor")
    shift, flip = sample_jitter(max_shift, p_flip, generator=generator, device=x.device)
    out = roll_flip(x, shift, flip)
    return (out, (shift[0], shift[1], flip)) if return_params else out
