"""InfoNCE with the positive on the same row (SPEC §3.2, CMI's contrastive loss).

What is computed: for query Q (M, D), keys K (M, D) and temperature T,
``loss_i = logsumexp_j(q_i . k_j / T) - q_i . k_i / T`` (cross-entropy of row i of Q K^T / T against label i).

Fast path (flash-attention style): one program per block of query rows streams over key tiles with an online
log-sum-exp, so the (M, M) logits never exist in memory (O(M D) memory: inputs, the per-row loss and the
per-row LSE saved for backward). Backward recomputes logit tiles from the saved LSE:
``dq_i = g_i / T * (sum_j P_ij k_j - k_i)`` (one program per query-row block) and
``dk_j = 1 / T * (sum_i g_i P_ij q_i - g_j q_j)`` (one program per key block, looping over query blocks:
deterministic, no atomics), with ``P = softmax(Q K^T / T)`` row-wise.

Layout: any 2-D strides (no copies). Accumulation: fp32 everywhere (``tl.dot`` with fp32 accumulator, IEEE
fp32 products for fp32 inputs; fp16/bf16 inputs use tensor-core products on GPU). D is processed in chunks of
most ``GPU_TILES`` columns on a GPU (32 for fp32, 64 for fp16/bf16; ``MAX_BLOCK_D`` = 128 in the interpreter),
so any D works; past one chunk it slows down (q/k chunks are re-read per key tile, and each backward program
owns one D chunk and recomputes the logits), and for tiny M (< 64) launch overhead dominates.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, interpreting, record_launch

__all__ = ["info_nce_ref", "info_nce_fwd", "info_nce_bwd"]


def info_nce_ref(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """loss_i = logsumexp_j(q_i . k_j / T) - q_i . k_i / T. Shape: (M, D), (M, D) -> (M,), fp32.

    Materializes the (M, M) logits: this is the eager baseline, not the fast path.
    """
    q = query.float() if query.dtype != torch.float64 else query
    k = keys.to(q.dtype)
    logits = q @ k.t() / temperature
    return torch.logsumexp(logits, dim=1) - logits.diagonal()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_nt(a, b, acc, LOWP_DOT: tl.constexpr):
        """acc + a @ b^T with fp32 accumulation (IEEE fp32 products unless LOWP_DOT)."""
        if LOWP_DOT:
            return tl.dot(a, tl.trans(b), acc)
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")

    @triton.jit
    def _tile_logits(q_ptr, k_ptr, offs_m, offs_n, D, stride_qm, stride_qd, stride_km, stride_kd, scale,
                     M_MASK, N_MASK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     LOWP_DOT: tl.constexpr):
        """S = Q[offs_m] K[offs_n]^T * scale, (BLOCK_M, BLOCK_N) fp32, summed over D chunks (D > BLOCK_D)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=M_MASK[:, None] & d_mask[None, :], other=0.0)
            k = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                        mask=N_MASK[:, None] & d_mask[None, :], other=0.0)
            acc = _dot_nt(q, k, acc, LOWP_DOT)
        return acc * scale

    @triton.jit
    def _info_nce_fwd_kernel(q_ptr, k_ptr, loss_ptr, lse_ptr, M, D, stride_qm, stride_qd, stride_km, stride_kd,
                             scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             SINGLE_D: tl.constexpr, LOWP_DOT: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_d = tl.arange(0, BLOCK_D)
        if SINGLE_D:  # D <= BLOCK_D: the query tile stays in registers across the key loop
            q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=m_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < M
            if SINGLE_D:
                k_blk = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                                mask=n_mask[:, None] & (offs_d < D)[None, :], other=0.0)
                s = _dot_nt(q_blk, k_blk, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOWP_DOT) * scale
            else:
                s = _tile_logits(q_ptr, k_ptr, offs_m, offs_n, D, stride_qm, stride_qd, stride_km, stride_kd,
                                 scale, m_mask, n_mask, BLOCK_M, BLOCK_N, BLOCK_D, LOWP_DOT)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        # positive logit q_i . k_i / T, accumulated in fp32 over D chunks
        pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_dd = d0 + offs_d
            mask = m_mask[:, None] & (offs_dd < D)[None, :]
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_dd[None, :] * stride_qd, mask=mask, other=0.0)
            k = tl.load(k_ptr + offs_m[:, None] * stride_km + offs_dd[None, :] * stride_kd, mask=mask, other=0.0)
            pos += tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)
        tl.store(lse_ptr + offs_m, lse, mask=m_mask)
        tl.store(loss_ptr + offs_m, lse - pos * scale, mask=m_mask)

    @triton.jit
    def _info_nce_bwd_dq_kernel(q_ptr, k_ptr, lse_ptr, g_ptr, dq_ptr, M, D, stride_qm, stride_qd, stride_km,
                                stride_kd, stride_dqm, stride_dqd, scale, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                                LOWP_DOT: tl.constexpr):
        """dq = g / T * (P @ K - K_diag), one D chunk (program axis 1) of one row block (axis 0)."""
        pid = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if SINGLE_D:
            q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
        g = tl.load(g_ptr + offs_m, mask=m_mask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < M
            k = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if SINGLE_D:  # this k chunk is the whole row: reuse it for the logits
                s = _dot_nt(q_blk, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOWP_DOT) * scale
            else:
                s = _tile_logits(q_ptr, k_ptr, offs_m, offs_n, D, stride_qm, stride_qd, stride_km, stride_kd,
                                 scale, m_mask, n_mask, BLOCK_M, BLOCK_N, BLOCK_D, LOWP_DOT)
            p = tl.where(n_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
            if LOWP_DOT:
                acc = tl.dot(p.to(k.dtype), k, acc)
            else:
                acc = tl.dot(p, k.to(tl.float32), acc, input_precision="ieee")
        mask = m_mask[:, None] & d_mask[None, :]
        k_diag = tl.load(k_ptr + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
        dq = (acc - k_diag.to(tl.float32)) * (g * scale)[:, None]
        tl.store(dq_ptr + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(dq_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _info_nce_bwd_dk_kernel(q_ptr, k_ptr, lse_ptr, g_ptr, dk_ptr, M, D, stride_qm, stride_qd, stride_km,
                                stride_kd, stride_dkm, stride_dkd, scale, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                                LOWP_DOT: tl.constexpr):
        """dk_j = 1 / T * (sum_i g_i P_ij q_i - g_j q_j), one D chunk (axis 1) of one key block (axis 0)."""
        pid = tl.program_id(0)
        d0 = tl.program_id(1) * BLOCK_D
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < M
            lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
            g = tl.load(g_ptr + offs_m, mask=m_mask, other=0.0)
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            if SINGLE_D:  # this q chunk is the whole row: reuse it for the logits
                s = _dot_nt(q, k_blk, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOWP_DOT) * scale
            else:
                s = _tile_logits(q_ptr, k_ptr, offs_m, offs_n, D, stride_qm, stride_qd, stride_km, stride_kd,
                                 scale, m_mask, n_mask, BLOCK_M, BLOCK_N, BLOCK_D, LOWP_DOT)
            # rows past M have g = 0; columns past M are zeroed (never stored, but keep them finite)
            pg = tl.where(n_mask[None, :], tl.exp(s - lse[:, None]) * g[:, None], 0.0)
            if LOWP_DOT:
                acc = tl.dot(tl.trans(pg.to(q.dtype)), q, acc)
            else:
                acc = tl.dot(tl.trans(pg), q.to(tl.float32), acc, input_precision="ieee")
        mask = n_mask[:, None] & d_mask[None, :]
        q_diag = tl.load(q_ptr + offs_n[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
        g_diag = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0)
        dk = (acc - q_diag.to(tl.float32) * g_diag[:, None]) * scale
        tl.store(dk_ptr + offs_n[:, None] * stride_dkm + offs_d[None, :] * stride_dkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=mask)


MAX_BLOCK_D = 128  # interpreter: D is processed in chunks of at most this many columns (GPU: GPU_TILES)


#: GPU tiles, chosen with kernels/aot.py so that no kernel spills registers on sm_90 / sm_80
#: (benchmarks/results/triton_aot_sm90.md). fp32 (IEEE products, no tensor cores): 32 x 32 logit tiles and
#: D chunks of at most 32 (64 x 64 tiles spilled kilobytes per thread: 242-255 registers + up to 80 KB of
#: local memory per thread for BLOCK_D = 128). fp16 / bf16 (tensor cores): 64 x 64 tiles; the query tile stays in
#: registers for D <= 64 (BLOCK_D 16 or 64: with BLOCK_D = 32 the dk kernel spilled 16 bytes on sm_80), larger
#: D streams 32-column chunks. Always 8 warps.
#: Per dtype class: (BLOCK_M, BLOCK_N, BLOCK_D values for one chunk, BLOCK_D of the chunks when D is larger).
GPU_TILES = {"fp32": (32, 32, (16, 32), 32), "lowp": (64, 64, (16, 64), 32)}
GPU_WARPS = 8


def _gpu_config(D: int, dtype: torch.dtype) -> tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, LOWP_DOT, num_warps) on a GPU: the table ``aot_specializations`` compiles.

    SINGLE_D (one D chunk) holds exactly when D <= BLOCK_D."""
    lowp = dtype in (torch.float16, torch.bfloat16)
    bm, bn, singles, chunk = GPU_TILES["lowp" if lowp else "fp32"]
    block_d = next((b for b in singles if D <= b), chunk)
    return bm, bn, block_d, lowp, GPU_WARPS


def _config(D: int, dtype: torch.dtype) -> tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, LOWP_DOT, num_warps) for a problem; one fixed config under the interpreter."""
    if interpreting():
        # bf16/fp16 arithmetic is unreliable in the interpreter: products in fp32 there
        block_d = max(16, min(MAX_BLOCK_D, 1 << (max(D, 1) - 1).bit_length()))
        return 32, 32, block_d, False, 4
    return _gpu_config(D, dtype)


def _check_launch(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> None:
    if query.dim() != 2 or query.shape != keys.shape:
        raise ValueError(f"info_nce: query and keys must both be (M, D), got {tuple(query.shape)} and "
                         f"{tuple(keys.shape)}")
    if query.dtype != keys.dtype or query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"info_nce (triton): query and keys must share a dtype among float32/float16/bfloat16, "
                         f"got {query.dtype} and {keys.dtype}; use backend='torch' for float64")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")


def info_nce_fwd(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE loss and log-sum-exp without materializing the (M, M) logits (no autograd).

    Shape: query (M, D), keys (M, D) -> loss (M,) fp32, lse (M,) fp32 with
    ``lse_i = logsumexp_j(q_i . k_j / T)`` and ``loss_i = lse_i - q_i . k_i / T``.
    """
    if not HAS_TRITON:
        raise RuntimeError("info_nce_fwd needs Triton")
    _check_launch(query, keys, temperature)
    M, D = query.shape
    loss = torch.empty(M, dtype=torch.float32, device=query.device)
    lse = torch.empty(M, dtype=torch.float32, device=query.device)
    bm, bn, bd, lowp, warps = _config(D, query.dtype)
    grid = (triton.cdiv(M, bm),)
    _info_nce_fwd_kernel[grid](query, keys, loss, lse, M, D, query.stride(0), query.stride(1), keys.stride(0),
                               keys.stride(1), 1.0 / temperature, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                               SINGLE_D=D <= bd, LOWP_DOT=lowp, num_warps=warps)
    record_launch("info_nce_fwd")
    return loss, lse


def info_nce_bwd(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                 temperature: float, need_dq: bool = True,
                 need_dk: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i g_i loss_i`` w.r.t. query and keys, recomputing logit tiles from the saved LSE.

    Shape: query, keys (M, D); lse, grad_loss (M,) -> dq (M, D) in query's dtype (or None), dk (M, D) in
    keys' dtype (or None). ``dq_i = g_i / T (sum_j P_ij k_j - k_i)``,
    ``dk_j = 1 / T (sum_i g_i P_ij q_i - g_j q_j)``, ``P_ij = exp(q_i . k_j / T - lse_i)``.
    """
    if not HAS_TRITON:
        raise RuntimeError("info_nce_bwd needs Triton")
    _check_launch(query, keys, temperature)
    M, D = query.shape
    g = grad_loss.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    if g.shape != (M,) or lse.shape != (M,):
        raise ValueError(f"info_nce_bwd: lse and grad_loss must be ({M},), got {tuple(lse.shape)} and {tuple(g.shape)}")
    bm, bn, bd, lowp, warps = _config(D, query.dtype)
    scale = 1.0 / temperature
    dq = dk = None
    if need_dq:
        dq = torch.empty_like(query, memory_format=torch.contiguous_format)
        grid = (triton.cdiv(M, bm), triton.cdiv(D, bd))
        _info_nce_bwd_dq_kernel[grid](query, keys, lse, g, dq, M, D, query.stride(0), query.stride(1),
                                      keys.stride(0), keys.stride(1), dq.stride(0), dq.stride(1), scale,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SINGLE_D=D <= bd, LOWP_DOT=lowp,
                                      num_warps=warps)
        record_launch("info_nce_bwd_dq")
    if need_dk:
        dk = torch.empty_like(keys, memory_format=torch.contiguous_format)
        grid = (triton.cdiv(M, bn), triton.cdiv(D, bd))
        _info_nce_bwd_dk_kernel[grid](query, keys, lse, g, dk, M, D, query.stride(0), query.stride(1),
                                      keys.stride(0), keys.stride(1), dk.stride(0), dk.stride(1), scale,
                                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SINGLE_D=D <= bd, LOWP_DOT=lowp,
                                      num_warps=warps)
        record_launch("info_nce_bwd_dk")
    return dq, dk


def aot_specializations() -> list:
    """Every variant the launchers above pick on a GPU (see ``kernels/aot.py``): the three kernels for
    query/keys in fp32 / fp16 / bf16 and every (BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, LOWP_DOT, num_warps) that
    :func:`_gpu_config` returns for any D (D past 4 * MAX_BLOCK_D gives no new configuration)."""
    from .aot import Specialization, signature, triton_dtype

    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dt = triton_dtype(dtype)
        configs = sorted({(*_gpu_config(d, dtype), d <= _gpu_config(d, dtype)[2])
                          for d in range(1, 4 * MAX_BLOCK_D + 1)})
        for bm, bn, bd, lowp, warps, single_d in configs:
            cx = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "SINGLE_D": single_d, "LOWP_DOT": lowp}
            label = f"{dt} BLOCK_M={bm} BLOCK_N={bn} BLOCK_D={bd} SINGLE_D={int(single_d)} LOWP={int(lowp)} w{warps}"
            sig, c = signature(_info_nce_fwd_kernel, {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "loss_ptr": "*fp32",
                                                      "lse_ptr": "*fp32", "scale": "fp32"}, cx)
            specs.append(Specialization("_info_nce_fwd_kernel", label, _info_nce_fwd_kernel, sig, c, warps))
            sig, c = signature(_info_nce_bwd_dq_kernel, {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "lse_ptr": "*fp32",
                                                         "g_ptr": "*fp32", "dq_ptr": f"*{dt}", "scale": "fp32"}, cx)
            specs.append(Specialization("_info_nce_bwd_dq_kernel", label, _info_nce_bwd_dq_kernel, sig, c, warps))
            sig, c = signature(_info_nce_bwd_dk_kernel, {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "lse_ptr": "*fp32",
                                                         "g_ptr": "*fp32", "dk_ptr": f"*{dt}", "scale": "fp32"}, cx)
            specs.append(Specialization("_info_nce_bwd_dk_kernel", label, _info_nce_bwd_dk_kernel, sig, c, warps))
    return specs
