"""Collectives for multi-process synthesis, at the building-block level (SPEC §8).

Every function works without an initialized ``torch.distributed`` process group: a single process is
world size 1, and each collective is then the identity (no copy, no communication). Building blocks
(``contrast.MemoryBank``) and synthesizers (``FastMeta``) call these, never ``dfkd_fast.distributed``
(process-group setup and launching live there, above the synthesizers).

- :func:`rank`, :func:`world_size`, :func:`is_distributed`, :func:`barrier`
- :func:`all_gather_rows`: every rank's rows, concatenated in rank order (row counts may differ).
- :func:`all_reduce_mean_`: in-place mean over ranks of a list of tensors, one coalesced all-reduce per dtype.
- :func:`broadcast_object`, :func:`broadcast_tensors_`: rank ``src``'s value on every rank.
- :func:`rank_seed`: a distinct seed per rank; :func:`wrap_ddp`: ``DistributedDataParallel`` for W > 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["rank", "world_size", "is_distributed", "barrier", "all_gather_rows", "all_reduce_mean_",
           "broadcast_object", "broadcast_tensors_", "rank_seed", "wrap_ddp"]


def _world(group: Any = None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank (0 without an initialized process group)."""
    return _world(group)[0]


def world_size(group: Any = None) -> int:
    """Number of processes in the group (1 without an initialized process group)."""
    return _world(group)[1]


def is_distributed(group: Any = None) -> bool:
    """True when a process group with more than one rank is initialized."""
    return _world(group)[1] > 1


def barrier(group: Any = None, device: torch.device | None = None) -> None:
    """Wait for every rank (no-op for one process). ``device``: this rank's CUDA device under NCCL."""
    if _world(group)[1] == 1:
        return
    if device is not None and device.type == "cuda" and dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[device.index or 0])
    else:
        dist.barrier(group=group)


def all_gather_rows(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; row counts may differ between ranks.

    Shape: (n_r, *S) on rank r -> (sum_r n_r, *S) on every rank. Without a process group: ``t`` itself.
    """
    world = _world(group)[1]
    if world == 1:
        return t
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in torch.cat(sizes).tolist()]  # one device->host read for all counts
    m = max(counts)
    padded = t if t.shape[0] == m else torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


def all_reduce_mean_(tensors: Sequence[torch.Tensor | None], group: Any = None) -> None:
    """Average tensors over ranks in place, in one coalesced (flattened) all-reduce per dtype.

    ``None`` entries (e.g. parameters without a gradient) are skipped. No-op for one process.

    .. math:: g \\leftarrow \\tfrac{1}{W} \\textstyle\\sum_r g_r
    """
    world = _world(group)[1]
    ts = [t for t in tensors if t is not None]
    if world == 1 or not ts:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in ts:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group_ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        views = flat.split([t.numel() for t in group_ts])
        torch._foreach_copy_(group_ts, [v.view_as(t) for v, t in zip(views, group_ts, strict=True)])


def broadcast_object(obj: Any, src: int = 0, group: Any = None, device: torch.device | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors come back on ``device`` or the CPU)."""
    if _world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, one coalesced broadcast per dtype.

    Every rank passes tensors of the same shapes and dtypes, in the same order. No-op for one process.
    """
    if _world(group)[1] == 1 or not tensors:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group_ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group_ts])
        dist.broadcast(flat, src=src, group=group)
        views = flat.split([t.numel() for t in group_ts])
        torch._foreach_copy_(group_ts, [v.view_as(t) for v, t in zip(views, group_ts, strict=True)])


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for rank ``rank`` of a run seeded with ``seed`` (SeedSequence mix; distinct per rank)."""
    import numpy as np

    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), 0x5EED]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when a multi-rank group is up, else ``model`` unchanged.

    DDP broadcasts rank 0's parameters and buffers at construction and averages gradients in ``backward``.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)
