"""Multi-process / multi-GPU synthesis on ``torch.distributed`` (launched by ``torchrun``; SPEC §8).

``torchrun --nproc_per_node K -m dfkd_fast synthesize ... --distributed`` starts K processes; each joins the
process group (:func:`init_distributed`: NCCL on CUDA, gloo on CPU) and runs its part of the ONE synthesis
run loop, ``dfkd_fast.runner.run_synthesis`` (a single process is world size 1 of the same loop):

- **Disjoint work.** The run's ``ceil(N / batch_size)`` batches are split into W contiguous ranges
  (``runner.rank_plan``); rank r synthesizes its range into its own shards ``shard-{r:03d}-*`` of ONE transfer
  set directory, batch b of rank r seeded with ``batch_seed(seed, b, r)``. A 1-rank run equals the plain run.
- **One manifest.** Every rank closes its writer (``done-{r}.json``); after a barrier rank 0 merges them into
  ``manifest.json`` atomically (temp file + rename).
- **Resume per rank.** Each rank has its own journal and synthesizer state: after any rank dies, relaunching
  with ``--resume`` continues every rank after its last committed shard; nothing is lost or duplicated.
- **Shared state.** A method that shares state overrides ``Synthesizer.setup_comm`` (install collectives) and
  lists its shared ``state_dict`` keys in ``Synthesizer.shared_state`` (``share_state`` broadcasts them from
  rank 0 on resume). CMI's memory bank all-gathers each batch's (local, global) features; FastMeta's meta
  generator is one model, its meta-gradients averaged by all-reduce before the meta step. Methods with such
  collectives run in lockstep: every rank makes the same number of ``synthesize`` calls (a rank whose range
  is done synthesizes filler batches that are not written).
- **Online KD.** :func:`wrap_ddp` wraps the student in ``DistributedDataParallel``
  (``dfkd_fast.tasks.distill.distill_online`` does it when a process group is up).
- **Throughput.** Images/s per rank and in total (sum of images / slowest rank's synthesis seconds),
  printed by rank 0 and stored in the manifest's summary.

Modules: :mod:`~dfkd_fast.distributed.group` (process group, DDP), :mod:`~dfkd_fast.distributed.torchrun`
(flag clashes with torchrun's parser); collectives in :mod:`dfkd_fast.comm`; the run loop in
:mod:`dfkd_fast.runner`. ``run_distributed_synthesis``, ``synthesize_distributed_from_config``, ``rank_plan``,
``RankPlan``, ``format_throughput`` and ``write_pool`` are re-exported from there (resolved on first use, so
this package never imports the run loop at import time).

Communication per synthesized batch of B images (fp32): CMI all-gathers W x B x (D_l + D_g) x 4 bytes;
FastMeta all-reduces the meta generator's gradients (4 bytes per parameter); pixel methods communicate
nothing until the final barrier. See ``benchmarks/results/scaling.md``.
"""
from __future__ import annotations

from typing import Any

from dfkd_fast.comm import all_gather_rows, all_reduce_mean_, broadcast_object, rank, world_size
from dfkd_fast.distributed.group import (
    DistContext,
    enable_distributed,
    init_distributed,
    module_checksum,
    rank_seed,
    shutdown,
    sync_shared_state,
    wrap_ddp,
)
from dfkd_fast.distributed.torchrun import torchrun_clashes, torchrun_option_strings
from dfkd_fast.transfer_set import write_tensors

__all__ = ["DistContext", "RankPlan", "init_distributed", "shutdown", "rank", "world_size", "rank_seed", "rank_plan",
           "all_gather_rows", "all_reduce_mean_", "broadcast_object", "module_checksum", "enable_distributed",
           "sync_shared_state", "wrap_ddp", "torchrun_option_strings", "torchrun_clashes",
           "run_distributed_synthesis", "format_throughput", "write_pool", "synthesize_distributed_from_config",
           "SHARED_STATE"]

_FROM_RUNNER = ("RankPlan", "rank_plan", "run_distributed_synthesis", "synthesize_distributed_from_config",
                "format_throughput")


def write_pool(out: str, images: Any, logits: Any, meta: dict[str, Any], shard_size: int = 4096) -> str:
    """Every rank writes its own images + teacher logits as its shards of ONE transfer set
    (``dfkd_fast.transfer_set.write_tensors(..., collective=True)``). Every rank of the group must call it."""
    return write_tensors(out, images, logits, meta, shard_size=shard_size, collective=True)


def __getattr__(name: str) -> Any:
    """The run-loop names (``dfkd_fast.runner``) and ``SHARED_STATE``, resolved on first use."""
    if name in _FROM_RUNNER:
        from dfkd_fast import runner

        return getattr(runner, name)
    if name == "SHARED_STATE":  # per method: the state_dict keys that are one model across ranks
        from dfkd_fast.synthesis import REGISTRY

        return {k: tuple(c.shared_state) for k, c in REGISTRY.items() if c.shared_state}
    raise AttributeError(f"module 'dfkd_fast.distributed' has no attribute {name!r}")
