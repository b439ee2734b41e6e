"""Helpers shared by the generator-based methods (DAFL, ZSKT, DFQ, CMI, FastMeta).

- :func:`make_generator` builds ``dfkd_fast.models.Generator`` / ``DCGANGenerator`` for a (C, H, W) teacher
  input, initialized deterministically from the synthesizer's ``torch.Generator`` (DCGAN init, N(0, 0.02)).
- :func:`student_list` turns the ``student`` argument into a list (a ``ModuleList`` is an ensemble).
- :func:`eval_mode` puts modules in eval mode for a block and restores each submodule's mode after.
- :func:`grads_to` runs ``torch.autograd.grad`` for exactly the given tensors, so a synthesis step never
  accumulates gradients into the teacher's or the student's parameters.
- :class:`PenultimateProbe` captures the input of the teacher's final ``nn.Linear`` (DAFL's features).
- :func:`information_entropy` / :func:`mean_entropy`: DAFL's and DFQ's entropy terms.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast.models import DCGANGenerator, Generator, last_linear
from dfkd_fast.synthesis.base import SynthesisResult, Synthesizer


def reset_generator(gen: nn.Module, rng: torch.Generator) -> None:
    """DCGAN initialization (as in the CMI code's ``reset_model``), drawn from ``rng``.

    Conv / ConvTranspose / Linear weights ~ N(0, 0.02), biases 0; BatchNorm weight ~ N(1, 0.02), bias 0,
    running statistics reset.
    """
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=rng)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    nn.init.normal_(m.weight, 1.0, 0.02, generator=rng)
                if m.bias is not None:
                    m.bias.zero_()
                m.reset_running_stats()


def make_generator(image_size: Sequence[int], nz: int, ngf: int, device: torch.device, rng: torch.Generator,
                   kind: str = "cmi") -> nn.Module:
    """A generator for a (C, H, W) teacher input on ``device``, DCGAN-initialized from ``rng``, in train mode.

    ``kind="cmi"``: ``dfkd_fast.models.Generator`` (CMI / FastDFKD, sigmoid output); ``kind="dcgan"``:
    ``dfkd_fast.models.DCGANGenerator`` (DAFL / ZSKT / DFQ, tanh output mapped to [0, 1]).

    Raises:
        ValueError: non-square images or a side that is not a multiple of 4 (two x2 upsamplings).
    """
    c, h, w = (int(s) for s in image_size)
    if h != w:
        raise ValueError(f"generator methods synthesize square images; got image_size (C, H, W) = {(c, h, w)}")
    if kind not in ("cmi", "dcgan"):
        raise ValueError(f"generator kind must be 'cmi' or 'dcgan', got {kind!r}")
    cls = Generator if kind == "cmi" else DCGANGenerator
    gen = cls(nz=nz, ngf=ngf, img_size=h, nc=c).to(device)
    reset_generator(gen, rng)
    return gen.train()


def student_list(student: nn.Module | Sequence[nn.Module] | None, teacher: nn.Module | None = None,
                 method: str = "synthesis") -> list[nn.Module]:
    """The students as a list: ``None`` -> [], a module -> [module], a ``ModuleList``/list -> its members.

    Raises:
        ValueError: a member is not a module, or is the ``teacher`` itself.
    """
    if student is None:
        return []
    members = list(student) if isinstance(student, (nn.ModuleList, list, tuple)) else [student]
    for m in members:
        if not isinstance(m, nn.Module):
            raise ValueError(f"{method}: student must be an nn.Module (or a list of them), got {type(m).__name__}")
        if m is teacher:
            raise ValueError(f"{method}: student must be the model being distilled, not the teacher itself")
    return members


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode inside the block; every submodule's previous ``training`` flag restored after."""
    saved = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod, _ in saved:
        mod.training = False
    try:
        yield
    finally:
        for mod, flag in saved:
            mod.training = flag


def grads_to(loss: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Set ``t.grad = d loss / d t`` for each tensor (``None`` -> zeros); nothing else receives gradients."""
    grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    for t, g in zip(tensors, grads, strict=False):
        t.grad = torch.zeros_like(t) if g is None else g


class BestTracker:
    """Keeps the tensors of the lowest-loss step on the device (no host sync per step).

    ``update(loss, *tensors)`` records the step's loss and, where it beats the best so far (strictly; NaN
    never wins), keeps detached copies of ``tensors``. ``losses()`` returns all step losses (one sync).
    """

    def __init__(self) -> None:
        self._history: list[torch.Tensor] = []
        self._best_loss: torch.Tensor | None = None
        self.best: tuple[torch.Tensor, ...] = ()

    def update(self, loss: torch.Tensor, *tensors: torch.Tensor) -> None:
        cost = loss.detach().float().reshape(())
        self._history.append(cost)
        new = tuple(t.detach() for t in tensors)
        if self._best_loss is None:
            self._best_loss = cost.clone()
            self.best = tuple(t.clone() for t in new)
            return
        better = cost < self._best_loss
        self._best_loss = torch.where(better, cost, self._best_loss)
        self.best = tuple(torch.where(better, n, b) for n, b in zip(new, self.best, strict=False))

    def losses(self) -> tuple[float, ...]:
        return tuple(torch.stack(self._history).tolist()) if self._history else ()


class PenultimateProbe:
    """Captures the input of the teacher's final ``nn.Linear`` on each forward (flattened to (N, F))."""

    def __init__(self, model: nn.Module, method: str) -> None:
        try:
            layer = last_linear(model)
        except ValueError as e:
            raise ValueError(f"{method}: the activation term needs the teacher's penultimate features, but the "
                             "teacher has no nn.Linear classifier; set act=0 to disable the term") from e
        self.features: torch.Tensor | None = None
        self._handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.features = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> PenultimateProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def information_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean prediction, :math:`H(\\bar p) = -\\sum_k \\bar p_k \\log \\bar p_k`.

    Shape: probs (N, K) -> scalar.
    """
    mean = probs.mean(0)
    return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy of ``softmax(logits)``. Shape: (N, K) -> scalar."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


class PersistentGeneratorSynthesizer(Synthesizer):
    """Base of DAFL, ZSKT and DFQ: one generator trained across ``synthesize`` calls with Adam.

    Each call runs ``iterations`` generator updates, each on a fresh latent batch z ~ N(0, I), and returns
    the images of the last update (the batch the reported loss was computed on) with the teacher's
    logits and argmax labels as targets. Subclasses implement :meth:`_generator_loss`; the Config must
    have ``nz``, ``ngf``, ``lr_g`` and ``betas``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {cfg.iterations}")
        self.netG = make_generator(self.image_size, cfg.nz, cfg.ngf, self.device, self.generator, kind="dcgan")
        self.opt_g = torch.optim.Adam(self.netG.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas))
        _ = self.students  # validate

    @property
    def students(self) -> list[nn.Module]:
        """The student(s) of the adversarial term (``student`` may be set after construction)."""
        return student_list(self.student, self.teacher, self.name)

    def _generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, teacher logits) for generated images ``x`` in [0, 1]. Shape: (N, C, H, W) -> (), (N, K)."""
        raise NotImplementedError

    def _synthesis_context(self) -> contextlib.AbstractContextManager:
        """Context around one batch (e.g. a TeacherProbe); none by default."""
        return contextlib.nullcontext()

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        if targets is not None:
            raise ValueError(f"{self.name}: the generator is not class-conditional; call synthesize() without "
                             "targets (the batch's targets are the teacher's argmax labels)")
        cfg = self.config
        params = list(self.netG.parameters())
        history: list[torch.Tensor] = []
        with eval_mode(self.students), self._synthesis_context():
            for _ in range(cfg.iterations):
                z = self.randn(self.batch_size, cfg.nz)
                x = self.netG(z)
                loss, t_logits = self._generator_loss(x)
                self.opt_g.zero_grad(set_to_none=True)
                grads_to(loss, params)
                self.opt_g.step()
                history.append(loss.detach().float())
        t_logits = t_logits.detach().float()
        return SynthesisResult(images=x.detach().clamp(0, 1), targets=t_logits.argmax(1),
                               teacher_logits=t_logits, losses=tuple(torch.stack(history).tolist()), seconds=0.0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = {k: v.detach().clone() for k, v in self.netG.state_dict().items()}
        state["optimizer"] = copy.deepcopy(self.opt_g.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.netG.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["optimizer"])
