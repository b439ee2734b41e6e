"""Public BN-statistic ops (SPEC §3.1): ``channel_stats``, ``bn_stats``, ``bn_stat_loss`` and
``bn_stat_loss_from_stats`` (dispatch: triton | cpp | torch).

Forward: one read of each activation gives the channel mean, biased variance and instance means; the loss
terms of all layers are computed by one kernel over the concatenated stats. Backward: one read of each
activation, ``dL/dx = g_mu/M + 2 g_var (x - mu)/M + g_inst/S``. Running statistics, moving averages
(``momentum_stats``) and ``weights`` are constants (no gradient flows into them).

Graph capture: the fused paths are ``torch.library.custom_op`` s (``dfkd_fast::bn_stats``,
``dfkd_fast::channel_stats``, ``dfkd_fast::bn_stats_bwd``, ``dfkd_fast::bn_stat_loss_terms``) with fake
implementations and ``register_autograd``; the backend string is an argument of the op. ``bn_stat_loss`` is
their composition (one stats op per layer + one loss op), so ``torch.compile(fullgraph=True)`` traces every
path; the torch reference is plain differentiable torch.

Host syncs: none per call inside :func:`dfkd_fast._checks.deferred` (the finite checks become device flags,
named by op, argument and layer). Per-layer constants (running stats, weights, offsets, the channel->layer
map the backward needs) can be packed ONCE with :func:`pack_stat_constants` and reused
(:func:`bn_stat_loss_packed`), which :class:`dfkd_fast.hooks.TeacherProbe` does.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import bn_stats as _k
from dfkd_fast.kernels.bn_stats import KINDS, bn_stat_layer_losses_ref, channel_stats_ref, stat_loss_terms_ref
from dfkd_fast.ops._registry import fused_op

__all__ = ["bn_stats", "bn_stat_loss", "channel_stats", "bn_stat_loss_from_stats", "StatConstants",
           "pack_stat_constants", "pack_momentum", "bn_stat_loss_packed"]

_OP = "bn_stat_loss"
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Custom ops (cpp / triton): fake implementations + autograd, so torch.compile traces them.
# ----------------------------------------------------------------------------------------------------
def _stats_fwd(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _k.bn_stats_fwd(x)
    mean, var, inst = _backend.extension().bn_stats_fwd(x)
    return mean, var, inst


def _bn_stats_impl(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var, _ = _stats_fwd(x, backend)
    return mean, var


def _channel_stats_impl(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C, L) or (N, C, H, W) only: for 2-D x the instance mean is x itself (an alias, not an op output)."""
    return _stats_fwd(x, backend)


def _bn_stats_bwd_impl(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor | None, g_var: torch.Tensor | None,
                       g_inst: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _k.bn_stats_bwd(x, mean, g_mean, g_var, g_inst)
    return _backend.extension().bn_stats_bwd(x, mean, g_mean, g_var, g_inst)


_bn_stats_op = torch.library.custom_op("dfkd_fast::bn_stats", mutates_args=())(_bn_stats_impl)
_channel_stats_op = torch.library.custom_op("dfkd_fast::channel_stats", mutates_args=())(_channel_stats_impl)
_bn_stats_bwd_op = torch.library.custom_op("dfkd_fast::bn_stats_bwd", mutates_args=())(_bn_stats_bwd_impl)


@_bn_stats_op.register_fake
def _(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@_channel_stats_op.register_fake
def _(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[0], x.shape[1]
    f32 = torch.float32
    return x.new_empty((c,), dtype=f32), x.new_empty((c,), dtype=f32), x.new_empty((n, c), dtype=f32)


@_bn_stats_bwd_op.register_fake
def _(x: torch.Tensor, mean: torch.Tensor, g_mean: torch.Tensor | None, g_var: torch.Tensor | None,
      g_inst: torch.Tensor | None, backend: str) -> torch.Tensor:
    return torch.empty_like(x)


def _stats_setup(ctx, inputs, output) -> None:
    x, backend = inputs
    ctx.save_for_backward(x, output[0])
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _stats_backward(ctx, g_mean, g_var, g_inst=None):
    if not ctx.needs_input_grad[0] or (g_mean is None and g_var is None and g_inst is None):
        return None, None
    x, mean = ctx.saved_tensors
    bwd = _bn_stats_bwd_impl if ctx.eager else _bn_stats_bwd_op
    return bwd(x, mean, g_mean, g_var, g_inst, ctx.backend), None


_bn_stats_call = fused_op(_bn_stats_op, _bn_stats_impl, _stats_setup, _stats_backward, "BNStatsFunction")
_channel_stats_call = fused_op(_channel_stats_op, _channel_stats_impl, _stats_setup, _stats_backward,
                               "ChannelStatsFunction")


def _stat_loss_impl(mean: torch.Tensor, var: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor,
                    offsets: torch.Tensor, segment: torch.Tensor, weights: torch.Tensor, kind: str,
                    mean_bar: torch.Tensor | None, var_bar: torch.Tensor | None, beta: torch.Tensor | None,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted per-layer terms (L,) and their gradients w.r.t. the concatenated mean and var (sum C,)."""
    if backend == "triton":
        return _k.stat_loss_fwd(mean, var, rmean, rvar, offsets, weights, kind, mean_bar, var_bar, beta)
    if backend == "cpp":
        losses, gm, gv = _backend.extension().bn_stat_loss_terms(mean, var, rmean, rvar, offsets, weights,
                                                                 _k.KIND_IDS[kind], mean_bar, var_bar, beta,
                                                                 _k.KL_EPS)
        return losses, gm, gv
    return stat_loss_terms_ref(mean, var, rmean, rvar, offsets, weights, kind, mean_bar, var_bar, beta,
                               segment=segment)


_stat_loss_op = torch.library.custom_op("dfkd_fast::bn_stat_loss_terms", mutates_args=())(_stat_loss_impl)


@_stat_loss_op.register_fake
def _(mean, var, rmean, rvar, offsets, segment, weights, kind, mean_bar, var_bar, beta, backend):
    n_layers = offsets.shape[0] - 1
    return (mean.new_empty((n_layers,), dtype=torch.float32), torch.empty_like(mean, dtype=torch.float32),
            torch.empty_like(mean, dtype=torch.float32))


def _stat_loss_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2], inputs[5])
    ctx.set_materialize_grads(False)


def _stat_loss_backward(ctx, g_losses, _g_gm=None, _g_gv=None):
    # gm / gv are auxiliary outputs (the gradients themselves): only the losses are differentiated.
    gm, gv, segment = ctx.saved_tensors
    if g_losses is None:
        return (None,) * 12
    scale = g_losses.float().index_select(0, segment)  # per channel: the grad of its layer's term
    return (gm * scale if ctx.needs_input_grad[0] else None, gv * scale if ctx.needs_input_grad[1] else None,
            *(None,) * 10)


_stat_loss_call = fused_op(_stat_loss_op, _stat_loss_impl, _stat_loss_setup, _stat_loss_backward,
                           "StatLossFunction")


# ----------------------------------------------------------------------------------------------------
# Checks and backend choice
# ----------------------------------------------------------------------------------------------------
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


def _check_x(x: torch.Tensor, name: str, op: str) -> None:
    """Shape/dtype checks. NaN/Inf are detected on the (small) statistics after the pass, not by an extra
    read of the activation: a NaN or Inf anywhere in x makes its channel's mean or variance non-finite."""
    _checks.check_float(x, name, op)
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"{op}: '{name}' must be a non-empty (N, C[, *]) tensor, got shape {tuple(x.shape)}")


def _stats_message(name: str, op: str) -> str:
    return (f"{op}: '{name}' contains NaN or Inf, or its batch statistics overflow float32; check the upstream "
            "computation (learning rate, input scaling) or disable checks with DFKD_FAST_CHECKS=0")


def _check_finite_stats(flags: torch.Tensor, xs: Sequence[torch.Tensor], names: Sequence[str], op: str) -> None:
    """Finite check of per-activation results (``flags``: one value per activation, e.g. its loss term).

    Inside :func:`dfkd_fast._checks.deferred`: device flags, one per activation, read when the block ends (no
    sync here). Outside: one host read; on failure the inputs are checked one by one to tell a NaN/Inf input
    from statistics that overflow float32.
    """
    if not _checks.checks_enabled():
        return
    ok = torch.isfinite(flags.detach()).reshape(-1)
    if _checks.in_deferred():
        _checks.expect_each(ok, [_stats_message(n, op) for n in names])
        return
    if bool(ok.all()):
        return
    for x, name in zip(xs, names, strict=True):
        _checks.check_finite(x, name, op)
    raise ValueError(f"{op}: the batch statistics overflowed (non-finite) although the inputs are finite; "
                     "the activations are too large for float32 accumulation -- rescale the input")


def _channel_stats_unchecked(x: torch.Tensor, backend: str, op: str = "channel_stats"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """channel_stats without the finite check (the caller checks what it uses, e.g. TeacherProbe)."""
    _check_x(x, "x", op)
    b = _pick_stats_backend(x, backend, op)
    if b == "torch":
        return channel_stats_ref(x)
    if x.dim() == 2:  # the instance mean of (N, C) is x itself: keep it out of the op (no aliasing outputs)
        mean, var = _bn_stats_call(x, b)
        return mean, var, x.float()
    return _channel_stats_call(x, b)


# ----------------------------------------------------------------------------------------------------
# Public stats ops
# ----------------------------------------------------------------------------------------------------
def channel_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel mean, biased variance and instance (spatial) means from ONE read of x, differentiable.

    .. math:: \\mu_c = \\frac{1}{M}\\sum x,\\ \\sigma^2_c = \\frac{1}{M}\\sum (x - \\mu_c)^2,\\
              \\bar x_{nc} = \\frac{1}{S}\\sum_{s} x_{ncs},\\ M = N S

    Shape: x (N, C) | (N, C, L) | (N, C, H, W), any strides -> mean (C,), var (C,), inst_mean (N, C), fp32
    (float64 for float64 x). For 2-D x the instance mean is x itself.
    """
    mean, var, inst = _channel_stats_unchecked(x, backend)
    _check_finite_stats((mean + var).sum(), [x], ["x"], "channel_stats")
    return mean, var, inst


def bn_stats(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32), differentiable.

    .. math:: \\mu_c = \\frac{1}{M}\\sum x,\\ \\sigma^2_c = \\frac{1}{M}\\sum (x - \\mu_c)^2

    Shape: (N, C, *) -> (C,), (C,).
    """
    op = "bn_stats"
    _check_x(x, "x", op)
    b = _pick_stats_backend(x, backend, op)
    mean, var = _k.bn_stats_ref(x) if b == "torch" else _bn_stats_call(x, b)
    _check_finite_stats((mean + var).sum(), [x], ["x"], op)
    return mean, var


# ----------------------------------------------------------------------------------------------------
# Per-layer constants, packed once
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class StatConstants:
    """Per-layer constants of the BN-prior loss, concatenated over layers and kept on the device.

    Build with :func:`pack_stat_constants` once (e.g. per teacher) and pass to :func:`bn_stat_loss_packed`
    every step: no per-step concatenation, validation or host->device copy.

    Attributes:
        channels: C_l per layer (host ints).
        kind: ``"l2" | "kl" | "mse"``.
        running_mean, running_var: (sum_l C_l,) fp32, detached copies of the running statistics.
        weights: (L,) fp32 layer weights w_l.
        offsets: (L+1,) int64, layer l owns channels ``offsets[l]:offsets[l+1]``.
        segment: (sum_l C_l,) int64, the layer of each channel (used by the backward instead of a
            data-dependent ``repeat_interleave``).
    """

    channels: tuple[int, ...]
    kind: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor
    segment: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.channels)

    @property
    def total_channels(self) -> int:
        return sum(self.channels)

    @property
    def device(self) -> torch.device:
        return self.running_mean.device


_RUNNING_MESSAGES = (_checks.finite_message("running_means", _OP), _checks.finite_message("running_vars", _OP),
                     f"{_OP}: 'running_vars' has a negative entry; a variance is >= 0: pass the running_var buffers "
                     "of the teacher's BatchNorm layers (check the teacher's weights file)",
                     f"{_OP}: 'weights' (the per-layer weights w_l) contains NaN or Inf; pass finite layer weights")


def _constant_flags(rm: torch.Tensor, rv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(4,) bool device flags, one per entry of ``_RUNNING_MESSAGES`` (no host read)."""
    return torch.stack([torch.isfinite(rm).all(), torch.isfinite(rv).all(), (rv >= 0).all(), torch.isfinite(w).all()])


def pack_stat_constants(channels: Sequence[int], running_means: Sequence[torch.Tensor],
                        running_vars: Sequence[torch.Tensor],
                        weights: Sequence[float] | torch.Tensor | None = None, kind: str = "l2",
                        device: torch.device | str | None = None) -> StatConstants:
    """Validate and concatenate the per-layer constants of the BN-prior loss once (fp32, detached, on ``device``).

    Args:
        channels: C_l of each layer.
        running_means, running_vars: one (C_l,) tensor per layer (the BatchNorm running statistics).
        weights: w_l per layer (default 1).
        kind: ``"l2" | "kl" | "mse"``.
        device: where the loss runs (default: the running statistics' device).

    Raises:
        ValueError: wrong counts or sizes, non-float or NaN/Inf running statistics (the finite check is a
            device flag inside :func:`dfkd_fast._checks.deferred`), unknown ``kind``.
    """
    channels = tuple(int(c) for c in channels)
    n = len(channels)
    if n == 0:
        raise ValueError(f"{_OP}: got no layers; pass at least one (mean, var) pair")
    if kind not in KINDS:
        raise ValueError(f"{_OP}: kind must be one of {KINDS}, got {kind!r}")
    if len(running_means) != n or len(running_vars) != n:
        raise ValueError(f"{_OP}: got {n} layers but {len(running_means)} running_means and {len(running_vars)} "
                         "running_vars; pass one per layer")
    for i, (c, rm, rv) in enumerate(zip(channels, running_means, running_vars, strict=True)):
        for t, name in ((rm, "running_means"), (rv, "running_vars")):
            _checks.check_float(t, f"{name}[{i}]", _OP)
            if t.numel() != c:
                raise ValueError(f"{_OP}: layer {i} has {c} channels but {name}[{i}] has {t.numel()} elements; "
                                 "pass the running statistics of the BatchNorm layer that receives this input")
    dev = torch.device(device) if device is not None else running_means[0].device
    rm = torch.cat([t.detach().reshape(-1).float().to(dev) for t in running_means])
    rv = torch.cat([t.detach().reshape(-1).float().to(dev) for t in running_vars])
    if weights is None:
        w = torch.ones(n, device=dev, dtype=torch.float32)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).detach().to(dev).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"{_OP}: weights must have one entry per layer ({n}), got {w.numel()}")
    if _checks.checks_enabled():
        _checks.expect_each(_constant_flags(rm, rv, w), _RUNNING_MESSAGES)
    starts = [0]
    for c in channels:
        starts.append(starts[-1] + c)
    offsets = torch.tensor(starts, dtype=torch.int64).to(dev)
    segment = torch.tensor([i for i, c in enumerate(channels) for _ in range(c)], dtype=torch.int64).to(dev)
    return StatConstants(channels, kind, rm, rv, w, offsets, segment)


_CACHE_SIZE = 16
_CONST_CACHE: collections.OrderedDict[tuple, tuple[tuple, StatConstants, torch.Tensor | None]] = \
    collections.OrderedDict()


def _constants(channels: Sequence[int], running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
               weights, kind: str, device: torch.device) -> StatConstants:
    """:func:`pack_stat_constants`, cached for repeated calls with the same (unmodified) running statistics.

    The key holds each tensor's identity and version counter (bumped by any in-place change, e.g. a BN update
    in train mode or ``load_state_dict``), so a cache hit is never stale; the entry keeps the tensors alive, so
    their ids cannot be reused. No cache while ``torch.compile`` traces (the packed tensors become constants).
    """
    if torch.compiler.is_compiling():
        return pack_stat_constants(channels, running_means, running_vars, weights, kind, device)
    if weights is None:
        wkey: object = None
    elif isinstance(weights, torch.Tensor):
        wkey = ("t", id(weights), weights._version)
    elif all(isinstance(w, (int, float)) for w in weights):
        wkey = tuple(float(w) for w in weights)
    else:
        return pack_stat_constants(channels, running_means, running_vars, weights, kind, device)
    tensors = (*running_means, *running_vars) + ((weights,) if isinstance(weights, torch.Tensor) else ())
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return pack_stat_constants(channels, running_means, running_vars, weights, kind, device)
    key = (tuple(int(c) for c in channels), kind, str(device), wkey,
           tuple((id(t), t._version) for t in tensors))
    hit = _CONST_CACHE.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors, strict=True)):
        _CONST_CACHE.move_to_end(key)
        if hit[2] is not None:  # packed inside a deferred block: its finite flag was never read; record it again
            _checks.expect_each(hit[2], _RUNNING_MESSAGES)
        return hit[1]
    consts = pack_stat_constants(channels, running_means, running_vars, weights, kind, device)
    ok = None
    if _checks.in_deferred() and _checks.checks_enabled():
        ok = _constant_flags(consts.running_mean, consts.running_var, consts.weights)
    _CONST_CACHE[key] = (tensors, consts, ok)
    while len(_CONST_CACHE) > _CACHE_SIZE:
        _CONST_CACHE.popitem(last=False)
    return consts


def pack_momentum(constants: StatConstants, momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate FastDFKD moving averages for :func:`bn_stat_loss_packed`: (mean_bar, var_bar, beta).

    ``momentum_stats[l]`` is ``(mean_bar, var_bar)`` of layer l or ``None`` (no blend on that layer: beta = 0).
    Shape: -> three (sum_l C_l,) fp32 tensors on the constants' device.
    """
    n, dev = constants.num_layers, constants.device
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum}")
    if len(momentum_stats) != n:
        raise ValueError(f"{_OP}: momentum_stats must have one entry (or None) per layer ({n}), "
                         f"got {len(momentum_stats)}")
    mbs, vbs, bts = [], [], []
    for i, (c, st) in enumerate(zip(constants.channels, momentum_stats, strict=True)):
        if st is None:
            z = torch.zeros(c, device=dev)
            mbs.append(z)
            vbs.append(z)
            bts.append(z)
            continue
        m_bar, v_bar = st
        if m_bar.numel() != c or v_bar.numel() != c:
            raise ValueError(f"{_OP}: momentum_stats[{i}] must hold ({c},) mean and var for layer {i}, got "
                             f"{tuple(m_bar.shape)} and {tuple(v_bar.shape)}")
        mbs.append(m_bar.detach().reshape(-1).float().to(dev))
        vbs.append(v_bar.detach().reshape(-1).float().to(dev))
        bts.append(torch.full((c,), float(momentum), device=dev))
    return torch.cat(mbs), torch.cat(vbs), torch.cat(bts)


def bn_stat_loss_packed(mean: torch.Tensor, var: torch.Tensor, constants: StatConstants,
                        mean_bar: torch.Tensor | None = None, var_bar: torch.Tensor | None = None,
                        beta: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Weighted per-layer BN-prior terms w_l L_l from concatenated batch stats and packed constants, one kernel.

    No validation of values and no host->device copy: the hot-path form of :func:`bn_stat_loss_from_stats`
    (the caller checks the result, e.g. ``torch.isfinite(terms)``). Gradients flow into ``mean`` and ``var``.

    Shape: mean, var (sum_l C_l,) fp32; mean_bar, var_bar, beta (sum_l C_l,) or None (from
    :func:`pack_momentum` or kept by the caller) -> (L,) fp32.
    """
    if mean.shape != constants.running_mean.shape or var.shape != constants.running_mean.shape:
        raise ValueError(f"{_OP}: mean and var must be ({constants.total_channels},) = the packed layers' channels, "
                         f"got {tuple(mean.shape)} and {tuple(var.shape)}")
    if (mean_bar is None) != (beta is None) or (var_bar is None) != (beta is None):
        raise ValueError(f"{_OP}: pass mean_bar, var_bar and beta together (or none of them)")
    b = _pick_loss_backend(mean.device, backend)
    losses, _, _ = _stat_loss_call(mean.float(), var.float(), constants.running_mean, constants.running_var,
                                 constants.offsets, constants.segment, constants.weights, constants.kind,
                                 mean_bar, var_bar, beta, b)
    return losses


# ----------------------------------------------------------------------------------------------------
# Public loss ops
# ----------------------------------------------------------------------------------------------------
def bn_stat_loss_from_stats(means: Sequence[torch.Tensor], vars: Sequence[torch.Tensor],
                            running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                            weights: Sequence[float] | torch.Tensor | None = None, kind: str = "l2",
                            momentum_stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                            momentum: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Weighted per-layer BN-prior terms w_l L_l from already computed batch stats, in one kernel.

    Packs the constants on every call; a caller that repeats the same layers should use
    :func:`pack_stat_constants` once and :func:`bn_stat_loss_packed` (as :class:`dfkd_fast.hooks.TeacherProbe`
    does). Gradients flow into ``means`` and ``vars`` only.

    Shape: means[l], vars[l], running_means[l], running_vars[l] (C_l,) -> (L,) fp32; sum it for the total.
    """
    if len(means) == 0:
        raise ValueError(f"{_OP}: got no layers; pass at least one (mean, var) pair")
    if len(vars) != len(means):
        raise ValueError(f"{_OP}: got {len(means)} means but {len(vars)} vars")
    device = means[0].device
    consts = _constants([m.numel() for m in means], running_means, running_vars, weights, kind, device)
    mb = vb = beta = None
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum}")
    if momentum_stats is not None and float(momentum) != 0.0:
        mb, vb, beta = pack_momentum(consts, momentum_stats, momentum)
    mean = torch.cat([m.reshape(-1).float() for m in means])
    var = torch.cat([v.reshape(-1).float() for v in vars])
    return bn_stat_loss_packed(mean, var, consts, mb, vb, beta, backend)


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

    Fused backends: one stats op per layer (``dfkd_fast::bn_stats``) and one loss op over all layers
    (``dfkd_fast::bn_stat_loss_terms``); the torch backend is the reference, per layer.

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
    names = [f"feats[{i}]" for i in range(len(feats))]
    for x, name in zip(feats, names, strict=True):
        _check_x(x, name, _OP)
    _checks.check_same_device(feats, names, _OP)
    device = feats[0].device
    consts = _constants([x.shape[1] for x in feats], running_means, running_vars, weights, kind, device)
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_OP}: momentum must be in [0, 1], got {momentum}")
    use_mmt = momentum_stats is not None and float(momentum) != 0.0
    mmt = pack_momentum(consts, momentum_stats, momentum) if use_mmt else (None, None, None)
    bs = {_pick_stats_backend(x, backend, _OP) for x in feats}
    if "torch" in bs or len(bs) != 1:
        terms = bn_stat_layer_losses_ref(feats, running_means, running_vars, consts.weights, kind,
                                         momentum_stats if use_mmt else None, momentum)
    else:
        b = bs.pop()
        stats = [_bn_stats_call(x, b) for x in feats]
        mean = torch.cat([s[0] for s in stats])
        var = torch.cat([s[1] for s in stats])
        terms = bn_stat_loss_packed(mean, var, consts, *mmt, backend=backend)
    _check_finite_stats(terms, feats, names, _OP)
    return terms.sum()
