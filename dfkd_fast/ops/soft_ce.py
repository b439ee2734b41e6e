"""Public soft-target losses: ``soft_target_cross_entropy``, ``kd_kl_div`` (dispatch: triton | cpp | torch).

The fused backends compute the row losses and the (reduction-scaled) gradients in one pass over the logits
in the forward and save the gradients; the backward multiplies them by ``grad_output``. Gradients are only
computed for inputs that require them (the KD teacher gradient, for adversarial generator terms, costs one
more read of the row). See ``dfkd_fast/kernels/soft_ce.py`` for the kernel design.

The fused paths are the custom ops ``dfkd_fast::soft_target_cross_entropy`` / ``dfkd_fast::kd_kl_div`` (fake
implementation + autograd; they return the reduced loss and the saved gradients, empty when not requested),
called through an equivalent autograd.Function in eager mode (see :mod:`dfkd_fast.ops._registry`). The NaN/Inf
check is one device flag on the loss inside :func:`dfkd_fast._checks.deferred` (no host sync).
"""
from __future__ import annotations

import math

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels import soft_ce as _k
from dfkd_fast.kernels.soft_ce import kd_kl_div_ref, soft_target_cross_entropy_ref
from dfkd_fast.ops._registry import fused_op

__all__ = ["soft_target_cross_entropy", "kd_kl_div", "SoftTargetCrossEntropyFunction", "KDKLDivFunction"]


def _check_inputs(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, temperature: float, reduction: str,
                  op: str) -> None:
    """Shape / dtype / temperature / reduction checks (the NaN/Inf check is done per backend, see below)."""
    _checks.check_float(a, na, op)
    _checks.check_float(b, nb, op)
    _checks.check_ndim(a, na, op, (2,))
    _checks.check_same_shape(a, b, na, nb, op)
    _checks.check_same_device([a, b], [na, nb], op)
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{op}: '{na}' must have at least one row and one class, got shape {tuple(a.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _k.REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_k.REDUCTIONS}, got {reduction!r}")


def _row_loss_message(na: str, nb: str, op: str) -> str:
    return (f"{op}: '{na}' or '{nb}' contains NaN or Inf (or '{na}' / temperature overflows float32); "
            "check the upstream computation or disable checks with DFKD_FAST_CHECKS=0")


def _check_loss(loss: torch.Tensor, na: str, nb: str, op: str) -> None:
    """NaN/Inf check of the fused paths on the (reduced or per-row) loss: any NaN/Inf input makes its row loss,
    hence the reduced loss, non-finite, so this replaces a full pass over both (N, K) inputs. A device flag
    inside :func:`dfkd_fast._checks.deferred` (no sync), one host read outside."""
    if _checks.checks_enabled():
        _checks.expect(torch.isfinite(loss.detach()).all(), _row_loss_message(na, nb, op))


def _fused(backend: str, kind: str, a: torch.Tensor, b: torch.Tensor, temperature: float, scale: float,
           need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if backend == "triton":
        fn = _k.soft_target_cross_entropy_fwd if kind == "ce" else _k.kd_kl_div_fwd
        return fn(a, b, float(temperature), scale, need_a, need_b)
    ext = _backend.extension()
    fn = ext.soft_ce_fwd if kind == "ce" else ext.kd_kl_fwd
    loss, ga, gb = fn(a, b, float(temperature), scale, need_a, need_b)
    return loss, ga, gb


def _forward_impl(kind: str, op: str, a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str,
                  need_a: bool, need_b: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = _k.reduction_scale(reduction, a.shape[0], op)
    loss, ga, gb = _fused(backend, kind, a, b, temperature, scale, need_a, need_b)
    loss = loss if reduction == "none" else loss.sum() * scale
    # custom ops cannot return None: an empty tensor stands for "not requested"
    return loss, (ga if ga is not None else a.new_empty(0)), (gb if gb is not None else b.new_empty(0))


def _fake_impl(a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str, need_a: bool, need_b: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    loss = a.new_empty((a.shape[0],) if reduction == "none" else (), dtype=acc)
    ga = a.new_empty(a.shape) if need_a else a.new_empty(0)
    gb = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return loss, ga, gb


def _soft_ce_impl(logits: torch.Tensor, targets: torch.Tensor, temperature: float, reduction: str, need_logits: bool,
                  need_targets: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d logits, d loss/d targets) in one fused pass; unrequested gradients are empty tensors."""
    return _forward_impl("ce", "soft_target_cross_entropy", logits, targets, temperature, reduction, need_logits,
                         need_targets, backend)


def _kd_kl_impl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str,
                need_student: bool, need_teacher: bool, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d student, d loss/d teacher) in one fused pass; unrequested gradients are empty tensors."""
    return _forward_impl("kl", "kd_kl_div", student_logits, teacher_logits, temperature, reduction, need_student,
                         need_teacher, backend)


_soft_ce_op = torch.library.custom_op("dfkd_fast::soft_target_cross_entropy", mutates_args=())(_soft_ce_impl)
_kd_kl_op = torch.library.custom_op("dfkd_fast::kd_kl_div", mutates_args=())(_kd_kl_impl)
_soft_ce_op.register_fake(_fake_impl)
_kd_kl_op.register_fake(_fake_impl)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.per_row = inputs[3] == "none"
    ctx.need = (inputs[4], inputs[5])
    ctx.set_materialize_grads(False)


def _scale_grad(g: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    if per_row:
        return (g * grad_output.view(-1, 1)).to(g.dtype)
    return g * grad_output.to(torch.float32 if g.dtype != torch.float64 else g.dtype)


def _backward(ctx, grad_output, _g_a=None, _g_b=None):
    ga, gb = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 7
    da = _scale_grad(ga, grad_output, ctx.per_row) if ctx.need[0] and ctx.needs_input_grad[0] else None
    db = _scale_grad(gb, grad_output, ctx.per_row) if ctx.need[1] and ctx.needs_input_grad[1] else None
    return da, db, None, None, None, None, None


_soft_ce_call = fused_op(_soft_ce_op, _soft_ce_impl, _setup, _backward, "SoftTargetCrossEntropyBackward")
_kd_kl_call = fused_op(_kd_kl_op, _kd_kl_impl, _setup, _backward, "KDKLDivBackward")


def _fused_loss(fn, a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str, backend: str,
                names: tuple[str, str], op: str) -> torch.Tensor:
    grad = torch.is_grad_enabled()
    loss, _, _ = fn(a, b, float(temperature), reduction, grad and a.requires_grad, grad and b.requires_grad, backend)
    _check_loss(loss, *names, op)
    return loss


class _FusedSoftLoss:
    """Autograd-Function-like front of the registered fused ops (``apply(a, b, temperature, reduction, backend)``).

    Kept for callers of the former ``torch.autograd.Function`` classes; the ops themselves are
    ``dfkd_fast::soft_target_cross_entropy`` / ``dfkd_fast::kd_kl_div`` (fake implementation + autograd).
    """

    OP: str = ""
    NAMES: tuple[str, str] = ("", "")

    @classmethod
    def apply(cls, a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str, backend: str) -> torch.Tensor:
        fn = _soft_ce_call if cls.OP == "soft_target_cross_entropy" else _kd_kl_call
        return _fused_loss(fn, a, b, temperature, reduction, backend, cls.NAMES, cls.OP)


class SoftTargetCrossEntropyFunction(_FusedSoftLoss):
    """Fused soft-target CE; gradients w.r.t. logits and (if required) targets are computed in forward."""

    OP, NAMES = "soft_target_cross_entropy", ("logits", "targets")


class KDKLDivFunction(_FusedSoftLoss):
    """Fused KD KL * T^2; the teacher gradient is computed only when the teacher logits require grad."""

    OP, NAMES = "kd_kl_div", ("student_logits", "teacher_logits")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                              reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of temperature-softened logits to soft targets (Data Impressions / ZSKD loss).

    .. math::
        \\ell_i = -\\sum_j y_{ij} \\log \\mathrm{softmax}(z_i / T)_j, \\qquad
        \\frac{\\partial \\ell_i}{\\partial z_i} = \\frac{\\mathrm{softmax}(z_i/T) \\sum_j y_{ij} - y_i}{T}

    The temperature is applied once. ``mean``/``batchmean`` divide by N, ``sum`` adds, ``none`` keeps rows.

    Shape: logits (N, K), targets (N, K) (fp32/fp16/bf16, any strides) -> () or (N,) fp32.
    Gradients come back in each input's dtype; targets get a gradient only if they require one.

    Args:
        logits: student / teacher logits z.
        targets: soft targets y (rows need not sum to 1; the gradient uses sum_j y_ij).
        temperature: T > 0.
        reduction: ``"mean" | "batchmean" | "sum" | "none"``.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
    """
    op = "soft_target_cross_entropy"
    _check_inputs(logits, targets, "logits", "targets", temperature, reduction, op)
    chosen = _backend.resolve(op, backend, logits.device, triton=True, cpp="soft_ce_fwd")
    if chosen == "torch":
        _checks.check_finite(logits, "logits", op)
        _checks.check_finite(targets, "targets", op)
        loss = soft_target_cross_entropy_ref(logits, targets, temperature, reduction)
        _check_loss(loss, "logits", "targets", op)  # finite inputs can still overflow (logits / T): as the fused paths
        return loss
    return _fused_loss(_soft_ce_call, logits, targets, temperature, reduction, chosen, ("logits", "targets"), op)


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """Hinton KD loss ``KL(softmax(t/T) || softmax(s/T)) * T^2``, differentiable w.r.t. both logits.

    .. math::
        \\ell_i = T^2 \\sum_j p_{ij} (\\log p_{ij} - \\log q_{ij}),\\quad p = \\mathrm{softmax}(t/T),\\;
        q = \\mathrm{softmax}(s/T);\\quad \\partial_s \\ell_i = T (q_i - p_i),\\;
        \\partial_t \\ell_i = T p_i (\\log p_i - \\log q_i - \\ell_i / T^2)

    Shape: student (N, K), teacher (N, K) -> () or (N,) fp32. ``batchmean``/``mean`` divide the sum by N.
    The teacher gradient (generator training through the teacher, CMI/ZSKT adversarial terms) is computed
    only when ``teacher_logits.requires_grad``.

    Args:
        student_logits: s.
        teacher_logits: t.
        temperature: T > 0.
        reduction: ``"batchmean" | "mean" | "sum" | "none"``.
        backend: ``"auto" | "triton" | "cpp" | "torch"``.
    """
    op = "kd_kl_div"
    _check_inputs(student_logits, teacher_logits, "student_logits", "teacher_logits", temperature, reduction, op)
    chosen = _backend.resolve(op, backend, student_logits.device, triton=True, cpp="kd_kl_fwd")
    if chosen == "torch":
        _checks.check_finite(student_logits, "student_logits", op)
        _checks.check_finite(teacher_logits, "teacher_logits", op)
        loss = kd_kl_div_ref(student_logits, teacher_logits, temperature, reduction)
        _check_loss(loss, "student_logits", "teacher_logits", op)  # overflow of logits / T, as the fused paths
        return loss
    return _fused_loss(_kd_kl_call, student_logits, teacher_logits, temperature, reduction, chosen,
                       ("student_logits", "teacher_logits"), op)
