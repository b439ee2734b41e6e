"""Helpers shared by the generator-based methods (DAFL, ZSKT, DFQ, CMI, FastMeta).

- :func:`make_generator` builds ``dfkd_fast.models.Generator`` / ``DCGANGenerator`` for a (C, H, W) teacher
  input, initialized deterministically from the synthesizer's ``torch.Generator`` (DCGAN init, N(0, 0.02)).
- :func:`student_list` turns the ``student`` argument into a list (a ``ModuleList`` is an ensemble).
- :func:`eval_mode` puts modules in eval mode for a block and restores each submodule's mode after.
- :func:`grads_to` runs ``torch.autograd.grad`` for exactly the given tensors, so a synthesis step never
  accumulates gradients into the teacher's or the student's parameters.
- :func:`information_entropy` / :func:`mean_entropy`: DAFL's and DFQ's entropy terms.
- :class:`BestTracker`: the lowest-loss step's tensors and the loss curve, kept on the device.

The base class of the generator methods is in :mod:`dfkd_fast.synthesis.generator_base`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from dfkd_fast.models import DCGANGenerator, Generator


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
