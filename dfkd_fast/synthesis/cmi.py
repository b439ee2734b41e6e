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

Online schedule (``dfkd-fast distill --online --method cmi``, as in the authors' ``datafree_kd.py``): each
epoch runs ``ep_steps // kd_steps`` rounds of one synthesized batch (kept in the on-device uint8 pool, every
batch kept) followed by ``kd_steps`` student KD steps on batches sampled uniformly from the whole pool with
on-device augmentation; the ``--warmup`` epochs only synthesize (no adversarial term, no KD).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_fast import comm, ops
from dfkd_fast.augment import sample_crop_boxes, sample_flips, sample_resized_crop_boxes
from dfkd_fast.contrast import MemoryBank, ProjectionHead, cmi_contrastive_loss
from dfkd_fast.synthesis._generator_common import BestTracker, reset_generator
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, register
from dfkd_fast.synthesis.generator_base import GeneratorSynthesizer, set_grads
from dfkd_fast.synthesis.losses import soft_target_ce

__all__ = ["CMI"]


def draw_seed(rng: torch.Generator, device: torch.device) -> int:
    """A 62-bit integer seed drawn from ``rng`` (to seed initializations that use the global RNG)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=rng, device=device).item())


def draw_global_view(n: int, hw: tuple[int, int], rng: torch.Generator, padding: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of the global view: padded-random-crop boxes (n, 4) and flips (n,), drawn on the device."""
    boxes = sample_crop_boxes(n, hw, padding=padding, generator=rng, device=device)
    return boxes, sample_flips(n, generator=rng, device=device)


def draw_local_view(n: int, hw: tuple[int, int], rng: torch.Generator, scale: tuple[float, float],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of the local view: random-resized-crop boxes (n, 4) and flips (n,), drawn on the device."""
    boxes = sample_resized_crop_boxes(n, hw, scale=tuple(scale), generator=rng, device=device)
    return boxes, sample_flips(n, generator=rng, device=device)


def global_view(x: torch.Tensor, rng: torch.Generator, padding: int, mean: torch.Tensor | None,
                std: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Padded random crop (whole-pixel shift up to ``padding``) + flip + the teacher's normalization.

    Shape: x (N, C, H, W) in [0, 1] -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    boxes, flips = draw_global_view(n, (h, w), rng, padding, x.device)
    return ops.crop_flip(x, boxes, flips, (h, w), mean, std, backend=backend)


def local_view(x: torch.Tensor, rng: torch.Generator, scale: tuple[float, float], mean: torch.Tensor | None,
               std: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Random resized crop (area ``scale``, aspect [3/4, 4/3]) + flip + the teacher's normalization.

    Shape: x (N, C, H, W) in [0, 1] -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    boxes, flips = draw_local_view(n, (h, w), rng, scale, x.device)
    return ops.crop_flip(x, boxes, flips, (h, w), mean, std, backend=backend)


class DrawnNegatives:
    """Bank entries drawn before a (compiled) step, in the ``MemoryBank`` interface ``cmi_contrastive_loss``
    reads (``len`` and ``sample``): the step itself draws nothing, so its graph has no RNG and no host read."""

    def __init__(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        self.local, self.global_ = local, global_

    def __len__(self) -> int:
        return self.local.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local[:n], self.global_[:n]


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
class CMI(GeneratorSynthesizer):
    """Contrastive Model Inversion. Needs BatchNorm layers in the teacher.

    Args: see :class:`~dfkd_fast.synthesis.base.Synthesizer`; hyper-parameters in :class:`CMI.Config`.

    Attributes:
        bank: :class:`dfkd_fast.contrast.MemoryBank` of (local, global) instance features of past batches.
        head: the persistent :class:`dfkd_fast.contrast.ProjectionHead`; ``head_optimizer`` its Adam.
    """

    needs_bn = True
    probe_kind = "l2"

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
        self.feature_dim = int(self.probe.feature_dim)
        self.netG = self.new_generator()
        self.bank = MemoryBank(cfg.bank_size, dims=(self.feature_dim, self.feature_dim), device=self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.generator, self.device))
            self.head = ProjectionHead(self.feature_dim, out_dim=cfg.head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr_head, betas=tuple(cfg.betas))

    def _validate_config(self) -> None:
        super()._validate_config()
        cfg = self.config
        if cfg.cr_T <= 0 or cfg.T <= 0:
            raise ValueError(f"cmi: cr_T and T must be > 0, got cr_T={cfg.cr_T}, T={cfg.T}")
        if cfg.bank_size < 1 or cfg.n_neg < 0 or cfg.head_dim < 1:
            raise ValueError(f"cmi: need bank_size >= 1, n_neg >= 0, head_dim >= 1; got {cfg.bank_size}, "
                             f"{cfg.n_neg}, {cfg.head_dim}")
        lo, hi = cfg.local_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"cmi: local_scale must satisfy 0 < lo <= hi <= 1, got {cfg.local_scale}")

    def draw_step(self) -> tuple[torch.Tensor, ...]:
        """Everything random of one step, in the eager order: global-view boxes and flips, local-view boxes and
        flips, then the bank negatives (when the contrastive term is on and the bank is non-empty).

        Returns:
            (boxes_g (N, 4), flips_g (N,), boxes_l (N, 4), flips_l (N,), neg_local (n', D), neg_global (n', D)).
        """
        cfg = self.config
        n, hw = self.batch_size, self.image_size[1:]
        boxes_g, flips_g = draw_global_view(n, hw, self.generator, cfg.padding, self.device)
        boxes_l, flips_l = draw_local_view(n, hw, self.generator, cfg.local_scale, self.device)
        if cfg.cr != 0 and len(self.bank) > 0 and cfg.n_neg > 0:
            neg_l, neg_g = self.bank.sample(cfg.n_neg, generator=self.generator)
        else:
            d = self.feature_dim
            neg_l = neg_g = torch.zeros(0, d, device=self.device, dtype=self.bank.dtype)
        return boxes_g, flips_g, boxes_l, flips_l, neg_l, neg_g

    def _step(self, z: torch.Tensor, targets: torch.Tensor, boxes_g: torch.Tensor, flips_g: torch.Tensor,
              boxes_l: torch.Tensor, flips_l: torch.Tensor, neg_l: torch.Tensor, neg_g: torch.Tensor,
              use_adv: bool) -> tuple[torch.Tensor, ...]:
        """One CMI step: (loss, x, f_local, f_global, gradients of [generator params, z, head params])."""
        cfg = self.config
        hw = self.image_size[1:]
        x = self.generate(self.netG, z)
        x_global = ops.crop_flip(x, boxes_g, flips_g, hw, self.mean, self.std, backend=self.backend)
        x_local = ops.crop_flip(x, boxes_l, flips_l, hw, self.mean, self.std, backend=self.backend)
        t_out = self.teacher_forward(x_global)
        loss = cfg.bn * self.probe.bn_loss() + cfg.oh * class_loss(t_out, targets, self.backend)
        f_global = self.probe.instance_features()
        if use_adv:
            loss = loss + cfg.adv * self.adversarial_loss(x_global, t_out, "decision", cfg.T)
        self.teacher_forward(x_local)
        f_local = self.probe.instance_features()
        if cfg.cr != 0:
            loss = loss + cfg.cr * cmi_contrastive_loss(self.head, f_local, f_global, DrawnNegatives(neg_l, neg_g),
                                                        cfg.n_neg, cfg.cr_T, backend=self.backend)
        self.release_captures()
        grads = torch.autograd.grad(loss, [*self.netG.parameters(), z, *self.head.parameters()], allow_unused=True)
        return loss.detach(), x.detach(), f_local.detach().float(), f_global.detach().float(), grads

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        cfg = self.config
        targets = self.default_targets() if targets is None else targets
        targets = check_targets(targets, self.batch_size, self.num_classes, self.name)
        reset_generator(self.netG, self.generator)
        z = self.randn(self.batch_size, cfg.nz).requires_grad_()
        opt = torch.optim.Adam([{"params": self.netG.parameters()}, {"params": [z]}], lr=cfg.lr_g,
                               betas=tuple(cfg.betas))
        params = [*self.netG.parameters(), z, *self.head.parameters()]
        use_adv = cfg.adv != 0 and self.use_adversarial
        # while the bank holds fewer than n_neg entries the negatives change shape every batch: those batches run
        # the step eagerly instead of recompiling it for each size (compile="off" is eager anyway)
        steady = cfg.cr == 0 or cfg.n_neg == 0 or len(self.bank) >= cfg.n_neg
        step = self.step_function() if steady else self._step
        tracker = BestTracker()
        with self.batch():
            for _ in range(cfg.iterations):
                loss, x, f_local, f_global, grads = step(z, targets, *self.draw_step(), use_adv)
                tracker.update(loss, x, f_local, f_global)
                set_grads(params, grads)
                opt.step()
                self.head_optimizer.step()
        losses = self.finish(tracker)
        best_x, best_local, best_global = tracker.best
        self.bank.add(best_local, best_global)
        images = best_x.clamp(0, 1)
        return SynthesisResult(images=images, targets=targets.detach(), teacher_logits=self.teacher_logits(images),
                               losses=losses, seconds=0.0)

    #: the memory bank is one across ranks (broadcast by ``share_state``)
    shared_state = ("bank",)

    def setup_comm(self, group: Any = None) -> bool:
        """The memory bank all-gathers every rank's (local, global) features of each batch."""
        self.bank.all_gather = True
        self.bank.group = group
        return comm.world_size(group) > 1

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
