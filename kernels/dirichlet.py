"""Class similarity and Dirichlet soft targets (SPEC §3.3, Data Impressions / ZSKD).

Triton forward of ``class_similarity``: one program per block of BLOCK_M rows; pass 1 streams the column
blocks (Gram tile via ``tl.dot`` over F tiles in fp32/IEEE, row and column squared norms accumulated in the
same loop) and keeps the running row min / max; pass 2 recomputes each tile and writes the min-max
normalized values (recomputing is cheaper than a store/reload round trip for K <= a few thousand, and
needs no intra-program barrier). fp32 accumulation, output fp32. Any input strides. Where it stops being
fast: K^2 F / BLOCK work is done twice, fine for classifier heads (K <= 1000s), not for huge Gram matrices.
Dirichlet sampling stays in torch (gamma sampling has no Triton primitive).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, interpreting, record_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

DIRICHLET_FLOOR = 1e-4


def class_similarity_ref(weight: torch.Tensor) -> torch.Tensor:
    """C(i, j) = w_i.w_j / (|w_i| |w_j|), then each row min-max normalized to [0, 1].

    Shape: weight (K, F) -> (K, K), fp32.
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = wn @ wn.t()
    lo = c.min(dim=1, keepdim=True).values
    hi = c.max(dim=1, keepdim=True).values
    return (c - lo) / (hi - lo).clamp_min(1e-12)


def dirichlet_targets_ref(similarity: torch.Tensor, classes: torch.Tensor, beta: float | torch.Tensor = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample y_n ~ Dir(beta_n * C[classes_n] + 1e-4). Shape: (K, K), (N,), beta scalar or (N,) -> (N, K).

    beta scales the concentration (no re-normalization afterwards: beta really changes the spread).
    """
    alpha = similarity.float()[classes]
    beta_t = torch.as_tensor(beta, dtype=alpha.dtype, device=alpha.device)
    if beta_t.dim() == 1:
        beta_t = beta_t.view(-1, 1)
    alpha = beta_t * alpha + DIRICHLET_FLOOR
    return torch._sample_dirichlet(alpha.double(), generator=generator).to(alpha.dtype)


if HAS_TRITON:

    @triton.jit
    def _cos_tile(w_ptr, stride_k, stride_f, rows, cols, K, F, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_F: tl.constexpr):
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        sq_r = tl.zeros((BLOCK_M,), tl.float32)
        sq_c = tl.zeros((BLOCK_N,), tl.float32)
        fo = tl.arange(0, BLOCK_F)
        for f0 in range(0, F, BLOCK_F):
            fm = (f0 + fo) < F
            a = tl.load(w_ptr + rows[:, None] * stride_k + (f0 + fo)[None, :] * stride_f,
                        mask=(rows[:, None] < K) & fm[None, :], other=0.0).to(tl.float32)
            b = tl.load(w_ptr + cols[:, None] * stride_k + (f0 + fo)[None, :] * stride_f,
                        mask=(cols[:, None] < K) & fm[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            sq_r += tl.sum(a * a, axis=1)
            sq_c += tl.sum(b * b, axis=1)
        inv_r = 1.0 / tl.maximum(tl.sqrt(sq_r), 1e-12)
        inv_c = 1.0 / tl.maximum(tl.sqrt(sq_c), 1e-12)
        return acc * inv_r[:, None] * inv_c[None, :]

    @triton.jit
    def _class_similarity_fwd_kernel(w_ptr, out_ptr, stride_k, stride_f, K, F,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        lo = tl.full((BLOCK_M,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for n0 in range(0, K, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            c = _cos_tile(w_ptr, stride_k, stride_f, rows, cols, K, F, BLOCK_M, BLOCK_N, BLOCK_F)
            valid = (cols < K)[None, :]
            lo = tl.minimum(lo, tl.min(tl.where(valid, c, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(valid, c, float("-inf")), axis=1))
        inv_span = 1.0 / tl.maximum(hi - lo, 1e-12)
        for n0 in range(0, K, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            c = _cos_tile(w_ptr, stride_k, stride_f, rows, cols, K, F, BLOCK_M, BLOCK_N, BLOCK_F)
            out = (c - lo[:, None]) * inv_span[:, None]
            tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], out,
                     mask=(rows[:, None] < K) & (cols[None, :] < K))


#: (BLOCK_M, BLOCK_N, BLOCK_F, num_warps) of the class-similarity kernel on a GPU (one compiled variant per
#: weight dtype; see ``aot_specializations`` and kernels/aot.py).
SIMILARITY_CONFIG = (32, 64, 32, 8)  # (16, 64, 64, 4) spilled (255 registers) on sm_90


def class_similarity_fwd(weight: torch.Tensor) -> torch.Tensor:
    """Triton forward of :func:`class_similarity_ref` (no autograd). Shape: (K, F) any strides -> (K, K) fp32."""
    if not HAS_TRITON:
        raise RuntimeError("class_similarity_fwd needs Triton")
    k, f = weight.shape
    out = torch.empty((k, k), dtype=torch.float32, device=weight.device)
    block_m, block_n, block_f, warps = (16, 16, 32, 1) if interpreting() else SIMILARITY_CONFIG
    _class_similarity_fwd_kernel[(triton.cdiv(k, block_m),)](
        weight, out, weight.stride(0), weight.stride(1), k, f,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_F=block_f, num_warps=warps)
    record_launch("class_similarity_fwd")
    return out


def aot_specializations() -> list:
    """The class-similarity kernel for weights in fp32 / fp16 / bf16 (``dfkd_fast.ops`` keeps fp64 in torch) at
    :data:`SIMILARITY_CONFIG` (see ``kernels/aot.py``). Not on the per-step path (once per run)."""
    from .aot import Specialization, signature

    bm, bn, bf, warps = SIMILARITY_CONFIG
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        sig, c = signature(_class_similarity_fwd_kernel, {"w_ptr": f"*{dt}", "out_ptr": "*fp32"},
                           {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_F": bf})
        specs.append(Specialization("_class_similarity_fwd_kernel", f"w={dt} BLOCK_M={bm} BLOCK_N={bn} "
                                    f"BLOCK_F={bf} w{warps}", _class_similarity_fwd_kernel, sig, c, warps, hot=False))
    return specs
