"""Online (interleaved) data-free KD: the student trains while the transfer set is synthesized (SPEC §7).

One driver, :func:`distill_online`, runs every registered method the way its paper does, chosen by the
synthesizer's ``online_schedule`` (a class attribute; ``"pool"`` when absent):

- ``"pool"`` (CMI, FastDFKD and the pixel methods): each round synthesizes one batch into an on-device uint8
  pool (:class:`ImagePool`, a :class:`dfkd_fast.buffers.RingBuffer`); the student then takes
  ``kd_steps_per_round`` KD steps on batches sampled uniformly from the whole pool, with on-device augmentation.
- ``"fresh"`` (DAFL, ZSKT, DFQ): no replay. Each student step trains on a fresh batch drawn from the current
  generator (``synthesizer.sample``); the generator takes one ``synthesize`` call (its ``iterations`` steps)
  every ``n_s`` student steps (``Config.n_s``, default 1: DAFL / DFQ's one generator step per student step;
  ZSKT's 10). A method with a ``student_loss(images)`` hook (ZSKT: KD at T = 1 + attention transfer) trains
  the student with it instead of the KD loss, and a ``Config.clip`` > 0 clips the student's gradient norm
  (ZSKT: 5). The last generator batch of each round joins the pool, which is only written out.

Epochs, rounds, warm-up (the authors' ``datafree_kd.py``): an epoch is ``rounds_per_epoch`` rounds
(``ep_steps // kd_steps``); the first ``warmup_rounds`` rounds only synthesize, with the adversarial term
paused (``adversarial_paused`` of the generator methods, no student for a pixel method's competition term;
FastMeta's ``warmup`` is set to the same count). By default (``warmup_rounds=None``) the fresh-sample schedules
(DAFL, DFQ, ZSKT) warm up for ``rounds // 5`` rounds -- a deviation from their papers, measured on the issue-13
quality matrix -- and the pool methods not at all.
Under ``torchrun`` the student runs through ``DistributedDataParallel`` and the synthesizer's collectives are
installed (``Synthesizer.setup_comm``).

Outputs in ``out_dir``: ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (after every epoch: student,
optimizer, schedule, synthesizer state incl. generator(s) and their optimizers, pool, RNG; ``resume=True``
continues bit-exactly), ``student.safetensors``, ``curves.png`` and, with ``save_pool``,
the pool as a transfer set in ``transfer_set/``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast import comm
from dfkd_fast.buffers import RingBuffer
from dfkd_fast.classifiers import normalizer as _normalizer
from dfkd_fast.config import DistillConfig
from dfkd_fast.ops import kd_kl_div
from dfkd_fast.tasks.distill.common import (
    CKPT_NAME,
    DistillResult,
    _augmenter,
    _check_models,
    _load_checkpoint,
    _progress,
    _rng_state,
    _save_checkpoint,
    _save_curves,
    _set_rng_state,
    evaluate_accuracy,
    make_optimizer,
    restores_teacher,
)
from dfkd_fast.transfer_set import write_tensors

__all__ = ["ImagePool", "distill_online", "METRICS_NAME", "STUDENT_NAME"]

METRICS_NAME = "metrics.jsonl"
STUDENT_NAME = "student.safetensors"
_CKPT_KIND = "online"
#: library defaults = the ``dfkd-fast distill`` flag defaults (one source of truth)
_DEF = {f.name: f.default for f in dataclasses.fields(DistillConfig)}


class ImagePool:
    """On-device uint8 pool of synthesized images (+ teacher logits), sampled uniformly for KD steps.

    A :class:`dfkd_fast.buffers.RingBuffer`: when full, the oldest entries are overwritten; ``capacity=None``
    grows without bound.

    Shape: images (len, C, H, W) uint8, logits (len, K) float32 (storage order).
    """

    def __init__(self, image_size: Sequence[int], num_classes: int, device: torch.device,
                 capacity: int | None = None) -> None:
        self.image_size = tuple(int(s) for s in image_size)
        self.capacity = capacity
        self.device = device
        self.ring = RingBuffer(capacity, {"images": (self.image_size, torch.uint8),
                                          "logits": ((int(num_classes),), torch.float32)}, device)

    @property
    def images(self) -> torch.Tensor:
        """(len, C, H, W) uint8 images in storage order."""
        return self.ring.view("images")

    @property
    def logits(self) -> torch.Tensor:
        """(len, K) float32 teacher logits, rows matching :attr:`images`."""
        return self.ring.view("logits")

    def __len__(self) -> int:
        return len(self.ring)

    def add(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Append images in [0, 1] (quantized to uint8 as stored in transfer sets) and their teacher logits."""
        if tuple(images.shape[1:]) != self.image_size:
            raise ValueError(f"synthesized images have shape {tuple(images.shape[1:])}, the pool expects "
                             f"{self.image_size}")
        q = images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
        self.ring.add(images=q, logits=logits.detach().float())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images drawn uniformly with replacement, as float in [0, 1]. Shape: -> (n, C, H, W)."""
        if len(self) == 0:
            raise ValueError("the image pool is empty: synthesize before sampling")
        idx = torch.randint(len(self), (n,), generator=generator).to(self.device)
        return self.images[idx].float().div_(255.0)

    def save(self, out_dir: str, meta: dict[str, Any] | None = None, collective: bool = False) -> str:
        """Write the pool as a transfer set (``dfkd_fast.transfer_set.write_tensors``); ``collective``: every
        rank's pool as its shards of one set (every rank calls it)."""
        return write_tensors(out_dir, self.images, self.logits, meta or {}, collective=collective)

    def state_dict(self) -> dict[str, Any]:
        """Storage (cloned), write pointer and fill count: everything to restore the pool exactly."""
        ring = self.ring
        return {"storage": {k: v.detach().clone() for k, v in ring.storage.items()}, "ptr": ring.ptr,
                "count": ring.count, "capacity": ring.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ring = self.ring
        if state["capacity"] != ring.capacity or set(state["storage"]) != set(ring.storage):
            raise ValueError(f"the checkpoint's pool has capacity {state['capacity']}, this run {ring.capacity}; "
                             "resume with the same pool capacity")
        ring.storage = {k: v.to(self.device) for k, v in state["storage"].items()}
        ring.ptr, ring.count = int(state["ptr"]), int(state["count"])


def _append_metrics(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _keep_metrics(path: str, upto: int) -> None:
    """Keep only the ``metrics.jsonl`` records of epochs <= ``upto`` (a resumed run rewrites the rest)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= upto:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _pause_adversarial(synthesizer: Any, student: nn.Module, paused: bool) -> None:
    """Warm-up: the generator methods pause their adversarial term (``adversarial_paused``); a pixel method
    (DeepInversion's ADI competition) holds no student while paused."""
    if hasattr(synthesizer, "adversarial_paused"):
        synthesizer.adversarial_paused = paused
    else:
        synthesizer.student = None if paused else student


def _write_pool_health(path: str, teacher: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                       seed: int) -> None:
    """``health.json`` beside the pool's manifest (:func:`dfkd_fast.health.transfer_set_health`); a failure is one
    warning line on stderr."""
    import sys

    try:
        from dfkd_fast.health import transfer_set_health

        transfer_set_health(path, teacher, mean=mean, std=std, max_images=2000, seed=seed)
    except Exception as e:  # noqa: BLE001 - advisory: the student and the pool are already saved
        detail = " ".join(str(e).split())[:160]
        print(f"dfkd-fast: warning: health report of {path} skipped ({type(e).__name__}: {detail})", file=sys.stderr,
              flush=True)


@restores_teacher
def distill_online(student: nn.Module, teacher: nn.Module, synthesizer: Any, rounds: int,
                   kd_steps_per_round: int = _DEF["kd_steps"], *, rounds_per_epoch: int = 1,
                   lr: float = _DEF["lr"], T: float = _DEF["temperature"], batch_size: int = _DEF["batch_size"],
                   momentum: float = 0.9, weight_decay: float = _DEF["weight_decay"],
                   schedule: str = _DEF["schedule"], grad_clip: float = _DEF["grad_clip"],
                   warmup_rounds: int | None = _DEF["warmup"],
                   pool_capacity: int | None = _DEF["pool_capacity"], augment: bool | str = _DEF["augment"],
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   test_data: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 1,
                   out_dir: str | None = None, save_pool: bool = False, resume: bool = False,
                   backend: str = "auto", seed: int = 0, progress: bool = True,
                   ddp: bool | None = None) -> DistillResult:
    """Online data-free KD, each method on its paper's schedule (see the module docstring).

    Per round: ``"pool"`` methods synthesize one batch into the pool, then take ``kd_steps_per_round`` steps
    on pool samples; ``"fresh"`` methods alternate one ``synthesize`` call (generator step) with ``n_s``
    student steps on fresh generator samples, ``kd_steps_per_round`` student steps in all. A KD step
    minimizes ``T^2 KL(softmax(t/T) || softmax(s/T))`` (``batchmean``) with SGD (momentum, weight decay) and
    a per-step ``schedule`` over all KD steps of the run.

    Args:
        synthesizer: a ``dfkd_fast.synthesis.Synthesizer``; its ``student`` is set to ``student`` when unset.
        rounds: synthesis rounds in all (``epochs * rounds_per_epoch``; a multiple of ``rounds_per_epoch``).
        kd_steps_per_round: student steps per round (the reference scripts' ``--kd_steps``, 400).
        rounds_per_epoch: rounds per epoch (``ep_steps // kd_steps``); metrics and checkpoints are per epoch.
        grad_clip: the student's gradient norm is clipped at this value in every KD step (0: off; see
            :func:`~dfkd_fast.tasks.distill.distill`). A method with its own student clip (ZSKT's ``clip``) uses
            that instead.
        warmup_rounds: first rounds that only synthesize (no KD, no adversarial term); sets FastMeta's
            ``warmup`` too, so one setting controls the warm-up. ``None`` (default): ``rounds // 5`` for the
            fresh-sample schedules (DAFL, DFQ, ZSKT), 0 for the others. Measured on the issue-13 quality matrix
            (40 rounds, 8 of them warm-up): students that stayed at chance when fed the early generator's
            batches learned (DFQ WRN-16-1/digits 10.0 -> 89.1%, DAFL WRN-16-1/MNIST 10.0 -> 53.5%, ZSKT
            LeNet-5-BN/digits 10.0 -> 78.6%), a working cell kept its accuracy (DFQ LeNet-5-BN 97.2 -> 96.9%).
        pool_capacity: keep at most this many images (ring buffer); ``None``: all.
        test_data: (x, y) real held-out images, evaluated every ``eval_every`` epochs and after the last.
        out_dir: metrics, checkpoint, student weights and curves (see the module docstring); ``save_pool``
            writes the pool as a transfer set there. resume: continue from ``out_dir/checkpoint.pt``.
        ddp: multi-process (torchrun): the KD steps run through ``DistributedDataParallel(student)`` and the
            synthesizer's collectives are installed; each rank synthesizes its own pool, rank 0 writes the
            student / curves / metrics, the pools form one transfer set. Default: on when a multi-rank
            ``torch.distributed`` group is initialized.

    Returns:
        :class:`DistillResult`; ``train_loss`` per epoch (trained epochs only), ``synth_seconds`` synthesis
        only, ``seconds`` end to end (both including the resumed-from part), ``images`` the final pool size.
    """
    if warmup_rounds is None:
        warmup_rounds = rounds // 5 if getattr(synthesizer, "online_schedule", "pool") == "fresh" else 0
    if rounds < 1 or kd_steps_per_round < 0 or warmup_rounds < 0 or rounds_per_epoch < 1:
        raise ValueError(f"need rounds >= 1, kd_steps_per_round >= 0, warmup_rounds >= 0, rounds_per_epoch >= 1; "
                         f"got {rounds}, {kd_steps_per_round}, {warmup_rounds}, {rounds_per_epoch}")
    if not grad_clip >= 0:
        raise ValueError(f"grad_clip must be >= 0 (0: off), got {grad_clip}")
    if rounds % rounds_per_epoch:
        raise ValueError(f"rounds ({rounds}) must be a multiple of rounds_per_epoch ({rounds_per_epoch})")
    if resume and not out_dir:
        raise ValueError("resume=True needs out_dir (where checkpoint.pt is)")
    epochs = rounds // rounds_per_epoch
    dev = synthesizer.device
    teacher = teacher.to(dev).eval()
    student = student.to(dev)
    if getattr(synthesizer, "student", None) is None:
        synthesizer.student = student
    elif synthesizer.student is not student:
        raise ValueError("the synthesizer holds a different student than the one being distilled")
    fresh = getattr(synthesizer, "online_schedule", "pool") == "fresh"
    scfg = synthesizer.config
    n_s = int(getattr(scfg, "n_s", 1)) if fresh else 1
    clip = float(scfg.clip or 0.0) if hasattr(scfg, "clip") else float(grad_clip)
    student_loss = getattr(synthesizer, "student_loss", None) if fresh else None
    if hasattr(scfg, "warmup"):  # FastMeta: the driver's warm-up is the method's warm-up
        synthesizer.config = dataclasses.replace(scfg, warmup=int(warmup_rounds))
    image_size = tuple(synthesizer.image_size)
    norm = _normalizer(mean, std, image_size[0], dev)
    k = _check_models(student, teacher, torch.rand(2, *image_size, device=dev), norm, synthesizer.num_classes)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    aug = _augmenter(augment, image_size, backend, aug_gen)
    kd_rounds = max(0, rounds - warmup_rounds)
    opt, sched = make_optimizer(student, lr, kd_rounds * kd_steps_per_round, schedule, momentum, weight_decay)
    world = comm.world_size()
    if ddp is None:
        ddp = world > 1
    if ddp and resume:
        raise ValueError("resume of online distillation is single-process only; run without torchrun to resume")
    if ddp and student_loss is not None:
        raise ValueError(f"{synthesizer.name}: its student loss runs on the plain student, so it cannot train "
                         "under torchrun (DistributedDataParallel); run it in one process")
    is_main = comm.rank() == 0
    pool = ImagePool(image_size, k, dev, pool_capacity)
    gen = torch.Generator().manual_seed(seed)
    res = DistillResult()
    state = {"epoch": 0, "images": 0, "synth_seconds": 0.0, "seconds": 0.0, "gen_loss": []}
    ckpt_path = os.path.join(out_dir, CKPT_NAME) if out_dir else None
    metrics_path = os.path.join(out_dir, METRICS_NAME) if out_dir else None
    if resume and ckpt_path and os.path.isfile(ckpt_path):
        ck = _load_checkpoint(ckpt_path)
        if ck.get("kind") != _CKPT_KIND or ck.get("method") != synthesizer.name:
            raise ValueError(f"resume: {ckpt_path} is not an online checkpoint of --method {synthesizer.name} "
                             f"(it has {ck.get('kind')!r} / {ck.get('method')!r}); start a new --out")
        plan = {"rounds_per_epoch": rounds_per_epoch, "kd_steps_per_round": kd_steps_per_round,
                "warmup_rounds": warmup_rounds, "batch_size": batch_size, "rounds": rounds, "grad_clip": clip}
        for key, val in plan.items():
            if ck["plan"].get(key, val) != val:
                raise ValueError(f"resume: {key} is {val} but {ckpt_path} was trained with {ck['plan'][key]}; "
                                 "resume with the same --epochs/--ep-steps/--kd-steps/--warmup/--batch-size/"
                                 "--grad-clip")
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        synthesizer.load_state_dict(ck["synthesizer"])
        pool.load_state_dict(ck["pool"])
        _set_rng_state(gen, ck["rng"])
        aug_gen.set_state(ck["rng"]["aug"])
        state = ck["state"]
        res.train_loss, res.test_acc = list(ck["train_loss"]), list(ck["test_acc"])
        if is_main:
            _keep_metrics(metrics_path, state["epoch"])
    elif out_dir and is_main:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.isfile(metrics_path):
            os.remove(metrics_path)
    kd_model = student
    if ddp:
        synthesizer.setup_comm()
        synthesizer.generator.manual_seed(comm.rank_seed(synthesizer.seed, comm.rank()))
        kd_model = comm.wrap_ddp(student, dev)  # broadcasts rank 0's student, averages its gradients
    params = [p for p in student.parameters() if p.requires_grad]

    def student_step(xb: torch.Tensor) -> torch.Tensor:
        if aug is not None:
            xb = aug(xb)
        if student_loss is not None:
            loss = student_loss(xb)
        else:
            xb = norm(xb)
            with torch.no_grad():
                t_logits = teacher(xb)
            loss = kd_kl_div(kd_model(xb), t_logits, temperature=T, backend=backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        return loss.detach()

    def synthesize() -> Any:
        batch = synthesizer.synthesize()
        state["synth_seconds"] += batch.seconds
        state["images"] += int(batch.images.shape[0])
        if batch.losses:
            state["gen_loss"].append(float(batch.losses[-1]))
        return batch

    t_resumed = time.perf_counter()
    seconds_before = state["seconds"]
    bar = _progress(rounds, f"distill-online {synthesizer.name}", progress)
    bar.update(state["epoch"] * rounds_per_epoch)
    for epoch in range(state["epoch"], epochs):
        loss_sum, n_steps = None, 0
        state["gen_loss"] = []
        for r in range(epoch * rounds_per_epoch, (epoch + 1) * rounds_per_epoch):
            warm = r < warmup_rounds
            _pause_adversarial(synthesizer, student, warm)
            steps = 0 if warm else kd_steps_per_round
            student.eval()
            if fresh:
                batch = None
                for g in range(max(1, math.ceil(kd_steps_per_round / n_s))):
                    batch = synthesize()
                    student.train()
                    for _ in range(min(n_s, steps - g * n_s)):
                        t0 = time.perf_counter()
                        xb = synthesizer.sample(batch_size)
                        state["synth_seconds"] += time.perf_counter() - t0
                        state["images"] += batch_size
                        loss = student_step(xb)
                        loss_sum = loss if loss_sum is None else loss_sum + loss
                        n_steps += 1
                    student.eval()
                pool.add(batch.images, batch.teacher_logits)
            else:
                batch = synthesize()
                pool.add(batch.images, batch.teacher_logits)
                student.train()
                for _ in range(steps):
                    loss = student_step(pool.sample(batch_size, gen))
                    loss_sum = loss if loss_sum is None else loss_sum + loss
                    n_steps += 1
                student.eval()
            bar.update(1)
        e = epoch + 1
        kd_loss = float(loss_sum) / n_steps if n_steps else None
        if kd_loss is not None:
            res.train_loss.append(kd_loss)
        acc = None
        if test_data is not None and (e % eval_every == 0 or e == epochs):
            acc = evaluate_accuracy(student, test_data[0], test_data[1], mean, std)
            res.test_acc.append(acc)
        state["epoch"] = e
        state["seconds"] = seconds_before + time.perf_counter() - t_resumed
        ips = state["images"] / state["synth_seconds"] if state["synth_seconds"] > 0 else 0.0
        bar.set_postfix({"pool": len(pool), "img/s": f"{ips:.0f}", **({"acc": f"{acc:.4f}"} if acc is not None
                                                                       else {})})
        if out_dir and is_main:
            gl = state["gen_loss"]
            _append_metrics(metrics_path, {
                "epoch": e, "kd_loss": _finite(kd_loss) if kd_loss is not None else None, "kd_steps": n_steps,
                "gen_loss": _finite(sum(gl) / len(gl)) if gl else None, "test_acc": acc,
                "images": state["images"], "pool": len(pool), "synth_seconds": round(state["synth_seconds"], 4),
                "seconds": round(state["seconds"], 4), "lr": opt.param_groups[0]["lr"],
                "warmup": e * rounds_per_epoch <= warmup_rounds})
            if world == 1:
                rng = _rng_state(gen)
                rng["aug"] = aug_gen.get_state()
                _save_checkpoint(ckpt_path, {
                    "kind": _CKPT_KIND, "method": synthesizer.name, "student": student.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "synthesizer": synthesizer.state_dict(), "pool": pool.state_dict(), "rng": rng,
                    "state": dict(state), "train_loss": list(res.train_loss), "test_acc": list(res.test_acc),
                    "plan": {"rounds_per_epoch": rounds_per_epoch, "kd_steps_per_round": kd_steps_per_round,
                             "warmup_rounds": warmup_rounds, "batch_size": batch_size, "rounds": rounds,
                             "grad_clip": clip}})
                res.checkpoint = ckpt_path
    bar.close()
    _pause_adversarial(synthesizer, student, False)
    res.epochs, res.images = epochs, len(pool)
    res.synth_seconds = state["synth_seconds"]
    if res.test_acc:
        res.final_acc, res.best_acc = res.test_acc[-1], max(res.test_acc)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if is_main:
            from dfkd_fast.models import save_model

            save_model(student, os.path.join(out_dir, STUDENT_NAME), {"method": synthesizer.name, "online": "1"})
        pool_meta = {"method": getattr(synthesizer, "name", "online"), "online": True, "rounds": rounds,
                     "schedule": "fresh" if fresh else "pool"}
        if save_pool:
            pool.save(os.path.join(out_dir, "transfer_set"), pool_meta, collective=world > 1)
            if is_main:  # every transfer set gets its data-free health report (advisory: never an error)
                _write_pool_health(os.path.join(out_dir, "transfer_set"), teacher, mean, std, seed)
        if res.train_loss and is_main:
            res.curves = _save_curves(os.path.join(out_dir, "curves.png"), res.train_loss, res.test_acc, "epoch")
    res.seconds = seconds_before + time.perf_counter() - t_resumed
    return res
