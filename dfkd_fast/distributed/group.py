"""Process-group setup for multi-process synthesis and online KD (launched by ``torchrun``; SPEC §8).

:func:`init_distributed` joins (or creates, from torchrun's environment) the process group -- NCCL on CUDA,
gloo on CPU -- and returns this process's :class:`DistContext`; :func:`DistContext.local` is the context of a
single process (world size 1, no group). :func:`wrap_ddp` wraps an online-KD student in
``DistributedDataParallel`` (both re-exported from :mod:`dfkd_fast.comm`, where the collectives are).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dfkd_fast import comm
from dfkd_fast.comm import rank_seed, wrap_ddp

__all__ = ["DistContext", "init_distributed", "shutdown", "rank_seed", "module_checksum", "wrap_ddp",
           "enable_distributed", "sync_shared_state"]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a process group.

    Attributes:
        rank, world_size, local_rank: as set by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
        device: this rank's device (``cuda:<local_rank>`` or cpu).
        backend: process-group backend (``"nccl"`` or ``"gloo"``; ``"none"`` for a single process).
        owns_group: :func:`init_distributed` created the group (so :func:`shutdown` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False

    @classmethod
    def local(cls, device: torch.device | str | None = None) -> DistContext:
        """A single process: rank 0 of world size 1, no process group."""
        return cls(0, 1, 0, torch.device(device) if device is not None else torch.device("cpu"), "none")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.world_size > 1:
            comm.barrier(device=self.device if self.backend == "nccl" else None)


def _resolve_rank_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str | torch.device | None = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistContext:
    """Join the process group (created from torchrun's environment unless one is already initialized).

    Args:
        device: ``"auto"`` (``cuda:<LOCAL_RANK>`` when CUDA is available, else cpu), ``"cpu"``, ``"cuda"``
            (-> ``cuda:<LOCAL_RANK>``) or an explicit ``"cuda:N"``.
        backend: ``"nccl"`` / ``"gloo"``; default NCCL for CUDA devices, gloo for CPU.
        timeout_s: collective timeout of a newly created group.

    Raises:
        ValueError: no group and no torchrun environment, or NCCL asked for with a CPU device.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build; run without --distributed")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        dev = _resolve_rank_device(device, local_rank)
        return DistContext(rank, world, local_rank, dev, str(dist.get_backend()), owns_group=False)
    missing = [v for v in _TORCHRUN_ENV if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment torchrun sets (missing {', '.join(missing)}); launch "
                         "with `torchrun --nproc_per_node K -m dfkd_fast synthesize ... --distributed`, or drop "
                         "--distributed for one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_rank_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend nccl needs CUDA devices; use --device cuda or the gloo backend on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, dev, backend, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def module_checksum(module: nn.Module | Iterable[torch.Tensor]) -> str:
    """sha256 over the raw bytes of a module's parameters (or of the given tensors), in order."""
    tensors = module.parameters() if isinstance(module, nn.Module) else module
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().to("cpu").contiguous()
        h.update(f"{c.dtype}|{tuple(c.shape)}|".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def enable_distributed(synth: Any, group: Any = None) -> bool:
    """Install ``synth``'s collectives (``Synthesizer.setup_comm``); returns whether the method communicates."""
    return bool(synth.setup_comm(group))


def sync_shared_state(synth: Any, src: int = 0, group: Any = None) -> None:
    """Load rank ``src``'s shared synthesizer state on every rank (``Synthesizer.share_state``)."""
    synth.share_state(src, group)
