"""DFQ: Data-Free network Quantization with adversarial KD (Choi et al., CVPR Workshops 2020).

A generator trained across ``synthesize`` calls (fresh z ~ N(0, I) per step) minimizes

.. math::
    L_G = bn \\sum_{l,c} \\mathrm{KL}\\big(\\mathcal N(\\mu_{l,c}, \\sigma^2_{l,c})
          \\,\\|\\, \\mathcal N(m_{l,c}, v_{l,c})\\big)
          + oh \\cdot \\tfrac1N \\textstyle\\sum_i H(p_i) - ie \\cdot H(\\bar p)
          - adv \\cdot \\tfrac1S \\textstyle\\sum_{s=1}^{S} \\mathrm{KL}(t \\| s)\\,T^2

(batch statistics of every teacher BN input against its running statistics, ``kind="kl"`` of
:func:`dfkd_fast.ops.bn_stat_loss`; per-sample entropy small = confident, entropy of the batch-mean
prediction large = balanced; adversarial to the student ensemble S when ``student`` is a module or an
``nn.ModuleList``). Needs BatchNorm layers in the teacher.

Online schedule (``dfkd-fast distill --online --method dfq``): per iteration one generator step on the loss
above (adversarial over the student(s) being distilled), then one student KD step on a *fresh* batch drawn
from the updated generator; no replay pool. The online ``--warmup`` epochs leave the adversarial term out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd_fast.synthesis._generator_common import information_entropy, mean_entropy
from dfkd_fast.synthesis.base import SynthesisConfig, register
from dfkd_fast.synthesis.generator_base import PersistentGeneratorSynthesizer

__all__ = ["DFQ"]


@register("dfq")
class DFQ(PersistentGeneratorSynthesizer):
    """DFQ generator synthesis (BN-KL prior + entropy terms + ensemble adversarial term)."""

    needs_bn = True
    probe_kind = "kl"  # the persistent TeacherProbe matches BN statistics with the Gaussian KL

    @dataclass
    class Config(SynthesisConfig):
        """DFQ hyper-parameters (the paper's loss is an unweighted sum: bn = oh = ie = adv = 1).

        Attributes:
            iterations: generator updates per ``synthesize`` call.
            nz, ngf: generator latent size and width. lr_g, betas: generator Adam.
            bn: weight of the BN-statistics KL. oh: weight of the mean per-sample entropy (minimized).
            ie: weight of the entropy of the batch-mean prediction (maximized).
            adv: weight of the adversarial KL to the student(s) (maximized; only with a student).
            T: temperature of the adversarial KL.
        """

        iterations: int = 1
        nz: int = 256
        ngf: int = 64
        lr_g: float = 1e-3
        betas: tuple[float, float] = (0.5, 0.999)
        bn: float = 1.0
        oh: float = 1.0
        ie: float = 1.0
        adv: float = 1.0
        T: float = 1.0

    def _generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        xn = self.normalize(x)
        t_logits = self.teacher_forward(xn)
        loss = cfg.bn * self.probe.bn_loss()
        if cfg.oh != 0:
            loss = loss + cfg.oh * mean_entropy(t_logits)
        if cfg.ie != 0:
            loss = loss - cfg.ie * information_entropy(F.softmax(t_logits, dim=1))
        if cfg.adv != 0 and self.use_adversarial:
            loss = loss + cfg.adv * self.adversarial_loss(xn, t_logits, "kl", cfg.T)
        return loss, t_logits
