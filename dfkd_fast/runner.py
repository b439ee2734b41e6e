"""THE synthesis run loop behind ``dfkd-fast synthesize``: batches -> shards of a resumable transfer set.

One loop (:func:`run_synthesis`) for one process and for every rank under ``torchrun``: a single process is
world size 1. Rank r of W synthesizes the global batches of :func:`rank_plan` ``[r]``; batch ``b`` is
synthesized after reseeding the synthesizer's generator (and torch's global RNG) with :func:`batch_seed`
``(seed, b, r)``, so a resumed run produces the same images as an uninterrupted one. Shards hold whole
batches (``shard_size`` is rounded up to a multiple of ``batch_size``); the synthesizer's ``state_dict`` and
the running summary statistics are saved with every shard, so ``resume=True`` continues exactly after the
last finished shard: no finished shard is lost or duplicated. A method that shares state across ranks
installs its collectives in ``Synthesizer.setup_comm`` (the loop then runs the ranks in lockstep); the
loop itself only talks to :mod:`dfkd_fast.comm`. Process-group setup is in :mod:`dfkd_fast.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import dfkd_fast
from dfkd_fast import comm
from dfkd_fast.config import SynthesizeConfig, parse_floats, parse_image_size, parse_opts
from dfkd_fast.distributed.group import DistContext, init_distributed, shutdown
from dfkd_fast.transfer_set import write_tensors

__all__ = ["SynthesisSummary", "RankPlan", "batch_seed", "rank_plan", "resolve_device", "load_teacher", "load_student",
           "build_from_config", "run_synthesis", "run_distributed_synthesis", "synthesize_from_config",
           "synthesize_distributed_from_config", "format_throughput", "write_tensors", "run_meta",
           "check_resume_meta", "storage_errors"]


@dataclass
class SynthesisSummary:
    """Final statistics of a synthesis run (also stored in the transfer set's manifest).

    Attributes:
        images: images in the transfer set.
        seconds: synthesis seconds summed over all sessions of the run (resumes included).
        images_per_s: ``images / seconds``.
        mean_confidence: mean over images of the teacher's top-1 softmax probability.
        class_histogram: number of images per teacher top-1 class, length K.
        out: transfer-set directory; preview: the PNG grid, if written.
    """

    images: int
    seconds: float
    images_per_s: float
    mean_confidence: float
    class_histogram: list[int]
    out: str = ""
    preview: str | None = None
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        hist = " ".join(f"{k}:{c}" for k, c in enumerate(self.class_histogram))
        health = self.extra.get("health")
        line = "" if health is None else (f"\nhealth: score {health['score']:.2f} ("
                                          f"{'; '.join(health['warnings']) or 'no warnings'})")
        return (f"images {self.images} | seconds {self.seconds:.1f} | images/s {self.images_per_s:.2f} | "
                f"mean teacher confidence {self.mean_confidence:.4f}\nclass histogram (teacher top-1): {hist}{line}")


def record_batch(stats: dict[str, Any], res: Any, take: int, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the first ``take`` images of a :class:`SynthesisResult` to the run statistics (class histogram of the
    teacher's top-1, confidence sum, synthesis seconds, image count) and return (images, logits, probs) of them."""
    images = res.images[:take].detach()
    logits = res.teacher_logits[:take].detach().float()
    probs = logits.softmax(1)
    conf, top1 = probs.max(1)
    counts = torch.bincount(top1.cpu(), minlength=k).tolist()
    stats["hist"] = [int(a + c) for a, c in zip(stats["hist"], counts, strict=True)]
    stats["conf_sum"] = float(stats["conf_sum"]) + float(conf.sum())
    stats["seconds"] = float(stats["seconds"]) + float(res.seconds)
    stats["images"] = int(stats["images"]) + take
    return images, logits, probs


def batch_seed(seed: int, index: int, rank: int = 0) -> int:
    """A 63-bit seed for batch ``index`` of rank ``rank`` of a run seeded with ``seed`` (SeedSequence mix)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> cuda when available else cpu; otherwise ``torch.device(device)`` (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


_PACKAGE_DIR = os.path.dirname(os.path.abspath(dfkd_fast.__file__))


def _raised_here(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in the dfkd_fast package (our own message)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _load_user_model(flag: str, spec: str, weights: str | None, num_classes: int,
                     image_size: tuple[int, int, int]) -> nn.Module:
    """``load_model(spec, weights, ...)``; anything the user's factory / module raises is blamed on ``flag``.

    Our own ``ValueError`` / ``FileNotFoundError`` (already naming the spec or file) pass through; a factory's
    ``SyntaxError`` (import), ``TypeError``, ``ZeroDivisionError``, own ``ValueError`` ... become one
    ``ValueError`` naming ``flag`` and the spec.
    """
    from dfkd_fast.models import load_model

    c, h, _ = image_size
    try:
        return load_model(spec, weights=weights, num_classes=num_classes, in_channels=c, image_size=h)
    except (ValueError, FileNotFoundError) as e:
        if _raised_here(e):
            raise
        raise ValueError(f"{flag} {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    except SyntaxError as e:
        where = f" ({os.path.basename(e.filename or '?')}, line {e.lineno})" if e.lineno else ""
        raise ValueError(f"{flag} {spec!r}: cannot import its module: SyntaxError: {e.msg}{where}") from e
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported against the flag
        if ":" not in str(spec):  # a zoo model failing is our bug, not the user's: keep the traceback (DEBUG)
            raise
        raise ValueError(f"{flag} {spec!r}: building the model failed: {type(e).__name__}: {e}") from e


def _probe_outputs(model: nn.Module, flag: str, spec: str, weights: str | None, weights_flag: str,
                   num_classes: int, image_size: tuple[int, int, int], device: torch.device) -> None:
    """Run ``model`` (eval) on a probe batch (a zero image and a U[0,1) image, (2, C, H, W)) and check it returns
    finite (2, num_classes) logits; each failure is one ``ValueError`` naming ``flag`` (or ``weights_flag``).

    A forward returning a tuple/list/dict is refused (the teacher / student must return the logits tensor).
    """
    gen = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.zeros(1, *image_size), torch.rand(1, *image_size, generator=gen)]).to(device)
    size = ",".join(map(str, image_size))
    with torch.no_grad():
        try:
            out = model(probe)
        except RuntimeError as e:
            raise ValueError(f"the {flag[2:]} {spec!r} cannot take inputs of --image-size {size} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - user code
            raise ValueError(f"{flag} {spec!r}: its forward on a (2, {size}) batch raised {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{flag} {spec!r}: its forward returned a {type(out).__name__}, not a tensor; it must "
                         f"return the (N, K) logits tensor (wrap the model to return only the logits)")
    if out.dim() != 2 or out.shape[0] != probe.shape[0]:
        raise ValueError(f"{flag} {spec!r}: its forward maps a (2, {size}) batch to shape {tuple(out.shape)}; it "
                         "must return (N, K) logits, one row per image (flatten / squeeze the output)")
    if out.shape[1] != num_classes and flag == "--teacher":
        raise ValueError(f"--num-classes {num_classes} does not match the teacher {spec!r}, which outputs "
                         f"{out.shape[1]} logits; pass --num-classes {out.shape[1]}")
    if out.shape[1] != num_classes:
        raise ValueError(f"{flag} {spec!r} outputs {out.shape[1]} logits but the teacher has --num-classes "
                         f"{num_classes}; pass a {flag[2:]} with {num_classes} outputs")
    if not bool(torch.isfinite(out).all()):  # one host read, at load time only
        src = f"its weights {weights!r} ({weights_flag})" if weights else "its parameters"
        raise ValueError(f"{flag} {spec!r} outputs NaN/Inf logits on a probe batch of inputs in [0, 1]; check {src}")


def _check_normalized_probe(model: nn.Module, spec: str, mean: Sequence[float] | None, std: Sequence[float] | None,
                            image_size: tuple[int, int, int], device: torch.device) -> None:
    """The teacher on the probe batch normalized with ``--mean`` / ``--std`` (``(x - mean) / std``) must give
    finite logits; else the flags are blamed (the raw probe already passed). Lengths other than 1 or C are
    left to the synthesizer's own check."""
    c = image_size[0]
    if (mean is None and std is None) or any(v is not None and len(v) not in (1, c) for v in (mean, std)):
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(1, *image_size), torch.rand(1, *image_size, generator=gen)])
    m = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
    s = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
    with torch.no_grad():
        out = model(((x - m) / s).to(device))
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        given = " ".join(f"--{n} {','.join(f'{v:g}' for v in vals)}" for n, vals in (("mean", mean), ("std", std))
                         if vals is not None)
        raise ValueError(f"{given}: the teacher {spec!r} outputs NaN/Inf logits on inputs in [0, 1] normalized with "
                         "these; check --mean / --std (the normalization the teacher was trained with)")


def load_teacher(spec: str, weights: str | None, num_classes: int, image_size: tuple[int, int, int],
                 device: torch.device, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> nn.Module:
    """Build / load the teacher (``dfkd_fast.models.load_model``) in eval mode on ``device``.

    The teacher is checked on a probe batch (:func:`_probe_outputs`): it must map (2, C, H, W) to finite
    (2, ``num_classes``) logits, also after normalization with ``mean`` / ``std`` when given.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: unknown model name or spec, a factory that fails, unreadable weights, a forward that fails,
            returns a non-tensor or a wrong shape, output width != ``num_classes``, NaN/Inf outputs.
    """
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights: file {weights!r} not found")
    if num_classes < 2:
        raise ValueError(f"--num-classes must be >= 2, got {num_classes}")
    model = _load_user_model("--teacher", spec, weights, num_classes, image_size)
    model = model.to(device).eval()
    _probe_outputs(model, "--teacher", spec, weights, "--weights", num_classes, image_size, device)
    _check_normalized_probe(model, spec, mean, std, image_size, device)
    return model


def load_student(spec: str, weights: str | None, num_classes: int, image_size: tuple[int, int, int],
                 device: torch.device) -> nn.Module:
    """Build / load the student on ``device`` (train mode kept) and check its output width up front.

    Raises:
        FileNotFoundError: ``weights`` does not exist. ValueError: as :func:`load_teacher`, naming ``--student``.
    """
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"--student-weights: file {weights!r} not found")
    model = _load_user_model("--student", spec, weights, num_classes, image_size).to(device)
    was_training = model.training
    model.eval()  # the probe must not update BatchNorm running statistics
    try:
        _probe_outputs(model, "--student", spec, weights, "--student-weights", num_classes, image_size, device)
    finally:
        model.train(was_training)
    return model


def load_reference_images(path: str, image_size: tuple[int, int, int]) -> torch.Tensor:
    """Images in [0, 1] resized to ``image_size`` from a transfer-set directory or a folder of PNG/JPEG files.

    Shape: -> (M, C, H, W) float32.
    """
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    c, h, w = image_size
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--reference-images: directory {path!r} not found")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        from dfkd_fast.transfer_set import TransferSet

        x = TransferSet(path).images().float()
    else:
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not files:
            raise ValueError(f"--reference-images: no PNG/JPEG files under {path!r}")
        mode = "L" if c == 1 else "RGB"
        imgs = []
        for f in files:
            with Image.open(f) as im:
                a = np.asarray(im.convert(mode).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
            imgs.append(torch.from_numpy(a.reshape(h, w, -1)).permute(2, 0, 1))
        x = torch.stack(imgs)
    if x.shape[1] != c:
        raise ValueError(f"--reference-images have {x.shape[1]} channels but --image-size has {c}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _method_class(name: str) -> type:
    import dfkd_fast.synthesis as synthesis

    key = name.lower().replace("-", "_")
    if key not in synthesis.REGISTRY:
        raise ValueError(f"unknown synthesis method {name!r}; choose one of: {', '.join(synthesis.list_methods())}")
    return synthesis.REGISTRY[key]


def build_from_config(cfg: SynthesizeConfig, method_options: dict[str, Any] | None = None):
    """Validate ``cfg`` and build (teacher, synthesizer, parsed sizes) from it.

    ``method_options`` (already typed, e.g. from per-method CLI flags) are merged with ``cfg.opt``
    (``key=value`` strings; these win).
    """
    import dfkd_fast.synthesis as synthesis
    from dfkd_fast.synthesis.base import COMPILE_MODES, PRECISIONS

    image_size = parse_image_size(cfg.image_size)
    if cfg.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {cfg.num_images}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if cfg.store not in ("uint8", "fp16"):
        raise ValueError(f"--store must be uint8 or fp16, got {cfg.store!r}")
    if cfg.compile not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    cls = _method_class(cfg.method)
    opts = dict(method_options or {})
    opts.update(parse_opts(cls.Config, cfg.opt))
    mean, std = parse_floats(cfg.mean, "mean"), parse_floats(cfg.std, "std")
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, device, mean=mean, std=std)
    student = None
    if cfg.student is not None:
        student = load_student(cfg.student, cfg.student_weights, cfg.num_classes, image_size, device)
    elif cfg.student_weights is not None:
        raise ValueError("--student-weights needs --student (the student's architecture)")
    extra: dict[str, Any] = {}
    if cfg.reference_images is not None:
        if cls.name != "impression_space":
            raise ValueError(f"--reference-images is an option of impression_space, not of {cfg.method!r}")
        extra["reference_images"] = load_reference_images(cfg.reference_images, image_size).to(device)
    elif cls.name == "impression_space":
        raise ValueError("impression_space synthesizes the impression of given images: pass --reference-images "
                         "(a folder of PNG/JPEG files or a transfer-set directory)")
    synth = synthesis.build_synthesizer(cfg.method, teacher, cfg.num_classes, image_size, batch_size=cfg.batch_size,
                                        mean=mean, std=std, device=device, backend=cfg.backend, seed=cfg.seed,
                                        student=student, compile=cfg.compile, precision=cfg.precision,
                                        **opts, **extra)
    return teacher, synth, image_size


def _new_stats(k: int) -> dict[str, Any]:
    return {"hist": [0] * k, "conf_sum": 0.0, "seconds": 0.0, "images": 0}


@dataclass(frozen=True)
class RankPlan:
    """Rank r's share of a run: global batches ``[first_batch, first_batch + batches)`` holding ``images``."""

    first_batch: int
    batches: int
    images: int


def rank_plan(num_images: int, batch_size: int, world_size: int) -> list[RankPlan]:
    """Split ``ceil(num_images / batch_size)`` batches into ``world_size`` contiguous, near-equal ranges.

    Rank r gets global batches ``[floor(nb r / W), floor(nb (r + 1) / W))``; only the run's last batch may be
    partial. The images of all ranks sum to ``num_images``. World size 1: one range with every batch.
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
    """The maximum of ``x`` over ranks (``x`` itself for one process)."""
    if ctx.world_size == 1:
        return x
    t = torch.tensor([[x]], dtype=torch.int64, device=ctx.device)
    return int(comm.all_gather_rows(t).max())


def run_synthesis(synth: Any, out: str, num_images: int, *, ctx: DistContext | None = None,
                  meta: dict[str, Any] | None = None, shard_size: int = 1024, store: str = "uint8",
                  resume: bool = False, seed: int = 0, preview: int = 64, progress: bool = True) -> SynthesisSummary:
    """THE synthesis run loop: this rank's share of ``num_images`` images into one transfer set at ``out``, resumably.

    A single process is world size 1 (``ctx=None``: :meth:`DistContext.local`); under ``torchrun`` every rank of
    the group calls it with the same arguments and its own ``ctx`` (:func:`run_distributed_synthesis`). Rank r
    synthesizes the global batches of :func:`rank_plan` ``[r]``, batch b seeded from :func:`batch_seed`
    ``(seed, b, r)``, into its own shards; rank 0 writes ``manifest.json`` once every rank has closed its writer.

    Args:
        synth: a ``dfkd_fast.synthesis.Synthesizer`` (on this rank's device).
        out: transfer-set directory (``dfkd_fast.transfer_set.TransferSetWriter``; shared by all ranks).
        num_images: images in the whole set (all ranks).
        ctx: this process's place in the group (``dfkd_fast.distributed.init_distributed``); None: one process.
        meta: manifest metadata (method, hyper-parameters, teacher fingerprint ...).
        shard_size: images per shard, rounded up to a multiple of the batch size.
        resume: continue the run found in ``out`` (each rank restores its synthesizer state and statistics; a
            method with :attr:`~dfkd_fast.synthesis.Synthesizer.shared_state` then takes rank 0's).
        seed: base seed.
        preview: images in the grid ``out/preview.png`` (teacher top-1 class and confidence per image; rank 0).
        progress: a progress bar (rank 0) and, for a multi-process run, the throughput lines.

    Returns:
        :class:`SynthesisSummary` of the whole run (the same on every rank; stored in the manifest as
        ``summary``). Under a process group (``ctx`` given) ``extra["distributed"]`` holds the world size and
        per-rank images / seconds / images/s.

    Only one run may write ``out`` at a time: the main rank holds ``dfkd_fast._lock.OutputLock(out)`` for the whole
    run, and a second run fails at once naming the holder.
    """
    from dfkd_fast._lock import OutputLock

    main_rank = ctx.is_main if ctx is not None else True
    if not main_rank:
        return _run_synthesis(synth, out, num_images, ctx=ctx, meta=meta, shard_size=shard_size, store=store,
                              resume=resume, seed=seed, preview=preview, progress=progress)
    with OutputLock(out, "dfkd-fast synthesize"):
        return _run_synthesis(synth, out, num_images, ctx=ctx, meta=meta, shard_size=shard_size, store=store,
                              resume=resume, seed=seed, preview=preview, progress=progress)


def _run_synthesis(synth: Any, out: str, num_images: int, *, ctx: DistContext | None = None,
                   meta: dict[str, Any] | None = None, shard_size: int = 1024, store: str = "uint8",
                   resume: bool = False, seed: int = 0, preview: int = 64, progress: bool = True) -> SynthesisSummary:
    """The body of :func:`run_synthesis` (the caller holds the output lock on the main rank)."""
    from dfkd_fast.transfer_set import TransferSetWriter, add_to_manifest, finalize_manifest

    distributed = ctx is not None
    ctx = ctx if ctx is not None else DistContext.local(synth.device)
    rank, world = ctx.rank, ctx.world_size
    bs = int(synth.batch_size)
    shard = int(math.ceil(shard_size / bs) * bs)
    k = int(synth.num_classes)
    plan = rank_plan(num_images, bs, world)[rank]
    meta = dict(meta or {})
    meta.setdefault("method", getattr(synth, "name", type(synth).__name__))
    meta.setdefault("hparams", dataclasses.asdict(synth.config) if dataclasses.is_dataclass(synth.config) else {})
    meta.update(batch_size=bs, seed=int(seed), num_classes=k, image_size=list(synth.image_size),
                dfkd_fast=dfkd_fast.__version__)
    if world > 1:  # the rank plan depends on it: a resume must use the same number
        meta["num_images"] = int(num_images)
    collective = synth.setup_comm() if world > 1 else False
    if resume:
        check_resume_meta(out, meta, store=store, shard_size=shard, world_size=world)

    def open_writer() -> TransferSetWriter:
        return TransferSetWriter(out, meta, shard_size=shard, store=store, soft_kind="logits", rank=rank,
                                 world_size=world, resume=resume)

    writer = open_writer() if rank == 0 else None  # rank 0 first: it writes meta.json and clears temp files
    ctx.barrier()
    writer = writer or open_writer()
    done = int(writer.num_committed)
    if world == 1 and done > plan.images:  # never silently keep more images than asked for
        raise ValueError(f"--num-images {num_images} is smaller than the {done} images {out} already holds; resume "
                         f"with --num-images {done} (or more, to extend the set) or write to a new --out")
    stats = _new_stats(k)
    if done:
        saved = writer.state
        if not isinstance(saved, dict) or "synth" not in saved or "runner" not in saved:
            raise ValueError(f"{out}: rank {rank} has {done} images but no saved synthesizer state; it was not "
                             "written by `dfkd-fast synthesize` and cannot be resumed")
        synth.load_state_dict(saved["synth"])
        stats = dict(saved["runner"])
        stats["hist"] = list(stats["hist"])
        if int(stats["images"]) != done:
            raise ValueError(f"{out}: saved state covers {stats['images']} images but {done} are committed")
    if (world > 1 and done > plan.images) or (done % bs and done < plan.images):
        raise ValueError(f"{out}: rank {rank} holds {done} images but its share is {plan.images} in batches of {bs}; "
                         "resume with the --num-images, --batch-size and number of processes of the interrupted run")
    if collective and resume:
        synth.share_state(0)  # ranks may have saved at different batches: rank 0's shared state wins
    b = done // bs
    steps = max(0, plan.batches - b)
    if collective:  # lockstep: every rank makes the same number of synthesize calls (collectives inside)
        steps = _max_int(steps, ctx)
    preview_path = os.path.join(out, "preview.png")
    need_preview = bool(ctx.is_main and preview and not _preview_ok(preview_path))  # missing, 0-byte or corrupt
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        where = f" (rank 0 of {world})" if world > 1 else ""
        bar = tqdm(total=plan.images, initial=min(done, plan.images), desc=f"synthesize {meta['method']}{where}",
                   unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    n = done
    for _ in range(steps):
        bseed = batch_seed(seed, b, rank)
        synth.generator.manual_seed(bseed)
        torch.manual_seed(bseed)
        res = synth.synthesize()
        b += 1
        if n >= plan.images:  # filler batch of a finished rank: keeps the collectives in lockstep, not written
            continue
        take = min(bs, plan.images - n)
        images, logits, probs = record_batch(stats, res, take, k)
        if need_preview:
            _save_preview(images[:preview], probs[:preview], preview_path)
            need_preview = False
        n += take
        # a shard is committed now (or the range ends): its state is saved with it, before its journal line
        save = {"state": {"synth": synth.state_dict(), "runner": dict(stats), "batches": b}} if (
            n % shard == 0 or n >= plan.images) else {}
        writer.add(images, logits, res.targets[:take].detach(), seed=bseed, **save)
        if bar is not None:
            bar.update(take)
            bar.set_postfix(img_s=f"{(n - done) / max(time.perf_counter() - t0, 1e-9):.1f}")
    if bar is not None:
        bar.close()
    writer.close(finalize=False)
    if need_preview and writer.shards:  # nothing left to synthesize (finished set): draw it from the set
        _preview_from_shards(out, writer.shards, preview, preview_path)
    local = torch.tensor([rank, stats["images"], stats["seconds"], stats["conf_sum"], *stats["hist"]],
                         dtype=torch.float64, device=ctx.device)
    rows = comm.all_gather_rows(local.unsqueeze(0)).cpu() if world > 1 else local.unsqueeze(0).cpu()
    per_rank = [{"rank": int(r[0]), "images": int(r[1]), "seconds": float(r[2]),
                 "images_per_s": float(r[1] / r[2]) if r[2] > 0 else float("nan")} for r in rows]
    imgs = int(rows[:, 1].sum())
    secs = float(rows[:, 2].max())
    summary = SynthesisSummary(
        images=imgs, seconds=secs, images_per_s=imgs / secs if secs > 0 else float("nan"),
        mean_confidence=float(rows[:, 3].sum()) / max(imgs, 1), class_histogram=[int(c) for c in
                                                                                 rows[:, 4:].sum(0).tolist()],
        out=out, preview=preview_path if os.path.exists(preview_path) else None, resumed_from=done)
    if distributed:
        summary.extra["distributed"] = {"world_size": world, "backend": ctx.backend, "per_rank": per_rank,
                                        "total_images_per_s": summary.images_per_s}
    if ctx.is_main:
        add_to_manifest(finalize_manifest(out), {"summary": dataclasses.asdict(summary)})
        _write_health(synth, out, summary, seed)
        if progress and distributed:
            print(format_throughput(per_rank), flush=True)
    ctx.barrier()  # the manifest exists before any rank returns
    return summary


def _write_health(synth: Any, out: str, summary: SynthesisSummary, seed: int) -> None:
    """``health.json`` beside the manifest (:func:`dfkd_fast.health.transfer_set_health`, at most 2,000 images)
    and ``summary.extra["health"]`` (score, warnings); a failure is one warning line on stderr, never an error."""
    import sys

    try:
        from dfkd_fast.health import transfer_set_health

        rep = transfer_set_health(out, synth.teacher, mean=synth.mean, std=synth.std, max_images=2000, seed=seed)
        summary.extra["health"] = {"score": rep["score"], "warnings": rep["warnings"]}
    except Exception as e:  # noqa: BLE001 - the report is advisory: the transfer set is already complete
        detail = " ".join(str(e).split())[:160]
        print(f"dfkd-fast: warning: health report of {out} skipped ({type(e).__name__}: {detail})", file=sys.stderr,
              flush=True)


def run_distributed_synthesis(synth: Any, out: str, num_images: int, *, ctx: DistContext | None = None,
                              **kwargs: Any) -> SynthesisSummary:
    """This rank's part of a multi-process run: :func:`run_synthesis` with ``ctx`` (joined from torchrun's
    environment by ``dfkd_fast.distributed.init_distributed`` when None). Same keyword arguments."""
    return run_synthesis(synth, out, num_images, ctx=ctx or init_distributed(synth.device), **kwargs)


def _save_preview(images: torch.Tensor, probs: torch.Tensor, path: str) -> None:
    from dfkd_fast.viz import save_grid

    save_grid(images.cpu(), path, probs=probs.cpu(), title="teacher top-1 class and confidence")  # atomic


def _preview_ok(path: str) -> bool:
    """Whether ``path`` is a readable PNG (False when missing, empty or damaged, e.g. by a kill mid-write)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:
        return False
    return True


def _preview_from_shards(out: str, shards: list[dict[str, Any]], preview: int, path: str) -> None:
    """Draw the preview grid from the first ``preview`` images of committed shards (and their teacher logits)."""
    from safetensors.torch import load_file

    from dfkd_fast.transfer_set.manifest import logits_key

    imgs, logits, n = [], [], 0
    for sh in shards:
        if n >= preview:
            break
        d = load_file(os.path.join(out, sh["file"]))
        imgs.append(d["images"][:preview - n])
        logits.append(d[logits_key(d)][:preview - n].float())
        n += imgs[-1].shape[0]
    x = torch.cat(imgs)
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    _save_preview(x, torch.cat(logits).softmax(1), path)


def run_meta(cfg: SynthesizeConfig, synth: Any, teacher: nn.Module) -> dict[str, Any]:
    """The manifest metadata of a run: method, hyper-parameters, teacher spec and fingerprint, normalization,
    backend, ``compile`` mode and ``precision``."""
    from dfkd_fast.transfer_set import teacher_fingerprint

    return {"method": synth.name, "hparams": dataclasses.asdict(synth.config),
            "teacher": {"spec": cfg.teacher, "weights": os.path.abspath(cfg.weights) if cfg.weights else None,
                        "fingerprint": teacher_fingerprint(teacher)},
            "mean": parse_floats(cfg.mean, "mean"), "std": parse_floats(cfg.std, "std"), "backend": cfg.backend,
            "compile": cfg.compile, "precision": cfg.precision}


#: meta.json keys (dotted for nested ones) -> the flag that sets them.
_META_FLAGS = {"method": "--method", "batch_size": "--batch-size", "seed": "--seed", "num_classes": "--num-classes",
               "image_size": "--image-size", "num_images": "--num-images", "teacher.spec": "--teacher",
               "teacher.weights": "--weights", "teacher.fingerprint": "--teacher/--weights (the teacher's parameters)",
               "mean": "--mean", "std": "--std", "backend": "--backend", "compile": "--compile",
               "precision": "--precision", "store": "--store", "shard_size": "--shard-size (rounded up to a multiple "
               "of --batch-size)", "world_size": "the number of processes", "dfkd_fast": "the dfkd_fast version"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_meta(out: str, meta: dict[str, Any], *, store: str, shard_size: int, world_size: int) -> None:
    """Before ``--resume``: compare ``out/meta.json`` with this run's settings and name every changed flag.

    Each difference is reported as ``--flag: was A, now B`` (method hyper-parameters ``hparams.x`` as ``--x``).
    Nothing to compare (no meta.json yet) passes; a damaged meta.json raises naming the file.

    Raises:
        ValueError: one line naming the changed flags and both values.
    """
    from dfkd_fast.transfer_set.manifest import _jsonable

    path = os.path.join(out, "meta.json")
    if not os.path.isfile(path):
        return
    import json

    try:
        with open(path, "rb") as f:
            old = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {path} is damaged (not valid JSON: {' '.join(str(e).split())}); restore it "
                         "or write to a new --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"--resume: {path} is damaged (not a JSON object); restore it or write to a new --out")
    was = _flatten(old.get("meta", {}))
    was.update({k: old[k] for k in ("store", "shard_size", "world_size") if k in old})
    now = _flatten(_jsonable(meta))
    now.update(store=store, shard_size=int(shard_size), world_size=int(world_size))
    diffs = []
    for key in sorted(set(was) | set(now)):
        if key == "dfkd_fast" or was.get(key) == now.get(key):
            continue
        if key == "teacher.fingerprint" and (was.get("teacher.spec") != now.get("teacher.spec")
                                             or was.get("teacher.weights") != now.get("teacher.weights")):
            continue  # already reported as --teacher / --weights
        flag = "--" + key[len("hparams."):].replace("_", "-") if key.startswith("hparams.") else \
            _META_FLAGS.get(key, key)
        diffs.append(f"{flag} was {_short(was.get(key))}, now {_short(now.get(key))}")
    if diffs:
        raise ValueError(f"--resume: the run in {out} was made with other settings: {'; '.join(diffs)}; resume with "
                         "the interrupted run's values or write to a new --out")


_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed", "No space left", "StorageFull",
                   "Disk quota")


def _is_write_failure(e: BaseException) -> bool:
    """A failed file write: ENOSPC/EDQUOT OSError, torch.save's RuntimeError, or safetensors' SafetensorError."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        return any(m in str(e) for m in _WRITE_FAILURES) or type(e).__name__ == "SafetensorError"
    return False


@contextlib.contextmanager
def storage_errors(out: str, flag: str = "--out") -> Iterator[None]:
    """Turn a failed write into the transfer set (disk full, quota, torch.save / safetensors write errors, which
    are not ``OSError``) into one ``OSError`` that says so in words and names ``flag`` and the free space."""
    try:
        yield
    except Exception as e:
        if not _is_write_failure(e):
            raise
        try:
            free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        full = isinstance(e, OSError) or any(m in str(e) for m in ("No space left", "StorageFull", "Disk quota"))
        what = "the disk is full" if full else "the disk is full or the directory is not writable"
        detail = " ".join(str(e).split())[:120]
        raise OSError(f"{flag} {out}: writing the transfer set failed: {what} ({free}; {type(e).__name__}: "
                      f"{detail}); free space, then rerun with --resume to continue") from e


def synthesize_from_config(cfg: SynthesizeConfig, method_options: dict[str, Any] | None = None,
                           progress: bool = True) -> SynthesisSummary:
    """``dfkd-fast synthesize``: build teacher + synthesizer from ``cfg`` and run :func:`run_synthesis`.

    With ``cfg.distributed`` (under torchrun) this process joins the group, builds its synthesizer on its
    rank's device, runs its rank's part of the set and leaves the group; ``summary.extra["distributed"]`` then
    also holds this process's ``rank`` and ``wall_seconds``.
    """
    if not cfg.distributed:
        teacher, synth, _ = build_from_config(cfg, method_options)
        with storage_errors(cfg.out):
            return run_synthesis(synth, cfg.out, cfg.num_images, meta=run_meta(cfg, synth, teacher),
                                 shard_size=cfg.shard_size, store=cfg.store, resume=cfg.resume, seed=cfg.seed,
                                 preview=cfg.preview, progress=progress)
    ctx = init_distributed(cfg.device)
    try:
        cfg = dataclasses.replace(cfg, device=str(ctx.device))
        teacher, synth, _ = build_from_config(cfg, method_options)
        t0 = time.perf_counter()
        with storage_errors(cfg.out):
            summary = run_synthesis(synth, cfg.out, cfg.num_images, ctx=ctx, meta=run_meta(cfg, synth, teacher),
                                    shard_size=cfg.shard_size, store=cfg.store, resume=cfg.resume, seed=cfg.seed,
                                    preview=cfg.preview, progress=progress and ctx.is_main)
        summary.extra["distributed"].update(rank=ctx.rank, wall_seconds=time.perf_counter() - t0)
        return summary
    finally:
        shutdown(ctx)


def synthesize_distributed_from_config(cfg: SynthesizeConfig, method_options: dict[str, Any] | None = None,
                                       progress: bool = True) -> SynthesisSummary:
    """``dfkd-fast synthesize --distributed``: :func:`synthesize_from_config` with ``cfg.distributed=True``."""
    return synthesize_from_config(dataclasses.replace(cfg, distributed=True), method_options, progress)
