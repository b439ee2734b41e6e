"""Public ``info_nce`` (dispatch: triton | torch): per-row InfoNCE, positive on the same row (SPEC §3.2)."""
from __future__ import annotations

import math

import torch

from dfkd_fast import _backend, _checks
from dfkd_fast.kernels.info_nce import info_nce_bwd, info_nce_fwd, info_nce_ref
from dfkd_fast.ops._registry import fused_op

__all__ = ["info_nce", "InfoNCEFunction"]

_OP = "info_nce"


def _info_nce_fwd_impl(query: torch.Tensor, keys: torch.Tensor, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce_fwd(query, keys, temperature)


def _info_nce_bwd_impl(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                       temperature: float, need_dq: bool, need_dk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = info_nce_bwd(query, keys, lse, grad_loss, temperature, need_dq=need_dq, need_dk=need_dk)
    # custom ops cannot return None: an empty tensor stands for "not requested"
    return (dq if dq is not None else query.new_empty(0)), (dk if dk is not None else keys.new_empty(0))


_info_nce_fwd_op = torch.library.custom_op("dfkd_fast::info_nce_fwd", mutates_args=())(_info_nce_fwd_impl)
_info_nce_bwd_op = torch.library.custom_op("dfkd_fast::info_nce_bwd", mutates_args=())(_info_nce_bwd_impl)


@_info_nce_fwd_op.register_fake
def _(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = query.shape[0]
    return query.new_empty(m, dtype=torch.float32), query.new_empty(m, dtype=torch.float32)


@_info_nce_bwd_op.register_fake
def _(query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, temperature: float,
      need_dq: bool, need_dk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dq = torch.empty_like(query, memory_format=torch.contiguous_format) if need_dq else query.new_empty(0)
    dk = torch.empty_like(keys, memory_format=torch.contiguous_format) if need_dk else keys.new_empty(0)
    return dq, dk


def _setup(ctx, inputs, output) -> None:
    query, keys, temperature = inputs
    ctx.save_for_backward(query, keys, output[1])
    ctx.temperature = temperature
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_lse=None):
    """Recomputes the key tiles (only (query, keys, lse) were saved: O(M D) memory, never the (M, M) logits)."""
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_dq or need_dk):
        return None, None, None
    query, keys, lse = ctx.saved_tensors
    bwd = _info_nce_bwd_impl if ctx.eager else _info_nce_bwd_op
    dq, dk = bwd(query, keys, lse, grad_loss, ctx.temperature, need_dq, need_dk)
    return (dq if need_dq else None), (dk if need_dk else None), None


_info_nce_call = fused_op(_info_nce_fwd_op, _info_nce_fwd_impl, _setup, _backward, "InfoNCEFunction")


class InfoNCEFunction:
    """Tiled InfoNCE: ``apply(query, keys, temperature) -> (M,)`` per-row losses.

    The ``dfkd_fast::info_nce_fwd`` / ``dfkd_fast::info_nce_bwd`` custom ops (fake implementations, autograd
    registered on the forward) are what ``torch.compile`` traces; eager calls run the same code through an
    autograd.Function (:mod:`dfkd_fast.ops._registry`).
    """

    @staticmethod
    def apply(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
        return _info_nce_call(query, keys, float(temperature))[0]


def _check(query: torch.Tensor, keys: torch.Tensor, temperature: float) -> float:
    _checks.check_float(query, "query", _OP)
    _checks.check_float(keys, "keys", _OP)
    _checks.check_ndim(query, "query", _OP, (2,))
    _checks.check_ndim(keys, "keys", _OP, (2,))
    _checks.check_same_shape(query, keys, "query", "keys", _OP)
    _checks.check_same_device([query, keys], ["query", "keys"], _OP)
    if query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"{_OP}: query and keys need at least one row and one column, got {tuple(query.shape)}")
    if query.dtype != keys.dtype:
        raise ValueError(f"{_OP}: query and keys must share a dtype, got {query.dtype} and {keys.dtype}; "
                         "cast one of them")
    if isinstance(temperature, torch.Tensor):  # a host read: pass a python float in the hot loop
        if temperature.numel() != 1:
            raise ValueError(f"{_OP}: temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{_OP}: temperature must be a finite number > 0, got {temperature}")
    _checks.check_finite(query, "query", _OP)
    _checks.check_finite(keys, "keys", _OP)
    return t


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.1, backend: str = "auto") -> torch.Tensor:
    r"""Per-row InfoNCE loss with the positive on the same row (CMI, Fang et al. 2021).

    .. math::
        \ell_i = \log \sum_j \exp(q_i \cdot k_j / T) - q_i \cdot k_i / T,
        \quad \partial \ell_i / \partial q_i = (\textstyle\sum_j P_{ij} k_j - k_i) / T,
        \quad P = \mathrm{softmax}_{\text{row}}(Q K^\top / T).

    The Triton path streams key tiles with an online log-sum-exp and recomputes them in backward, so memory
    is O(M D); ``keys`` gets a gradient only if it requires one. The torch path is :func:`info_nce_ref`
    (materializes the (M, M) logits). Accumulation is fp32 for every input dtype.

    Args:
        query: (M, D) float32/float16/bfloat16 (float64 on the torch path).
        keys: (M, D), same dtype and device; row i is the positive of query row i.
        temperature: T > 0.
        backend: ``"auto" | "triton" | "torch"`` (no cpp implementation: ``auto`` on CPU is torch).

    Returns:
        (M,) float32 per-row losses (float64 for float64 inputs).

    Shape:
        query (M, D), keys (M, D) -> (M,).

    Raises:
        ValueError: non-2-D or mismatched inputs, T <= 0, NaN/Inf, float64 with ``backend="triton"``.
    """
    t = _check(query, keys, temperature)
    chosen = _backend.resolve(_OP, backend, query.device, triton=True, cpp=None)
    if chosen == "triton" and query.dtype == torch.float64:
        if backend == "triton":
            raise ValueError(f"{_OP}: backend='triton' takes float32/float16/bfloat16; use backend='torch' for float64")
        chosen = "torch"
    if chosen == "triton":
        return InfoNCEFunction.apply(query, keys, t)
    return info_nce_ref(query, keys, t)
