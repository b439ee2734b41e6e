"""Input validation shared by the ops: clear ``ValueError`` messages that say what to change.

Shape, dtype and device checks read only metadata (no sync). Value checks (NaN/Inf, ranges) need a device
value on the host. Called on their own, ops check at once (one host read per call). Inside
:func:`deferred` (what every synthesizer wraps a batch in), a value check instead records a boolean flag on
the device (no sync) and the block checks all flags once when it ends, raising the ``ValueError`` of the
first failed check -- which names the op, the argument and the layer (:func:`expect` for one flag,
:func:`expect_each` for one flag per layer from a single device op). ``DFKD_FAST_CHECKS=0`` or
:func:`set_checks` turns value checks off; they are skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

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


class DeferredChecks:
    """Device-side flags of value checks made inside :func:`deferred`; :meth:`check` reads them once.

    Flags with the same message (or the same tuple of messages, for a vector of flags from
    :func:`expect_each`) are AND-ed on the device (a loop of many steps keeps one flag per check site, not one
    per step). ``check()`` costs one host read for all of them and raises the ``ValueError`` of the first
    failed check, in the order the checks were first made.
    """

    def __init__(self) -> None:
        self._flags: dict[str | tuple[str, ...], torch.Tensor] = {}

    def add(self, ok: torch.Tensor, message: str | tuple[str, ...]) -> None:
        """Record ``ok`` (a bool scalar, or a bool vector with one entry per message of a tuple)."""
        ok = ok.detach().reshape(-1 if isinstance(message, tuple) else ())
        prev = self._flags.get(message)
        self._flags[message] = ok if prev is None else torch.logical_and(prev, ok)

    def __len__(self) -> int:
        return len(self._flags)

    def check(self) -> None:
        """Raise the first failed check's ``ValueError`` (one host read); clears the flags."""
        if not self._flags:
            return
        keys = list(self._flags)
        dev = self._flags[keys[0]].device
        oks = torch.cat([f.to(dev).reshape(-1) for f in self._flags.values()]).tolist()
        self._flags.clear()
        msgs = [m for k in keys for m in (k if isinstance(k, tuple) else (k,))]
        for ok, msg in zip(oks, msgs, strict=True):
            if not ok:
                raise ValueError(msg)


_DEFERRED: list[DeferredChecks] = []


@contextlib.contextmanager
def deferred(check_on_exit: bool = True) -> Iterator[DeferredChecks]:
    """Collect value checks on the device inside the block; check them all once when it ends.

    Nested blocks share the outermost collector. ``check_on_exit=False`` leaves the final
    :meth:`DeferredChecks.check` to the caller (e.g. to check before a batch's results are used).
    """
    if _DEFERRED:
        yield _DEFERRED[-1]
        return
    guard = DeferredChecks()
    _DEFERRED.append(guard)
    failed = False
    try:
        yield guard
    except BaseException:
        failed = True
        raise
    finally:
        _DEFERRED.remove(guard)
        if check_on_exit and not failed:
            guard.check()


def expect(ok: torch.Tensor, message: str) -> None:
    """Value check: ``ok`` is a bool tensor that must be all-true, else ``ValueError(message)``.

    At once (one host read) outside :func:`deferred`; recorded on the device (no sync) inside it; skipped
    when checks are off or while ``torch.compile`` traces.
    """
    if not checks_enabled():
        return
    ok = ok.all() if ok.numel() != 1 else ok.reshape(())
    if _DEFERRED:
        _DEFERRED[-1].add(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def expect_each(ok: torch.Tensor, messages: Sequence[str]) -> None:
    """Vector value check: ``ok[i]`` (bool) must hold, else ``ValueError(messages[i])`` (first failure wins).

    One flag per layer in one device op (e.g. ``torch.isfinite(per_layer_losses)``): the error names the layer
    without a host read per layer. At once outside :func:`deferred`, recorded on the device inside it.
    """
    if not checks_enabled():
        return
    messages = tuple(messages)
    if ok.numel() != len(messages):
        raise ValueError(f"expect_each: got {ok.numel()} flags for {len(messages)} messages")
    if _DEFERRED:
        _DEFERRED[-1].add(ok, messages)
        return
    for flag, msg in zip(ok.reshape(-1).tolist(), messages, strict=True):
        if not flag:
            raise ValueError(msg)


def in_deferred() -> bool:
    """Whether value checks are currently collected by a :func:`deferred` block."""
    return bool(_DEFERRED)


def finite_message(name: str, op: str) -> str:
    return (f"{op}: '{name}' contains NaN or Inf; check the upstream computation "
            "(learning rate, input scaling) or disable checks with DFKD_FAST_CHECKS=0")


def check_finite(t: torch.Tensor, name: str, op: str) -> None:
    """NaN/Inf check of ``t`` via :func:`expect` (deferred to the end of a :func:`deferred` block)."""
    if checks_enabled() and t.numel():
        expect(torch.isfinite(t).all(), finite_message(name, op))


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
