"""DAFL: Data-Free Learning of student networks (Chen et al., ICCV 2019).

A generator G is trained across ``synthesize`` calls (one Adam step per iteration, fresh z ~ N(0, I)) so that
the teacher T finds its images "real": confident (one-hot), strongly activated, and balanced over classes.

.. math::
    L_G = oh \\cdot \\mathrm{CE}(T(x), \\arg\\max T(x)) - act \\cdot \\operatorname{mean}|f_T(x)|
          - ie \\cdot H_{10}(\\bar p), \\qquad \\bar p = \\tfrac1N \\textstyle\\sum_i \\mathrm{softmax}(T(x_i))

with f_T the teacher's penultimate features (input of its final ``nn.Linear``) and H_10 the entropy in
base 10, as in the published code (so ``ie`` keeps its published scale). Works on teachers without
BatchNorm.

Online schedule (``dfkd-fast distill --online --method dafl``, as in the paper's Algorithm 1): per student
step, one generator step (``iterations`` = 1) and then one student KD step on a *fresh* batch drawn from
the updated generator (:meth:`~dfkd_fast.synthesis.generator_base.PersistentGeneratorSynthesizer.sample`);
no replay pool.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_fast.classifiers import PenultimateTap
from dfkd_fast.synthesis._generator_common import information_entropy
from dfkd_fast.synthesis.base import SynthesisConfig, register
from dfkd_fast.synthesis.generator_base import PersistentGeneratorSynthesizer

__all__ = ["DAFL"]


@register("dafl")
class DAFL(PersistentGeneratorSynthesizer):
    """DAFL generator synthesis; ``synthesize()`` = ``iterations`` generator steps + the last step's batch.

    Args: see :class:`~dfkd_fast.synthesis.base.Synthesizer`; hyper-parameters in :class:`DAFL.Config`.
    """

    @dataclass
    class Config(SynthesisConfig):
        """DAFL hyper-parameters (published CIFAR settings: latent 1000, Adam lr_G 0.02, oh 1, a 0.1, ie 5).

        Attributes:
            iterations: generator updates per ``synthesize`` call (1 = DAFL's one G step per student step).
            nz: latent size. ngf: generator width.
            lr_g: generator Adam learning rate. betas: Adam betas (PyTorch defaults in DAFL).
            oh: weight of the one-hot CE to the teacher's own argmax.
            act: weight of the activation term (mean |penultimate feature|, maximized); 0 disables it.
            ie: weight of the information entropy of the batch-mean prediction (maximized), base-10 log.
        """

        iterations: int = 1
        nz: int = 1000
        ngf: int = 64
        lr_g: float = 0.02
        betas: tuple[float, float] = (0.9, 0.999)
        oh: float = 1.0
        act: float = 0.1
        ie: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.act != 0:
            PenultimateTap(self.teacher, method="dafl").remove()  # raises a clear error when there is no classifier

    def _synthesis_context(self) -> contextlib.AbstractContextManager:
        if self.config.act == 0:
            return contextlib.nullcontext()
        self._penultimate = PenultimateTap(self.teacher, method=self.name)
        return self._penultimate

    def _generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        t_logits = self.teacher_forward(self.normalize(x))
        loss = cfg.oh * F.cross_entropy(t_logits, t_logits.argmax(1))
        if cfg.act != 0:
            loss = loss - cfg.act * self._penultimate.pop().float().abs().mean()
        if cfg.ie != 0:
            entropy10 = information_entropy(F.softmax(t_logits, dim=1)) / math.log(10.0)
            loss = loss - cfg.ie * entropy10
        return loss, t_logits
