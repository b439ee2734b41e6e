"""BatchNorm-statistic matching (SPEC §3.1): per-channel mean / biased variance and the prior loss.

What is computed: for x of shape (N, C), (N, C, L) or (N, C, H, W) the per-(n, c) spatial mean (CMI's
instance feature) and the per-(n, c) sum of squared deviations M2 in ONE read of x; the channel mean and
biased variance follow from those (N, C) partials by Chan's parallel-variance combination, so large means
(x = 1e3 + noise) do not cancel. The backward writes dL/dx = g_mu/M + 2 g_var (x - mu)/M + g_inst/S in
one more read of x, in x's dtype and memory format.

Layout: any strides (contiguous, channels_last, slices): every tensor is addressed as (N, C, H, W) with
explicit strides, never permuted or copied. A 2-D input (N, C) is viewed as (1, C, 1, N).
Accumulation: fp32 (fp16/bf16 are converted right after the load). Each program reduces a
[BLOCK_C, BLOCK_S] tile at a time with a per-tile two-pass mean/M2 merged by Chan's formula.
Where it stops being fast: tiny spatial sizes with few samples (few programs); very large H*W with few
(n, c) pairs is handled by splitting the spatial axis over a third grid dimension.

The loss over all layers runs in one kernel over the concatenated per-channel stats (one program per
layer), producing the weighted per-layer terms and the gradients w.r.t. the (concatenated) stats.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import HAS_TRITON, interpreting, record_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

KL_EPS = 1e-5  # added to both variances in kind="kl" (log and division)
KINDS = ("l2", "kl", "mse")
KIND_IDS = {"l2": 0, "kl": 1, "mse": 2}


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


# ----------------------------------------------------------------------------------------------------
# References (pure PyTorch, fp32 accumulation): the spec, test oracle, eager baseline and CPU fallback.
# ----------------------------------------------------------------------------------------------------
def bn_stats_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dim but 1, accumulated in fp32.

    Shape: x (N, C) | (N, C, L) | (N, C, H, W) -> mean (C,), var (C,) in float32 (float64 for float64 x).
    """
    xf = x.float() if x.dtype != torch.float64 else x
    dims = _reduce_dims(xf)
    mean = xf.mean(dim=dims)
    shape = [1, -1] + [1] * (xf.dim() - 2)
    var = ((xf - mean.view(shape)) ** 2).mean(dim=dims)
    return mean, var


def instance_mean_ref(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean per (sample, channel): CMI's instance feature. Shape: (N, C, *) -> (N, C), fp32."""
    xf = x.float() if x.dtype != torch.float64 else x
    return xf.flatten(2).mean(-1) if xf.dim() > 2 else xf


def channel_stats_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel mean, biased variance and instance means from one tensor (reference).

    Shape: x (N, C, *) -> mean (C,), var (C,), inst_mean (N, C); fp32 (float64 for float64 x).
    """
    mean, var = bn_stats_ref(x)
    return mean, var, instance_mean_ref(x)


def layer_loss_ref(mean: torch.Tensor, var: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor,
                   kind: str) -> torch.Tensor:
    """One layer's term L_l from batch stats (mean, var) and running stats (rmean, rvar)."""
    rmean = rmean.to(mean.dtype)
    rvar = rvar.to(var.dtype)
    if kind == "l2":
        return torch.linalg.vector_norm(var - rvar, 2) + torch.linalg.vector_norm(mean - rmean, 2)
    if kind == "mse":
        return ((mean - rmean) ** 2).mean() + ((var - rvar) ** 2).mean()
    if kind == "kl":  # sum_c KL(N(mean, var) || N(rmean, rvar))
        v1, v2 = var + KL_EPS, rvar + KL_EPS
        return (0.5 * torch.log(v2 / v1) + (v1 + (mean - rmean) ** 2) / (2 * v2) - 0.5).sum()
    raise ValueError(f"bn_stat_loss: kind must be 'l2', 'kl' or 'mse', got {kind!r}")


def bn_stat_layer_losses_ref(feats: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                             running_vars: Sequence[torch.Tensor],
                             weights: Sequence[float] | torch.Tensor | None = None, kind: str = "l2",
                             momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                             momentum: float = 0.0) -> torch.Tensor:
    """Weighted per-layer BN-prior terms w_l L_l (SPEC §3.1), stacked: (L,) fp32 (float64 for float64 feats).

    With ``momentum_stats[l] = (mean_bar, var_bar)`` the batch stats are blended first:
    mean <- (1 - momentum) mean + momentum mean_bar (same for var) -- FastDFKD.
    """
    terms = []
    for i, (x, rm, rv) in enumerate(zip(feats, running_means, running_vars, strict=True)):
        mean, var = bn_stats_ref(x)
        if momentum_stats is not None and momentum_stats[i] is not None:
            mb, vb = momentum_stats[i]
            mean = (1 - momentum) * mean + momentum * mb.to(mean.dtype)
            var = (1 - momentum) * var + momentum * vb.to(var.dtype)
        term = layer_loss_ref(mean, var, rm, rv, kind)
        if weights is not None:
            term = term * weights[i]
        terms.append(term)
    if not terms:
        raise ValueError("bn_stat_loss: got no layers")
    dtype = terms[0].dtype
    for t in terms[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.to(dtype) for t in terms])


def bn_stat_loss_ref(feats: Sequence[torch.Tensor], running_means: Sequence[torch.Tensor],
                     running_vars: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None = None,
                     kind: str = "l2", momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                     momentum: float = 0.0) -> torch.Tensor:
    """Total BN-prior loss L = sum_l w_l L_l over layers (SPEC §3.1), fp32 scalar.

    With ``momentum_stats[l] = (mean_bar, var_bar)`` the batch stats are blended first:
    mean <- (1 - momentum) mean + momentum mean_bar (same for var) -- FastDFKD.
    """
    return bn_stat_layer_losses_ref(feats, running_means, running_vars, weights, kind, momentum_stats,
                                    momentum).sum()


def stat_loss_terms_ref(mean: torch.Tensor, var: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor,
                        offsets: torch.Tensor, weights: torch.Tensor, kind: str,
                        mean_bar: torch.Tensor | None = None, var_bar: torch.Tensor | None = None,
                        beta: torch.Tensor | None = None, segment: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-layer loss terms and their gradients over concatenated stats (vectorized torch).

    Layer l owns channels ``offsets[l]:offsets[l+1]``. With momentum, the stats are first blended per
    channel, m' = (1 - beta) m + beta m_bar (beta = 0 on layers without moving averages), and the
    gradients carry the factor (1 - beta).

    .. math::
        l2: w_l (||v' - v_run|| + ||m' - m_run||), mse: w_l (mean_c (m'-m_run)^2 + mean_c (v'-v_run)^2),
        kl: w_l sum_c [0.5 log(v2/v1) + (v1 + (m'-m_run)^2)/(2 v2) - 0.5], v1 = v' + eps, v2 = v_run + eps.

    Shape: mean, var, rmean, rvar, mean_bar, var_bar, beta (sum_l C_l,); offsets (L+1,) int;
    weights (L,); segment (sum C,) int64 = the layer of each channel, or None (derived from offsets without a
    data-dependent shape) -> losses (L,), g_mean (sum C,), g_var (sum C,), all fp32.
    """
    n_layers = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).to(device=mean.device, dtype=torch.long)
    if segment is None:  # channel c belongs to the layer whose range [offsets[l], offsets[l+1]) holds c
        chan = torch.arange(mean.numel(), device=mean.device, dtype=torch.long)
        seg = torch.searchsorted(offsets[1:].to(device=mean.device, dtype=torch.long), chan, right=True)
    else:
        seg = segment.to(device=mean.device, dtype=torch.long)
    m, v = mean.float(), var.float()
    rm, rv = rmean.float(), rvar.float()
    factor = None
    if beta is not None:
        b = beta.float()
        m = m + b * (mean_bar.float() - m)
        v = v + b * (var_bar.float() - v)
        factor = 1.0 - b
    w = weights.float()
    dm, dv = m - rm, v - rv
    if kind == "l2":
        sm = torch.zeros(n_layers, device=m.device).index_add_(0, seg, dm * dm).sqrt()
        sv = torch.zeros(n_layers, device=m.device).index_add_(0, seg, dv * dv).sqrt()
        losses = w * (sm + sv)
        im = torch.where(sm > 0, w / sm.clamp_min(1e-30), torch.zeros_like(sm))
        iv = torch.where(sv > 0, w / sv.clamp_min(1e-30), torch.zeros_like(sv))
        g_m, g_v = dm * im[seg], dv * iv[seg]
    elif kind == "mse":
        cnt = counts.float()
        s = torch.zeros(n_layers, device=m.device).index_add_(0, seg, dm * dm + dv * dv)
        losses = w * s / cnt
        scale = (2.0 * w / cnt)[seg]
        g_m, g_v = dm * scale, dv * scale
    elif kind == "kl":
        v1, v2 = v + KL_EPS, rv + KL_EPS
        term = 0.5 * torch.log(v2 / v1) + (v1 + dm * dm) / (2 * v2) - 0.5
        losses = w * torch.zeros(n_layers, device=m.device).index_add_(0, seg, term)
        ws = w[seg]
        g_m = ws * dm / v2
        g_v = ws * (0.5 / v2 - 0.5 / v1)
    else:
        raise ValueError(f"bn_stat_loss: kind must be 'l2', 'kl' or 'mse', got {kind!r}")
    if factor is not None:
        g_m, g_v = g_m * factor, g_v * factor
    return losses, g_m, g_v


# ----------------------------------------------------------------------------------------------------
# Layout helpers shared by the Triton and the C++ paths.
# ----------------------------------------------------------------------------------------------------
def nchw_view(x: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Sizes and strides of x seen as (N, C, H, W) without copying; 2-D (N, C) becomes (1, C, 1, N).

    Shape: (N, C) | (N, C, L) | (N, C, H, W) -> ((N', C, H', W'), strides).
    """
    if x.dim() == 2:
        n, c = x.shape
        return (1, c, 1, n), (0, x.stride(1), 0, x.stride(0))
    if x.dim() == 3:
        n, c, length = x.shape
        return (n, c, 1, length), (x.stride(0), x.stride(1), 0, x.stride(2))
    if x.dim() == 4:
        return tuple(x.shape), tuple(x.stride())  # type: ignore[return-value]
    raise ValueError(f"bn_stats: x must have 2, 3 or 4 dims (N, C[, L | H, W]), got shape {tuple(x.shape)}")


def combine_partials(mean_p: torch.Tensor, m2_p: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Chan's combination of (mean, M2) partials over dim 0.

    Shape: mean_p, m2_p (K, *), counts (K,) -> mean (*), M2 (*). Counts may be 0 for empty partials.
    """
    shape = [-1] + [1] * (mean_p.dim() - 1)
    cnt = counts.to(mean_p.dtype).view(shape)
    total = counts.sum().to(mean_p.dtype)
    mean = (mean_p * cnt).sum(0) / total
    m2 = m2_p.sum(0) + (cnt * (mean_p - mean) ** 2).sum(0)
    return mean, m2


if HAS_TRITON:

    @triton.jit
    def _bn_stats_fwd_kernel(X, MEAN_P, M2_P, N, C, H, W, s_n, s_c, s_h, s_w, CHUNK,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Per-(split, n, c) mean and M2 over the split's spatial chunk (Chan-merged tiles)."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        hw = H * W
        start = pid_s * CHUNK
        end = tl.minimum(start + CHUNK, hw)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        base = X + pid_n * s_n + cs.to(tl.int64)[:, None] * s_c
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = 0.0
        for s0 in range(start, end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            smask = ss < end
            hh = (ss // W).to(tl.int64)
            ww = (ss % W).to(tl.int64)
            mask = cmask[:, None] & smask[None, :]
            x = tl.load(base + hh[None, :] * s_h + ww[None, :] * s_w, mask=mask, other=0.0).to(tl.float32)
            nb = tl.minimum(end - s0, BLOCK_S).to(tl.float32)
            t_mean = tl.sum(x, axis=1) / nb
            d = tl.where(mask, x - t_mean[:, None], 0.0)
            t_m2 = tl.sum(d * d, axis=1)
            new_count = count + nb
            delta = t_mean - mean
            mean = mean + delta * (nb / new_count)
            m2 = m2 + t_m2 + delta * delta * (count * nb / new_count)
            count = new_count
        out = (pid_s * N + pid_n) * C + cs
        tl.store(MEAN_P + out, mean, mask=cmask)
        tl.store(M2_P + out, m2, mask=cmask)

    @triton.jit
    def _bn_stats_bwd_kernel(X, DX, MEAN, GA, GB, GI, C, H, W, s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                             g_n, g_c, g_h, g_w, CHUNK, HAS_GI: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_S: tl.constexpr):
        """dx = GA[c] + GB[c] (x - MEAN[c]) + GI[n, c, h, w-broadcast] (GI pre-scaled; strides may be 0)."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        hw = H * W
        start = pid_s * CHUNK
        end = tl.minimum(start + CHUNK, hw)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        c64 = cs.to(tl.int64)
        mu = tl.load(MEAN + cs, mask=cmask, other=0.0)
        ga = tl.load(GA + cs, mask=cmask, other=0.0)
        gb = tl.load(GB + cs, mask=cmask, other=0.0)
        xbase = X + pid_n * s_n + c64[:, None] * s_c
        obase = DX + pid_n * o_n + c64[:, None] * o_c
        gbase = GI + pid_n * g_n + c64[:, None] * g_c
        for s0 in range(start, end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            smask = ss < end
            hh = (ss // W).to(tl.int64)
            ww = (ss % W).to(tl.int64)
            mask = cmask[:, None] & smask[None, :]
            x = tl.load(xbase + hh[None, :] * s_h + ww[None, :] * s_w, mask=mask, other=0.0).to(tl.float32)
            dx = ga[:, None] + gb[:, None] * (x - mu[:, None])
            if HAS_GI:
                gi = tl.load(gbase + hh[None, :] * g_h + ww[None, :] * g_w, mask=mask, other=0.0)
                dx += gi
            tl.store(obase + hh[None, :] * o_h + ww[None, :] * o_w, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _stat_loss_kernel(MEAN, VAR, RM, RV, MB, VB, BETA, OFFS, WTS, LOSS, GM, GV, KL_EPS_C,
                          KIND: tl.constexpr, HAS_MMT: tl.constexpr, BLOCK: tl.constexpr):
        """One program per layer: weighted loss term and d(term)/d(mean), d(term)/d(var) of its channels."""
        layer = tl.program_id(0)
        lo = tl.load(OFFS + layer)
        hi = tl.load(OFFS + layer + 1)
        w = tl.load(WTS + layer).to(tl.float32)
        cnt = (hi - lo).to(tl.float32)
        acc_m = tl.zeros([BLOCK], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(lo, hi, BLOCK):
            cs = c0 + tl.arange(0, BLOCK)
            mask = cs < hi
            m = tl.load(MEAN + cs, mask=mask, other=0.0)
            v = tl.load(VAR + cs, mask=mask, other=0.0)
            if HAS_MMT:
                b = tl.load(BETA + cs, mask=mask, other=0.0)
                m = m + b * (tl.load(MB + cs, mask=mask, other=0.0) - m)
                v = v + b * (tl.load(VB + cs, mask=mask, other=0.0) - v)
            dm = m - tl.load(RM + cs, mask=mask, other=0.0)
            rv = tl.load(RV + cs, mask=mask, other=0.0)
            dv = v - rv
            if KIND == 1:
                v1 = v + KL_EPS_C
                v2 = rv + KL_EPS_C
                term = 0.5 * tl.log(v2 / v1) + (v1 + dm * dm) / (2.0 * v2) - 0.5
                acc_m += tl.where(mask, term, 0.0)
            else:
                acc_m += dm * dm
                acc_v += dv * dv
        sm = tl.sum(acc_m, axis=0)
        sv = tl.sum(acc_v, axis=0)
        if KIND == 0:
            nm = tl.sqrt(sm)
            nv = tl.sqrt(sv)
            loss = w * (nm + nv)
            scale_m = tl.where(nm > 0, w / tl.maximum(nm, 1e-30), 0.0)
            scale_v = tl.where(nv > 0, w / tl.maximum(nv, 1e-30), 0.0)
        elif KIND == 2:
            loss = w * (sm + sv) / cnt
            scale_m = 2.0 * w / cnt
            scale_v = 2.0 * w / cnt
        else:
            loss = w * sm
            scale_m = w
            scale_v = w
        tl.store(LOSS + layer, loss)
        for c0 in range(lo, hi, BLOCK):
            cs = c0 + tl.arange(0, BLOCK)
            mask = cs < hi
            m = tl.load(MEAN + cs, mask=mask, other=0.0)
            v = tl.load(VAR + cs, mask=mask, other=0.0)
            fac = tl.full([BLOCK], 1.0, tl.float32)
            if HAS_MMT:
                b = tl.load(BETA + cs, mask=mask, other=0.0)
                m = m + b * (tl.load(MB + cs, mask=mask, other=0.0) - m)
                v = v + b * (tl.load(VB + cs, mask=mask, other=0.0) - v)
                fac = 1.0 - b
            dm = m - tl.load(RM + cs, mask=mask, other=0.0)
            rv = tl.load(RV + cs, mask=mask, other=1.0)
            if KIND == 1:
                v1 = v + KL_EPS_C
                v2 = rv + KL_EPS_C
                gm = scale_m * dm / v2
                gv = scale_v * (0.5 / v2 - 0.5 / v1)
            else:
                gm = scale_m * dm
                gv = scale_v * (v - rv)
            tl.store(GM + cs, gm * fac, mask=mask)
            tl.store(GV + cs, gv * fac, mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


#: Tiles (BLOCK_C, BLOCK_S) the launchers pick on a GPU: every tile holds TILE_ELEMS elements, 8 per thread at
#: NUM_WARPS = 8 (measured with kernels/aot.py: <= 128 registers for the backward with the instance gradient,
#: 255 and spills at 4 warps), and the set stays small (each entry is a compiled kernel variant; see
#: ``aot_specializations``).
#: Spatial-inner (NCHW): BLOCK_S is H*W rounded up to a power of 4, at most 512. Channels-inner
#: (channels_last, and 2-D inputs viewed as (1, C, 1, N)): BLOCK_C is 16 or 64.
TILE_ELEMS = 2048
SPATIAL_TILES = tuple((TILE_ELEMS // s, s) for s in (1, 4, 16, 64, 256, 512))
CHANNEL_TILES = tuple((c, TILE_ELEMS // c) for c in (16, 64))
STAT_LOSS_BLOCK = 512
NUM_WARPS = 8
STAT_LOSS_WARPS = 4


def _pow4_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 4
    return p


def _tiles(c: int, hw: int, channels_inner: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) from :data:`SPATIAL_TILES` / :data:`CHANNEL_TILES` (small tiles when interpreting)."""
    if interpreting():  # about 1 ms per loop iteration on the CPU: keep tiles tight around tiny test shapes
        if channels_inner:
            block_c = min(_next_pow2(c), 64)
            return block_c, max(1, min(_next_pow2(hw), 1024 // block_c))
        block_s = min(_next_pow2(hw), 512)
        return max(1, min(_next_pow2(c), 1024 // block_s)), block_s
    if channels_inner:
        block_c = 16 if c <= 16 else 64
        return block_c, TILE_ELEMS // block_c
    block_s = min(_pow4_at_least(hw), 512)
    return TILE_ELEMS // block_s, block_s


def _grid(n: int, c: int, hw: int, block_c: int, block_s: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) of the spatial axis so that the grid fills the device."""
    base = n * triton.cdiv(c, block_c)
    if device.type == "cuda" and not interpreting():
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1
    tiles = triton.cdiv(hw, block_s)
    splits = max(1, min(tiles, triton.cdiv(target, base)))
    chunk = triton.cdiv(tiles, splits) * block_s
    splits = triton.cdiv(hw, chunk)
    return splits, chunk


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("bn_stats: Triton is not importable; use backend='cpp' or 'torch'")


def bn_stats_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton host launcher: channel mean, biased variance and instance means in one read of x.

    Shape: x (N, C) | (N, C, L) | (N, C, H, W), any strides -> mean (C,), var (C,), inst_mean (N, C), fp32.
    For 2-D x the instance mean is x itself (converted to fp32).
    """
    _require_triton()
    (n, c, h, w), (s_n, s_c, s_h, s_w) = nchw_view(x)
    hw = h * w
    if n * c * hw == 0:
        raise ValueError(f"bn_stats: x must be non-empty, got shape {tuple(x.shape)}")
    channels_inner = s_c == 1 and s_w != 1
    block_c, block_s = _tiles(c, hw, channels_inner)
    splits, chunk = _grid(n, c, hw, block_c, block_s, x.device)
    mean_p = torch.empty((splits, n, c), device=x.device, dtype=torch.float32)
    m2_p = torch.empty_like(mean_p)
    grid = (n, triton.cdiv(c, block_c), splits)
    _bn_stats_fwd_kernel[grid](x, mean_p, m2_p, n, c, h, w, s_n, s_c, s_h, s_w, chunk,
                               BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS)
    record_launch("bn_stats_fwd")
    if splits > 1:
        counts = torch.clamp(hw - torch.arange(splits, device=x.device) * chunk, 0, chunk)
        inst, m2_nc = combine_partials(mean_p, m2_p, counts)
    else:
        inst, m2_nc = mean_p[0], m2_p[0]
    counts_n = torch.full((n,), hw, device=x.device, dtype=torch.float32)
    mean, m2 = combine_partials(inst, m2_nc, counts_n)
    var = m2 / float(n * hw)
    inst_out = x.float() if x.dim() == 2 else inst
    return mean, var, inst_out


def bn_stats_bwd(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor | None, g_var: torch.Tensor | None,
                 g_inst: torch.Tensor | None) -> torch.Tensor:
    """Triton host launcher: gradient of (mean, var, inst_mean) w.r.t. x in one read of x.

    .. math:: dx = g_\\mu / M + 2 g_{\\sigma^2} (x - \\mu) / M + g_{inst} / S,  M = N S, S = spatial size

    Shape: x (N, C, *), mean/g_mean/g_var (C,), g_inst (N, C) -> dx like x (dtype and memory format).
    """
    _require_triton()
    (n, c, h, w), (s_n, s_c, s_h, s_w) = nchw_view(x)
    hw = h * w
    m_total = float(x.numel() // c)
    zeros = None
    if g_mean is None or g_var is None:
        zeros = torch.zeros(c, device=x.device, dtype=torch.float32)
    ga = (g_mean.float() / m_total) if g_mean is not None else zeros
    gb = (g_var.float() * (2.0 / m_total)) if g_var is not None else zeros
    dx = torch.empty_like(x)
    _, (o_n, o_c, o_h, o_w) = nchw_view(dx)
    if g_inst is not None:
        if x.dim() == 2:  # inst_mean is x itself: the gradient passes through element-wise
            gi = g_inst.float()
            g_strides = (0, gi.stride(1), 0, gi.stride(0))
        else:
            gi = g_inst.float() / float(hw)
            g_strides = (gi.stride(0), gi.stride(1), 0, 0)
    else:
        gi = ga
        g_strides = (0, 0, 0, 0)
    channels_inner = s_c == 1 and s_w != 1
    block_c, block_s = _tiles(c, hw, channels_inner)
    splits, chunk = _grid(n, c, hw, block_c, block_s, x.device)
    grid = (n, triton.cdiv(c, block_c), splits)
    _bn_stats_bwd_kernel[grid](x, dx, mean.float().contiguous(), ga.contiguous(), gb.contiguous(), gi, c, h, w,
                               s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w, *g_strides, chunk,
                               HAS_GI=g_inst is not None, BLOCK_C=block_c, BLOCK_S=block_s,
                               num_warps=NUM_WARPS)
    record_launch("bn_stats_bwd")
    return dx


def stat_loss_fwd(mean: torch.Tensor, var: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor,
                  offsets: torch.Tensor, weights: torch.Tensor, kind: str, mean_bar: torch.Tensor | None = None,
                  var_bar: torch.Tensor | None = None,
                  beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton host launcher of :func:`stat_loss_terms_ref`: ONE launch for every layer's term and gradient.

    Shape: per-channel inputs (sum_l C_l,) fp32; offsets (L+1,) int32; weights (L,) ->
    losses (L,), g_mean (sum C,), g_var (sum C,).
    """
    _require_triton()
    if kind not in KIND_IDS:
        raise ValueError(f"bn_stat_loss: kind must be 'l2', 'kl' or 'mse', got {kind!r}")
    n_layers = offsets.numel() - 1
    losses = torch.empty(n_layers, device=mean.device, dtype=torch.float32)
    g_m = torch.empty_like(mean, dtype=torch.float32)
    g_v = torch.empty_like(g_m)
    has_mmt = beta is not None
    mb = mean_bar if has_mmt else mean
    vb = var_bar if has_mmt else var
    bt = beta if has_mmt else mean
    block = min(_next_pow2(int(mean.numel())), 1024) if interpreting() else STAT_LOSS_BLOCK
    _stat_loss_kernel[(n_layers,)](mean, var, rmean, rvar, mb, vb, bt, offsets.to(torch.int32), weights.float(),
                                   losses, g_m, g_v, KL_EPS, KIND=KIND_IDS[kind], HAS_MMT=has_mmt, BLOCK=block,
                                   num_warps=STAT_LOSS_WARPS)
    record_launch("stat_loss_fwd")
    return losses, g_m, g_v


def aot_specializations() -> list:
    """Every (kernel, dtype, tile, flag) variant the launchers above can pick on a GPU (see ``kernels/aot.py``).

    bn_stats fwd / bwd: x in fp32 / fp16 / bf16 (the dtypes ``dfkd_fast.ops`` sends here) x every tile of
    :data:`SPATIAL_TILES` and :data:`CHANNEL_TILES` (x HAS_GI for the backward); the loss kernel: every kind x
    with / without FastDFKD momentum (its inputs are fp32 statistics).
    """
    from .aot import Specialization, signature, triton_dtype

    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for block_c, block_s in SPATIAL_TILES + CHANNEL_TILES:
            tile = f"BLOCK_C={block_c} BLOCK_S={block_s}"
            sig, cx = signature(_bn_stats_fwd_kernel, {"X": f"*{dt}", "MEAN_P": "*fp32", "M2_P": "*fp32"},
                                {"BLOCK_C": block_c, "BLOCK_S": block_s})
            specs.append(Specialization("_bn_stats_fwd_kernel", f"x={dt} {tile}", _bn_stats_fwd_kernel, sig, cx,
                                        NUM_WARPS))
            for has_gi in (False, True):
                sig, cx = signature(_bn_stats_bwd_kernel,
                                    {"X": f"*{dt}", "DX": f"*{dt}", "MEAN": "*fp32", "GA": "*fp32", "GB": "*fp32",
                                     "GI": "*fp32"},
                                    {"HAS_GI": has_gi, "BLOCK_C": block_c, "BLOCK_S": block_s})
                specs.append(Specialization("_bn_stats_bwd_kernel", f"x={dt} {tile} HAS_GI={int(has_gi)}",
                                            _bn_stats_bwd_kernel, sig, cx, NUM_WARPS))
    fp32 = triton_dtype("float32")
    for kind in KINDS:
        for has_mmt in (False, True):
            ptrs = {name: f"*{fp32}" for name in ("MEAN", "VAR", "RM", "RV", "MB", "VB", "BETA", "WTS", "LOSS",
                                                  "GM", "GV")}
            ptrs.update(OFFS="*i32", KL_EPS_C="fp32")
            sig, cx = signature(_stat_loss_kernel, ptrs,
                                {"KIND": KIND_IDS[kind], "HAS_MMT": has_mmt, "BLOCK": STAT_LOSS_BLOCK})
            specs.append(Specialization("_stat_loss_kernel", f"kind={kind} HAS_MMT={int(has_mmt)} "
                                        f"BLOCK={STAT_LOSS_BLOCK}", _stat_loss_kernel, sig, cx, STAT_LOSS_WARPS))
    return specs
