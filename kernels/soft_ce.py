"""Temperature-softmax cross-entropy to soft targets and KD KL divergence (SPEC §3.3).

What is computed: per row i of logits z (N, K), with u = z / T,

* soft CE: ``loss_i = -sum_j y_ij log softmax(u_i)_j`` and its gradients
  ``dz = (softmax(u) * sum_j y - y) * r / T`` and ``dy = (lse(u) - u) * r``;
* KD KL: ``loss_i = T^2 KL(p_i || q_i)`` with ``p = softmax(t / T)``, ``q = softmax(s / T)`` and
  ``ds = T (q - p) r``, ``dt = T p (log p - log q - KL_i) r``,

where ``r`` is the reduction scale (``1/N`` for mean/batchmean, else 1). One Triton program per row;
the row is streamed in ``BLOCK_K`` tiles with an online max / log-sum-exp, so K is unbounded (pass 1:
statistics; pass 2: loss and gradients; pass 3, KD teacher gradient only: it needs the finished KL).
When K fits one tile (the default up to 4096) every pass re-reads the same tile from cache.

Design choice: the gradients are computed in the forward pass and saved (as Liger-Kernel does), and the
backward only scales them by ``grad_output``. Recomputing in backward moves exactly as many bytes
(forward 2NK reads + backward 2NK reads and NK writes vs. forward 2NK reads and NK writes + backward NK
reads and NK writes) but evaluates every exponential twice; saving costs N*K extra memory in the input
dtype, which is small next to the activations that produced the logits.

Layout: any strides (no copies). Accumulation in fp32 (fp64 for fp64 inputs); losses in fp32 (fp64),
gradients in the input dtype. Stable for |z/T| up to 1e4 and beyond: every exponent is <= 0.
Where it stops being fast: a program per row leaves the GPU idle for N < ~1000 rows with tiny K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import HAS_TRITON, interpreting, record_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "batchmean", "sum", "none")
MAX_BLOCK_K = 4096


def _reduce(loss: torch.Tensor, reduction: str, n: int, op: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean" or reduction == "batchmean":
        return loss.sum() / n
    raise ValueError(f"{op}: reduction must be 'mean', 'batchmean', 'sum' or 'none', got {reduction!r}")


def reduction_scale(reduction: str, n: int, op: str) -> float:
    """The factor r that the reduction applies to every row loss (1/N for mean/batchmean, else 1)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'batchmean', 'sum' or 'none', got {reduction!r}")
    return 1.0 / max(n, 1) if reduction in ("mean", "batchmean") else 1.0


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


if HAS_TRITON:

    @triton.jit
    def _soft_ce_fwd_kernel(z_ptr, y_ptr, loss_ptr, gz_ptr, gy_ptr,
                            stride_zn, stride_zk, stride_yn, stride_yk, stride_gzn, stride_gyn,
                            K, inv_t, scale,
                            BLOCK_K: tl.constexpr, NEED_GZ: tl.constexpr, NEED_GY: tl.constexpr,
                            ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_zn
        y_row = y_ptr + row * stride_yn
        cols = tl.arange(0, BLOCK_K)
        m = tl.full((), float("-inf"), ACC)  # running max of u
        s = tl.zeros((), ACC)  # sum exp(u - m)
        sy = tl.zeros((), ACC)  # sum y
        syu = tl.zeros((), ACC)  # sum y (u - m), <= 0 term by term: no cancellation
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            u = tl.load(z_row + offs * stride_zk, mask=mask, other=0.0).to(ACC) * inv_t
            y = tl.load(y_row + offs * stride_yk, mask=mask, other=0.0).to(ACC)
            u_inf = tl.where(mask, u, float("-inf"))
            m_new = tl.maximum(m, tl.max(u_inf, axis=0))
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)
            s = s * tl.exp(shift) + tl.sum(tl.exp(u_inf - m_new), axis=0)
            syu = syu + sy * shift + tl.sum(y * (u - m_new), axis=0)
            sy = sy + tl.sum(y, axis=0)
            m = m_new
        log_s = tl.log(s)
        tl.store(loss_ptr + row, sy * log_s - syu)
        if NEED_GZ or NEED_GY:
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + cols
                mask = offs < K
                u = tl.load(z_row + offs * stride_zk, mask=mask, other=0.0).to(ACC) * inv_t
                if NEED_GZ:
                    y = tl.load(y_row + offs * stride_yk, mask=mask, other=0.0).to(ACC)
                    g = (tl.exp((u - m) - log_s) * sy - y) * (inv_t * scale)
                    tl.store(gz_ptr + row * stride_gzn + offs, g.to(gz_ptr.dtype.element_ty), mask=mask)
                if NEED_GY:
                    gy = ((m - u) + log_s) * scale
                    tl.store(gy_ptr + row * stride_gyn + offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kd_kl_fwd_kernel(s_ptr, t_ptr, loss_ptr, gs_ptr, gt_ptr,
                          stride_sn, stride_sk, stride_tn, stride_tk, stride_gsn, stride_gtn,
                          K, inv_t, temp, scale,
                          BLOCK_K: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
                          ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_sn
        t_row = t_ptr + row * stride_tn
        cols = tl.arange(0, BLOCK_K)
        ma = tl.full((), float("-inf"), ACC)  # teacher a = t / T
        sa = tl.zeros((), ACC)
        mb = tl.full((), float("-inf"), ACC)  # student b = s / T
        sb = tl.zeros((), ACC)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            a = tl.load(t_row + offs * stride_tk, mask=mask, other=float("-inf")).to(ACC)
            b = tl.load(s_row + offs * stride_sk, mask=mask, other=float("-inf")).to(ACC)
            a = tl.where(mask, a * inv_t, float("-inf"))
            b = tl.where(mask, b * inv_t, float("-inf"))
            ma_new = tl.maximum(ma, tl.max(a, axis=0))
            mb_new = tl.maximum(mb, tl.max(b, axis=0))
            sa = sa * tl.exp(tl.where(ma == float("-inf"), 0.0, ma - ma_new)) + tl.sum(tl.exp(a - ma_new), axis=0)
            sb = sb * tl.exp(tl.where(mb == float("-inf"), 0.0, mb - mb_new)) + tl.sum(tl.exp(b - mb_new), axis=0)
            ma = ma_new
            mb = mb_new
        log_sa = tl.log(sa)
        log_sb = tl.log(sb)
        kl = tl.zeros((), ACC)
        g_scale = temp * scale
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            a = tl.load(t_row + offs * stride_tk, mask=mask, other=0.0).to(ACC) * inv_t
            b = tl.load(s_row + offs * stride_sk, mask=mask, other=0.0).to(ACC) * inv_t
            log_p = (a - ma) - log_sa  # log softmax as (x - max) - log(sum): no rounding of max + log(sum)
            log_q = (b - mb) - log_sb
            p = tl.exp(log_p)
            kl = kl + tl.sum(tl.where(mask, p * (log_p - log_q), 0.0), axis=0)
            if NEED_GS:
                gs = (tl.exp(log_q) - p) * g_scale
                tl.store(gs_ptr + row * stride_gsn + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)
        tl.store(loss_ptr + row, kl * (temp * temp))
        if NEED_GT:
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + cols
                mask = offs < K
                a = tl.load(t_row + offs * stride_tk, mask=mask, other=0.0).to(ACC) * inv_t
                b = tl.load(s_row + offs * stride_sk, mask=mask, other=0.0).to(ACC) * inv_t
                log_p = (a - ma) - log_sa
                gt = tl.exp(log_p) * (log_p - ((b - mb) - log_sb) - kl) * g_scale
                tl.store(gt_ptr + row * stride_gtn + offs, gt.to(gt_ptr.dtype.element_ty), mask=mask)


#: (BLOCK_K, num_warps) the launchers pick from (at most 8 elements per thread: at 16 per thread, BLOCK_K=4096
#: with 8 warps, ptxas capped the KD kernel at 64 registers and spilled); K above the largest block streams over
#: several tiles. Each entry is a compiled kernel variant (see ``aot_specializations`` and kernels/aot.py).
BLOCK_K_CONFIGS = ((64, 1), (256, 2), (1024, 4), (MAX_BLOCK_K, 16))


def _block_k(k: int, block_k: int | None) -> int:
    if block_k is not None:
        if block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
        return block_k
    for block, _ in BLOCK_K_CONFIGS:
        if k <= block:
            return block
    return MAX_BLOCK_K


def _launch_cfg(block: int) -> dict[str, int]:
    if interpreting():
        return {"num_warps": 1}
    for b, warps in BLOCK_K_CONFIGS:
        if block <= b:
            return {"num_warps": warps}
    return {"num_warps": BLOCK_K_CONFIGS[-1][1]}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def soft_target_cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float, scale: float,
                                  need_grad_logits: bool, need_grad_targets: bool, block_k: int | None = None,
                                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row losses and (optionally) the gradients scaled by ``scale / T`` in one launch. No autograd.

    Shape: logits (N, K), targets (N, K), any strides -> loss (N,) fp32 (fp64 for fp64 logits),
    grad_logits (N, K) in logits' dtype, grad_targets (N, K) in targets' dtype (``None`` when not asked).
    The backward of the loss is these saved gradients times ``grad_output``.
    """
    if not HAS_TRITON:
        raise RuntimeError("soft_target_cross_entropy_fwd needs Triton")
    n, k = logits.shape
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc_dtype, device=logits.device)
    gz = torch.empty((n, k), dtype=logits.dtype, device=logits.device) if need_grad_logits else None
    gy = torch.empty((n, k), dtype=targets.dtype, device=targets.device) if need_grad_targets else None
    if n == 0:
        return loss, gz, gy
    block = _block_k(k, block_k)
    _soft_ce_fwd_kernel[(n,)](
        logits, targets, loss, gz if gz is not None else loss, gy if gy is not None else loss,
        logits.stride(0), logits.stride(1), targets.stride(0), targets.stride(1),
        k if gz is not None else 0, k if gy is not None else 0,
        k, 1.0 / temperature, scale,
        BLOCK_K=block, NEED_GZ=gz is not None, NEED_GY=gy is not None, ACC=_acc(logits.dtype),
        **_launch_cfg(block))
    record_launch("soft_ce_fwd")
    return loss, gz, gy


def kd_kl_div_fwd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, scale: float,
                  need_grad_student: bool, need_grad_teacher: bool, block_k: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row losses ``T^2 KL(p || q)`` and (optionally) both gradients times ``scale`` in one launch.

    Shape: student (N, K), teacher (N, K), any strides -> loss (N,) fp32 (fp64 for fp64 inputs),
    grad_student / grad_teacher (N, K) in the respective input dtype (``None`` when not asked).
    The teacher gradient costs a third read of the row (it needs the finished KL); ask only if needed.
    """
    if not HAS_TRITON:
        raise RuntimeError("kd_kl_div_fwd needs Triton")
    n, k = student_logits.shape
    acc_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc_dtype, device=student_logits.device)
    gs = torch.empty((n, k), dtype=student_logits.dtype, device=loss.device) if need_grad_student else None
    gt = torch.empty((n, k), dtype=teacher_logits.dtype, device=loss.device) if need_grad_teacher else None
    if n == 0:
        return loss, gs, gt
    block = _block_k(k, block_k)
    _kd_kl_fwd_kernel[(n,)](
        student_logits, teacher_logits, loss, gs if gs is not None else loss, gt if gt is not None else loss,
        student_logits.stride(0), student_logits.stride(1), teacher_logits.stride(0), teacher_logits.stride(1),
        k if gs is not None else 0, k if gt is not None else 0,
        k, 1.0 / temperature, float(temperature), scale,
        BLOCK_K=block, NEED_GS=gs is not None, NEED_GT=gt is not None, ACC=_acc(student_logits.dtype),
        **_launch_cfg(block))
    record_launch("kd_kl_fwd")
    return loss, gs, gt


def aot_specializations() -> list:
    """Every variant the launchers above pick on a GPU (see ``kernels/aot.py``): for both kernels, each
    (input dtype, second input dtype) in fp32 / fp16 / bf16 / fp64 pairs plus the autocast mix (bf16 logits,
    fp32 targets) x each :data:`BLOCK_K_CONFIGS` entry x each (NEED_grad_a, NEED_grad_b) flag pair.
    (An explicit ``block_k`` argument, a tuning knob, compiles more variants on demand.)"""
    from .aot import Specialization, signature

    specs = []
    pairs = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp64", "fp64"), ("bf16", "fp32"))
    kernels = ((_soft_ce_fwd_kernel, "z_ptr", "y_ptr", "gz_ptr", "gy_ptr", "NEED_GZ", "NEED_GY"),
               (_kd_kl_fwd_kernel, "s_ptr", "t_ptr", "gs_ptr", "gt_ptr", "NEED_GS", "NEED_GT"))
    for fn, a, b, ga, gb, need_a, need_b in kernels:
        floats = [n for n in ("inv_t", "temp", "scale") if n in fn.arg_names]
        for da, db in pairs:
            acc = "fp64" if da == "fp64" else "fp32"
            for block, warps in BLOCK_K_CONFIGS:
                for flag_a in (True, False):
                    for flag_b in (False, True):
                        types = {a: f"*{da}", b: f"*{db}", "loss_ptr": f"*{acc}",
                                 ga: f"*{da}" if flag_a else f"*{acc}", gb: f"*{db}" if flag_b else f"*{acc}"}
                        types.update({n: "fp32" for n in floats})  # Python floats are passed as fp32
                        sig, cx = signature(fn, types, {"BLOCK_K": block, need_a: flag_a, need_b: flag_b,
                                                        "ACC": tl.float64 if acc == "fp64" else tl.float32})
                        label = f"{da}/{db} BLOCK_K={block} w{warps} {need_a}={int(flag_a)} {need_b}={int(flag_b)}"
                        specs.append(Specialization(fn.__name__, label, fn, sig, cx, warps))
    return specs
