"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey, NeurIPS 2019).

The generator is trained across ``synthesize`` calls to *maximize* the teacher-student disagreement on
its images (fresh z ~ N(0, I) per step):

.. math::
    L_G = -adv \\cdot \\mathrm{KL}(\\mathrm{softmax}(t/T) \\| \\mathrm{softmax}(s/T)) \\, T^2

with t, s the logits of the frozen teacher and of the *real* student (required; never the teacher). The
student then takes ``n_s`` steps on the returned batches with :meth:`ZSKT.student_loss`: KD plus the
attention-transfer term between paired teacher/student layers,

.. math::
    L_S = \\mathrm{KL}(t\\|s) + \\beta \\sum_l \\operatorname{mean}\\Big(\\frac{a^S_l}{\\|a^S_l\\|_2}
          - \\frac{a^T_l}{\\|a^T_l\\|_2}\\Big)^2, \\qquad a_l = \\tfrac{1}{C_l}\\textstyle\\sum_c A_{l,c}^2
Online schedule (``dfkd-fast distill --online --method zskt``, the paper's Algorithm 1): per iteration one
generator step (n_g = ``iterations`` = 1) on the -KL above, then ``n_s`` (10) student steps, each on a
*fresh* batch from the updated generator, minimizing :meth:`ZSKT.student_loss` (KD at T = 1 plus attention
transfer with beta = 250); both the generator's and the student's gradients are clipped to norm ``clip``
(5, as in the published code). ``at_layers`` default ``("auto",)``: :func:`auto_at_layers` pairs, for every
spatial resolution both networks produce, the last module of each at that resolution (ResNet ``layer1..4``,
WRN ``block1..3``; LeNet / VGG ``features.*`` stages).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast import ops
from dfkd_fast.synthesis._generator_common import eval_mode
from dfkd_fast.synthesis.base import SynthesisConfig, register
from dfkd_fast.synthesis.generator_base import PersistentGeneratorSynthesizer

__all__ = ["ZSKT", "attention_map", "attention_transfer_loss", "auto_at_layers", "parse_at_layers"]


def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """Normalized spatial attention of a feature map: mean over channels of A^2, flattened, L2-normalized.

    Shape: (N, C, H, W) -> (N, H*W).
    """
    if feat.dim() != 4:
        raise ValueError(f"attention_map: feature must be (N, C, H, W), got {tuple(feat.shape)}")
    return F.normalize(feat.float().pow(2).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feats: Sequence[torch.Tensor],
                            teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layer pairs of mean((att(s) - att(t))^2) (Zagoruyko & Komodakis, as used by ZSKT).

    Shape: two equally long lists of (N, C_l, H_l, W_l) maps (student and teacher C_l may differ) -> scalar.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"attention_transfer_loss: need equally many (>= 1) student and teacher maps, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats, strict=False):
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(f"attention_transfer_loss: paired maps need the same N, H, W, got {tuple(s.shape)} "
                             f"and {tuple(t.shape)}; pair layers of equal resolution")
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total


def _stage_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``auto_at_layers`` may pair: the top-level children, with a top-level ``nn.Sequential`` of
    leaf layers (``features`` of LeNet / VGG, or a whole ``nn.Sequential`` model) expanded into its layers."""
    children = list(model.named_children())
    if isinstance(model, nn.Sequential) or not children:
        return children
    out: list[tuple[str, nn.Module]] = []
    for name, m in children:
        if isinstance(m, nn.Sequential) and len(m) and all(not list(c.children()) for c in m):
            out += [(f"{name}.{n}", c) for n, c in m.named_children()]
        else:
            out.append((name, m))
    return out


def _last_module_per_resolution(model: nn.Module, x: torch.Tensor) -> dict[tuple[int, int], str]:
    """Forward ``x`` once (no grad, eval mode restored) and map each spatial size (H, W) with H*W > 1 of a 4-D
    candidate output (BatchNorm layers excluded) to the name of the last candidate (in call order) producing it."""
    found: dict[tuple[int, int], str] = {}
    handles = []
    for name, m in _stage_candidates(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # a stage ends at a block / activation, not a BN
            continue

        def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                found[(int(out.shape[2]), int(out.shape[3]))] = name

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode([model]):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def auto_at_layers(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> tuple[tuple[str, str], ...]:
    """Default attention-transfer pairs: for every spatial resolution (H, W) both networks produce on ``x``
    (H*W > 1), the last module of each network at that resolution, largest resolution first.

    Shape: x (N, C, H, W), already normalized. Returns ((teacher_name, student_name), ...), possibly empty.
    """
    t = _last_module_per_resolution(teacher, x)
    s = _last_module_per_resolution(student, x)
    common = sorted(set(t) & set(s), key=lambda hw: -hw[0] * hw[1])
    return tuple((t[hw], s[hw]) for hw in common)


def parse_at_layers(spec: Sequence[Any]) -> tuple[tuple[str, str], ...] | None:
    """``at_layers`` -> explicit pairs, or ``None`` for ``("auto",)``.

    Entries: ``(teacher_name, student_name)`` pairs, ``"t:s"`` strings (``--at-layers layer1:layer1,...``) or
    one name used for both; ``()`` / ``("none",)``: no attention transfer.
    """
    items = list(spec)
    if items in (["auto"], ("auto",)):
        return None
    if items in (["none"], []):
        return ()
    pairs = []
    for it in items:
        if isinstance(it, str):
            if it in ("auto", "none"):
                raise ValueError(f"zskt: at_layers {it!r} must be given alone, got {tuple(items)}")
            t_name, _, s_name = it.partition(":")
            pairs.append((t_name.strip(), (s_name or t_name).strip()))
        elif len(it) == 2:
            pairs.append((str(it[0]), str(it[1])))
        else:
            raise ValueError(f"zskt: at_layers entries must be 'teacher:student' names or pairs, got {it!r}")
    return tuple(pairs)


class _OutputCapture:
    """Forward hooks keeping the outputs of the named submodules of ``model`` (in the given order)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"zskt: {role} has no submodule(s) {missing} named in at_layers; "
                             f"choose among: {[n for n in modules if n][:20]}")
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(names)]

    def _hook(self, i: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.outputs[i] = out

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@register("zskt")
class ZSKT(PersistentGeneratorSynthesizer):
    """ZSKT adversarial generator (generator step) + :meth:`student_loss` (student step).

    Raises:
        ValueError: no ``student`` given (the adversarial term needs the real student).
    """

    @dataclass
    class Config(SynthesisConfig):
        """ZSKT hyper-parameters (published: latent 100, Adam lr 1e-3, n_g 1, n_s 10, beta 250, clip 5).

        Attributes:
            iterations: generator updates per ``synthesize`` call (ZSKT's n_g = 1).
            n_s: student steps per generator step in the online loop.
            nz, ngf: generator latent size and width. lr_g, betas: generator Adam.
            adv: weight of the adversarial -KL term. T: KD temperature of both KL terms.
            beta: attention-transfer weight in :meth:`ZSKT.student_loss`.
            at_layers: attention-transfer layer pairs: ``("auto",)`` (:func:`auto_at_layers`),
                ``"teacher_name:student_name"`` strings or (teacher, student) pairs; ``()``: KD only.
            clip: gradient-norm clip of the generator step and (online) of the student step; 0: none.
        """

        iterations: int = 1
        n_s: int = 10
        nz: int = 100
        ngf: int = 64
        lr_g: float = 1e-3
        betas: tuple[float, float] = (0.9, 0.999)
        adv: float = 1.0
        T: float = 1.0
        beta: float = 250.0
        at_layers: tuple[str | tuple[str, str], ...] = ("auto",)
        clip: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.students:
            raise ValueError("zskt: the generator is adversarial to the student, so a student is required; "
                             "pass student=<the nn.Module being distilled> (never the teacher)")
        if self.config.T <= 0:
            raise ValueError(f"zskt: T must be > 0, got {self.config.T}")
        if self.config.n_s < 1 or self.config.clip < 0:
            raise ValueError(f"zskt: need n_s >= 1 and clip >= 0, got n_s={self.config.n_s}, clip={self.config.clip}")
        pairs = parse_at_layers(self.config.at_layers)
        if pairs is None:
            probe = self.normalize(torch.zeros(2, *self.image_size, device=self.device))
            pairs = auto_at_layers(self.teacher, self.students[0], probe) if len(self.students) == 1 else ()
        #: the resolved (teacher_name, student_name) attention-transfer pairs
        self.at_pairs: tuple[tuple[str, str], ...] = pairs

    def _generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn = self.normalize(x)
        t_logits = self.teacher_forward(xn)
        if not self.use_adversarial:  # online warm-up: nothing to chase, the step leaves the generator as it is
            return x.sum() * 0.0, t_logits
        return self.config.adv * self.adversarial_loss(xn, t_logits, "kl", self.config.T), t_logits

    def student_loss(self, images: torch.Tensor) -> torch.Tensor:
        """ZSKT's student objective on a batch: KL(t || s) T^2 + beta * attention transfer over :attr:`at_pairs`.

        The student keeps its current train/eval mode; gradients flow into the student only.

        Shape: images (N, C, H, W) in [0, 1] -> scalar.
        """
        if len(self.students) != 1:
            raise ValueError("zskt.student_loss: needs exactly one student module, got an ensemble")
        cfg = self.config
        student = self.students[0]
        xn = self.normalize(images.to(self.device))
        t_names = [p[0] for p in self.at_pairs]
        s_names = [p[1] for p in self.at_pairs]
        t_cap = _OutputCapture(self.teacher, t_names, "the teacher")
        s_cap = _OutputCapture(student, s_names, "the student")
        try:
            with torch.no_grad(), eval_mode([self.teacher]):
                t_logits = self.teacher(xn)
            s_logits = student(xn)
        finally:
            t_cap.remove()
            s_cap.remove()
        loss = ops.kd_kl_div(s_logits, t_logits, cfg.T, backend=self.backend)
        if self.at_pairs and cfg.beta != 0:
            loss = loss + cfg.beta * attention_transfer_loss(s_cap.outputs, t_cap.outputs)
        return loss
