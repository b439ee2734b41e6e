"""One projected-Adam pixel loop for the methods that optimize the images themselves.

Data Impressions, Class Impressions (Nayak et al. 2019), DeepInversion (Yin et al. 2020) and Impression
Space (Wang et al. 2020) all optimize a batch of pixels ``x`` in [0, 1] directly:

.. math::
    x_{t+1} = \\operatorname{clamp}_{[0, 1]}\\big(\\operatorname{Adam}(x_t, \\nabla_x L(v_t(x_t)))\\big)

where :math:`v_t` is a random view (DeepInversion's roll jitter + flip, Impression Space's crop + flip, or
the identity) and :math:`L` the method's loss. :class:`PixelSynthesizer` owns everything but the loss:

- the Adam optimizer with the method's ``lr`` / ``betas`` (and an optional per-step ``lr`` schedule), the
  clamp to [0, 1] after each step; :meth:`PixelSynthesizer.pixel_lr` turns an lr given in normalized-input units
  into the pixel lr (``lr * mean(std)``), so one default serves teachers with any input normalization;
- the per-step function ``(x, targets, *view) -> (loss, grad)``: view -> teacher forward under
  :meth:`~dfkd_fast.synthesis.base.Synthesizer.autocast` -> loss -> ``torch.autograd.grad`` to the pixels;
  compiled as ONE graph with :meth:`~dfkd_fast.synthesis.base.Synthesizer.compile_step` when
  ``compile != "off"`` (``torch.autograd.grad`` is traced with dynamo's ``trace_autograd_ops``);
- the random view parameters are drawn eagerly on the device from the synthesizer's ``torch.Generator``
  before each step (no host read) and enter the step as tensors;
- losses and the best batch stay on the device (:class:`BestTracker`: the lowest-loss batch, a copy taken
  before the step that followed it, NaN never wins); the losses are read once when the batch ends, and a
  non-finite loss raises a ``ValueError`` naming the method and the first bad step;
- the ops' value checks are collected on the device for the whole batch (:func:`dfkd_fast._checks.deferred`)
  and read once at the end.

So a steady-state optimization step makes no host synchronization; a batch makes at most two (the loss
curve, the deferred checks). A method implements :meth:`PixelSynthesizer.step_loss` (and, if it augments,
:meth:`PixelSynthesizer.sample_view`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_fast import _checks
from dfkd_fast.synthesis._generator_common import BestTracker
from dfkd_fast.synthesis.base import Synthesizer

__all__ = ["PixelRun", "PixelSynthesizer", "BestTracker"]


@dataclass(frozen=True)
class PixelRun:
    """Result of one pixel optimization: ``images`` (N, C, H, W) in [0, 1], detached; ``losses`` per step."""

    images: torch.Tensor
    losses: tuple[float, ...]


class PixelSynthesizer(Synthesizer):
    """Base of the pixel methods: projected Adam on [0, 1] pixels against :meth:`step_loss`.

    Subclasses implement :meth:`step_loss` and may override :meth:`sample_view` (random augmentation
    parameters), :meth:`lr_at` (an lr schedule) and :meth:`batch_context` (state around one batch, e.g. a
    student in eval mode or a probe capturing). ``keep_best = True`` returns the lowest-loss batch
    (DeepInversion) instead of the last one.
    """

    keep_best: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: mean of the per-channel input std (1 without normalization), read once here, never in the loop
        self.input_scale = 1.0 if self.std is None else float(self.std.mean())

    def pixel_lr(self, lr: float, units: str) -> float:
        """The Adam lr on the [0, 1] pixels for ``lr`` given in ``units``.

        ``"pixels"``: ``lr`` as is. ``"normalized"``: ``lr * mean(std)``, so that one Adam step (about ``lr`` per
        element) moves the teacher's normalized input by about ``lr`` whatever the input's scale -- the rule that
        needs no data: the authors of DeepInversion optimize the normalized input itself (lr 0.1 at CIFAR's
        std ~0.2 is a pixel step of ~0.02, not 0.1).
        """
        if units == "pixels":
            return lr
        if units == "normalized":
            return lr * self.input_scale
        raise ValueError(f"{self.name}: lr_units must be 'normalized' or 'pixels', got {units!r}")

    # ----- what a method implements -----
    def step_loss(self, x: torch.Tensor, targets: Any, *view: torch.Tensor) -> torch.Tensor:
        """The method's loss of the pixels ``x`` for one view. Shape: x (N, C, H, W) in [0, 1] -> scalar."""
        raise NotImplementedError

    def sample_view(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Random view parameters of one step, drawn on the device from ``self.generator`` (default: none)."""
        return ()

    def lr_at(self, step: int, total: int, lr: float) -> float:
        """Learning rate of ``step`` of ``total`` (default: constant ``lr``)."""
        return lr

    def batch_context(self) -> contextlib.AbstractContextManager:
        """Context around one batch's optimization (default: the owned probes capture)."""
        return self.probes_capturing()

    # ----- helpers -----
    def teacher_forward(self, inp: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """``model(inp)`` (default: the teacher) under the synthesizer's autocast precision."""
        with self.autocast():
            return (self.teacher if model is None else model)(inp)

    def _step(self, x: torch.Tensor, targets: Any, *view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimization step's loss and gradient to the pixels: (scalar fp32, (N, C, H, W))."""
        loss = self.step_loss(x, targets, *view)
        self.release_captures()
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach().float(), grad

    def step_function(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The per-step function ``(x, targets, *view) -> (loss, grad)``, compiled once when ``compile`` is on."""
        fn = self.__dict__.get("_step_fn")
        if fn is None:
            fn = self._step_fn = self.compile_step(self._step)
        return fn

    def optimize(self, x0: torch.Tensor, targets: Any, iterations: int, lr: float,
                 betas: Sequence[float]) -> PixelRun:
        """Projected Adam from ``x0`` for ``iterations`` steps; no host sync per step.

        Returns the last batch (or the lowest-loss one when ``keep_best``) and the loss per step.

        Raises:
            ValueError: the loss became NaN/Inf (names the method and the first bad step), or an op's
                deferred value check failed.

        Shape: x0 (N, C, H, W) in [0, 1] -> images (N, C, H, W).
        """
        x = x0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr, betas=tuple(betas))
        tracker = BestTracker()
        step = self.step_function()
        with _checks.deferred(check_on_exit=False) as guard, self.batch_context():
            for it in range(iterations):
                lr_t = self.lr_at(it, iterations, lr)
                for g in opt.param_groups:
                    g["lr"] = lr_t
                view = self.sample_view(x)
                loss, grad = step(x, targets, *view)
                if self.keep_best:
                    tracker.update(loss, x)  # a copy of the pixels the loss was computed on (before the step)
                else:
                    tracker.update(loss)
                x.grad = grad
                opt.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
        losses = self.read_losses(tracker, "lower lr or the loss weights")  # the one read of the loss curve
        guard.check()
        images = tracker.best[0] if self.keep_best else x.detach().clone()
        return PixelRun(images=images, losses=losses)
