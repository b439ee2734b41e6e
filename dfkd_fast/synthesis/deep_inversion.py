"""DeepInversion and Adaptive DeepInversion (ADI): pixels optimized to match the teacher's BN statistics.

Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (CVPR 2020).

Per step, a randomly rolled (jitter) and flipped view of the batch goes through the teacher; the loss is

.. math::
    L = bn \\sum_l w_l (\\|\\sigma^2_l - v_l\\|_2 + \\|\\mu_l - m_l\\|_2) + oh\\, \\mathrm{CE}(T(\\hat x), y)
        + tv\\, \\mathrm{TV}_{l1}(x) + tv\\_l2\\, \\mathrm{TV}_{l2}(x) + l2 \\|x\\|_2
        + adv\\, (1 - \\mathrm{JS}(T(\\hat x), S(\\hat x)))

with :math:`w_0 =` ``first_bn_multiplier`` and the competition term only when a student is given (ADI,
temperature 3, student in eval mode, no gradient to its parameters). The BN term is computed in one fused
pass by :class:`dfkd_fast.hooks.TeacherProbe`. The pixels live in [0, 1] (projected Adam: clamped after
every step), start from the teacher's normalized-space N(0, 1) noise mapped back to pixels (uniform noise
when no mean/std is given), and the batch with the lowest loss is returned (a copy taken before the step
that followed it). The image priors act on the un-augmented pixels in [0, 1].

The loop is :class:`dfkd_fast.synthesis.pixel_base.PixelSynthesizer`'s (no host sync per step); the jitter's
shift and flip are drawn on the device (:func:`dfkd_fast.augment.sample_jitter`: d_y, d_x uniform in
{-m..m}, flip with probability 1/2, one draw each per step, in that order, from the synthesizer's generator)
and applied by an on-device gather (:func:`dfkd_fast.augment.roll_flip`, equal to ``torch.roll`` + flip).
One :class:`~dfkd_fast.hooks.TeacherProbe` is built per synthesizer and capturing only during its batches.
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
    Published CIFAR defaults: Adam lr 0.1, betas (0.5, 0.99), 2000 iterations, bn 10, oh 1, adv 1,
    tv 1e-3, roll jitter up to H/8 pixels + horizontal flip, JS competition at T = 3.

    Shape: images (N, C, H, W) in [0, 1], targets (N,) or (N, K), teacher_logits (N, K).
    """

    needs_bn = True
    keep_best = True

    @dataclass
    class Config(SynthesisConfig):
        iterations: int = 2000  # Adam steps per batch (1000-2000 in the paper; 2000 for CIFAR)
        lr: float = 0.1  # Adam learning rate on the pixels
        betas: tuple[float, float] = (0.5, 0.99)  # Adam betas
        bn: float = 10.0  # weight of the BN-statistics prior (r_feature)
        first_bn_multiplier: float = 10.0  # extra weight of the first BN layer's term
        oh: float = 1.0  # weight of the CE to the targets
        adv: float = 1.0  # weight of ADI's competition term 1 - JS(t, s) (only with a student)
        tv: float = 1e-3  # weight of the TV-l1 prior
        tv_l2: float = 0.0  # weight of the TV-l2 prior
        l2: float = 1e-5  # weight of the L2-norm prior
        jitter: int = -1  # max roll shift in pixels; -1 -> H // 8 (4 px at 32x32)
        flip: bool = True  # random horizontal flip of the jittered view
        temperature: float = 3.0  # temperature of the JS competition term

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"deep_inversion: iterations must be >= 1, got {cfg.iterations}")
        if cfg.lr <= 0:
            raise ValueError(f"deep_inversion: lr must be > 0, got {cfg.lr}")
        if cfg.temperature <= 0:
            raise ValueError(f"deep_inversion: temperature must be > 0, got {cfg.temperature}")
        if cfg.jitter < -1:
            raise ValueError(f"deep_inversion: jitter must be >= 0 pixels (or -1 for H // 8), got {cfg.jitter}")
        if self.student is not None and self.student is self.teacher:
            raise ValueError("deep_inversion: the student must be a different module from the teacher")
        #: one probe for every batch (paused outside them); its hooks go when the synthesizer is collected
        self.probe = self.own_probe(TeacherProbe(self.teacher, kind="l2", first_bn_multiplier=cfg.first_bn_multiplier,
                                                 backend=self.backend))

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
        loss = cfg.bn * self.probe.bn_loss()
        if cfg.oh:
            if targets.dim() == 1:
                loss = loss + cfg.oh * F.cross_entropy(logits.float(), targets)
            else:
                loss = loss + cfg.oh * soft_target_ce(logits, targets, 1.0, backend=self.backend)
        if cfg.tv:
            loss = loss + cfg.tv * tv_loss(x, "l1")
        if cfg.tv_l2:
            loss = loss + cfg.tv_l2 * tv_loss(x, "l2")
        if cfg.l2:
            loss = loss + cfg.l2 * l2_prior(x)
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
            run = self.optimize(self.init_images(y.shape[0]), y, cfg.iterations, cfg.lr, cfg.betas)
        return SynthesisResult(images=run.images, targets=y, teacher_logits=self.teacher_logits(run.images),
                               losses=run.losses, seconds=0.0)
