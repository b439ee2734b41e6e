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

from dfkd_fast.ops.bn_stats import bn_stat_loss_from_stats, channel_stats

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


def _blend_update(old: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor],
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FastDFKD moving average: first batch copies, later ones mix ``momentum * old + (1 - momentum) * new``."""
    m, v = new[0].detach(), new[1].detach()
    if old is None:
        return m.clone(), v.clone()
    return momentum * old[0] + (1 - momentum) * m, momentum * old[1] + (1 - momentum) * v


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
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.paused:
            return
        mean, var, _ = channel_stats(inputs[0], self.backend)
        self.mean, self.var = mean, var
        mmt = [self.mmt] if (self.mmt is not None and self.momentum > 0) else None
        self.r_feature = bn_stat_loss_from_stats([mean], [var], [module.running_mean], [module.running_var],
                                                 kind=self.kind, momentum_stats=mmt, momentum=self.momentum,
                                                 backend=self.backend).sum()

    def update_mmt(self) -> None:
        """Update the moving averages from the last batch: mu_bar <- beta mu_bar + (1 - beta) mu."""
        if self.mean is None or self.var is None:
            raise RuntimeError("BNStatHook.update_mmt: run a forward pass of the model first")
        self.mmt = _blend_update(self.mmt, (self.mean, self.var), self.momentum)

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
        self._mmt: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        self._handles += [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(layers)]

    def _reset(self, module: nn.Module, inputs: tuple) -> None:
        if not self._paused:
            self._stats = [None] * len(self.layers)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self._paused:
                self._stats[index] = channel_stats(inputs[0], self.backend)

        return hook

    def _captured(self, what: str) -> list[int]:
        idx = [i for i, s in enumerate(self._stats) if s is not None]
        if not idx:
            raise RuntimeError(f"TeacherProbe.{what}: no BN input captured; run a (non-paused) forward of the model")
        return idx

    def bn_loss(self) -> torch.Tensor:
        """Total BN-prior loss sum_l w_l L_l of the last forward (fp32 scalar, differentiable), one fused kernel."""
        idx = self._captured("bn_loss")
        means = [self._stats[i][0] for i in idx]
        vars_ = [self._stats[i][1] for i in idx]
        weights = [self.first_bn_multiplier if i == 0 else 1.0 for i in idx]
        mmt = None
        if self.momentum > 0 and any(self._mmt[i] is not None for i in idx):
            mmt = [self._mmt[i] for i in idx]
        terms = bn_stat_loss_from_stats(means, vars_, [self.layers[i].running_mean for i in idx],
                                        [self.layers[i].running_var for i in idx], weights=weights, kind=self.kind,
                                        momentum_stats=mmt, momentum=self.momentum, backend=self.backend)
        return terms.sum()

    def instance_features(self) -> torch.Tensor:
        """Spatial means of every probed BN input, concatenated (CMI). Shape: (N, feature_dim) fp32."""
        self._captured("instance_features")
        missing = [i for i, s in enumerate(self._stats) if s is None]
        if missing:
            raise RuntimeError(f"TeacherProbe.instance_features: layers {missing} did not run in the last forward; "
                               "probe only layers on the forward path (pass `layers=`)")
        return torch.cat([s[2] for s in self._stats], dim=1)

    def layer_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean[C], var[C]) of each probed layer that ran in the last forward (fp32, differentiable)."""
        idx = self._captured("layer_stats")
        return [(self._stats[i][0], self._stats[i][1]) for i in idx]

    def update_momentum(self) -> None:
        """FastDFKD moving averages from the last forward: mu_bar <- beta mu_bar + (1 - beta) mu (first: copy)."""
        for i in self._captured("update_momentum"):
            st = self._stats[i]
            self._mmt[i] = _blend_update(self._mmt[i], (st[0], st[1]), self.momentum)

    @property
    def momentum_stats(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Current moving averages per layer (None before the first :meth:`update_momentum`)."""
        return list(self._mmt)



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

