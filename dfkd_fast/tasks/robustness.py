"""Adversarial robustness of teachers and of students distilled from them (Data Impressions, TPAMI 2021, §4.1.7).

Attacks work in pixel space: images are in [0, 1], the model's input normalization ``(x - mean) / std`` is
applied inside (:class:`NormalizedModel`), and every adversarial image is projected back onto the L-inf ball
``||x' - x||_inf <= eps`` and onto [0, 1].

* FGSM (Goodfellow et al., 2015): :math:`x' = \\Pi(x + \\epsilon\\,\\mathrm{sign}\\nabla_x L(f(x), y))`.
* iFGSM / BIM (Kurakin et al., 2017): ``steps`` FGSM steps of size ``step_size`` (default ``eps / steps``)
  from ``x``, each projected.
* PGD (Madry et al., 2018): iFGSM from a uniform random start in the eps-ball, default step
  ``2.5 eps / steps``.

:func:`robustness` reports natural accuracy, adversarial accuracy and the *fooling rate*: the fraction of all
samples whose predicted label the attack changed, correct or not (the Data Impressions paper's definition,
Table 4: "the amount of samples whose labels got changed after adversarial attack").
:func:`adversarial_train` is PGD adversarial training (Madry et al.), used to make the robust teacher of the
"robust teacher -> student via impressions" experiment (:func:`robust_distill`, paper Table 4).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.classifiers import model_device

__all__ = ["NormalizedModel", "fgsm", "ifgsm", "pgd", "attack", "ATTACKS", "RobustnessResult", "robustness",
           "AdvTrainResult", "adversarial_train", "check_images", "model_device", "num_outputs",
           "ROBUST_DISTILL_MODELS", "RobustDistillResult", "robust_distill"]

ATTACKS = ("fgsm", "ifgsm", "pgd")


def check_images(x: torch.Tensor, name: str = "x", fn: str = "robustness", nonempty: bool = True) -> torch.Tensor:
    """Validate a batch of images in [0, 1]: 4-D float, finite, in range; returns it as float32.

    Shape: x (N, C, H, W).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be images of shape (N, C, H, W), got {shape}")
    if nonempty and x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} is empty; pass at least one image")
    x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: {name} contains NaN or Inf")
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(f"{fn}: {name} must be pixels in [0, 1] (before the model's mean/std normalization), "
                         f"got range [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def _check_labels(y: torch.Tensor, n: int, fn: str, num_classes: int | None = None) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{fn}: y must be (N,) class indices with N = {n} (one per image), got {shape}")
    y = y.long()
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{fn}: labels must be in [0, {num_classes}) for a model with {num_classes} outputs, "
                         f"got range [{int(y.min())}, {int(y.max())}]")
    return y


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: lets attacks and tasks work on [0, 1] pixels.

    Args:
        model: classifier taking normalized images.
        mean, std: per-channel (or scalar) input normalization; ``None`` means identity.

    Shape: x (N, C, H, W) in [0, 1] -> logits (N, K).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | float | None = None,
                 std: Sequence[float] | float | None = None) -> None:
        super().__init__()
        self.model = model
        dev = model_device(model)
        m = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.ones(1) if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
        if bool((s <= 0).any()):
            raise ValueError(f"NormalizedModel: std must be > 0 for every channel, got {s.tolist()}")
        self.register_buffer("mean", m.to(dev).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.to(dev).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.mean.numel() not in (1, c) or self.std.numel() not in (1, c):
            raise ValueError(f"NormalizedModel: mean/std have {self.mean.numel()}/{self.std.numel()} values, "
                             f"the images have {c} channels; give 1 or {c} values")
        return self.model((x - self.mean) / self.std)


def _wrap(model: nn.Module, mean, std) -> nn.Module:
    if isinstance(model, NormalizedModel) and mean is None and std is None:
        return model
    return NormalizedModel(model, mean, std)


def _grad_sign(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(net(x), y)
    (g,) = torch.autograd.grad(loss, x)
    return g.sign()


def _check_attack_args(eps: float, steps: int, step_size: float | None, fn: str) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(f"{fn}: eps must be in [0, 1] (pixel units of [0, 1] images; 8/255 = {8 / 255:.4f}), "
                         f"got {eps!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{fn}: steps must be an int >= 1, got {steps!r}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"{fn}: step_size must be > 0, got {step_size!r}")


def _eval_mode(model: nn.Module) -> list[bool]:
    modes = [m.training for m in model.modules()]
    model.eval()
    return modes


def _restore_mode(model: nn.Module, modes: list[bool]) -> None:
    for m, t in zip(model.modules(), modes, strict=True):
        m.training = t


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Fast Gradient Sign Method (one step of size eps, eval mode).

    .. math:: x' = \\mathrm{clip}_{[0,1]}(x + \\epsilon\\, \\mathrm{sign}(\\nabla_x \\mathrm{CE}(f(x), y)))

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> x' (N, C, H, W) in [0, 1].
    """
    return attack(model, x, y, "fgsm", eps, mean=mean, std=std)


def ifgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
          step_size: float | None = None, *, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None) -> torch.Tensor:
    """Iterative FGSM / BIM: ``steps`` signed-gradient steps (default size eps/steps), projected each step.

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> (N, C, H, W).
    """
    return attack(model, x, y, "ifgsm", eps, steps=steps, step_size=step_size, mean=mean, std=std)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, *, mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al.): random start in the eps-ball, ``steps`` steps of
    ``step_size`` (default 2.5 eps / steps), projection onto the ball and [0, 1] after each.

    .. math:: x^{t+1} = \\Pi_{B_\\infty(x, \\epsilon) \\cap [0,1]}(x^t + \\alpha\\, \\mathrm{sign}\\nabla L(f(x^t), y))

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> (N, C, H, W).
    """
    return attack(model, x, y, "pgd", eps, steps=steps, step_size=step_size, random_start=random_start,
                  mean=mean, std=std, generator=generator)


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, eps: float, steps: int = 10,
           step_size: float | None = None, random_start: bool = True, *, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``method`` in {"fgsm", "ifgsm", "pgd"} with the model in eval mode (its modes restored after).

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> adversarial images (N, C, H, W), detached.
    """
    if method not in ATTACKS:
        raise ValueError(f"attack: method must be one of {ATTACKS}, got {method!r}")
    _check_attack_args(eps, steps, step_size, method)
    x = check_images(x, "x", method)
    net = _wrap(model, mean, std)
    dev = model_device(net)
    x = x.to(dev)
    y = _check_labels(y, x.shape[0], method).to(dev)
    modes = _eval_mode(net)
    try:
        if method == "fgsm" or eps == 0.0:
            return (x + eps * _grad_sign(net, x, y)).clamp(0.0, 1.0).detach()
        alpha = step_size if step_size is not None else (eps / steps if method == "ifgsm" else 2.5 * eps / steps)
        x_adv = x.clone()
        if method == "pgd" and random_start:
            noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else dev)
            x_adv = (x + (noise.to(dev) * 2 - 1) * eps).clamp(0.0, 1.0)
        for _ in range(steps):
            x_adv = x_adv + alpha * _grad_sign(net, x_adv, y)
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
        return x_adv
    finally:
        _restore_mode(net, modes)


@dataclass
class RobustnessResult:
    """Accuracy of a model under one attack (accuracies and rates in [0, 1]).

    Attributes:
        attack, eps, steps, step_size: the attack (``step_size`` as used).
        natural_acc: accuracy on the clean images.
        adversarial_acc: accuracy on the attacked images.
        fooling_rate: fraction of all n samples whose predicted label the attack changed (correct or not).
        n: number of images; seconds: wall time.
    """

    attack: str
    eps: float
    steps: int
    step_size: float
    natural_acc: float
    adversarial_acc: float
    fooling_rate: float
    n: int
    seconds: float


@torch.no_grad()
def num_outputs(net: nn.Module, sample: torch.Tensor) -> int:
    """Number of logits K of ``net`` on a sample batch (eval mode, modes restored)."""
    modes = _eval_mode(net)
    try:
        out = net(sample)
    finally:
        _restore_mode(net, modes)
    if out.dim() != 2:
        raise ValueError(f"the model must output logits of shape (N, K), got {tuple(out.shape)}")
    return int(out.shape[1])


@torch.no_grad()
def _predict(net: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    modes = _eval_mode(net)
    try:
        return torch.cat([net(xb).argmax(1) for xb in x.split(batch_size)])
    finally:
        _restore_mode(net, modes)


def robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_name: str = "pgd", eps: float = 0.3,
               steps: int = 10, step_size: float | None = None, random_start: bool = True, *,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None, batch_size: int = 256,
               seed: int = 0) -> RobustnessResult:
    """Natural accuracy, adversarial accuracy and fooling rate of ``model`` under one attack.

    .. math:: \\mathrm{FR} = \\frac{1}{N} |\\{i : \\arg\\max f(x'_i) \\ne \\arg\\max f(x_i)\\}|

    (every sample whose prediction changed, as in the Data Impressions paper's Table 4; not only the correct ones)

    Args:
        model: classifier taking normalized images (``mean``/``std`` applied inside).
        x, y: real images in [0, 1] and labels.
        attack_name: ``"fgsm"``, ``"ifgsm"`` or ``"pgd"``; eps in pixel units (MNIST convention 0.3).
        steps, step_size, random_start: iterative-attack settings (see :func:`attack`).
        batch_size: images per attack batch; seed: PGD random start.

    Shape: x (N, C, H, W), y (N,).
    """
    t0 = time.perf_counter()
    if attack_name not in ATTACKS:
        raise ValueError(f"robustness: attack must be one of {ATTACKS}, got {attack_name!r}")
    if batch_size < 1:
        raise ValueError(f"robustness: batch_size must be >= 1, got {batch_size}")
    _check_attack_args(eps, steps, step_size, "robustness")
    x = check_images(x, "x", "robustness")
    net = _wrap(model, mean, std)
    dev = model_device(net)
    y = _check_labels(y, x.shape[0], "robustness", num_outputs(net, x[:1].to(dev)))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    clean, adv = [], []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        xb, yb = xb.to(dev), yb.to(dev)
        xa = attack(net, xb, yb, attack_name, eps, steps, step_size, random_start, generator=gen)
        clean.append(_predict(net, xb, batch_size).cpu())
        adv.append(_predict(net, xa, batch_size).cpu())
    p_clean, p_adv = torch.cat(clean), torch.cat(adv)
    correct = p_clean == y.cpu()
    n_correct = int(correct.sum())
    fooled = int((p_adv != p_clean).sum())
    alpha = step_size if step_size is not None else (
        eps if attack_name == "fgsm" else eps / steps if attack_name == "ifgsm" else 2.5 * eps / steps)
    return RobustnessResult(attack=attack_name, eps=float(eps), steps=1 if attack_name == "fgsm" else steps,
                            step_size=float(alpha), natural_acc=n_correct / len(y),
                            adversarial_acc=int((p_adv == y.cpu()).sum()) / len(y),
                            fooling_rate=fooled / len(y), n=len(y),
                            seconds=time.perf_counter() - t0)


@dataclass
class AdvTrainResult:
    """History of :func:`adversarial_train` (per epoch: mean training loss, accuracy on the attacked batches)."""

    loss: list[float] = field(default_factory=list)
    adv_train_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0


def adversarial_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.3, steps: int = 7,
                      step_size: float | None = None, *, epochs: int = 5, lr: float = 1e-3, batch_size: int = 64,
                      clean_weight: float = 0.0, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None, seed: int = 0, eps_warmup: int = 1,
                      verbose: bool = False) -> AdvTrainResult:
    """PGD adversarial training (Madry et al., 2018), in place, with Adam and a cosine schedule.

    Each step attacks the batch with PGD (model in eval mode for the attack, random start) and minimizes

    .. math:: (1 - w)\\,\\mathrm{CE}(f(x'), y) + w\\,\\mathrm{CE}(f(x), y), \\qquad w = \\text{clean\\_weight}

    The attack radius ramps linearly from 0 to ``eps`` over the first ``eps_warmup`` epochs (eps curriculum,
    which keeps small MNIST models from collapsing early).

    Shape: x (N, C, H, W) in [0, 1], y (N,). Returns :class:`AdvTrainResult`.
    """
    t0 = time.perf_counter()
    _check_attack_args(eps, steps, step_size, "adversarial_train")
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= clean_weight <= 1.0 or eps_warmup < 0:
        raise ValueError("adversarial_train: need epochs >= 1, batch_size >= 1, lr > 0, clean_weight in [0, 1], "
                         f"eps_warmup >= 0; got {epochs}, {batch_size}, {lr}, {clean_weight}, {eps_warmup}")
    x = check_images(x, "x", "adversarial_train")
    y = _check_labels(y, x.shape[0], "adversarial_train")
    net = _wrap(model, mean, std)
    dev = model_device(net)
    g = torch.Generator().manual_seed(int(seed))
    gen_dev = torch.Generator(device=dev).manual_seed(int(seed) + 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    n_batches = math.ceil(len(x) / batch_size)
    total = epochs * n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    res = AdvTrainResult()
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        tot, correct = 0.0, 0
        for i in range(n_batches):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            ramp = min(1.0, (step + 1) / (eps_warmup * n_batches)) if eps_warmup else 1.0
            e = eps * ramp
            xa = attack(net, xb, yb, "pgd", e, steps, None if step_size is None else step_size * ramp,
                        generator=gen_dev) if e > 0 else xb
            net.train()
            logits = net(xa)
            loss = F.cross_entropy(logits, yb)
            if clean_weight > 0:
                loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        res.loss.append(tot / len(x))
        res.adv_train_acc.append(correct / len(x))
        if verbose:
            print(f"adv-train epoch {ep + 1}/{epochs} loss {res.loss[-1]:.4f} adv acc {res.adv_train_acc[-1]:.4f}")
    model.eval()
    res.seconds = time.perf_counter() - t0
    return res


#: Row keys of :class:`RobustDistillResult` (the four models of the Data Impressions paper's Table 4) and labels.
ROBUST_DISTILL_MODELS = {
    "teacher": "natural teacher",
    "student": "student via DIs from the natural teacher",
    "robust_teacher": "PGD-trained teacher",
    "robust_student": "student via DIs from the PGD-trained teacher",
}


@dataclass
class RobustDistillResult:
    """The Table 4 experiment of the Data Impressions paper: four models, each attacked by every attack.

    Attributes:
        rows: one dict per model (keys of :data:`ROBUST_DISTILL_MODELS`, in that order): ``model``, ``label``,
            ``natural_acc`` and per attack ``a``: ``{a}_acc`` (accuracy on the attacked images) and
            ``{a}_fooling_rate`` (fraction of all images whose prediction changed). All in [0, 1].
        attacks, eps, steps: the attacks.
        num_impressions: Data Impressions per teacher (the students' only training images).
        student_kd_loss: final KD training loss of each student (``"student"``, ``"robust_student"``).
        seconds: wall time per stage (``adv_train``, ``impressions``, ``distill``, ``attacks``, ``total``).
        models: the four models (eval mode), by row key.
    """

    rows: list[dict[str, Any]]
    attacks: tuple[str, ...]
    eps: float
    steps: int
    num_impressions: int
    student_kd_loss: dict[str, float]
    seconds: dict[str, float]
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def row(self, model: str) -> dict[str, Any]:
        """The row of ``model`` (a key of :data:`ROBUST_DISTILL_MODELS`)."""
        for r in self.rows:
            if r["model"] == model:
                return r
        raise KeyError(f"no row {model!r}; rows: {[r['model'] for r in self.rows]}")

    def table(self) -> str:
        """Markdown table in the layout of the paper's Table 4 (percentages)."""
        names = {"fgsm": "FGSM", "ifgsm": "iFGSM", "pgd": "PGD"}
        head = "| model | natural acc % | " + " | ".join(f"{names[a]} acc % | {names[a]} F.R. %"
                                                       for a in self.attacks) + " |"
        sep = "|---|---:|" + "---:|---:|" * len(self.attacks)
        lines = [f"eps {self.eps:.4g} (L-inf, [0, 1] pixels), {self.steps} steps for iFGSM/PGD; "
                 f"F.R.: fooling rate, every image whose prediction changed", "", head, sep]
        for r in self.rows:
            cells = [f"{100 * r['natural_acc']:.2f}"]
            for a in self.attacks:
                cells += [f"{100 * r[f'{a}_acc']:.2f}", f"{100 * r[f'{a}_fooling_rate']:.2f}"]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def robust_distill(teacher: nn.Module, student_factory: Callable[[], nn.Module],
                   train_data: tuple[torch.Tensor, torch.Tensor] | None,
                   test_data: tuple[torch.Tensor, torch.Tensor], *, robust_teacher: nn.Module | None = None,
                   attacks: Sequence[str] = ATTACKS, eps: float = 0.2, steps: int = 10,
                   adv_train_epochs: int = 3, adv_train_steps: int = 5, adv_train_lr: float = 1e-3,
                   adv_clean_weight: float = 0.3, num_impressions: int = 1200, impression_iterations: int = 200,
                   impression_batch_size: int = 100, kd_epochs: int = 40, kd_lr: float = 0.02,
                   temperature: float = 4.0, kd_batch_size: int = 64, kd_augment: bool | str = "crop",
                   seed: int = 0, backend: str = "auto") -> RobustDistillResult:
    """Data Impressions' robustness experiment (TPAMI 2021, §4.1.7, Table 4) on one teacher architecture.

    1. Robust teacher: ``robust_teacher`` if given, else a copy of ``teacher`` PGD-adversarially trained
       (:func:`adversarial_train`, Madry et al.; fine-tuned from the natural weights, eps-ball ``eps``,
       ``adv_train_steps`` PGD steps, loss weight ``adv_clean_weight`` on the clean images) for
       ``adv_train_epochs`` epochs on ``train_data``.
    2. For each teacher: ``num_impressions`` class-balanced Data Impressions (Dirichlet targets from the
       teacher's class similarity, :func:`dfkd_fast.tasks._common.synthesize_impressions`), then offline KD
       (:func:`dfkd_fast.tasks.distill.distill`, ``T^2 KL(softmax(t/T) || softmax(s/T))``) of a fresh student
       from ``student_factory`` (same init for both students) on those impressions only (SGD ``kd_lr``,
       batch ``kd_batch_size``, on-device augmentation ``kd_augment``: ``"crop"`` pad-crop for digits).
    3. Every model (two teachers, two students) is attacked on ``test_data`` by every attack in ``attacks``
       (:func:`robustness`; PGD from the same seeded random start).

    Args:
        teacher: natural classifier on [0, 1] pixels (wrap with :class:`NormalizedModel` if it normalizes).
            Not modified (its ``requires_grad`` flags are restored).
        student_factory: builds an untrained student (called twice under the same seed).
        train_data: (x (N, C, H, W) in [0, 1], y (N,)) for adversarial training; may be ``None`` when
            ``robust_teacher`` is given. The students never see it.
        test_data: real held-out (x, y) for the attacks.

    Defaults are the MNIST settings of ``benchmarks/quality.py`` (LeNet-5 -> LeNet-5-half, 32x32). With them
    the students learn (81% / 90% natural accuracy there); with eps 0.3, 5 adversarial epochs without the clean
    term, 1,000 impressions and KD at lr 0.01, batch 128, 20 epochs without augmentation, the student of the
    PGD-trained teacher collapsed to one class (10%) on MNIST-5k.

    Returns:
        :class:`RobustDistillResult` (``.table()`` is the markdown table).
    """
    import copy

    from dfkd_fast.tasks._common import synthesize_impressions
    from dfkd_fast.tasks.distill import distill

    t0 = time.perf_counter()
    attacks = tuple(attacks)
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ValueError(f"robust_distill: attacks must be a non-empty subset of {ATTACKS}, got {list(attacks)}")
    _check_attack_args(eps, steps, None, "robust_distill")
    if num_impressions < 2 or impression_iterations < 1 or kd_epochs < 1:
        raise ValueError("robust_distill: need num_impressions >= 2, impression_iterations >= 1 and kd_epochs >= 1; "
                         f"got {num_impressions}, {impression_iterations}, {kd_epochs}")
    xt, yt = test_data
    xt = check_images(xt, "test images", "robust_distill")
    flags = [p.requires_grad for p in teacher.parameters()]
    secs = {"adv_train": 0.0, "impressions": 0.0, "distill": 0.0, "attacks": 0.0}
    try:
        if robust_teacher is None:
            if train_data is None:
                raise ValueError("robust_distill: pass train_data (to PGD-train the robust teacher) "
                                 "or a robust_teacher")
            if adv_train_epochs < 1:
                raise ValueError(f"robust_distill: adv_train_epochs must be >= 1, got {adv_train_epochs}")
            robust_teacher = copy.deepcopy(teacher)
            for p in robust_teacher.parameters():
                p.requires_grad_(True)
            t = time.perf_counter()
            adversarial_train(robust_teacher, train_data[0], train_data[1], eps=eps, steps=adv_train_steps,
                              epochs=adv_train_epochs, lr=adv_train_lr, clean_weight=adv_clean_weight, seed=seed)
            secs["adv_train"] = time.perf_counter() - t
        robust_teacher.eval()
        models: dict[str, nn.Module] = {"teacher": teacher.eval(), "robust_teacher": robust_teacher}
        kd_loss: dict[str, float] = {}
        shape = tuple(xt.shape[1:])
        for t_key, s_key in (("teacher", "student"), ("robust_teacher", "robust_student")):
            t = time.perf_counter()
            imp, _, _ = synthesize_impressions(models[t_key], num_impressions, shape,
                                               iterations=impression_iterations,
                                               batch_size=impression_batch_size, seed=seed, backend=backend)
            secs["impressions"] += time.perf_counter() - t
            t = time.perf_counter()
            student = _seeded(student_factory, seed)
            res = distill(student, models[t_key], imp, epochs=kd_epochs, lr=kd_lr, T=temperature,
                          batch_size=kd_batch_size, augment=kd_augment, device=model_device(models[t_key]),
                          backend=backend, seed=seed, progress=False, curves=False)
            secs["distill"] += time.perf_counter() - t
            kd_loss[s_key] = res.train_loss[-1]
            models[s_key] = student.eval()
    finally:
        for p, f in zip(teacher.parameters(), flags, strict=True):
            p.requires_grad_(f)
    t = time.perf_counter()
    rows = []
    for key, label in ROBUST_DISTILL_MODELS.items():
        row: dict[str, Any] = {"model": key, "label": label}
        for a in attacks:
            r = robustness(models[key], xt, yt, a, eps, steps, seed=seed)
            row["natural_acc"] = r.natural_acc
            row[f"{a}_acc"], row[f"{a}_fooling_rate"] = r.adversarial_acc, r.fooling_rate
        rows.append(row)
    secs["attacks"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    return RobustDistillResult(rows=rows, attacks=attacks, eps=float(eps), steps=int(steps),
                               num_impressions=int(num_impressions), student_kd_loss=kd_loss, seconds=secs,
                               models=models)
