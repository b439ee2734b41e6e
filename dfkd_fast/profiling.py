"""Count what a GPU would punish, on any device: host syncs and aten launches.

:class:`SyncCounter` is a ``TorchDispatchMode`` (plus a ``TorchFunctionMode`` for the host reads that never
reach the dispatcher on CPU tensors) that records, while active:

- ``syncs``: ops that force a device->host synchronization on CUDA -- reading a value on the host
  (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.numpy()``: ``_local_scalar_dense`` /
  ``is_nonzero`` at the aten level), and ops whose output shape depends on the data (``nonzero``,
  ``masked_select``, ``unique``, ``bincount`` without ``minlength`` known, ``repeat_interleave`` without
  ``output_size``, boolean-mask indexing);
- ``aten_ops``: every aten op dispatched (a proxy for kernel launches).

Counting on CPU gives the same numbers a CUDA run would sync on: the sync is a property of the op, not the
device. Use :func:`count_syncs` around one call, or the context manager::

    with SyncCounter() as sc:
        synth.synthesize()
    sc.syncs, sc.aten_ops, sc.where  # where: "op @ file:line" of each sync (with record_stack=True)
"""
from __future__ import annotations

import collections
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "count_syncs", "SYNC_OPS"]

_aten = torch.ops.aten

#: aten overload packets that always force a host sync (value read or data-dependent output shape).
SYNC_OPS = frozenset(getattr(_aten, n) for n in (
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "equal", "allclose") if hasattr(_aten, n))

# Host reads that, on CPU tensors, bypass the dispatcher (they read memory directly) but sync on CUDA.
_HOST_READS = frozenset({"tolist", "numpy", "__array__", "item", "__float__", "__int__", "__bool__", "__index__"})


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet is _aten.repeat_interleave:
        return kwargs.get("output_size") is None
    if packet in (_aten.index, _aten.index_put, _aten.index_put_):
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx if i is not None)
    return False


class _HostReadMode(TorchFunctionMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and isinstance(args[0], torch.Tensor) and self.owner._depth == 0:
            self.owner._record(f"Tensor.{name}", host_read=True)
        self.owner._depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.owner._depth -= 1


class SyncCounter(TorchDispatchMode):
    """Counts host-sync-forcing ops and all aten ops while active (nests with other modes).

    Attributes:
        syncs: number of sync-forcing events (a host read such as ``.item()`` counts once, not also as the
            ``_local_scalar_dense`` it dispatches to).
        aten_ops: number of aten ops dispatched (launch proxy).
        by_op: ``Counter`` of sync events per op name.
        where: ``"op @ file:line"`` of each sync event (when ``record_stack``), innermost dfkd_fast frame.
        optimizer_host_reads: reads of ``torch.optim``'s host-side step counters (not syncs: with
            ``capturable=False`` the counter is a CPU tensor on every device), reported apart.
    """

    def __init__(self, record_stack: bool = True) -> None:
        super().__init__()
        self.record_stack = record_stack
        self.syncs = 0
        self.aten_ops = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self.where: list[str] = []
        self.optimizer_host_reads = 0
        self._depth = 0  # >0 while inside a host read already counted at the Python level
        self._fn_mode = _HostReadMode(self)

    def _record(self, name: str, host_read: bool = False) -> None:
        stack = traceback.extract_stack()[:-2]
        if host_read and stack and "/torch/optim/" in stack[-1].filename.replace("\\", "/"):
            # torch.optim keeps its step counter on the host (capturable=False): reading it never syncs.
            self.optimizer_host_reads += 1
            return
        self.syncs += 1
        self.by_op[name] += 1
        if self.record_stack:
            frames = [f for f in stack if "dfkd_fast" in f.filename and not f.filename.endswith("profiling.py")]
            loc = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
            self.where.append(f"{name} @ {loc}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.aten_ops += 1
        if self._depth == 0 and _is_sync(func, args, kwargs):
            self._record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def __enter__(self) -> SyncCounter:
        self._fn_mode.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._fn_mode.__exit__(*exc)

    def reset(self) -> None:
        self.syncs = 0
        self.aten_ops = 0
        self.by_op.clear()
        self.where.clear()
        self.optimizer_host_reads = 0


def count_syncs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`SyncCounter`; returns (result, counter)."""
    with SyncCounter() as sc:
        out = fn(*args, **kwargs)
    return out, sc
