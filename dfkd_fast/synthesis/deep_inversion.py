"""DeepInversion and Adaptive DeepInversion (ADI): pixels optimized to match the teacher's BN statistics.

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (CVPR 2020).

Per step, a randomly rolled (jitter) and optionally flipped view of the batch is normalized,
:math:`\\hat x = \\mathrm{normalize}(\\mathrm{view}(x))`, and goes through the teacher; the loss is

.. math::
    L = bn\\, s \\sum_l w_l (\\|\\sigma^2_l - v_l\\|_2 + \\|\\mu_l - m_l\\|_2) + oh\\, \\mathrm{CE}(T(\\hat x), y)
        + tv\\, \\mathrm{TV}_{l1}(\\hat x) + tv\\_l2\\, \\mathrm{TV}_{l2}(\\hat x) + l2 \\|\\hat x\\|_2
        + adv\\, (1 - \\mathrm{JS}(T(\\hat x), S(\\hat x)))

with :math:`w_0 =` ``first_bn_multiplier``, :math:`w_{l>0} = 1`, :math:`s = \\mathrm{CE}(T(x_0), y) /
L_{bn}(x_0)` on the batch's starting noise :math:`x_0` when ``balance`` (else 1), and the competition term only
when a student is given (ADI, temperature 3, student in eval mode, no gradient to its parameters). The BN term is
computed in one fused pass by :class:`dfkd_fast.hooks.TeacherProbe`. As in the authors' code, the image priors
act on the normalized, jittered input the teacher sees (TV-l1: mean absolute neighbour difference; TV-l2 and l2:
un-squared norms over the batch), so their weights mean the same at any input scale.

Recipe (the authors' CIFAR-10 script, not their ImageNet one): every BN layer weighted equally
(``first_bn_multiplier`` 1; their ImageNet code uses 10), no l2 prior, no flip (digits and text are not mirror
symmetric; their CIFAR script only rolls). The pixel lr is given in normalized-input units (``lr_units``): the
authors optimize the normalized input itself, so lr 0.1 moves it by ~0.1 per Adam step; on [0, 1] pixels the
same step is ``lr * mean(std)`` (the rule needs no data: it follows the teacher's normalization).

Balance (``balance``, on by default): a fixed ``bn`` does not hold across teachers -- on the starting noise the BN
term is 2-7x the class term on small digit CNNs, and with an absolute bn 10 it swamps the class term there (the
teacher then agrees with the targets on only 45-60% of a batch). So ``bn`` weighs the BN term relative to the class
term at the start of each batch: :math:`s` is measured once per batch on the device (no host read) and stays
fixed over the batch. Measured (400 images, 200 steps, seed 0; a plain CNN student distilled 60 epochs at T 4;
teacher agreement with the targets / student accuracy on the real test split): BN CNN with global pooling on
16x16 digits: previous defaults 0.61 / 52.4%, bn 1: 1.00 / 37.3%, bn 10: 0.98 / 54.0%; LeNet-5-BN on MNIST-5k:
previous defaults 0.50 / 74.1%, bn 1: 0.98 / 41.0%, bn 10: 0.98 / 56.1% (KD on 200 real images: 75.8%, 82.5%).
With ``first_bn_multiplier`` 10 and an absolute bn 10 the students reached 68.8% and 67.0% (agreement 0.97 and
0.61): on these one-channel teachers the first layer's statistics matter more than the CIFAR recipe weighs them.
``balance=False`` restores the authors' absolute weight.

The pixels live in [0, 1] (projected Adam: clamped after every step), start from the teacher's
normalized-space N(0, 1) noise mapped back to pixels (uniform noise when no mean/std is given), and the batch
with the lowest loss is returned (a copy taken before the step that followed it).

The loop is :class:`dfkd_fast.synthesis.pixel_base.PixelSynthesizer`'s (no host sync per step); the jitter's
shift and flip are drawn on the device (:func:`dfkd_fast.augment.sample_jitter`: d_y, d_x uniform in
{-m..m}, flip with probability 1/2 when ``flip``, one draw each per step, in that order, from the synthesizer's
generator) and applied by an on-device gather (:func:`dfkd_fast.augment.roll_flip`, equal to ``torch.roll`` +
flip). One :class:`~dfkd_fast.hooks.TeacherProbe` is built per synthesizer and capturing only during its batches.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_fast import _checks
from dfkd_fast.augment import roll_flip, sample_jitter
from dfkd_fast.hooks import TeacherProbe
from dfkd_fast.synthesis._generator_common import eval_mode
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, register
from dfkd_fast.synthesis.losses import competition_loss, l2_prior, soft_target_ce, tv_loss
from dfkd_fast.synthesis.pixel_base import PixelSynthesizer

__all__ = ["DeepInversion"]


@register("deep_inversion")
class DeepInversion(PixelSynthesizer):
    """DeepInversion (+ADI when ``student`` is given); needs a teacher with BatchNorm.

    ``synthesize(targets)``: (N,) class indices (``None`` -> balanced) or (N, K) soft targets (CE at T=1).
    Defaults (the authors' CIFAR recipe plus the balance rule, see the module docstring): Adam lr 0.1 in
    normalized-input units, betas (0.5, 0.99), 2000 iterations, bn 10 relative to the class term at the start
    with every BN layer weighted 1, oh 1, adv 1, TV-l1 1e-3 on the normalized view, no l2, roll jitter up to H/8
    pixels without flip, JS competition at T = 3.

    Shape: images (N, C, H, W) in [0, 1], targets (N,) or (N, K), teacher_logits (N, K).
    """

    needs_bn = True
    keep_best = True

    @dataclass
    class Config(SynthesisConfig):
        iterations: int = 2000  # Adam steps per batch (1000-2000 in the paper; 2000 for CIFAR)
        lr: float = 0.1  # Adam learning rate, in ``lr_units``
        lr_units: str = "normalized"  # "normalized": lr in normalized-input units (pixel lr = lr * mean(std)); "pixels"
        betas: tuple[float, float] = (0.5, 0.99)  # Adam betas
        bn: float = 10.0  # weight of the BN-statistics prior (r_feature), relative to the class term when balance
        balance: bool = True  # weigh the BN term by CE(x0) / L_bn(x0), measured on each batch's starting noise
        first_bn_multiplier: float = 1.0  # weight of the first BN layer's term (10 only in the authors' ImageNet code)
        oh: float = 1.0  # weight of the CE to the targets
        adv: float = 1.0  # weight of ADI's competition term 1 - JS(t, s) (only with a student)
        tv: float = 1e-3  # weight of the TV-l1 prior
        tv_l2: float = 0.0  # weight of the TV-l2 prior
        l2: float = 0.0  # weight of the L2-norm prior (0 in the authors' CIFAR recipe; 1e-5 in their ImageNet code)
        jitter: int = -1  # max roll shift in pixels; -1 -> H // 8 (4 px at 32x32)
        flip: bool = False  # random horizontal flip of the jittered view (the authors' ImageNet code; not CIFAR)
        temperature: float = 3.0  # temperature of the JS competition term

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"deep_inversion: iterations must be >= 1, got {cfg.iterations}")
        if cfg.lr <= 0:
            raise ValueError(f"deep_inversion: lr must be > 0, got {cfg.lr}")
        if cfg.lr_units not in ("normalized", "pixels"):
            raise ValueError(f"deep_inversion: lr_units must be 'normalized' or 'pixels', got {cfg.lr_units!r}")
        if cfg.temperature <= 0:
            raise ValueError(f"deep_inversion: temperature must be > 0, got {cfg.temperature}")
        if cfg.jitter < -1:
            raise ValueError(f"deep_inversion: jitter must be >= 0 pixels (or -1 for H // 8), got {cfg.jitter}")
        if self.student is not None and self.student is self.teacher:
            raise ValueError("deep_inversion: the student must be a different module from the teacher")
        #: one probe for every batch (paused outside them); its hooks go when the synthesizer is collected
        self.probe = self.own_probe(TeacherProbe(self.teacher, kind="l2", first_bn_multiplier=cfg.first_bn_multiplier,
                                                 backend=self.backend))
        #: () fp32 factor on the BN term (1, or CE(x0) / L_bn(x0) of the current batch when ``balance``); updated in
        #: place on the device, so the compiled step reads it as the same input tensor every batch
        self.bn_scale = torch.ones((), device=self.device)

    @property
    def max_shift(self) -> int:
        """Roll-jitter range in pixels (``jitter``, or H // 8 when ``jitter == -1``)."""
        return self.image_size[1] // 8 if self.config.jitter == -1 else self.config.jitter

    def init_images(self, n: int) -> torch.Tensor:
        """Starting noise in pixel space [0, 1]. Shape: -> (n, C, H, W)."""
        if self.std is None and self.mean is None:
            return self.rand(n, *self.image_size)
        return self.denormalize(self.randn(n, *self.image_size)).clamp_(0.0, 1.0)

    def _targets(self, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:
            return self.default_targets()
        if targets.dim() == 2 and targets.shape[1] == self.num_classes:
            return targets.float()
        if targets.dim() == 1:
            return targets.long()
        raise ValueError(f"deep_inversion: targets must be (N,) classes or (N, {self.num_classes}) probabilities, "
                         f"got {tuple(targets.shape)}")

    def _class_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE to the targets: (N,) classes or (N, K) probabilities (at T = 1). Shape: (N, K) -> scalar."""
        if targets.dim() == 1:
            return F.cross_entropy(logits.float(), targets)
        return soft_target_ce(logits, targets, 1.0, backend=self.backend)

    def balance_bn(self, x0: torch.Tensor, targets: torch.Tensor) -> None:
        """Set :attr:`bn_scale` to ``CE(T(x0), y) / L_bn(x0)`` on the device (no host read), or 1 without ``balance``.

        With it, ``bn`` is the BN term's weight relative to the class term on the batch's starting noise, whatever
        the teacher's depth, width or confidence on noise (the rule needs no data). Shape: x0 (N, C, H, W).
        """
        if not (self.config.balance and self.config.bn):
            self.bn_scale.fill_(1.0)
            return
        with torch.no_grad(), self.batch_context():
            logits = self.teacher_forward(self.normalize(x0))
            ratio = self._class_loss(logits, targets).float() / self.probe.bn_loss().float().clamp_min(1e-6)
            self.release_captures()
        self.bn_scale.copy_(ratio)

    def sample_view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's jitter: shift (2,) int64 (d_y, d_x) and flip () bool, on the device."""
        return sample_jitter(self.max_shift, p_flip=0.5 if self.config.flip else 0.0, generator=self.generator,
                             device=x.device)

    def step_loss(self, x: torch.Tensor, targets: torch.Tensor, shift: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
        """The DeepInversion objective of the pixel batch ``x`` for one jitter/flip view.

        Shape: x (N, C, H, W) in [0, 1], targets (N,) or (N, K), shift (2,), flip () -> scalar.
        """
        cfg = self.config
        inp = self.normalize(roll_flip(x, shift, flip))
        logits = self.teacher_forward(inp)
        loss = cfg.bn * self.bn_scale * self.probe.bn_loss()
        if cfg.oh:
            loss = loss + cfg.oh * self._class_loss(logits, targets)
        if cfg.tv:  # the priors act on the normalized, jittered view, as in the authors' code
            loss = loss + cfg.tv * tv_loss(inp, "l1")
        if cfg.tv_l2:
            loss = loss + cfg.tv_l2 * tv_loss(inp, "l2")
        if cfg.l2:
            loss = loss + cfg.l2 * l2_prior(inp)
        if self.student is not None and cfg.adv:
            s_logits = self.teacher_forward(inp, self.student)  # not hooked: the probe sees the teacher's BN only
            loss = loss + cfg.adv * competition_loss(logits, s_logits, cfg.temperature)
        return loss

    @contextlib.contextmanager
    def batch_context(self) -> Iterator[None]:
        """The probe captures and the student (ADI) is in eval mode during the batch; both restored after."""
        with eval_mode([self.student] if self.student is not None else []), self.probes_capturing():
            yield

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        with _checks.deferred():
            y = self._targets(targets)
            x0 = self.init_images(y.shape[0])
            self.balance_bn(x0, y)
            run = self.optimize(x0, y, cfg.iterations, self.pixel_lr(cfg.lr, cfg.lr_units), cfg.betas)
        return SynthesisResult(images=run.images, targets=y, teacher_logits=self.teacher_logits(run.images),
                               losses=run.losses, seconds=0.0)
