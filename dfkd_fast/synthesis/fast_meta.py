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

As in the published Fast-Datafree scripts (``--reset_l0 1 --reset_bn 0``), before batch number
``warmup + reset_after`` (counted from 0; the scripts: 120 epochs after the 20 warm-up epochs, one batch per
epoch) the meta generator's first layer (``l1.0``, the latent Linear) is re-initialized once, N(0, 0.02)
weights and zero bias (``reset_l0``), and with ``reset_bn`` its BatchNorm affine parameters N(1, 0.02) / 0.

Online schedule (``dfkd-fast distill --online --method fast_meta``, the authors' ``datafree_kd.py``): each
epoch runs ``ep_steps // kd_steps`` rounds of one synthesized batch (kept in the on-device uint8 pool) and
``kd_steps`` student KD steps on augmented batches sampled from the whole pool. The first ``--warmup`` epochs
only synthesize: no adversarial term and no KD (the driver sets ``warmup`` to those batches, one setting).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from dfkd_fast import comm, ops
from dfkd_fast.synthesis._generator_common import BestTracker
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, register
from dfkd_fast.synthesis.cmi import check_targets, class_loss, draw_global_view
from dfkd_fast.synthesis.generator_base import GeneratorSynthesizer, set_grads

__all__ = ["FastMeta"]


@register("fast_meta")
class FastMeta(GeneratorSynthesizer):
    """FastDFKD meta-generator synthesis. Needs BatchNorm layers in the teacher.

    ``g_steps`` is accepted as an alias of ``iterations`` (inner steps per batch).

    Attributes:
        netG: the meta generator; ``meta_optimizer`` its persistent Adam.
        fast: the per-batch clone theta' (one module, re-loaded from ``netG`` at the start of every batch).
        momentum_stats: the BN moving averages, kept by the persistent ``probe``.
    """

    needs_bn = True
    probe_kind = "l2"

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
            warmup: batches without the adversarial term (20, the paper's warm-up epochs at one batch each;
                online, the driver's warm-up sets it).
            meta: "fomaml" (first-order MAML) or "reptile".
            padding: crop padding of the augmentation (4).
            reset_l0: re-initialize the meta generator's first layer once, before batch ``warmup + reset_after``.
            reset_bn: re-initialize its BatchNorm affine parameters at the same point (published: off).
            reset_after: batches after the warm-up at which the resets happen (120).
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
        reset_l0: bool = True
        reset_bn: bool = False
        reset_after: int = 120

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
        self.netG = self.new_generator()
        self.meta_optimizer = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_g * cfg.iterations,
                                               betas=tuple(cfg.betas))
        self.fast = copy.deepcopy(self.netG)
        self._meta_tensors = [*self.netG.parameters(), *self.netG.buffers()]
        self._fast_tensors = [*self.fast.parameters(), *self.fast.buffers()]
        self._fast_params = list(self.fast.parameters())
        # multi-process (setup_comm): meta-gradients are averaged over the group
        self.distributed = False
        self.process_group: Any = None

    #: the meta generator and its Adam are one model across ranks (broadcast by ``share_state``)
    shared_state = ("generator", "meta_optimizer")

    def setup_comm(self, group: Any = None) -> bool:
        """Average meta-gradients over ``group`` before each meta step; start from rank 0's meta generator."""
        self.distributed = True
        self.process_group = group
        self.share_state(0, group)
        return comm.world_size(group) > 1

    def _validate_config(self) -> None:
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"fast_meta: g_steps (iterations) must be >= 1, got {cfg.iterations}")
        if cfg.meta not in ("fomaml", "reptile"):
            raise ValueError(f"fast_meta: meta must be 'fomaml' or 'reptile', got {cfg.meta!r}")
        if not 0.0 <= cfg.bn_mmt < 1.0:
            raise ValueError(f"fast_meta: bn_mmt must be in [0, 1), got {cfg.bn_mmt}")
        if cfg.T <= 0:
            raise ValueError(f"fast_meta: T must be > 0, got {cfg.T}")
        if cfg.warmup < 0 or cfg.reset_after < 0:
            raise ValueError(f"fast_meta: warmup and reset_after must be >= 0, got {cfg.warmup}, {cfg.reset_after}")

    def reset_layers(self) -> None:
        """The published ``reset_l0`` / ``reset_bn`` of the meta generator: first layer (``l1.0``) weight
        ~ N(0, 0.02), bias 0; with ``reset_bn`` every BatchNorm weight ~ N(1, 0.02), bias 0. Drawn from a
        generator seeded by (``seed``, ``batches_done``), so every rank of a multi-process run draws the same
        values and the meta generator stays one model; the meta Adam's state is kept (as in the published code)."""
        cfg = self.config
        rng = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.batches_done)
        with torch.no_grad():
            if cfg.reset_l0:
                first = self.netG.l1[0]
                torch.nn.init.normal_(first.weight, 0.0, 0.02, generator=rng)
                if first.bias is not None:
                    first.bias.zero_()
            if cfg.reset_bn:
                for m in self.netG.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                        torch.nn.init.normal_(m.weight, 1.0, 0.02, generator=rng)
                        m.bias.zero_()

    @property
    def probe_momentum(self) -> float:
        return self.config.bn_mmt

    def _step(self, z: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
              use_adv: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """One inner step on (theta', z): (loss, x, gradients of [theta' params, z])."""
        cfg = self.config
        x = self.generate(self.fast, z)
        x_aug = ops.crop_flip(x, boxes, flips, self.image_size[1:], self.mean, self.std, backend=self.backend)
        t_out = self.teacher_forward(x_aug)
        loss = cfg.bn * self.probe.bn_loss() + cfg.oh * class_loss(t_out, targets, self.backend)
        if use_adv:
            loss = loss + cfg.adv * self.adversarial_loss(x_aug, t_out, "decision", cfg.T)
        self.release_captures()
        grads = torch.autograd.grad(loss, [*self._fast_params, z], allow_unused=True)
        return loss.detach(), x.detach(), grads

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        targets = self.default_targets() if targets is None else targets
        targets = check_targets(targets, self.batch_size, self.num_classes, self.name)
        if (cfg.reset_l0 or cfg.reset_bn) and self.batches_done == cfg.warmup + cfg.reset_after:
            self.reset_layers()
        with torch.no_grad():  # theta' <- theta (parameters and generator BN buffers)
            torch._foreach_copy_(self._fast_tensors, self._meta_tensors)
        fast_params = self._fast_params
        z = self.randn(self.batch_size, cfg.nz).requires_grad_()
        opt = torch.optim.Adam([{"params": fast_params}, {"params": [z], "lr": cfg.lr_z}], lr=cfg.lr_g,
                               betas=tuple(cfg.betas))
        inner = [*fast_params, z]
        n_fast = len(fast_params)
        meta_grads = None
        use_adv = cfg.adv != 0 and self.use_adversarial and self.batches_done >= cfg.warmup
        step = self.step_function()
        tracker = BestTracker()
        with self.batch():
            for _ in range(cfg.iterations):
                boxes, flips = draw_global_view(self.batch_size, self.image_size[1:], self.generator, cfg.padding,
                                                self.device)
                loss, x, grads = step(z, targets, boxes, flips, use_adv)
                tracker.update(loss, x)
                set_grads(inner, grads)
                if cfg.meta == "fomaml":  # first-order MAML: sum of the inner gradients, one foreach per step
                    g = [p.grad for p in fast_params]
                    if meta_grads is None:
                        meta_grads = torch._foreach_add(g, 0.0)
                    else:
                        torch._foreach_add_(meta_grads, g)
                opt.step()
            self._check_bn_path()
            if cfg.bn_mmt > 0:
                self.probe.update_momentum()  # from the last inner step's statistics
        losses = self.finish(tracker)
        self.meta_optimizer.zero_grad(set_to_none=True)
        meta_params = self._meta_tensors[:n_fast]
        with torch.no_grad():  # reptile: theta - theta'
            new = meta_grads if meta_grads is not None else torch._foreach_sub(meta_params, fast_params)
        set_grads(meta_params, new)
        if self.distributed:  # one meta generator across ranks: average the meta-gradients before the step
            comm.all_reduce_mean_([p.grad for p in self.netG.parameters()], self.process_group)
        self.meta_optimizer.step()
        images = tracker.best[0].clamp(0, 1)
        return SynthesisResult(images=images, targets=targets.detach(), teacher_logits=self.teacher_logits(images),
                               losses=losses, seconds=0.0)

    def _check_bn_path(self) -> None:
        """Every BN layer must run in the teacher's forward (each has a moving average); checked once per batch."""
        ran = len(self.probe.layer_stats())
        if ran != len(self.probe.layers):
            raise ValueError(f"fast_meta: only {ran} of the teacher's {len(self.probe.layers)} BatchNorm layers ran "
                             "in its forward; every BN layer must be on the forward path")

    def state_dict(self) -> dict[str, Any]:
        """Base state + meta generator, meta Adam and the BN moving averages."""
        state = super().state_dict()
        state["generator"] = {k: v.detach().clone() for k, v in self.netG.state_dict().items()}
        state["meta_optimizer"] = copy.deepcopy(self.meta_optimizer.state_dict())
        mmt = self.momentum_stats
        state["momentum_stats"] = None if mmt is None else [(m.clone(), v.clone()) for m, v in mmt]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.netG.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self._load_momentum_stats(state["momentum_stats"])
