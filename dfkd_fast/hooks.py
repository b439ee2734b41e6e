"""Forward hooks that turn a teacher's BatchNorm inputs into the BN-prior loss and CMI instance features.

- :class:`BNStatHook` (alias :class:`DeepInversionHook`): one hook per BN layer, DeepInversion-style
  ``.r_feature`` (Yin et al., "Dreaming to Distill", CVPR 2020), with FastDFKD's moving-average blend
  (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).
- :class:`TeacherProbe`: registers once on every BN layer; one stats pass per BN input serves the BN-prior
  loss (all layers fused in one kernel), the instance features of CMI (Fang et al., "Contrastive Model
  Inversion", IJCAI 2021) and per-layer stats.
- :class:`FeatureProbe`: per-layer [mu, var] of module outputs of any conv net -- the Impression-Space code
  (Wang et al., "Impression Space from Deep Template Network").

Hooks read BN *inputs*, so eval-mode teachers work and gradients flow back to the input image.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dfkd_fast import _checks
from dfkd_fast.ops.bn_stats import (
    StatConstants,
    _channel_stats_unchecked,
    bn_stat_loss_packed,
    channel_stats,
    pack_momentum,
    pack_stat_constants,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["BNStatHook", "DeepInversionHook", "TeacherProbe", "FeatureProbe"]

_NO_BN_METHODS = "DataImpressions, ClassImpressions, DAFL, ZSKT, ImpressionSpace"


def _check_bn(module: nn.Module, where: str) -> None:
    if not isinstance(module, _BatchNorm):
        raise ValueError(f"{where}: expected a BatchNorm module, got {type(module).__name__}")
    if module.running_mean is None or module.running_var is None:
        raise ValueError(f"{where}: {type(module).__name__} has track_running_stats=False, so it has no running "
                         "statistics to match; use a BN layer with running stats or a method without BN "
                         f"({_NO_BN_METHODS})")


def _layer_message(owner: str, layer: str) -> str:
    return (f"{owner}: the input of {layer} contains NaN or Inf, or its batch statistics overflow float32; check the "
            "upstream computation (learning rate, input scaling) or disable checks with DFKD_FAST_CHECKS=0")


class _PackedRunningStats:
    """The per-layer loss constants of a fixed list of BN layers, packed once (:func:`pack_stat_constants`).

    Re-packed only when a running statistic is replaced or modified in place (tensor identity and version
    counter, read on the host: no sync), e.g. a teacher in train mode or ``load_state_dict`` / ``.to()``.
    """

    def __init__(self, layers: Sequence[nn.Module], kind: str) -> None:
        self.layers = list(layers)
        self.kind = kind
        self._sig: tuple | None = None
        self._cache: dict[tuple, StatConstants] = {}

    def _signature(self) -> tuple:
        return tuple((m.running_mean, m.running_mean._version, m.running_var, m.running_var._version)
                     for m in self.layers)

    def _fresh(self) -> bool:
        if self._sig is None or len(self._sig) != len(self.layers):
            return False
        for (rm, vm, rv, vv), m in zip(self._sig, self.layers, strict=True):
            if rm is not m.running_mean or rv is not m.running_var or vm != rm._version or vv != rv._version:
                return False
        return True

    def get(self, idx: tuple[int, ...], weights: tuple[float, ...]) -> StatConstants:
        """Constants of layers ``idx`` with layer weights ``weights`` (packed on the first request).

        While ``torch.compile`` traces, the packed constants are used as they are (version counters are not
        traceable); a change of the running statistics is picked up by the next eager call.
        """
        if not self._cache or not torch.compiler.is_compiling() and not self._fresh():
            self._cache.clear()
            self._sig = self._signature()
        key = (idx, weights)
        consts = self._cache.get(key)
        if consts is None:
            layers = [self.layers[i] for i in idx]
            consts = pack_stat_constants([int(m.running_mean.numel()) for m in layers],
                                         [m.running_mean for m in layers], [m.running_var for m in layers],
                                         list(weights), self.kind, layers[0].running_mean.device)
            self._cache[key] = consts
        return consts


class BNStatHook:
    """DeepInversion forward hook on one BatchNorm layer.

    After each forward of the hooked module: ``.r_feature`` is that layer's BN-prior loss (scalar, autograd to
    the input), ``.mean`` / ``.var`` the batch statistics (fp32). With ``momentum`` = beta > 0 and moving averages
    available (after :meth:`update_mmt`), the batch stats are blended, mu <- (1 - beta) mu + beta mu_bar.

    Args:
        module: a BatchNorm layer with running statistics.
        kind: ``"l2"`` (DeepInversion/CMI), ``"kl"`` (DFQ) or ``"mse"``.
        momentum: FastDFKD ``bn_mmt`` (0 disables the blend; the paper uses 0.9).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
    """

    def __init__(self, module: nn.Module, kind: str = "l2", momentum: float = 0.0, backend: str = "auto") -> None:
        _check_bn(module, "BNStatHook")
        if kind not in ("l2", "kl", "mse"):
            raise ValueError(f"BNStatHook: kind must be 'l2', 'kl' or 'mse', got {kind!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BNStatHook: momentum must be in [0, 1], got {momentum}")
        self.module = module
        self.kind = kind
        self.momentum = float(momentum)
        self.backend = backend
        self.r_feature: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.mmt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.paused = False
        self._packed = _PackedRunningStats([module], kind)
        self._packed.get((0,), (1.0,))  # pack (and validate) the running statistics once, now
        self._beta: torch.Tensor | None = None
        self._message = (_layer_message("BNStatHook", f"its {type(module).__name__} layer "
                                                      f"({module.running_mean.numel()} channels)"),)
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.paused:
            return
        mean, var, _ = _channel_stats_unchecked(inputs[0], self.backend, "BNStatHook")
        self.mean, self.var = mean, var
        mb = vb = beta = None
        if self.mmt is not None and self.momentum > 0:
            mb, vb = self.mmt
            if self._beta is None or self._beta.device != mb.device:
                self._beta = torch.full_like(mb, self.momentum)
            beta = self._beta
        terms = bn_stat_loss_packed(mean, var, self._packed.get((0,), (1.0,)), mb, vb, beta, backend=self.backend)
        _checks.expect_each(torch.isfinite(terms.detach()), self._message)
        self.r_feature = terms.sum()

    def update_mmt(self) -> None:
        """Update the moving averages from the last batch (on the device, no host read):
        mu_bar <- beta mu_bar + (1 - beta) mu (the first batch copies)."""
        if self.mean is None or self.var is None:
            raise RuntimeError("BNStatHook.update_mmt: run a forward pass of the model first")
        m, v = self.mean.detach(), self.var.detach()
        if self.mmt is None:
            self.mmt = (m.clone(), v.clone())
        else:
            b = self.momentum
            self.mmt = (torch.lerp(m, self.mmt[0], b), torch.lerp(v, self.mmt[1], b))

    def remove(self) -> None:
        """Detach the hook from the module."""
        self._handle.remove()


DeepInversionHook = BNStatHook


class _Probe:
    """Shared hook bookkeeping of the probes: ``paused()``, ``remove()``, context manager."""

    _paused: bool
    _handles: list

    @contextlib.contextmanager
    def paused(self) -> Iterator[Self]:
        """Forwards inside this block are not captured (and do not clear the captured stats)."""
        prev = self._paused
        self._paused = True
        try:
            yield self
        finally:
            self._paused = prev

    def pause(self) -> Self:
        """Stop capturing until :meth:`capturing` (a persistent probe's idle state)."""
        self._paused = True
        return self

    @contextlib.contextmanager
    def capturing(self) -> Iterator[Self]:
        """Forwards inside this block are captured, also when the probe is paused outside it (a persistent
        probe of a synthesizer captures only during its batches)."""
        prev = self._paused
        self._paused = False
        try:
            yield self
        finally:
            self._paused = prev

    def clear(self) -> None:
        """Drop the captured stats of the last forward (and the autograd graph they keep alive)."""
        self._stats = [None] * len(self._stats)

    def detach_captured(self) -> None:
        """Keep the captured stats but cut them from the autograd graph. A step function calls this once its
        loss is assembled, before ``autograd.grad``: a tensor that outlives a compiled step must not hold
        grad_fns its backward consumes; the detached stats still serve ``update_momentum``."""
        self._stats = [None if s is None else tuple(t.detach() for t in s) for s in self._stats]

    def remove(self) -> None:
        """Remove every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class TeacherProbe(_Probe):
    """Capture every BatchNorm input of a teacher in one forward; fused BN-prior loss and instance features.

    Each BN input gets ONE stats pass (:func:`dfkd_fast.ops.channel_stats`) that yields the channel mean, the
    biased variance and the (N, C) instance means; :meth:`bn_loss` evaluates all layers' terms in one kernel:

    .. math::
        L = \\sum_l w_l L_l(\\mu_l, \\sigma^2_l; m_l, v_l),\\quad w_0 = \\text{first\\_bn\\_multiplier},\\ w_{l>0} = 1

    Stats of the latest captured forward are kept (each forward of ``model`` clears the previous ones).

    Args:
        model: the teacher (any mode; eval mode is the usual one).
        kind: ``"l2" | "kl" | "mse"``.
        first_bn_multiplier: DeepInversion's weight of the first BN layer (10 on ImageNet, 1 on CIFAR).
        momentum: FastDFKD ``bn_mmt`` (0 disables the moving-average blend).
        layers: BatchNorm modules to probe (default: every BatchNorm of ``model``, in module order).
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Raises:
        ValueError: ``model`` has no BatchNorm layer (names the methods that work without BN).
    """

    def __init__(self, model: nn.Module, kind: str = "l2", first_bn_multiplier: float = 1.0, momentum: float = 0.0,
                 layers: Sequence[nn.Module] | None = None, backend: str = "auto") -> None:
        if kind not in ("l2", "kl", "mse"):
            raise ValueError(f"TeacherProbe: kind must be 'l2', 'kl' or 'mse', got {kind!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"TeacherProbe: momentum must be in [0, 1], got {momentum}")
        if layers is None:
            layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
            if not layers:
                raise ValueError(f"TeacherProbe: {type(model).__name__} has no BatchNorm layer, so BN-statistic "
                                 f"matching is impossible; use a method that does not need BN ({_NO_BN_METHODS})")
        layers = list(layers)
        if not layers:
            raise ValueError("TeacherProbe: 'layers' is empty; pass BatchNorm modules or None for all of them")
        for i, m in enumerate(layers):
            _check_bn(m, f"TeacherProbe layers[{i}]")
        self.model = model
        self.layers: list[nn.Module] = layers
        self.kind = kind
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.momentum = float(momentum)
        self.backend = backend
        self.channels: list[int] = [int(m.running_mean.numel()) for m in layers]
        self.feature_dim: int = sum(self.channels)
        self._paused = False
        self._stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        module_names = {id(m): n for n, m in model.named_modules()}
        self._messages = [
            _layer_message("TeacherProbe", f"BN layer {i} ('{module_names.get(id(m), type(m).__name__)}')")
            for i, m in enumerate(layers)]
        self._all = tuple(range(len(layers)))
        self._packed = _PackedRunningStats(layers, kind)
        self._packed.get(self._all, self._weights(self._all))  # pack (and validate) once, now
        # FastDFKD moving averages, concatenated over layers on the device (see update_momentum)
        self._mean_bar: torch.Tensor | None = None
        self._var_bar: torch.Tensor | None = None
        self._has_mmt = [False] * len(layers)
        self._beta_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(layers)]

    def _reset(self, module: nn.Module, inputs: tuple) -> None:
        if not self._paused:
            self._stats = [None] * len(self.layers)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self._paused:
                # checked where the stats are used (one device flag per layer, see _check_layers)
                self._stats[index] = _channel_stats_unchecked(inputs[0], self.backend, "TeacherProbe")

        return hook

    def _captured(self, what: str) -> tuple[int, ...]:
        idx = tuple(i for i, s in enumerate(self._stats) if s is not None)
        if not idx:
            raise RuntimeError(f"TeacherProbe.{what}: no BN input captured; run a (non-paused) forward of the model")
        return idx

    def _weights(self, idx: tuple[int, ...]) -> tuple[float, ...]:
        return tuple(self.first_bn_multiplier if i == 0 else 1.0 for i in idx)

    def _constants(self, idx: tuple[int, ...]) -> StatConstants:
        return self._packed.get(idx, self._weights(idx))

    @property
    def constants(self) -> StatConstants:
        """The packed per-layer constants of all probed layers (running stats, weights, offsets), on the device."""
        return self._constants(self._all)

    def _cat_stats(self, idx: tuple[int, ...], k: int) -> torch.Tensor:
        return torch.cat([self._stats[i][k].reshape(-1).float() for i in idx])

    def _check_layers(self, idx: tuple[int, ...], mean: torch.Tensor, var: torch.Tensor) -> None:
        """One device flag per layer: its stats are finite (a NaN/Inf anywhere in a BN input makes them not)."""
        if not _checks.checks_enabled():
            return
        bad = (~torch.isfinite(mean.detach() + var.detach())).float()
        consts = self._constants(idx)
        per_layer = torch.zeros(len(idx), device=bad.device).index_add_(0, consts.segment, bad)
        _checks.expect_each(per_layer == 0, [self._messages[i] for i in idx])

    def _moving(self, idx: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(mean_bar, var_bar, beta) over the channels of layers ``idx``; beta = 0 on layers without averages."""
        if self.momentum <= 0 or self._mean_bar is None or not any(self._has_mmt[i] for i in idx):
            return None, None, None
        beta = self._beta_cache.get(idx)
        if beta is None:
            vals = [self.momentum if self._has_mmt[i] else 0.0 for i in idx for _ in range(self.channels[i])]
            beta = torch.tensor(vals, dtype=torch.float32).to(self._mean_bar.device)
            self._beta_cache[idx] = beta
        if idx == self._all:
            return self._mean_bar, self._var_bar, beta
        starts = [sum(self.channels[:i]) for i in range(len(self.channels))]
        sel = torch.tensor([starts[i] + k for i in idx for k in range(self.channels[i])]).to(self._mean_bar.device)
        return self._mean_bar.index_select(0, sel), self._var_bar.index_select(0, sel), beta

    def bn_loss(self) -> torch.Tensor:
        """Total BN-prior loss sum_l w_l L_l of the last forward (fp32 scalar, differentiable), one fused kernel.

        No host sync: the constants are packed once, the moving averages live on the device, and the finite
        check is one device flag per layer (read when a :func:`dfkd_fast._checks.deferred` block ends; at once
        outside one).
        """
        idx = self._captured("bn_loss")
        mean, var = self._cat_stats(idx, 0), self._cat_stats(idx, 1)
        terms = bn_stat_loss_packed(mean, var, self._constants(idx), *self._moving(idx), backend=self.backend)
        _checks.expect_each(torch.isfinite(terms.detach()), [self._messages[i] for i in idx])
        return terms.sum()

    def instance_features(self) -> torch.Tensor:
        """Spatial means of every probed BN input, concatenated (CMI). Shape: (N, feature_dim) fp32."""
        self._captured("instance_features")
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(f"TeacherProbe.instance_features: layers {missing} did not run in the last forward; "
                               "probe only layers on the forward path (pass `layers=`)")
        self._check_layers(self._all, self._cat_stats(self._all, 0), self._cat_stats(self._all, 1))
        return torch.cat([s[2] for s in self._stats], dim=1)

    def layer_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean[C], var[C]) of each probed layer that ran in the last forward (fp32, differentiable)."""
        idx = self._captured("layer_stats")
        self._check_layers(idx, self._cat_stats(idx, 0), self._cat_stats(idx, 1))
        return [(self._stats[i][0], self._stats[i][1]) for i in idx]

    def update_momentum(self) -> None:
        """FastDFKD moving averages from the last forward, on the device (no host read):
        mu_bar <- beta mu_bar + (1 - beta) mu (a layer's first update copies)."""
        idx = self._captured("update_momentum")
        if self._mean_bar is None:
            dev = self._stats[idx[0]][0].device
            self._mean_bar = torch.zeros(self.feature_dim, device=dev)
            self._var_bar = torch.zeros(self.feature_dim, device=dev)
        mean = self._cat_stats(idx, 0).detach()
        var = self._cat_stats(idx, 1).detach()
        b = self.momentum
        if idx == self._all and all(self._has_mmt):
            self._mean_bar = torch.lerp(mean, self._mean_bar, b)
            self._var_bar = torch.lerp(var, self._var_bar, b)
        else:
            mbs, vbs, pos = [], [], 0
            for i, c in enumerate(self.channels):
                old_m, old_v = self._mean_bar[pos:pos + c], self._var_bar[pos:pos + c]
                if i in idx:
                    j = sum(self.channels[k] for k in idx if k < i)
                    m, v = mean[j:j + c], var[j:j + c]
                    if self._has_mmt[i]:
                        m, v = torch.lerp(m, old_m, b), torch.lerp(v, old_v, b)
                    old_m, old_v = m, v
                mbs.append(old_m)
                vbs.append(old_v)
                pos += c
            self._mean_bar, self._var_bar = torch.cat(mbs), torch.cat(vbs)
            for i in idx:
                self._has_mmt[i] = True
            self._beta_cache.clear()

    @property
    def momentum_stats(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Current moving averages per layer (None before the layer's first :meth:`update_momentum`)."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        pos = 0
        for has, c in zip(self._has_mmt, self.channels, strict=True):
            out.append((self._mean_bar[pos:pos + c], self._var_bar[pos:pos + c]) if has else None)
            pos += c
        return out

    def set_momentum_stats(self, stats: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None) -> None:
        """Replace the moving averages (resume): one ``(mean_bar, var_bar)`` or None per probed layer; None clears."""
        n = len(self.layers)
        if stats is None:
            stats = [None] * n
        if len(stats) != n:
            raise ValueError(f"TeacherProbe.set_momentum_stats: got {len(stats)} entries for {n} probed BN layers")
        try:  # one packing routine for the probe and the op (validation, fp32, concatenation on the device)
            self._mean_bar, self._var_bar, _ = pack_momentum(self.constants, stats, 0.0)
        except ValueError as e:
            raise ValueError(f"TeacherProbe.set_momentum_stats: {e}") from e
        self._has_mmt = [st is not None for st in stats]
        self._beta_cache.clear()



class FeatureProbe(_Probe):
    """Per-layer [mu, var] of module outputs of any network: the Impression-Space code.

    Args:
        model: any network.
        layer_types: module types whose outputs are captured (default: ``nn.Conv2d``).
        layers: explicit modules to capture instead of ``layer_types``.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.

    Shape: :meth:`code` -> (sum_l 2 C_l,) fp32, differentiable (order: mu_0, var_0, mu_1, var_1, ...).
    """

    def __init__(self, model: nn.Module, layer_types: tuple[type, ...] = (nn.Conv2d,),
                 layers: Sequence[nn.Module] | None = None, backend: str = "auto") -> None:
        if layers is None:
            layers = [m for m in model.modules() if isinstance(m, tuple(layer_types))]
        layers = list(layers)
        if not layers:
            names = ", ".join(t.__name__ for t in layer_types)
            raise ValueError(f"FeatureProbe: {type(model).__name__} has no module of type ({names}); pass "
                             "`layer_types=` or `layers=` naming modules on the forward path")
        self.model = model
        self.layers: list[nn.Module] = layers
        self.backend = backend
        self._paused = False
        self._stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(layers)]

    def _reset(self, module: nn.Module, inputs: tuple) -> None:
        if not self._paused:
            self._stats = [None] * len(self.layers)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._paused:
                return None
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise ValueError(f"FeatureProbe: layer {index} ({type(module).__name__}) must output an (N, C, ...) "
                                 "tensor")
            mean, var, _ = channel_stats(output, self.backend)
            self._stats[index] = (mean, var)
            if torch.is_grad_enabled() and output.requires_grad:
                # The fused backward re-reads this activation; conv outputs are often followed by an
                # ``inplace=True`` activation, so the rest of the network gets a copy to modify.
                return output.clone()
            return None

        return hook

    def layer_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean[C], var[C]) of each captured layer output of the last forward."""
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(f"FeatureProbe: layers {missing} were not captured; run a (non-paused) forward "
                               "whose path contains every probed layer")
        return [s for s in self._stats if s is not None]

    def code(self) -> torch.Tensor:
        """Concatenated [mu_l, var_l] over layers (Impression-Space code). Shape: (sum_l 2 C_l,)."""
        return torch.cat([t for s in self.layer_stats() for t in s])

