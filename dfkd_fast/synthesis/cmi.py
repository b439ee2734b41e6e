"""CMI: Contrastive Model Inversion (Fang et al., IJCAI 2021; SPEC §3.2, §4).

Per batch a freshly initialized generator G (N(0, 0.02) init) and a fresh latent z are optimized jointly
with Adam (lr 1e-3, betas (0.5, 0.999)) for ``iterations`` steps. Each step, x = G(z) gives a global view
(4-pixel padded random crop + flip) and a local view (random resized crop, scale [0.25, 1], + flip), both
through :func:`dfkd_fast.ops.crop_flip` with the teacher's normalization, and

.. math::
    L = bn \\cdot L_{bn}(x_g) + oh \\cdot \\mathrm{CE}(T(x_g), y) + adv \\cdot L_{adv}(x_g)
        + cr \\cdot L_{cr}(h;\\, f(x_l) \\cup B_l,\\; f(x_g) \\cup B_g)

with L_bn the l2 BN-statistics prior over every teacher BN input (:class:`dfkd_fast.hooks.TeacherProbe`),
L_adv the decision-adversarial term -mean[KL(t||s) 1{argmax t = argmax s}] (only with a student), f the
instance features (spatial means of the BN inputs) and L_cr the InfoNCE of
:func:`dfkd_fast.contrast.cmi_contrastive_loss` at temperature ``cr_T`` against ``n_neg`` entries of the
memory bank B. The projection head h persists across batches with its own Adam. The lowest-loss images of
the batch are returned and their (local, global) features pushed into the bank.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast import ops
from dfkd_fast.augment import sample_crop_boxes, sample_flips, sample_resized_crop_boxes
from dfkd_fast.contrast import MemoryBank, ProjectionHead, cmi_contrastive_loss
from dfkd_fast.hooks import TeacherProbe
from dfkd_fast.synthesis._generator_common import (
    BestTracker,
    eval_mode,
    grads_to,
    make_generator,
    reset_generator,
    student_list,
)
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, Synthesizer, register
from dfkd_fast.synthesis.losses import adversarial_decision_loss, soft_target_ce

__all__ = ["CMI"]


def draw_seed(rng: torch.Generator, device: torch.device) -> int:
    """A 62-bit integer seed drawn from ``rng`` (to seed initializations that use the global RNG)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=rng, device=device).item())


def global_view(x: torch.Tensor, rng: torch.Generator, padding: int, mean: torch.Tensor | None,
                std: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Padded random crop (whole-pixel shift up to ``padding``) + flip + the teacher's normalization.

    Shape: x (N, C, H, W) in [0, 1] -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    boxes = sample_crop_boxes(n, (h, w), padding=padding, generator=rng, device=x.device)
    flips = sample_flips(n, generator=rng, device=x.device)
    return ops.crop_flip(x, boxes, flips, (h, w), mean, std, backend=backend)


def local_view(x: torch.Tensor, rng: torch.Generator, scale: tuple[float, float], mean: torch.Tensor | None,
               std: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Random resized crop (area ``scale``, aspect [3/4, 4/3]) + flip + the teacher's normalization.

    Shape: x (N, C, H, W) in [0, 1] -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    boxes = sample_resized_crop_boxes(n, (h, w), scale=tuple(scale), generator=rng, device=x.device)
    flips = sample_flips(n, generator=rng, device=x.device)
    return ops.crop_flip(x, boxes, flips, (h, w), mean, std, backend=backend)


def check_targets(targets: torch.Tensor, batch_size: int, num_classes: int, method: str) -> torch.Tensor:
    """Validate per-batch targets: (batch_size,) class indices or (batch_size, K) soft targets."""
    if targets.shape[0] != batch_size:
        raise ValueError(f"{method}: got {targets.shape[0]} targets for batch_size {batch_size}")
    if targets.dim() == 2:
        if targets.shape[1] != num_classes or not targets.is_floating_point():
            raise ValueError(f"{method}: soft targets must be float ({batch_size}, {num_classes}), got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        return targets.float()
    if targets.dim() != 1 or targets.is_floating_point():
        raise ValueError(f"{method}: targets must be ({batch_size},) class indices or ({batch_size}, "
                         f"{num_classes}) probabilities, got {targets.dtype} {tuple(targets.shape)}")
    return targets.long()


def class_loss(t_logits: torch.Tensor, targets: torch.Tensor, backend: str) -> torch.Tensor:
    """CE to class indices (N,) or to soft targets (N, K). Shape: (N, K) -> scalar."""
    if targets.dim() == 2:
        return soft_target_ce(t_logits, targets.to(t_logits.dtype), temperature=1.0, backend=backend)
    return F.cross_entropy(t_logits, targets)


@register("cmi")
class CMI(Synthesizer):
    """Contrastive Model Inversion. Needs BatchNorm layers in the teacher.

    Args: see :class:`~dfkd_fast.synthesis.base.Synthesizer`; hyper-parameters in :class:`CMI.Config`.

    Attributes:
        bank: :class:`dfkd_fast.contrast.MemoryBank` of (local, global) instance features of past batches.
        head: the persistent :class:`dfkd_fast.contrast.ProjectionHead`; ``head_optimizer`` its Adam.
    """

    needs_bn = True

    @dataclass
    class Config(SynthesisConfig):
        """CMI hyper-parameters, published CIFAR defaults.

        Attributes:
            iterations: generator / z steps per batch (200).
            nz, ngf: generator latent size (256) and width (64).
            lr_g: Adam lr of generator and z (1e-3); betas (0.5, 0.999). lr_head: head Adam lr (= lr_g).
            bn, oh, adv, cr: loss weights (1, 0.5, 0.5, 0.8); cr_T: InfoNCE temperature (0.1).
            T: temperature of the decision-adversarial KL (1).
            bank_size: memory-bank capacity (40960); n_neg: bank entries per step (4096).
            head_dim: projection output size (256).
            padding: global-view crop padding (4); local_scale: local-view area range ([0.25, 1]).
        """

        iterations: int = 200
        nz: int = 256
        ngf: int = 64
        lr_g: float = 1e-3
        lr_head: float = 1e-3
        betas: tuple[float, float] = (0.5, 0.999)
        bn: float = 1.0
        oh: float = 0.5
        adv: float = 0.5
        cr: float = 0.8
        cr_T: float = 0.1
        T: float = 1.0
        bank_size: int = 40960
        n_neg: int = 4096
        head_dim: int = 256
        padding: int = 4
        local_scale: tuple[float, float] = (0.25, 1.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"cmi: iterations must be >= 1, got {cfg.iterations}")
        if cfg.cr_T <= 0 or cfg.T <= 0:
            raise ValueError(f"cmi: cr_T and T must be > 0, got cr_T={cfg.cr_T}, T={cfg.T}")
        if cfg.bank_size < 1 or cfg.n_neg < 0 or cfg.head_dim < 1:
            raise ValueError(f"cmi: need bank_size >= 1, n_neg >= 0, head_dim >= 1; got {cfg.bank_size}, "
                             f"{cfg.n_neg}, {cfg.head_dim}")
        lo, hi = cfg.local_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"cmi: local_scale must satisfy 0 < lo <= hi <= 1, got {cfg.local_scale}")
        _ = self.students  # validate
        probe = TeacherProbe(self.teacher, backend=self.backend)
        self.feature_dim = int(probe.feature_dim)
        probe.remove()
        self.netG = make_generator(self.image_size, cfg.nz, cfg.ngf, self.device, self.generator, kind="cmi")
        self.bank = MemoryBank(cfg.bank_size, dims=(self.feature_dim, self.feature_dim), device=self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.generator, self.device))
            self.head = ProjectionHead(self.feature_dim, out_dim=cfg.head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr_head, betas=tuple(cfg.betas))

    @property
    def students(self) -> list[nn.Module]:
        """The student(s) of the adversarial term (``student`` may be set after construction)."""
        return student_list(self.student, self.teacher, self.name)

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        targets = self.default_targets() if targets is None else targets
        targets = check_targets(targets, self.batch_size, self.num_classes, self.name)
        reset_generator(self.netG, self.generator)
        z = self.randn(self.batch_size, cfg.nz).requires_grad_()
        opt = torch.optim.Adam([{"params": self.netG.parameters()}, {"params": [z]}], lr=cfg.lr_g,
                               betas=tuple(cfg.betas))
        params = [*self.netG.parameters(), z, *self.head.parameters()]
        use_adv = cfg.adv != 0 and bool(self.students)
        tracker = BestTracker()
        with TeacherProbe(self.teacher, kind="l2", backend=self.backend) as probe, eval_mode(self.students):
            for _ in range(cfg.iterations):
                x = self.netG(z)
                x_global = global_view(x, self.generator, cfg.padding, self.mean, self.std, self.backend)
                x_local = local_view(x, self.generator, cfg.local_scale, self.mean, self.std, self.backend)
                t_out = self.teacher(x_global).float()
                loss = cfg.bn * probe.bn_loss() + cfg.oh * class_loss(t_out, targets, self.backend)
                f_global = probe.instance_features()
                if use_adv:
                    adv = sum(adversarial_decision_loss(s(x_global).float(), t_out, cfg.T, backend=self.backend)
                              for s in self.students)
                    loss = loss + cfg.adv * adv / len(self.students)
                self.teacher(x_local)
                f_local = probe.instance_features()
                if cfg.cr != 0:
                    loss = loss + cfg.cr * cmi_contrastive_loss(self.head, f_local, f_global, self.bank, cfg.n_neg,
                                                                cfg.cr_T, backend=self.backend,
                                                                generator=self.generator)
                tracker.update(loss, x, f_local.float(), f_global.float())
                opt.zero_grad(set_to_none=True)
                self.head_optimizer.zero_grad(set_to_none=True)
                grads_to(loss, params)
                opt.step()
                self.head_optimizer.step()
        best_x, best_local, best_global = tracker.best
        self.bank.add(best_local, best_global)
        images = best_x.clamp(0, 1)
        return SynthesisResult(images=images, targets=targets.detach(), teacher_logits=self.teacher_logits(images),
                               losses=tracker.losses(), seconds=0.0)

    def state_dict(self) -> dict[str, Any]:
        """Base state + memory bank, projection head and its Adam (the generator is re-drawn per batch)."""
        state = super().state_dict()
        state["bank"] = self.bank.state_dict()
        state["head"] = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        state["head_optimizer"] = copy.deepcopy(self.head_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["bank"])
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
