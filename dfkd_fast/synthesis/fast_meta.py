"""FastMeta: "Up to 100x Faster Data-free Knowledge Distillation" (FastDFKD; Fang et al., AAAI 2022).

A persistent *meta* generator G_theta learns a common initialization for per-batch synthesis. Per batch:
clone it (theta' <- theta), draw a fresh z, and run ``g_steps`` inner Adam steps on (theta', z)
(lr_g for the generator, lr_z for z, betas (0.5, 0.999)) on

.. math::
    L = bn \\cdot L_{bn}^{mmt}(x) + oh \\cdot \\mathrm{CE}(T(x), y) + adv \\cdot L_{adv}(x),
    \\qquad x = \\mathrm{aug}(G_{\\theta'}(z))

(aug: 4-pixel padded random crop + flip through :func:`dfkd_fast.ops.crop_flip`; L_bn^mmt the l2 BN prior
with the batch statistics blended with their moving averages at rate ``bn_mmt``, SPEC §3.1; L_adv the
decision-adversarial term, off for the first ``warmup`` batches and without a student). Then the meta
update with a persistent Adam of lr = lr_g * g_steps:

- ``meta="fomaml"``: grad_theta = sum over inner steps of dL/dtheta' (first-order MAML);
- ``meta="reptile"``: grad_theta = theta - theta' (the inner displacement).

After each batch the BN moving averages are updated from the last inner step's statistics.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dfkd_fast import ops
from dfkd_fast.hooks import TeacherProbe
from dfkd_fast.synthesis._generator_common import BestTracker, eval_mode, grads_to, make_generator, student_list
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, Synthesizer, register
from dfkd_fast.synthesis.cmi import check_targets, class_loss, global_view
from dfkd_fast.synthesis.losses import adversarial_decision_loss

__all__ = ["FastMeta"]


@register("fast_meta")
class FastMeta(Synthesizer):
    """FastDFKD meta-generator synthesis. Needs BatchNorm layers in the teacher.

    ``g_steps`` is accepted as an alias of ``iterations`` (inner steps per batch).

    Attributes:
        netG: the meta generator; ``meta_optimizer`` its persistent Adam.
    """

    needs_bn = True

    @dataclass
    class Config(SynthesisConfig):
        """FastDFKD hyper-parameters, published CIFAR defaults for 5 inner steps.

        Attributes:
            iterations: inner steps per batch, a.k.a. ``g_steps`` (5; the paper also uses 2 / 10 with
                lr_g 5e-3 / 2e-3 and lr_z 0.015 / 0.01).
            nz, ngf: generator latent size (256) and width (64).
            lr_g: inner generator lr (3e-3); the meta Adam uses lr_g * g_steps. lr_z: latent lr (0.01).
            betas: Adam betas (0.5, 0.999) for inner and meta optimizers.
            bn, oh, adv: loss weights (10, 0.5, 1.0; the paper uses oh 0.4-0.5, adv 1-1.33). T: adv KL temperature.
            bn_mmt: rate of the BN-statistics moving average (0.9; 0 disables the blend).
            warmup: batches without the adversarial term (20, the paper's warm-up epochs at one batch each).
            meta: "fomaml" (first-order MAML) or "reptile".
            padding: crop padding of the augmentation (4).
        """

        iterations: int = 5
        nz: int = 256
        ngf: int = 64
        lr_g: float = 3e-3
        lr_z: float = 0.01
        betas: tuple[float, float] = (0.5, 0.999)
        bn: float = 10.0
        oh: float = 0.5
        adv: float = 1.0
        T: float = 1.0
        bn_mmt: float = 0.9
        warmup: int = 20
        meta: str = "fomaml"
        padding: int = 4

        @property
        def g_steps(self) -> int:
            return self.iterations

    def __init__(self, *args: Any, g_steps: int | None = None, **kwargs: Any) -> None:
        if g_steps is not None:
            if kwargs.get("iterations", g_steps) != g_steps:
                raise ValueError(f"fast_meta: g_steps={g_steps} and iterations={kwargs['iterations']} disagree; "
                                 "give one of them")
            kwargs["iterations"] = g_steps
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"fast_meta: g_steps (iterations) must be >= 1, got {cfg.iterations}")
        if cfg.meta not in ("fomaml", "reptile"):
            raise ValueError(f"fast_meta: meta must be 'fomaml' or 'reptile', got {cfg.meta!r}")
        if not 0.0 <= cfg.bn_mmt < 1.0:
            raise ValueError(f"fast_meta: bn_mmt must be in [0, 1), got {cfg.bn_mmt}")
        if cfg.T <= 0:
            raise ValueError(f"fast_meta: T must be > 0, got {cfg.T}")
        _ = self.students  # validate
        self.netG = make_generator(self.image_size, cfg.nz, cfg.ngf, self.device, self.generator, kind="cmi")
        self.meta_optimizer = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_g * cfg.iterations,
                                               betas=tuple(cfg.betas))
        self._bn_layers = [m for m in self.teacher.modules() if isinstance(m, _BatchNorm)]
        self.momentum_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # multi-process (dfkd_fast.distributed.enable_distributed): meta-gradients are averaged over the group
        self.distributed = False
        self.process_group: Any = None

    @property
    def students(self) -> list[nn.Module]:
        """The student(s) of the adversarial term (``student`` may be set after construction)."""
        return student_list(self.student, self.teacher, self.name)

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        targets = self.default_targets() if targets is None else targets
        targets = check_targets(targets, self.batch_size, self.num_classes, self.name)
        fast = copy.deepcopy(self.netG)
        fast_params = list(fast.parameters())
        z = self.randn(self.batch_size, cfg.nz).requires_grad_()
        opt = torch.optim.Adam([{"params": fast_params}, {"params": [z], "lr": cfg.lr_z}], lr=cfg.lr_g,
                               betas=tuple(cfg.betas))
        meta_grads = [torch.zeros_like(p) for p in fast_params] if cfg.meta == "fomaml" else None
        use_adv = cfg.adv != 0 and bool(self.students) and self.batches_done >= cfg.warmup
        tracker = BestTracker()
        with TeacherProbe(self.teacher, kind="l2", layers=self._bn_layers, backend=self.backend) as probe, \
                eval_mode(self.students):
            for _ in range(cfg.iterations):
                x = fast(z)
                x_aug = global_view(x, self.generator, cfg.padding, self.mean, self.std, self.backend)
                t_out = self.teacher(x_aug).float()
                loss = cfg.bn * self._bn_loss(probe) + cfg.oh * class_loss(t_out, targets, self.backend)
                if use_adv:
                    adv = sum(adversarial_decision_loss(s(x_aug).float(), t_out, cfg.T, backend=self.backend)
                              for s in self.students)
                    loss = loss + cfg.adv * adv / len(self.students)
                tracker.update(loss, x)
                opt.zero_grad(set_to_none=True)
                grads_to(loss, [*fast_params, z])
                if meta_grads is not None:
                    for acc, p in zip(meta_grads, fast_params, strict=False):
                        acc.add_(p.grad)
                opt.step()
            if cfg.bn_mmt > 0:
                self._update_momentum(probe.layer_stats())
        self.meta_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, (p, q) in enumerate(zip(self.netG.parameters(), fast_params, strict=False)):
                p.grad = meta_grads[i] if meta_grads is not None else (p - q).detach()
        if self.distributed:  # one meta generator across ranks: average the meta-gradients before the step
            from dfkd_fast.distributed import all_reduce_mean_

            all_reduce_mean_([p.grad for p in self.netG.parameters()], self.process_group)
        self.meta_optimizer.step()
        images = tracker.best[0].clamp(0, 1)
        return SynthesisResult(images=images, targets=targets.detach(), teacher_logits=self.teacher_logits(images),
                               losses=tracker.losses(), seconds=0.0)

    def _bn_loss(self, probe: TeacherProbe) -> torch.Tensor:
        """l2 BN prior of the last forward, batch stats blended with the moving averages (SPEC §3.1), fused."""
        stats = probe.layer_stats()
        if len(stats) != len(self._bn_layers):
            raise ValueError(f"fast_meta: only {len(stats)} of the teacher's {len(self._bn_layers)} BatchNorm layers "
                             "ran in its forward; every BN layer must be on the forward path")
        mmt = self.momentum_stats if self.config.bn_mmt > 0 else None
        terms = ops.bn_stat_loss_from_stats([m for m, _ in stats], [v for _, v in stats],
                                            [b.running_mean for b in self._bn_layers],
                                            [b.running_var for b in self._bn_layers], kind="l2",
                                            momentum_stats=mmt, momentum=self.config.bn_mmt, backend=self.backend)
        return terms.sum()

    def _update_momentum(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """mu_bar <- beta mu_bar + (1 - beta) mu (the first batch copies), from the last inner step's stats."""
        beta = self.config.bn_mmt
        new = [(m.detach().float().clone(), v.detach().float().clone()) for m, v in stats]
        if self.momentum_stats is None:
            self.momentum_stats = new
        else:
            self.momentum_stats = [(beta * mb + (1 - beta) * m, beta * vb + (1 - beta) * v)
                                   for (mb, vb), (m, v) in zip(self.momentum_stats, new, strict=False)]

    def state_dict(self) -> dict[str, Any]:
        """Base state + meta generator, meta Adam and the BN moving averages."""
        state = super().state_dict()
        state["generator"] = {k: v.detach().clone() for k, v in self.netG.state_dict().items()}
        state["meta_optimizer"] = copy.deepcopy(self.meta_optimizer.state_dict())
        state["momentum_stats"] = (None if self.momentum_stats is None else
                                   [(m.clone(), v.clone()) for m, v in self.momentum_stats])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.netG.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        mmt = state["momentum_stats"]
        self.momentum_stats = None if mmt is None else [(m.to(self.device), v.to(self.device)) for m, v in mmt]
