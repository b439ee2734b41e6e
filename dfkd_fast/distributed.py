"""Multi-process / multi-GPU synthesis on ``torch.distributed`` (launched by ``torchrun``; SPEC §8).

``torchrun --nproc_per_node K -m dfkd_fast synthesize ... --distributed`` starts K processes; each calls
:func:`init_distributed` (NCCL on CUDA, gloo on CPU, from the environment torchrun sets) and
:func:`run_distributed_synthesis`:

- **Disjoint work.** The run's ``ceil(N / batch_size)`` batches are split into W contiguous ranges
  (:func:`rank_plan`); rank r synthesizes its range into its own shards ``shard-{r:03d}-*`` of ONE transfer
  set directory, batch b of rank r seeded with ``batch_seed(seed, b, r)``. A 1-rank run equals the plain run.
- **One manifest.** Every rank closes its writer (``done-{r}.json``); after a barrier rank 0 merges them into
  ``manifest.json`` atomically (temp file + rename).
- **Resume per rank.** Each rank has its own journal and synthesizer state: after any rank dies, relaunching
  with ``--resume`` continues every rank after its last committed shard; nothing is lost or duplicated.
- **Shared state.** CMI's memory bank all-gathers each batch's (local, global) features, so every rank
  contrasts against all ranks' history; FastMeta's meta generator is one model: its meta-gradients are
  averaged by all-reduce before the meta step (:func:`enable_distributed`). Methods with such collectives
  run in lockstep: every rank makes the same number of ``synthesize`` calls (a rank whose range is done
  synthesizes filler batches that are not written) and, on resume, rank 0's shared state is broadcast.
- **Online KD.** :func:`wrap_ddp` wraps the student in ``DistributedDataParallel``
  (``dfkd_fast.tasks.distill.distill_online`` does it when a process group is up).
- **Throughput.** Images/s per rank and in total (sum of images / slowest rank's synthesis seconds),
  printed by rank 0 and stored in the manifest's summary.

Communication per synthesized batch of B images (fp32): CMI all-gathers W x B x (D_l + D_g) x 4 bytes;
FastMeta all-reduces the meta generator's gradients (4 bytes per parameter); pixel methods communicate
nothing until the final barrier. See ``benchmarks/results/scaling.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "RankPlan", "init_distributed", "shutdown", "rank", "world_size", "rank_seed", "rank_plan",
           "all_gather_rows",
           "all_reduce_mean_", "broadcast_object", "module_checksum", "enable_distributed", "sync_shared_state",
           "wrap_ddp", "torchrun_option_strings", "torchrun_clashes", "run_distributed_synthesis",
           "format_throughput", "write_pool", "synthesize_distributed_from_config", "SHARED_STATE"]

#: Synthesizer state keys that are one model across ranks (broadcast from rank 0 on resume).
SHARED_STATE: dict[str, tuple[str, ...]] = {"cmi": ("bank",), "fast_meta": ("generator", "meta_optimizer")}

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a process group.

    Attributes:
        rank, world_size, local_rank: as set by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
        device: this rank's device (``cuda:<local_rank>`` or cpu).
        backend: process-group backend (``"nccl"`` or ``"gloo"``).
        owns_group: :func:`init_distributed` created the group (so :func:`shutdown` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process without a group)."""
        if dist.is_available() and dist.is_initialized():
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()


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


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for rank ``rank`` of a run seeded with ``seed`` (SeedSequence mix; distinct per rank)."""
    import numpy as np

    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), 0x5EED]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@dataclass(frozen=True)
class RankPlan:
    """Rank r's share of a run: global batches ``[first_batch, first_batch + batches)`` holding ``images``."""

    first_batch: int
    batches: int
    images: int


def rank_plan(num_images: int, batch_size: int, world_size: int) -> list[RankPlan]:
    """Split ``ceil(num_images / batch_size)`` batches into ``world_size`` contiguous, near-equal ranges.

    Rank r gets global batches ``[floor(nb r / W), floor(nb (r + 1) / W))``; only the run's last batch may be
    partial. The images of all ranks sum to ``num_images``.
    """
    if num_images < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(f"rank_plan: need num_images, batch_size, world_size >= 1, got {num_images}, "
                         f"{batch_size}, {world_size}")
    nb = math.ceil(num_images / batch_size)
    plans = []
    for r in range(world_size):
        lo, hi = nb * r // world_size, nb * (r + 1) // world_size
        plans.append(RankPlan(lo, hi - lo, max(0, min(hi * batch_size, num_images) - lo * batch_size)))
    return plans


def all_gather_rows(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; row counts may differ between ranks.

    Shape: (n_r, *S) on rank r -> (sum_r n_r, *S) on every rank. Without a process group: ``t`` itself.
    """
    _, world = _world(group)
    if world == 1:
        return t
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    m = max(counts)
    padded = t if t.shape[0] == m else torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=False)])


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group: Any = None) -> None:
    """Average tensors over ranks in place, in one flattened all-reduce per dtype.

    .. math:: g \\leftarrow \\tfrac{1}{W} \\textstyle\\sum_r g_r
    """
    _, world = _world(group)
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def broadcast_object(obj: Any, src: int = 0, group: Any = None, device: torch.device | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors come back on ``device`` or the CPU)."""
    _, world = _world(group)
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


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
    """Install the collectives of ``synth``'s method; returns whether the method now communicates.

    CMI: the memory bank all-gathers each batch's (local, global) features (``bank.all_gather = True``).
    FastMeta: meta-gradients are averaged over ranks before the meta step, and the meta generator (and its
    Adam state) starts from rank 0's. Other methods are independent per rank (nothing installed).
    """
    _, world = _world(group)
    name = getattr(synth, "name", "")
    if name == "cmi":
        synth.bank.all_gather = True
        synth.bank.group = group
        return world > 1
    if name == "fast_meta":
        synth.distributed = True
        synth.process_group = group
        if world > 1:
            sync_shared_state(synth, src=0, group=group)
        return world > 1
    return False


def sync_shared_state(synth: Any, src: int = 0, group: Any = None) -> None:
    """Load rank ``src``'s shared synthesizer state (:data:`SHARED_STATE`) on every rank."""
    keys = SHARED_STATE.get(getattr(synth, "name", ""), ())
    _, world = _world(group)
    if not keys or world == 1:
        return
    rank, _ = _world(group)
    full = synth.state_dict() if rank == src else None
    shared = {k: full[k] for k in keys} if full is not None else None
    shared = broadcast_object(shared, src=src, group=group, device=synth.device if synth.device.type == "cuda"
                              else None)
    if rank == src:
        return
    state = synth.state_dict()
    state.update(shared)
    synth.load_state_dict(state)


def wrap_ddp(model: nn.Module, device: torch.device | None = None, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when a multi-rank group is up, else ``model`` unchanged.

    DDP broadcasts rank 0's parameters and buffers at construction and averages gradients in ``backward``.
    """
    _, world = _world()
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def torchrun_option_strings() -> list[str]:
    """Every option string of torchrun's own parser (``torch.distributed.run.get_args_parser``)."""
    from torch.distributed.run import get_args_parser

    return sorted({s for a in get_args_parser()._actions for s in a.option_strings})  # noqa: SLF001


def torchrun_clashes(flags: Iterable[str]) -> list[tuple[str, str]]:
    """(flag, torchrun option) pairs where torchrun's abbreviation matching could take one of our flags.

    A flag clashes when it equals or is a prefix of a torchrun option (``--num`` of ``--numa-binding``), or
    when torchrun's parser, given ``-m dfkd_fast synthesize <flag> 1``, does not pass it through untouched.
    """
    from torch.distributed.run import get_args_parser

    options = torchrun_option_strings()
    out = [(f, o) for f in flags for o in options if o.startswith(f)]
    parser = get_args_parser()
    for f in flags:
        argv = ["--nproc-per-node", "2", "-m", "dfkd_fast", "synthesize", f, "1"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(argv)
        except SystemExit:  # argparse reports e.g. an ambiguous abbreviation by exiting
            out.append((f, "torchrun error: " + " ".join(err.getvalue().strip().splitlines()[-1:])))
            continue
        if ns.training_script_args != argv[-3:] or str(ns.nproc_per_node) != "2":
            out.append((f, "taken by torchrun"))
    return sorted(set(out))


def write_pool(out: str, images: torch.Tensor, logits: torch.Tensor, meta: dict[str, Any],
               shard_size: int = 4096) -> str:
    """Every rank writes its own images (uint8 or [0, 1] float) + teacher logits as its shards of ONE transfer set.

    Rank 0 opens the set first, all ranks write, then rank 0 writes the manifest after a barrier. Every rank
    of the group must call it. Shape: images (N_r, C, H, W), logits (N_r, K); N_r may be 0 on some ranks.
    """
    from dfkd_fast.transfer_set import TransferSetWriter, finalize_manifest

    if images.shape[0] != logits.shape[0]:
        raise ValueError(f"images and logits must be equally many, got {images.shape[0]} and {logits.shape[0]}")
    r, world = _world()
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    meta = {**meta, "num_classes": int(logits.shape[1]), "image_size": list(x.shape[1:])}

    def open_writer() -> TransferSetWriter:
        return TransferSetWriter(out, meta, shard_size=shard_size, soft_kind="logits", rank=r, world_size=world)

    writer = open_writer() if r == 0 else None
    if world > 1:
        dist.barrier()
    writer = writer or open_writer()
    for i in range(0, x.shape[0], shard_size):
        lg = logits[i:i + shard_size].float().cpu()
        writer.add(x[i:i + shard_size].cpu(), lg, lg.argmax(1))
    writer.close(finalize=False)
    if world > 1:
        dist.barrier()
    if r == 0:
        finalize_manifest(out)
    if world > 1:
        dist.barrier()
    return out


def format_throughput(per_rank: Sequence[dict[str, float]]) -> str:
    """Lines ``rank r: images, seconds, images/s`` and the total (sum of images / slowest rank's seconds)."""
    lines = [f"rank {int(p['rank'])}: {int(p['images'])} images in {p['seconds']:.2f} s -> "
             f"{p['images_per_s']:.2f} images/s" for p in per_rank]
    total = sum(int(p["images"]) for p in per_rank)
    slowest = max((p["seconds"] for p in per_rank), default=0.0)
    rate = total / slowest if slowest > 0 else float("nan")
    lines.append(f"total: {total} images on {len(per_rank)} ranks in {slowest:.2f} s -> {rate:.2f} images/s")
    return "\n".join(lines)


def _max_int(x: int, ctx: DistContext) -> int:
    if ctx.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_distributed_synthesis(synth: Any, out: str, num_images: int, *, ctx: DistContext | None = None,
                              meta: dict[str, Any] | None = None, shard_size: int = 1024, store: str = "uint8",
                              resume: bool = False, seed: int = 0, preview: int = 64,
                              progress: bool = True) -> Any:
    """This rank's part of a multi-process synthesis run into one transfer set at ``out`` (see module doc).

    Every rank of the group calls it with the same arguments (its own ``synth``, built on ``ctx.device``).

    Args:
        synth: a ``dfkd_fast.synthesis.Synthesizer`` on this rank's device.
        out: the shared transfer-set directory (a filesystem every rank sees).
        num_images: images in the whole set (all ranks).
        ctx: from :func:`init_distributed` (created when None).
        meta, shard_size, store, resume, seed, preview, progress: as ``dfkd_fast.runner.run_synthesis``.

    Returns:
        ``dfkd_fast.runner.SynthesisSummary`` of the whole run (same on every rank), with
        ``extra["distributed"]`` = world size and per-rank images / seconds / images/s.
    """
    import dfkd_fast
    from dfkd_fast import runner
    from dfkd_fast.transfer_set import TransferSetWriter, finalize_manifest

    ctx = ctx or init_distributed(synth.device)
    rank, world = ctx.rank, ctx.world_size
    bs = int(synth.batch_size)
    shard = int(math.ceil(shard_size / bs) * bs)
    k = int(synth.num_classes)
    plan = rank_plan(num_images, bs, world)[rank]
    meta = dict(meta or {})
    meta.setdefault("method", getattr(synth, "name", type(synth).__name__))
    meta.setdefault("hparams", dataclasses.asdict(synth.config) if dataclasses.is_dataclass(synth.config) else {})
    meta.update(batch_size=bs, seed=int(seed), num_classes=k, image_size=list(synth.image_size),
                dfkd_fast=dfkd_fast.__version__, num_images=int(num_images))
    collective = enable_distributed(synth)

    def open_writer() -> TransferSetWriter:
        return TransferSetWriter(out, meta, shard_size=shard, store=store, soft_kind="logits", rank=rank,
                                 world_size=world, resume=resume)

    writer = open_writer() if rank == 0 else None  # rank 0 first: it writes meta.json and clears temp files
    ctx.barrier()
    writer = writer or open_writer()
    done = int(writer.num_committed)
    stats = runner._new_stats(k)  # noqa: SLF001
    if done:
        saved = writer.state
        if not isinstance(saved, dict) or "synth" not in saved or "runner" not in saved:
            raise ValueError(f"{out}: rank {rank} has {done} images but no saved synthesizer state; it was not "
                             "written by a distributed `dfkd-fast synthesize` and cannot be resumed")
        synth.load_state_dict(saved["synth"])
        stats = dict(saved["runner"])
        stats["hist"] = list(stats["hist"])
    if done > plan.images or (done % bs and done < plan.images):
        raise ValueError(f"{out}: rank {rank} holds {done} images but its share is {plan.images} in batches of {bs}; "
                         "resume with the --num-images, --batch-size and number of processes of the interrupted run")
    if collective and resume:
        sync_shared_state(synth, src=0)  # ranks may have saved at different batches: rank 0's shared state wins
    b = done // bs
    steps = plan.batches - b
    if collective:  # lockstep: every rank makes the same number of synthesize calls (collectives inside)
        steps = _max_int(steps, ctx)
    preview_path = os.path.join(out, "preview.png")
    session_images, session_seconds = 0, 0.0
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.images, initial=done, desc=f"synthesize {meta['method']} (rank 0 of {world})",
                   unit="img", dynamic_ncols=True)
    n = done
    for _ in range(steps):
        bseed = runner.batch_seed(seed, b, rank)
        synth.generator.manual_seed(bseed)
        torch.manual_seed(bseed)
        res = synth.synthesize()
        b += 1
        if n >= plan.images:  # filler batch of a finished rank: keeps the collectives in lockstep, not written
            continue
        take = min(bs, plan.images - n)
        images, logits, probs = runner.record_batch(stats, res, take, k)
        session_images += take
        session_seconds += float(res.seconds)
        if ctx.is_main and preview and not os.path.exists(preview_path):
            runner._save_preview(images[:preview], probs[:preview], preview_path)  # noqa: SLF001
        writer.add(images, logits, res.targets[:take].detach(), seed=bseed)
        n += take
        if n % shard == 0 or n >= plan.images:
            writer.state = {"synth": synth.state_dict(), "runner": dict(stats), "batches": b}
        if bar is not None:
            bar.update(take)
            bar.set_postfix(img_s=f"{session_images / max(session_seconds, 1e-9):.1f}")
    if bar is not None:
        bar.close()
    writer.close(finalize=False)
    local = torch.tensor([rank, stats["images"], stats["seconds"], stats["conf_sum"], *stats["hist"]],
                         dtype=torch.float64, device=ctx.device)
    rows = all_gather_rows(local.unsqueeze(0)).cpu()  # also a barrier: every rank has closed its writer
    per_rank = [{"rank": int(r[0]), "images": int(r[1]), "seconds": float(r[2]),
                 "images_per_s": float(r[1] / r[2]) if r[2] > 0 else float("nan")} for r in rows]
    imgs = int(rows[:, 1].sum())
    secs = float(rows[:, 2].max())
    hist = [int(c) for c in rows[:, 4:].sum(0).tolist()]
    summary = runner.SynthesisSummary(
        images=imgs, seconds=secs, images_per_s=imgs / secs if secs > 0 else float("nan"),
        mean_confidence=float(rows[:, 3].sum()) / max(imgs, 1), class_histogram=hist, out=out,
        preview=preview_path if os.path.exists(preview_path) else None, resumed_from=done,
        extra={"distributed": {"world_size": world, "backend": ctx.backend, "per_rank": per_rank,
                               "total_images_per_s": imgs / secs if secs > 0 else float("nan")}})
    if ctx.is_main:
        manifest = finalize_manifest(out)
        runner._add_to_manifest(manifest, {"summary": dataclasses.asdict(summary)})  # noqa: SLF001
        if progress:
            print(format_throughput(per_rank), flush=True)
    ctx.barrier()  # the manifest exists before any rank returns
    return summary


def synthesize_distributed_from_config(cfg: Any, method_options: dict[str, Any] | None = None,
                                       progress: bool = True) -> Any:
    """``dfkd-fast synthesize --distributed``: join the group, build this rank's synthesizer, run, leave.

    Returns:
        the run's ``SynthesisSummary`` (``extra["distributed"]["rank"]`` is this process's rank).
    """
    from dfkd_fast import runner

    ctx = init_distributed(cfg.device)
    try:
        cfg = dataclasses.replace(cfg, device=str(ctx.device))
        teacher, synth, _ = runner.build_from_config(cfg, method_options)
        meta = runner.run_meta(cfg, synth, teacher)
        t0 = time.perf_counter()
        summary = run_distributed_synthesis(synth, cfg.out, cfg.num_images, ctx=ctx, meta=meta,
                                            shard_size=cfg.shard_size, store=cfg.store, resume=cfg.resume,
                                            seed=cfg.seed, preview=cfg.preview, progress=progress and ctx.is_main)
        summary.extra["distributed"].update(rank=ctx.rank, wall_seconds=time.perf_counter() - t0)
        return summary
    finally:
        shutdown(ctx)
