"""Loss terms shared by the synthesis methods (image priors, competition and adversarial terms).

Every function is plain autograd PyTorch over the fused ops in :mod:`dfkd_fast.ops`; images are the
synthesized batch (N, C, H, W), logits are (N, K).

- :func:`tv_loss` -- total variation (DeepInversion's image prior), ``kind="l1"`` or ``"l2"``.
- :func:`l2_prior` -- the L2 norm of the batch (DeepInversion's ``l2`` term).
- :func:`js_divergence` / :func:`competition_loss` -- ADI's adaptive competition ``1 - JS(t, s)``.
- :func:`adversarial_decision_loss` -- CMI's decision-adversarial term (masked negative KL).
- :func:`soft_target_ce` -- Data-Impressions CE to soft targets at temperature tau (tau applied once).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfkd_fast import ops

__all__ = ["tv_loss", "l2_prior", "js_divergence", "competition_loss", "adversarial_decision_loss",
           "soft_target_ce"]


def _check_images(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: images must be a (N, C, H, W) tensor, got {shape}")


def _check_logits(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, fn: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{fn}: '{na}' and '{nb}' must both be (N, K) with the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _neighbour_diffs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Differences to the right, down, down-right and down-left neighbours."""
    right = x[..., :, 1:] - x[..., :, :-1]
    down = x[..., 1:, :] - x[..., :-1, :]
    diag = x[..., 1:, 1:] - x[..., :-1, :-1]
    anti = x[..., 1:, :-1] - x[..., :-1, 1:]
    return right, down, diag, anti


def tv_loss(x: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Total variation over the 4 neighbour directions (horizontal, vertical, both diagonals).

    .. math::
        \\mathrm{TV}_{l1} = \\sum_{d} \\operatorname{mean}|\\Delta_d x|, \\qquad
        \\mathrm{TV}_{l2} = \\sum_{d} \\|\\Delta_d x\\|_2

    (``l2`` is DeepInversion's un-squared Euclidean norm over the whole batch; ``l1`` a mean absolute
    difference, independent of the image size.)

    Shape: x (N, C, H, W) -> scalar.
    """
    _check_images(x, "tv_loss")
    diffs = _neighbour_diffs(x)
    if kind == "l1":
        return sum(d.abs().mean() for d in diffs)
    if kind == "l2":
        return sum(torch.linalg.vector_norm(d) for d in diffs)
    raise ValueError(f"tv_loss: kind must be 'l1' or 'l2', got {kind!r}")


def l2_prior(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the whole batch, :math:`\\|x\\|_2` (DeepInversion's ``l2`` prior).

    Shape: x (N, C, H, W) -> scalar.
    """
    _check_images(x, "l2_prior")
    return torch.linalg.vector_norm(x)


def js_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 3.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Jensen-Shannon divergence between the tempered teacher and student distributions (nats).

    .. math::
        p = \\mathrm{softmax}(t/T),\\; q = \\mathrm{softmax}(s/T),\\; m = (p + q)/2, \\qquad
        \\mathrm{JS}_i = \\tfrac12 \\mathrm{KL}(p_i\\|m_i) + \\tfrac12 \\mathrm{KL}(q_i\\|m_i) \\in [0, \\ln 2]

    Computed in log space (stable for large logits). Differentiable in both arguments.

    Shape: (N, K), (N, K) -> scalar (``"mean"``) or (N,) (``"none"``).
    """
    _check_logits(teacher_logits, student_logits, "teacher_logits", "student_logits", "js_divergence")
    if temperature <= 0:
        raise ValueError(f"js_divergence: temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    js = 0.5 * (log_p.exp() * (log_p - log_m)).sum(1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(1)
    if reduction == "none":
        return js
    if reduction == "mean":
        return js.mean()
    raise ValueError(f"js_divergence: reduction must be 'mean' or 'none', got {reduction!r}")


def competition_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's competition term :math:`1 - \\mathrm{JS}(t, s)` (batch mean), T = 3.

    Minimizing it pushes the images to where teacher and student disagree. The original code clamps the
    probabilities to [0.01, 0.99] and uses KL(m||.); here the exact JS (<= ln 2 < 1) is used instead.

    Shape: (N, K), (N, K) -> scalar.
    """
    return 1.0 - js_divergence(teacher_logits, student_logits, temperature)


def adversarial_decision_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """CMI's decision-adversarial term: negative KL on the samples where student and teacher agree.

    .. math::
        L_{adv} = -\\frac1N \\sum_i \\mathrm{KL}_i(t\\|s)\\, T^2\\, \\mathbb 1[\\arg\\max t_i = \\arg\\max s_i]

    Uses :func:`dfkd_fast.ops.kd_kl_div` (``reduction="none"``).

    Shape: (N, K), (N, K) -> scalar.
    """
    _check_logits(student_logits, teacher_logits, "student_logits", "teacher_logits", "adversarial_decision_loss")
    kl = ops.kd_kl_div(student_logits, teacher_logits, temperature, reduction="none", backend=backend)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(kl.dtype)
    return -(kl * agree).mean()


def soft_target_ce(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 20.0,
                   backend: str = "auto") -> torch.Tensor:
    """Data-Impressions objective: CE of soft (or one-hot) targets to ``softmax(z / tau)``, tau applied once.

    .. math::
        L = -\\frac1N \\sum_i \\sum_j y_{ij} \\log \\mathrm{softmax}(z_i/\\tau)_j

    ``targets`` may be (N, K) probabilities or (N,) class indices (one-hot).

    Shape: logits (N, K), targets (N, K) or (N,) -> scalar.
    """
    if targets.dim() == 1:
        targets = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
    return ops.soft_target_cross_entropy(logits, targets, temperature, reduction="mean", backend=backend)
