"""Batched bilinear crop-resize + horizontal flip + normalize (SPEC §3.2 convention).

What is computed: for every image n, channel c and output pixel (i, j) of an (oh, ow) output,

    x = x0 + (j' + 0.5) (x1 - x0) / ow - 0.5,   j' = ow - 1 - j if flip[n] else j
    y = y0 + (i + 0.5) (y1 - y0) / oh - 0.5
    out[n, c, i, j] = (bilinear(img[n, c], y, x) - mean_c) / std_c

with zeros outside the image (``grid_sample(align_corners=False, padding_mode="zeros")``).

Layout: the input may have any strides (contiguous, channels_last, sliced); the output is always
contiguous NCHW. The Triton forward runs one program per (image, output tile) and loops over all C
channels, so the sample coordinates and bilinear weights are computed once per tile. The backward
scatters the four bilinear weights with fp32 atomic adds into an fp32 buffer (N, C, H, W) that is cast to
x's dtype at the end. Arithmetic is fp32 (fp64 for float64 inputs). Boxes and flips are not
differentiable. It stops being fast when boxes are far larger than the output (heavy downsampling:
bilinear reads only 4 taps and aliases, exactly like ``grid_sample``) and, in the backward, when many
output pixels hit the same input pixel (upsampling by large factors serializes the atomics).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import HAS_TRITON, interpreting, record_launch

if HAS_TRITON:
    import triton
    import triton.language as tl


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


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _crop_flip_coords(boxes_ptr, flip_ptr, n, offs_h, offs_w, H, W, OH, OW, ACC: tl.constexpr):
        """Row taps (iy0, wy0, wy1) and column taps (ix0, wx0, wx1) of one tile; invalid taps weigh 0."""
        bx0 = tl.load(boxes_ptr + n * 4 + 0).to(ACC)
        by0 = tl.load(boxes_ptr + n * 4 + 1).to(ACC)
        bx1 = tl.load(boxes_ptr + n * 4 + 2).to(ACC)
        by1 = tl.load(boxes_ptr + n * 4 + 3).to(ACC)
        fl = tl.load(flip_ptr + n)
        jj = tl.where(fl != 0, OW - 1 - offs_w, offs_w)
        xs = bx0 + (jj.to(ACC) + 0.5) * (bx1 - bx0) / OW - 0.5
        ys = by0 + (offs_h.to(ACC) + 0.5) * (by1 - by0) / OH - 0.5
        # clamping far-outside coordinates keeps the int cast in range; all their taps stay invalid
        xs = tl.minimum(tl.maximum(xs, -2.0), W + 1.0)
        ys = tl.minimum(tl.maximum(ys, -2.0), H + 1.0)
        xf = tl.floor(xs)
        yf = tl.floor(ys)
        wx1 = xs - xf
        wy1 = ys - yf
        ix0 = xf.to(tl.int32)
        iy0 = yf.to(tl.int32)
        wx0 = tl.where((ix0 >= 0) & (ix0 < W), 1.0 - wx1, 0.0)
        wx1 = tl.where((ix0 + 1 >= 0) & (ix0 + 1 < W), wx1, 0.0)
        wy0 = tl.where((iy0 >= 0) & (iy0 < H), 1.0 - wy1, 0.0)
        wy1 = tl.where((iy0 + 1 >= 0) & (iy0 + 1 < H), wy1, 0.0)
        return ix0, wx0, wx1, iy0, wy0, wy1

    @triton.jit
    def _crop_flip_fwd_kernel(x_ptr, out_ptr, boxes_ptr, flip_ptr, mean_ptr, std_ptr,
                              C, H, W, OH, OW, sxn, sxc, sxh, sxw,
                              HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        n = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        ix0, wx0, wx1, iy0, wy0, wy1 = _crop_flip_coords(boxes_ptr, flip_ptr, n, offs_h, offs_w,
                                                         H, W, OH, OW, ACC)
        out_mask = (offs_h[:, None] < OH) & (offs_w[None, :] < OW)
        m00 = out_mask & (wy0[:, None] != 0.0) & (wx0[None, :] != 0.0)
        m01 = out_mask & (wy0[:, None] != 0.0) & (wx1[None, :] != 0.0)
        m10 = out_mask & (wy1[:, None] != 0.0) & (wx0[None, :] != 0.0)
        m11 = out_mask & (wy1[:, None] != 0.0) & (wx1[None, :] != 0.0)
        off00 = iy0[:, None].to(tl.int64) * sxh + ix0[None, :].to(tl.int64) * sxw
        off01 = off00 + sxw
        off10 = off00 + sxh
        off11 = off10 + sxw
        out_off = offs_h[:, None].to(tl.int64) * OW + offs_w[None, :]
        x_base = x_ptr + n.to(tl.int64) * sxn
        out_base = out_ptr + n.to(tl.int64) * C * OH * OW
        xc = x_base
        out_c = out_base
        for c in range(C):
            v00 = tl.load(xc + off00, mask=m00, other=0.0).to(ACC)
            v01 = tl.load(xc + off01, mask=m01, other=0.0).to(ACC)
            v10 = tl.load(xc + off10, mask=m10, other=0.0).to(ACC)
            v11 = tl.load(xc + off11, mask=m11, other=0.0).to(ACC)
            v = wy0[:, None] * (wx0[None, :] * v00 + wx1[None, :] * v01) \
                + wy1[:, None] * (wx0[None, :] * v10 + wx1[None, :] * v11)
            if HAS_NORM:
                v = (v - tl.load(mean_ptr + c).to(ACC)) / tl.load(std_ptr + c).to(ACC)
            tl.store(out_c + out_off, v.to(out_ptr.dtype.element_ty), mask=out_mask)
            xc += sxc  # pointer arithmetic is 64-bit: no int32 overflow on large batches
            out_c += OH * OW

    @triton.jit
    def _crop_flip_bwd_kernel(go_ptr, gx_ptr, boxes_ptr, flip_ptr, std_ptr,
                              C, H, W, OH, OW, sgn, sgc, sgh, sgw,
                              HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        n = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        ix0, wx0, wx1, iy0, wy0, wy1 = _crop_flip_coords(boxes_ptr, flip_ptr, n, offs_h, offs_w,
                                                         H, W, OH, OW, ACC)
        out_mask = (offs_h[:, None] < OH) & (offs_w[None, :] < OW)
        m00 = out_mask & (wy0[:, None] != 0.0) & (wx0[None, :] != 0.0)
        m01 = out_mask & (wy0[:, None] != 0.0) & (wx1[None, :] != 0.0)
        m10 = out_mask & (wy1[:, None] != 0.0) & (wx0[None, :] != 0.0)
        m11 = out_mask & (wy1[:, None] != 0.0) & (wx1[None, :] != 0.0)
        off00 = iy0[:, None].to(tl.int64) * W + ix0[None, :]
        go_off = offs_h[:, None].to(tl.int64) * sgh + offs_w[None, :].to(tl.int64) * sgw
        go_base = go_ptr + n.to(tl.int64) * sgn
        gx_base = gx_ptr + n.to(tl.int64) * C * H * W
        go_c = go_base
        gxc = gx_base
        for c in range(C):
            g = tl.load(go_c + go_off, mask=out_mask, other=0.0).to(ACC)
            if HAS_NORM:
                g = g / tl.load(std_ptr + c).to(ACC)
            gy0 = g * wy0[:, None]
            gy1 = g * wy1[:, None]
            tl.atomic_add(gxc + off00, gy0 * wx0[None, :], mask=m00)
            tl.atomic_add(gxc + off00 + 1, gy0 * wx1[None, :], mask=m01)
            tl.atomic_add(gxc + off00 + W, gy1 * wx0[None, :], mask=m10)
            tl.atomic_add(gxc + off00 + W + 1, gy1 * wx1[None, :], mask=m11)
            go_c += sgc
            gxc += H * W


# ---------------------------------------------------------------------------------------------------
# Host launchers (checks, allocation, grid, launch; no autograd)
# ---------------------------------------------------------------------------------------------------
#: (BLOCK_H, BLOCK_W) output tiles the launchers pick on a GPU (512 pixels, 4 per thread at NUM_WARPS = 4):
#: wide rows for outputs wider than 8 pixels, tall narrow tiles otherwise. Each entry is a compiled kernel
#: variant (see ``aot_specializations`` and kernels/aot.py).
TILES = ((16, 32), (64, 8))
NUM_WARPS = 4


def _blocks(oh: int, ow: int) -> tuple[int, int]:
    if interpreting():  # about 1 ms per loop iteration on the CPU: tiles tight around tiny test shapes
        block_w = min(triton.next_power_of_2(ow), 32)
        return min(triton.next_power_of_2(oh), max(1, 512 // block_w)), block_w
    return TILES[0] if ow > 8 else TILES[1]


def _prep_params(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, mean: torch.Tensor | None,
                 std: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    boxes_c = boxes.to(device=x.device, dtype=acc).contiguous()
    flip_c = flip.to(device=x.device, dtype=torch.int8).contiguous()
    has_norm = mean is not None or std is not None
    C = x.shape[1]
    mean_c = (torch.zeros(C, dtype=acc, device=x.device) if mean is None
              else mean.to(device=x.device, dtype=acc).contiguous())
    std_c = (torch.ones(C, dtype=acc, device=x.device) if std is None
             else std.to(device=x.device, dtype=acc).contiguous())
    return boxes_c, flip_c, mean_c, std_c, has_norm


def _check_launch(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_hw: tuple[int, int]) -> None:
    if not HAS_TRITON:
        raise RuntimeError("crop_flip: Triton is not importable")
    if x.dim() != 4:
        raise ValueError(f"crop_flip: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if boxes.shape != (x.shape[0], 4) or flip.shape != (x.shape[0],):
        raise ValueError(f"crop_flip: boxes must be (N, 4) and flip (N,) for N={x.shape[0]}, got "
                         f"{tuple(boxes.shape)} and {tuple(flip.shape)}")
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"crop_flip: out_size must be positive, got {out_hw}")


def crop_flip_fwd(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int | Sequence[int],
                  mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """Triton forward of :func:`crop_flip_ref`.

    Shape: x (N, C, H, W) any strides, boxes (N, 4), flip (N,), mean/std (C,) or None
    -> (N, C, oh, ow) contiguous, x's dtype.
    """
    out_hw = _out_hw(out_size)
    _check_launch(x, boxes, flip, out_hw)
    N, C, H, W = x.shape
    oh, ow = out_hw
    boxes_c, flip_c, mean_c, std_c, has_norm = _prep_params(x, boxes, flip, mean, std)
    out = torch.empty((N, C, oh, ow), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bh, bw = _blocks(oh, ow)
    grid = (N, triton.cdiv(oh, bh), triton.cdiv(ow, bw))
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    record_launch("crop_flip_fwd")
    _crop_flip_fwd_kernel[grid](x, out, boxes_c, flip_c, mean_c, std_c, C, H, W, oh, ow, *x.stride(),
                                HAS_NORM=has_norm, ACC=acc, BLOCK_H=bh, BLOCK_W=bw,
                                num_warps=1 if interpreting() else NUM_WARPS)
    return out


def crop_flip_bwd(grad_out: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, in_hw: Sequence[int],
                  std: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton backward w.r.t. x: scatter of the bilinear weights, divided by std_c.

    Shape: grad_out (N, C, oh, ow) any strides -> grad_x (N, C, H, W) contiguous in ``dtype``
    (default grad_out's dtype), accumulated in fp32 (fp64 for float64).
    """
    H, W = int(in_hw[0]), int(in_hw[1])
    N, C, oh, ow = grad_out.shape
    _check_launch(grad_out, boxes, flip, (oh, ow))
    if H <= 0 or W <= 0:
        raise ValueError(f"crop_flip: input size must be positive, got {(H, W)}")
    dtype = grad_out.dtype if dtype is None else dtype
    boxes_c, flip_c, _, std_c, _ = _prep_params(grad_out, boxes, flip, None, std)
    acc_t = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    gx = torch.zeros((N, C, H, W), dtype=acc_t, device=grad_out.device)
    if grad_out.numel() == 0 or gx.numel() == 0:
        return gx.to(dtype)
    bh, bw = _blocks(oh, ow)
    grid = (N, triton.cdiv(oh, bh), triton.cdiv(ow, bw))
    acc = tl.float64 if acc_t == torch.float64 else tl.float32
    record_launch("crop_flip_bwd")
    _crop_flip_bwd_kernel[grid](grad_out, gx, boxes_c, flip_c, std_c, C, H, W, oh, ow, *grad_out.stride(),
                                HAS_NORM=std is not None, ACC=acc, BLOCK_H=bh, BLOCK_W=bw,
                                num_warps=1 if interpreting() else NUM_WARPS)
    return gx if gx.dtype == dtype else gx.to(dtype)


def aot_specializations() -> list:
    """Every variant the launchers above pick on a GPU (see ``kernels/aot.py``): forward and backward for x in
    fp32 / fp16 / bf16 / fp64 (fp64 arithmetic for fp64) x each tile of :data:`TILES` x HAS_NORM."""
    from .aot import Specialization, signature

    specs = []
    for dt in ("fp32", "fp16", "bf16", "fp64"):
        acc = "fp64" if dt == "fp64" else "fp32"
        acc_tl = tl.float64 if dt == "fp64" else tl.float32
        for bh, bw in TILES:
            for has_norm in (False, True):
                cx = {"HAS_NORM": has_norm, "ACC": acc_tl, "BLOCK_H": bh, "BLOCK_W": bw}
                label = f"x={dt} BLOCK_H={bh} BLOCK_W={bw} HAS_NORM={int(has_norm)} w{NUM_WARPS}"
                sig, c = signature(_crop_flip_fwd_kernel, {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                                                           "boxes_ptr": f"*{acc}", "flip_ptr": "*i8",
                                                           "mean_ptr": f"*{acc}", "std_ptr": f"*{acc}"}, cx)
                specs.append(Specialization("_crop_flip_fwd_kernel", label, _crop_flip_fwd_kernel, sig, c, NUM_WARPS))
                sig, c = signature(_crop_flip_bwd_kernel, {"go_ptr": f"*{dt}", "gx_ptr": f"*{acc}",
                                                           "boxes_ptr": f"*{acc}", "flip_ptr": "*i8",
                                                           "std_ptr": f"*{acc}"}, cx)
                specs.append(Specialization("_crop_flip_bwd_kernel", label, _crop_flip_bwd_kernel, sig, c, NUM_WARPS))
    return specs
