"""One base for the generator methods (DAFL, ZSKT, DFQ, CMI, FastMeta).

:class:`GeneratorSynthesizer` owns what the five methods share:

- generator construction (:meth:`~GeneratorSynthesizer.new_generator`, DCGAN init from the synthesizer's
  ``torch.Generator``), the student list (:attr:`~GeneratorSynthesizer.students`) and its eval mode per batch;
- the adversarial term (:meth:`~GeneratorSynthesizer.adversarial_loss`): ``-KL(t||s)`` (ZSKT, DFQ) or the
  decision-adversarial ``-mean[KL 1{agree}]`` (CMI, FastMeta), averaged over the student ensemble;
- one persistent :class:`dfkd_fast.hooks.TeacherProbe` (BN methods), built once and paused between batches, that
  also keeps FastDFKD's BN moving averages (``probe.update_momentum()``);
- the per-batch :func:`dfkd_fast._checks.deferred` block (op value checks become device flags, read once), the
  loss curve and the best batch kept on the device (:class:`BestTracker`), read once when the batch ends, and a
  clear ``ValueError`` naming the method, the batch and the step when the loss became NaN/Inf;
- the per-step function: loss + ``torch.autograd.grad`` to the trained tensors in one function, compiled with
  :meth:`~dfkd_fast.synthesis.base.Synthesizer.compile_step` when ``compile != "off"``. Everything random
  (latents, crop boxes, flips, bank draws) is drawn *before* the step from the synthesizer's ``torch.Generator``
  (so the compiled graph is pure and the random stream is the eager one); the optimizer step runs after it.

Nothing in a step reads a device value on the host: 0 host syncs per optimization step; per batch, one read of
the loss curve and one of the deferred check flags.

:class:`PersistentGeneratorSynthesizer` is the DAFL / ZSKT / DFQ flavour: one generator trained across
``synthesize`` calls with a persistent Adam.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_fast import _checks, ops
from dfkd_fast.hooks import TeacherProbe
from dfkd_fast.synthesis._generator_common import BestTracker, eval_mode, make_generator, student_list
from dfkd_fast.synthesis.base import SynthesisResult, Synthesizer
from dfkd_fast.synthesis.losses import adversarial_decision_loss

__all__ = ["GeneratorSynthesizer", "PersistentGeneratorSynthesizer", "set_grads"]


def set_grads(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``t.grad = g`` for each pair (``None`` -> zeros): hands a step's gradients to an optimizer."""
    for t, g in zip(tensors, grads, strict=True):
        t.grad = torch.zeros_like(t) if g is None else g


class GeneratorSynthesizer(Synthesizer):
    """Base of the generator methods. Subclasses set :attr:`generator_kind` / :attr:`probe_kind` and implement
    ``_synthesize`` with :meth:`batch`, :meth:`step_function` and :meth:`finish`.

    Class attributes:
        generator_kind: ``"cmi"`` (``models.Generator``, CMI / FastDFKD) or ``"dcgan"`` (DAFL / ZSKT / DFQ).
        probe_kind: ``None`` (no BN prior) or the ``kind`` of the persistent :class:`TeacherProbe` (``"l2"``,
            ``"kl"``).

    Attributes:
        probe: the persistent :class:`TeacherProbe` (None without ``probe_kind``); captures only inside
            :meth:`batch`, so other forwards of the teacher (KD, evaluation) cost nothing.
    """

    generator_kind: ClassVar[str] = "cmi"
    probe_kind: ClassVar[str | None] = None
    #: how online distillation (:func:`dfkd_fast.tasks.distill.distill_online`) drives the method: ``"pool"``
    #: (every batch joins a replay pool the student samples; CMI, FastDFKD) or ``"fresh"`` (every student step
    #: draws a fresh batch from the current generator; DAFL, ZSKT, DFQ).
    online_schedule: ClassVar[str] = "pool"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: set by the online driver during its warm-up: the adversarial term is left out of every loss
        self.adversarial_paused = False
        self._validate_config()
        _ = self.students  # validate
        self.probe: TeacherProbe | None = None
        if self.probe_kind is not None:
            self.probe = self.own_probe(TeacherProbe(self.teacher, kind=self.probe_kind, momentum=self.probe_momentum,
                                                     backend=self.backend))
        self._step_fn: Callable[..., Any] | None = None

    # ----- configuration -----
    def _validate_config(self) -> None:
        """Check the method's hyper-parameters (before anything is built); raises ``ValueError``."""
        if self.config.iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {self.config.iterations}")

    @property
    def probe_momentum(self) -> float:
        """Rate of the probe's FastDFKD moving averages (0: no blend)."""
        return 0.0

    @property
    def use_adversarial(self) -> bool:
        """Whether the adversarial term is on: a student is set and the online warm-up is over."""
        return not self.adversarial_paused and bool(self.students)

    @property
    def students(self) -> list[nn.Module]:
        """The student(s) of the adversarial term (``student`` may be set after construction)."""
        return student_list(self.student, self.teacher, self.name)

    def new_generator(self) -> nn.Module:
        """A DCGAN-initialized generator of kind :attr:`generator_kind` (config ``nz``, ``ngf``), in train mode."""
        cfg = self.config
        return make_generator(self.image_size, cfg.nz, cfg.ngf, self.device, self.generator, kind=self.generator_kind)

    # ----- pieces of a step -----
    def generate(self, net: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """``net(z)`` under the ``precision`` autocast, returned in fp32. Shape: (N, nz) -> (N, C, H, W)."""
        with self.autocast():
            x = net(z)
        return x.float()

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (fp32) of already-normalized images, forward under the ``precision`` autocast."""
        with self.autocast():
            out = self.teacher(x)
        return out.float()

    def adversarial_loss(self, x: torch.Tensor, t_logits: torch.Tensor, kind: str = "kl",
                         temperature: float = 1.0) -> torch.Tensor:
        """The generator's adversarial term against the student(s), averaged over the ensemble S.

        .. math::
            \\text{kl}: -\\tfrac1{|S|}\\textstyle\\sum_s \\mathrm{KL}(t\\|s)\\,T^2 \\quad(\\text{ZSKT, DFQ}),\\qquad
            \\text{decision}: -\\tfrac1{|S|}\\sum_s \\tfrac1N\\sum_i \\mathrm{KL}_i(t\\|s)\\,T^2\\,
            \\mathbb 1[\\arg\\max t_i = \\arg\\max s_i] \\quad(\\text{CMI, FastMeta})

        Args:
            x: the (normalized) images the teacher saw; t_logits: its fp32 logits (N, K).
            kind: ``"kl"`` or ``"decision"``. temperature: T.

        Raises:
            ValueError: no student, or an unknown ``kind``.
        """
        students = self.students
        if not students:
            raise ValueError(f"{self.name}: the adversarial term needs a student; pass student=... or set adv=0")
        if kind not in ("kl", "decision"):
            raise ValueError(f"{self.name}: adversarial kind must be 'kl' or 'decision', got {kind!r}")
        total = None
        for s in students:
            with self.autocast():
                s_logits = s(x)
            s_logits = s_logits.float()
            if kind == "decision":
                term = adversarial_decision_loss(s_logits, t_logits, temperature, backend=self.backend)
            else:
                term = -ops.kd_kl_div(s_logits, t_logits, temperature, backend=self.backend)
            total = term if total is None else total + term
        return total / len(students)

    # ----- per batch -----
    def _synthesis_context(self) -> contextlib.AbstractContextManager:
        """Extra context around one batch (e.g. DAFL's penultimate-feature hook); none by default."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Context of one batch: op value checks deferred to its end (one read), students in eval mode, the
        probe capturing, the method's extra context."""
        with _checks.deferred(), eval_mode(self.students), self.probes_capturing(), self._synthesis_context():
            yield

    def step_function(self) -> Callable[..., Any]:
        """The method's ``_step`` (loss + gradients of one optimization step), compiled once per synthesizer
        with :meth:`compile_step` when ``compile != "off"``.

        Under ``"reduce-overhead"`` (CUDA graphs) a replay overwrites the previous outputs, which the loss curve,
        the best batch and the optimizers still hold: each call marks a new step and returns copies.
        """
        if self._step_fn is None:
            self._step_fn = self.compile_step(self._step)
        return self._step_fn

    def _step(self, *args: Any) -> Any:
        raise NotImplementedError

    def finish(self, tracker: BestTracker) -> tuple[float, ...]:
        """The batch's loss curve, read once; raises ``ValueError`` naming the step where it became NaN/Inf."""
        return self.read_losses(tracker, "lower the learning rates (lr_g / lr_z) or the loss weights, or check the "
                                "teacher and its input normalization (mean / std)")

    # ----- FastDFKD moving averages (kept by the probe) -----
    @property
    def momentum_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The probe's BN moving averages per layer (None before the first update or without a probe)."""
        if self.probe is None:
            return None
        stats = self.probe.momentum_stats
        return None if any(s is None for s in stats) else list(stats)

    def _load_momentum_stats(self, stats: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        if self.probe is not None:
            self.probe.set_momentum_stats(None if stats is None else
                                          [(m.to(self.device), v.to(self.device)) for m, v in stats])


class PersistentGeneratorSynthesizer(GeneratorSynthesizer):
    """Base of DAFL, ZSKT and DFQ: one generator trained across ``synthesize`` calls with Adam.

    Each call runs ``iterations`` generator updates, each on a fresh latent batch z ~ N(0, I), and returns
    the images of the last update (the batch the reported loss was computed on) with the teacher's
    logits and argmax labels as targets. Subclasses implement :meth:`_generator_loss`; the Config must
    have ``nz``, ``ngf``, ``lr_g`` and ``betas``; an optional ``clip`` > 0 clips the generator's gradient
    norm before each Adam step (ZSKT).

    Online (:attr:`online_schedule` ``"fresh"``): the student never replays old batches; each student step
    trains on :meth:`sample` (a fresh z through the current generator), and the generator takes one
    ``synthesize`` call every ``n_s`` student steps (``Config.n_s``, 1 when absent).
    """

    generator_kind = "dcgan"
    online_schedule = "fresh"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.netG = self.new_generator()
        self.opt_g = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas))
        self._params = list(self.netG.parameters())

    def _generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, teacher logits) for generated images ``x`` in [0, 1]. Shape: (N, C, H, W) -> (), (N, K)."""
        raise NotImplementedError

    def _step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """One generator step: (loss, images, teacher logits, gradients of the generator parameters)."""
        x = self.generate(self.netG, z)
        loss, t_logits = self._generator_loss(x)
        self.release_captures()
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        return loss.detach(), x.detach(), t_logits.detach(), grads

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        if targets is not None:
            raise ValueError(f"{self.name}: the generator is not class-conditional; call synthesize() without "
                             "targets (the batch's targets are the teacher's argmax labels)")
        cfg = self.config
        step = self.step_function()
        tracker = BestTracker()
        with self.batch():
            for _ in range(cfg.iterations):
                z = self.randn(self.batch_size, cfg.nz)
                loss, x, t_logits, grads = step(z)
                set_grads(self._params, grads)
                if getattr(cfg, "clip", 0) > 0:
                    torch.nn.utils.clip_grad_norm_(self._params, cfg.clip)
                self.opt_g.step()
                tracker.update(loss)
        losses = self.finish(tracker)
        return SynthesisResult(images=x.clamp(0, 1), targets=t_logits.argmax(1), teacher_logits=t_logits,
                               losses=losses, seconds=0.0)

    @torch.no_grad()
    def sample(self, n: int | None = None) -> torch.Tensor:
        """A fresh batch from the current generator: z ~ N(0, I) from this synthesizer's ``torch.Generator``,
        ``netG(z)`` (train mode, as in the papers' student loops), no gradient. Shape: -> (n, C, H, W) in [0, 1].
        """
        z = self.randn(self.batch_size if n is None else int(n), self.config.nz)
        return self.generate(self.netG, z).clamp(0, 1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = {k: v.detach().clone() for k, v in self.netG.state_dict().items()}
        state["optimizer"] = copy.deepcopy(self.opt_g.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.netG.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["optimizer"])
