"""Input validation shared by the ops: clear ``ValueError`` messages that say what to change.

Finite-value checks need a host sync; they are on by default and can be turned off in tight loops with
``DFKD_FAST_CHECKS=0`` or :func:`set_checks`. They are skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_enabled = os.environ.get("DFKD_FAST_CHECKS", "1") != "0"


def set_checks(enabled: bool) -> None:
    """Turn the NaN/Inf checks of every op on or off (shape checks always run)."""
    global _enabled
    _enabled = bool(enabled)


def checks_enabled() -> bool:
    return _enabled and not torch.compiler.is_compiling()


def check_float(t: torch.Tensor, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{op}: '{name}' must be float32/float16/bfloat16/float64, got {t.dtype}")


def check_finite(t: torch.Tensor, name: str, op: str) -> None:
    if checks_enabled() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: '{name}' contains NaN or Inf; check the upstream computation "
                         "(learning rate, input scaling) or disable checks with DFKD_FAST_CHECKS=0")


def check_ndim(t: torch.Tensor, name: str, op: str, ndims: Sequence[int]) -> None:
    if t.dim() not in ndims:
        raise ValueError(f"{op}: '{name}' must have {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, op: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{op}: '{na}' and '{nb}' must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_same_device(tensors: Sequence[torch.Tensor], names: Sequence[str], op: str) -> None:
    devs = {t.device for t in tensors}
    if len(devs) > 1:
        desc = ", ".join(f"{n}:{t.device}" for n, t in zip(names, tensors, strict=False))
        raise ValueError(f"{op}: all inputs must be on one device, got {desc}")
