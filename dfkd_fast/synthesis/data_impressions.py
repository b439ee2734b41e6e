"""Data Impressions (ZSKD) and Class Impressions: pixel optimization toward sampled teacher outputs.

Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks" (ICML 2019) and "Mining Data
Impressions from Deep Models as Substitute for the Unavailable Training Data" (TPAMI 2021).

The teacher's final linear layer gives a class-similarity matrix C (cosine similarity of its weight rows,
each row min-max normalized). For a target class k and a scale beta, a softmax vector is sampled
``y ~ Dir(beta * c_k + 1e-4)`` and random-noise pixels are optimized (Adam) until the teacher's
temperature softmax matches it: ``min_x CE(y, softmax(T(x) / tau))`` (tau applied once). Half of each
batch uses beta = 1.0 and half beta = 0.1 (the published mixture). No BatchNorm is needed.

Pixel parameterization: the images are optimized directly in [0, 1] with projected Adam (after every
step the pixels are clamped back to [0, 1]); gradients are not masked by the clamp.

Deviations from the published settings (measured on MNIST-5k, LeNet-5 -> LeNet-5-half, 600 impressions,
the same KD recipe): the paper starts from uniform noise and uses Adam lr 10 on its own pixel scale. In
[0, 1] pixels lr 10 moves every pixel by ~lr per step, so the impressions saturate (about 40% of the pixels
at 1.0) and the student reached 64%. Starting from dim noise ``U[0, init_scale]`` (default 0.1: the teacher's
inputs are mostly black) with lr 0.05 gave 79% (50 steps) and 82% (150 steps); U[0, 1] at lr 0.05 and a
sigmoid parameterization did worse (49% and 23-46%). ``init_scale=1.0, lr=10.0`` restores the published setup.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_fast import _checks, ops
from dfkd_fast.models import classifier_weight
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, register
from dfkd_fast.synthesis.losses import soft_target_ce
from dfkd_fast.synthesis.pixel_base import PixelSynthesizer

__all__ = ["DataImpressions", "ClassImpressions"]


@dataclass
class _PixelConfig(SynthesisConfig):
    iterations: int = 1500  # Adam steps per batch (ZSKD)
    lr: float = 0.05  # initial Adam lr for [0, 1] pixels, decayed by lr_schedule (the paper's 10 saturates them)
    init_scale: float = 0.1  # start from U[0, init_scale] noise (the paper: U[0, 1]; see the module docstring)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas (the optimizer's defaults; the paper names none)
    lr_schedule: str = "linear"  # "linear" (to 0 over the iterations, as published) or "constant"
    temperature: float = 20.0  # tau of the teacher's softmax, applied once


class _ImpressionSynthesizer(PixelSynthesizer):
    """Projected-Adam pixel optimization of one batch against ``self._loss(teacher logits, targets)``.

    The loop is :class:`~dfkd_fast.synthesis.pixel_base.PixelSynthesizer`'s; the random draws of a batch are,
    in order, its targets (Data Impressions' Dirichlet samples) and the ``U[0, init_scale]`` starting noise.
    """

    Config = _PixelConfig

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {cfg.iterations}")
        if cfg.lr <= 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {cfg.lr}")
        if not 0.0 <= cfg.init_scale <= 1.0:
            raise ValueError(f"{self.name}: init_scale must be in [0, 1], got {cfg.init_scale}")
        if cfg.temperature <= 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {cfg.temperature}")
        if cfg.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"{self.name}: lr_schedule must be 'linear' or 'constant', got {cfg.lr_schedule!r}")

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _make_targets(self, targets: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def lr_at(self, step: int, total: int, lr: float) -> float:
        """Constant, or decayed linearly toward 0 over the batch (the published ZSKD schedule)."""
        return lr * (1.0 - step / total) if self.config.lr_schedule == "linear" else lr

    def step_loss(self, x: torch.Tensor, targets: torch.Tensor, *view: torch.Tensor) -> torch.Tensor:
        """``self._loss`` of the teacher's logits on the (normalized) pixels. Shape: (N, C, H, W) -> scalar."""
        return self._loss(self.teacher_forward(self.normalize(x)), targets)

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        with _checks.deferred():  # the target sampling's value checks are read with the loop's, once
            y = self._make_targets(targets)
            x0 = self.rand(y.shape[0], *self.image_size) * cfg.init_scale
            run = self.optimize(x0, y, cfg.iterations, cfg.lr, cfg.betas)
        return SynthesisResult(images=run.images, targets=y.detach(), teacher_logits=self.teacher_logits(run.images),
                               losses=run.losses, seconds=0.0)


@register("data_impressions")
class DataImpressions(_ImpressionSynthesizer):
    """Data Impressions (ZSKD): pixels optimized toward Dirichlet-sampled soft targets.

    ``synthesize(targets)``: ``targets`` (N,) class indices (a Dirichlet vector is sampled per row around
    that class), or (N, K) probability vectors used as they are; ``None`` -> balanced classes. The
    result's ``targets`` are the (N, K) soft targets.

    .. math::
        y_n \\sim \\mathrm{Dir}(\\beta_n c_{k_n} + 10^{-4}), \\qquad
        \\min_x -\\frac1N \\sum_n \\sum_j y_{nj} \\log \\mathrm{softmax}(T(x_n)/\\tau)_j

    Shape: images (N, C, H, W) in [0, 1], targets (N, K).
    """

    @dataclass
    class Config(_PixelConfig):
        beta: tuple[float, ...] = (1.0, 0.1)  # Dirichlet scale mixture; the batch is split evenly among them

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_config()
        beta = tuple(float(b) for b in self.config.beta)
        if not beta or any(b <= 0 for b in beta):
            raise ValueError(f"data_impressions: beta must be a non-empty tuple of positive scales, got {beta}")
        self.config = dataclasses.replace(self.config, beta=beta)
        try:
            weight = classifier_weight(self.teacher).detach().to(self.device)
        except ValueError as e:
            raise ValueError(f"data_impressions needs the teacher's final nn.Linear (its weight rows give the class "
                             f"similarity); use class_impressions for this teacher ({e})") from e
        if weight.dim() != 2 or weight.shape[0] != self.num_classes:
            raise ValueError(f"data_impressions: the teacher's final linear weight has shape {tuple(weight.shape)}, "
                             f"expected ({self.num_classes}, F); pass the teacher whose last nn.Linear is the "
                             "classifier")
        # once per synthesizer, not on the hot path: an op without a C++ kernel runs its torch reference
        setup_backend = "torch" if self.backend == "cpp" and ops.OP_BACKENDS["class_similarity"][1] is None \
            else self.backend
        self.similarity = ops.class_similarity(weight, backend=setup_backend)

    def batch_betas(self, n: int) -> torch.Tensor:
        """Per-row Dirichlet scale: the batch is cut into ``len(beta)`` contiguous, near-equal parts.

        Shape: -> (n,) float.
        """
        beta = torch.tensor(self.config.beta, dtype=torch.float32, device=self.device)
        idx = torch.arange(n, device=self.device) * len(self.config.beta) // max(n, 1)
        return beta[idx]

    def _make_targets(self, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:
            targets = self.default_targets()
        if targets.dim() == 2:
            if targets.shape[1] != self.num_classes:
                raise ValueError(f"data_impressions: soft targets must be (N, {self.num_classes}), "
                                 f"got {tuple(targets.shape)}")
            return targets.float()
        if targets.dim() != 1:
            raise ValueError(f"data_impressions: targets must be (N,) classes or (N, K) probabilities, "
                             f"got {tuple(targets.shape)}")
        return self.sample_targets(targets.long())

    def sample_targets(self, classes: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """Dirichlet soft targets ``y_n ~ Dir(beta_n * c_{k_n} + 1e-4)`` from this synthesizer's generator.

        ``beta=None`` uses the configured mixture (:meth:`batch_betas`), a number uses that scale for all rows.

        Shape: classes (N,) long -> (N, K) rows on the simplex.
        """
        classes = classes.to(self.device).long()
        betas = self.batch_betas(classes.numel()) if beta is None else float(beta)
        return ops.dirichlet_targets(self.similarity, classes, betas, generator=self.generator)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_target_ce(logits, targets, self.config.temperature, backend=self.backend)


@register("class_impressions")
class ClassImpressions(_ImpressionSynthesizer):
    """Class Impressions (Nayak et al. 2019, beta -> 0 limit of Data Impressions): one-hot targets.

    ``loss="ce"`` minimizes CE(one-hot, softmax(T(x)/tau)); ``loss="logit"`` maximizes the target logit
    (``-mean_n z_{n, y_n}``). ``synthesize(targets)``: (N,) class indices (``None`` -> balanced). Works on
    any classifier (no BatchNorm, no linear layer needed). The result's ``targets`` are (N,) long.

    Shape: images (N, C, H, W) in [0, 1], targets (N,).
    """

    @dataclass
    class Config(_PixelConfig):
        loss: str = "ce"  # "ce" (one-hot CE at tau) or "logit" (logit maximization)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_config()
        if self.config.loss not in ("ce", "logit"):
            raise ValueError(f"class_impressions: loss must be 'ce' or 'logit', got {self.config.loss!r}")

    def _make_targets(self, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:
            return self.default_targets()
        if targets.dim() != 1:
            raise ValueError(f"class_impressions: targets must be (N,) class indices, got {tuple(targets.shape)}")
        return targets.long()

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "logit":
            return -logits.gather(1, targets.view(-1, 1)).float().mean()
        return soft_target_ce(logits, F.one_hot(targets, self.num_classes).float(), self.config.temperature,
                              backend=self.backend)
