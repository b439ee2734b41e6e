"""Public BN-statistic ops (SPEC §3.1): ``channel_stats``, ``bn_stats``, ``bn_stat_loss`` and
``bn_stat_loss_from_stats`` (dispatch: triton | cpp | torch).

Forward: one read of each activation gives the channel mean, biased variance and instance means; the loss
terms of all layers are computed by one kernel over the concatenated stats. Backward: one read of each
activation, ``dL/dx = g_mu/M + 2 g_var (x - mu)/M + g_inst/S``. Running statistics, moving averages
(``momentum_stats``) and ``weights`` are constants (no gradient flows into them).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import bn_stats as _k
from dfkd_fast.kernels.bn_stats import KINDS, bn_stat_loss_ref, channel_stats_ref, stat_loss_terms_ref

__all__ = ["bn_stats", "bn_stat_loss", "channel_stats", "bn_stat_loss_from_stats"]

_OP = "bn_stat_loss"
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pick_stats_backend(x: torch.Tensor, backend: str, op: str) -> str:
    b = _backend.resolve(op, backend, x.device, triton=True, cpp="bn_stats_fwd")
    if b != "torch" and (x.dtype not in _FAST_DTYPES or x.dim() > 4):
        if backend == "auto":
            return "torch"
        raise RuntimeError(f"{op}: backend={b!r} supports float32/float16/bfloat16 inputs with 2-4 dims, got "
                           f"{x.dtype} with shape {tuple(x.shape)}; use backend='torch'")
    return b


def _pick_loss_backend(device: torch.device, backend: str) -> str:
    return _backend.resolve(_OP, backend, device, triton=True, cpp="bn_stat_loss_terms")


def _stats_fwd(x: torch.Tensor, b: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if b == "triton":
        return _k.bn_stats_fwd(x)
    mean, var, inst = _backend.extension().bn_stats_fwd(x)
    return mean, var, inst


def _stats_bwd(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor | None, g_var: torch.Tensor | None,
               g_inst: torch.Tensor | None, b: str) -> torch.Tensor:
    if b == "triton":
        return _k.bn_stats_bwd(x, mean, g_mean, g_var, g_inst)
    return _backend.extension().bn_stats_bwd(x, mean, g_mean, g_var, g_inst)


def _loss_terms(b: str, mean: torch.Tensor, var: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor,
                offsets: torch.Tensor, weights: torch.Tensor, kind: str, mb: torch.Tensor | None,
                vb: torch.Tensor | None, beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if b == "triton":
        return _k.stat_loss_fwd(mean, var, rm, rv, offsets, weights, kind, mb, vb, beta)
    if b == "cpp":
        losses, gm, gv = _backend.extension().bn_stat_loss_terms(mean, var, rm, rv, offsets, weights,
                                                                 _k.KIND_IDS[kind], mb, vb, beta, _k.KL_EPS)
        return losses, gm, gv
    return stat_loss_terms_ref(mean, var, rm, rv, offsets, weights, kind, mb, vb, beta)


class ChannelStatsFunction(torch.autograd.Function):
    """(mean[C], var[C], inst_mean[N, C]) of x with a one-read fused backward (triton or cpp)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, backend: str):  # noqa: D102
        mean, var, inst = _stats_fwd(x, backend)
        ctx.save_for_backward(x, mean)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return mean, var, inst

    @staticmethod
    def backward(ctx, g_mean, g_var, g_inst):  # noqa: D102
        x, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_mean is None and g_var is None and g_inst is None):
            return None, None
        return _stats_bwd(x, mean, g_mean, g_var, g_inst, ctx.backend), None


class StatLossFunction(torch.autograd.Function):
    """Weighted per-layer BN-prior terms over concatenated stats; grads w.r.t. mean and var only."""

    @staticmethod
    def forward(ctx, mean, var, rm, rv, offsets, weights, kind, mb, vb, beta, backend):  # noqa: D102
        losses, gm, gv = _loss_terms(backend, mean, var, rm, rv, offsets, weights, kind, mb, vb, beta)
        counts = (offsets[1:] - offsets[:-1]).to(torch.long)
        ctx.save_for_backward(gm, gv, counts)
        return losses

    @staticmethod
    def backward(ctx, g_losses):  # noqa: D102
        gm, gv, counts = ctx.saved_tensors
        scale = torch.repeat_interleave(g_losses.float(), counts)
        return gm * scale, gv * scale, None, None, None, None, None, None, None, None, None


class BNStatLossFunction(torch.autograd.Function):
    """Total BN-prior loss over a list of activations: per-layer stats, one loss kernel, fused backward."""

    @staticmethod
    def forward(ctx, backend, loss_backend, kind, rm, rv, offsets, weights, mb, vb, beta, *feats):  # noqa: D102
        stats = [_stats_fwd(x, backend) for x in feats]
        means = [s[0] for s in stats]
        mean = torch.cat(means)
        var = torch.cat([s[1] for s in stats])
        losses, gm, gv = _loss_terms(loss_backend, mean, var, rm, rv, offsets, weights, kind, mb, vb, beta)
        ctx.save_for_backward(gm, gv, *feats, *means)
        ctx.backend = backend
        ctx.n_layers = len(feats)
        ctx.sizes = [x.shape[1] for x in feats]
        return losses.sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        saved = ctx.saved_tensors
        n = ctx.n_layers
        gm, gv = saved[0] * grad, saved[1] * grad
        feats, means = saved[2:2 + n], saved[2 + n:]
        gms, gvs = gm.split(ctx.sizes), gv.split(ctx.sizes)
        dxs = tuple(_stats_bwd(x, mu, a, b, None, ctx.backend) if need else None
                    for x, mu, a, b, need in zip(feats, means, gms, gvs, ctx.needs_input_grad[10:], strict=True))
        return (None,) * 10 + dxs


def _check_x(x: torch.Tensor, name: str, op: str) -> None:
    """Shape/dtype checks. NaN/Inf are detected on the (small) statistics after the pass, not by an extra
    read of the activation: a NaN or Inf anywhere in x makes its channel's mean or variance non-finite."""
    _checks.check_float(x, name, op)
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"{op}: '{name}' must be a non-empty (N, C[, *]) tensor, got shape {tuple(x.shape)}")


def _check_finite_stats(stats: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], names: Sequence[str],
                        op: str) -> None:
    """Raise ValueError naming the first activation whose statistics are not finite (one host sync)."""
    if not _checks.checks_enabled():
        return
    if bool(torch.isfinite(torch.cat([t.detach().reshape(-1).float() for t in stats])).all()):
        return
    for x, name in zip(xs, names, strict=True):
        _checks.check_finite(x, name, op)
    raise ValueError(f"{op}: the batch statistics overflowed (non-finite) although the inputs are finite; "
                     "the activations are too large for float32 accumulation -- rescale the input")


def channel_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel mean, biased variance and instance (spatial) means from ONE read of x, differentiable.

    .. math:: \\mu_c = \\frac{1}{M}\\sum x,\\ \\sigma^2_c = \\frac{1}{M}\\sum (x - \\mu_c)^2,\\
              \\bar x_{nc} = \\frac{1}{S}\\sum_{s} x_{ncs},\\ M = N S

    Shape: x (N, C) | (N, C, L) | (N, C, H, W), any strides -> mean (C,), var (C,), inst_mean (N, C), fp32
    (float64 for float64 x). For 2-D x the instance mean is x itself.
    """
    _check_x(x, "x", "channel_stats")
    b = _pick_stats_backend(x, backend, "channel_stats")
    if b == "torch":
        mean, var, inst = channel_stats_ref(x)
    else:
        mean, var, inst = ChannelStatsFunction.apply(x, b)
    _check_finite_stats([mean, var], [x], ["x"], "channel_stats")
    return mean, var, inst


def bn_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32), differentiable.

    .. math:: \\mu_c = \\frac{1}{M}\\sum x,\\ \\sigma^2_c = \\frac{1}{M}\\sum (x - \\mu_c)^2

    Shape: (N, C, *) -> (C,), (C,).
    """
    mean, var, _ = channel_stats(x, backend)
    return mean, var


def _pack(means_c: Sequence[int], running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
          weights, momentum_stats, momentum: float, kind: str, device: torch.device):
    """Validate and concatenate the per-layer constants of the loss (fp32, detached)."""
    n = len(means_c)
    if kind not in KINDS:
        raise ValueError(f"{_OP}: kind must be one of {KINDS}, got {kind!r}")
    if len(running_means) != n or len(running_vars) != n:
        raise ValueError(f"{_OP}: got {n} layers but {len(running_means)} running_means and {len(running_vars)} "
                         "running_vars; pass one per layer")
    for i, (c, rm, rv) in enumerate(zip(means_c, running_means, running_vars, strict=True)):
        for t, name in ((rm, "running_means"), (rv, "running_vars")):
            _checks.check_float(t, f"{name}[{i}]", _OP)
            if t.numel() != c:
                raise ValueError(f"{_OP}: layer {i} has {c} channels but {name}[{i}] has {t.numel()} elements; "
                                 "pass the running statistics of the BatchNorm layer that receives this input")
            _checks.check_finite(t, f"{name}[{i}]", _OP)
    if weights is None:
        w = torch.ones(n, device=device, dtype=torch.float32)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).detach().to(device).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"{_OP}: weights must have one entry per layer ({n}), got {w.numel()}")
    rm = torch.cat([t.detach().reshape(-1).float() for t in running_means]).to(device)
    rv = torch.cat([t.detach().reshape(-1).float() for t in running_vars]).to(device)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(list(means_c), dtype=torch.int64), 0)
    offsets = offsets.to(device)
    mb = vb = beta = None
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum}")
    if momentum_stats is not None and float(momentum) != 0.0:
        if len(momentum_stats) != n:
            raise ValueError(f"{_OP}: momentum_stats must have one entry (or None) per layer ({n}), "
                             f"got {len(momentum_stats)}")
        mbs, vbs, bts = [], [], []
        for i, (c, st) in enumerate(zip(means_c, momentum_stats, strict=True)):
            if st is None:
                z = torch.zeros(c, device=device)
                mbs.append(z)
                vbs.append(z)
                bts.append(z)
                continue
            m_bar, v_bar = st
            if m_bar.numel() != c or v_bar.numel() != c:
                raise ValueError(f"{_OP}: momentum_stats[{i}] must hold ({c},) mean and var for layer {i}, got "
                                 f"{tuple(m_bar.shape)} and {tuple(v_bar.shape)}")
            mbs.append(m_bar.detach().reshape(-1).float().to(device))
            vbs.append(v_bar.detach().reshape(-1).float().to(device))
            bts.append(torch.full((c,), float(momentum), device=device))
        mb, vb, beta = torch.cat(mbs), torch.cat(vbs), torch.cat(bts)
    return rm, rv, offsets, w, mb, vb, beta


def bn_stat_loss_from_stats(means: Sequence[torch.Tensor], vars: Sequence[torch.Tensor],
                            running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                            weights: Sequence[float] | torch.Tensor | None = None, kind: str = "l2",
                            momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                            momentum: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Weighted per-layer BN-prior terms w_l L_l from already computed batch stats, in one kernel.

    Used by :class:`dfkd_fast.hooks.TeacherProbe` (stats come from :func:`channel_stats`). Gradients flow into
    ``means`` and ``vars`` only.

    Shape: means[l], vars[l], running_means[l], running_vars[l] (C_l,) -> (L,) fp32; sum it for the total.
    """
    if len(means) == 0:
        raise ValueError(f"{_OP}: got no layers; pass at least one (mean, var) pair")
    if len(vars) != len(means):
        raise ValueError(f"{_OP}: got {len(means)} means but {len(vars)} vars")
    device = means[0].device
    rm, rv, offsets, w, mb, vb, beta = _pack([m.numel() for m in means], running_means, running_vars, weights,
                                             momentum_stats, momentum, kind, device)
    mean = torch.cat([m.reshape(-1).float() for m in means])
    var = torch.cat([v.reshape(-1).float() for v in vars])
    b = _pick_loss_backend(device, backend)
    return StatLossFunction.apply(mean, var, rm, rv, offsets, w, kind, mb, vb, beta, b)


def bn_stat_loss(feats: Sequence[torch.Tensor] | torch.Tensor, running_means: Sequence[torch.Tensor] | torch.Tensor,
                 running_vars: Sequence[torch.Tensor] | torch.Tensor,
                 weights: Sequence[float] | torch.Tensor | None = None, kind: str = "l2",
                 momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                 momentum: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Total BN-prior loss L = sum_l w_l L_l over layers (DeepInversion / CMI / DFQ / FastDFKD), fp32 scalar.

    .. math::
        l2: L_l = \\|\\sigma^2 - v\\|_2 + \\|\\mu - m\\|_2;\\quad
        kl: L_l = \\sum_c KL(N(\\mu_c, \\sigma^2_c) \\| N(m_c, v_c));\\quad
        mse: L_l = \\mathrm{mean}_c (\\mu - m)^2 + \\mathrm{mean}_c (\\sigma^2 - v)^2

    With ``momentum_stats[l] = (mean_bar, var_bar)`` and ``momentum`` = beta the batch stats are blended
    first, mu <- (1 - beta) mu + beta mean_bar (FastDFKD ``bn_mmt``). Gradient per layer:
    dL/dx = g_mu/M + 2 g_var (x - mu)/M.

    Shape: feats[l] (N, C_l[, *]) (any dtype among fp32/fp16/bf16, any strides); running_means[l],
    running_vars[l] (C_l,); weights (L,) -> () fp32.
    """
    if isinstance(feats, torch.Tensor):
        feats, running_means, running_vars = [feats], [running_means], [running_vars]
        if momentum_stats is not None and len(momentum_stats) == 2 and isinstance(momentum_stats[0], torch.Tensor):
            momentum_stats = [momentum_stats]
    feats = list(feats)
    if len(feats) == 0:
        raise ValueError(f"{_OP}: feats is empty; pass one activation per BatchNorm layer")
    for i, x in enumerate(feats):
        _check_x(x, f"feats[{i}]", _OP)
    _checks.check_same_device(feats, [f"feats[{i}]" for i in range(len(feats))], _OP)
    device = feats[0].device
    rm, rv, offsets, w, mb, vb, beta = _pack([x.shape[1] for x in feats], running_means, running_vars, weights,
                                             momentum_stats, momentum, kind, device)
    bs = {_pick_stats_backend(x, backend, _OP) for x in feats}
    if "torch" in bs or len(bs) != 1:
        loss = bn_stat_loss_ref(feats, running_means, running_vars, w, kind, momentum_stats, momentum)
    else:
        lb = _pick_loss_backend(device, backend)
        loss = BNStatLossFunction.apply(bs.pop(), lb, kind, rm, rv, offsets, w, mb, vb, beta, *feats)
    _check_finite_stats([loss], feats, [f"feats[{i}]" for i in range(len(feats))], _OP)
    return loss
