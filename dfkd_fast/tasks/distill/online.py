"""Online (interleaved) data-free KD for generator methods (CMI, FastDFKD, DAFL, ZSKT, DFQ; SPEC §7).

Synthesis rounds and KD steps alternate, as in the papers; the synthesized images are kept in an on-device
uint8 pool (:class:`ImagePool`, a :class:`dfkd_fast.buffers.RingBuffer`) that the student samples with
on-device augmentation. Under ``torchrun`` the student runs through ``DistributedDataParallel`` and the
synthesizer's collectives are installed (``Synthesizer.setup_comm``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast import comm
from dfkd_fast.buffers import RingBuffer
from dfkd_fast.classifiers import normalizer as _normalizer
from dfkd_fast.tasks.distill.common import (
    DistillResult,
    _augmenter,
    _check_models,
    _progress,
    _save_checkpoint,
    _save_curves,
    evaluate_accuracy,
    kd_step,
    make_optimizer,
)
from dfkd_fast.transfer_set import write_tensors

__all__ = ["ImagePool", "distill_online"]


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


def distill_online(student: nn.Module, teacher: nn.Module, synthesizer: Any, rounds: int,
                   kd_steps_per_round: int = 400, *, lr: float = 0.1, T: float = 20.0, batch_size: int = 256,
                   momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "cosine",
                   warmup_rounds: int = 0, pool_capacity: int | None = None, augment: bool | str = True,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   test_data: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 1,
                   out_dir: str | None = None, save_pool: bool = False, backend: str = "auto", seed: int = 0,
                   progress: bool = True, ddp: bool | None = None) -> DistillResult:
    """Online (interleaved) data-free KD for generator methods (CMI, FastDFKD, DAFL, ZSKT, DFQ).

    Each round: ``synthesizer.synthesize()`` (the synthesizer holds the student for its adversarial term),
    the batch joins an on-device uint8 pool, then ``kd_steps_per_round`` SGD steps minimize
    ``T^2 KL(softmax(t/T) || softmax(s/T))`` on augmented batches sampled from the pool. The first
    ``warmup_rounds`` rounds only synthesize (FastDFKD warm-up).

    Args:
        synthesizer: a ``dfkd_fast.synthesis.Synthesizer``; its ``student`` is set to ``student`` when unset.
        rounds: synthesis rounds ("epochs" in the papers).
        kd_steps_per_round: student SGD steps per round (DataFree: 400).
        pool_capacity: keep at most this many images (ring buffer); ``None``: all.
        test_data: (x, y) real held-out images, evaluated every ``eval_every`` rounds and after the last.
        out_dir / save_pool: write the pool there as a transfer set, plus ``curves.png``.
        ddp: multi-process (torchrun): the KD steps run through ``DistributedDataParallel(student)`` and the
            synthesizer's collectives are installed (``Synthesizer.setup_comm``); each rank
            synthesizes its own pool, rank 0 writes ``student.pt`` / curves, the pools form one transfer set.
            Default: on when a multi-rank ``torch.distributed`` group is initialized. Every rank must call
            this with the same arguments.

    Returns:
        :class:`DistillResult`; ``synth_seconds`` is synthesis only, ``seconds`` end to end.
    """
    t_start = time.perf_counter()
    if rounds < 1 or kd_steps_per_round < 0 or warmup_rounds < 0:
        raise ValueError(f"need rounds >= 1, kd_steps_per_round >= 0, warmup_rounds >= 0; got {rounds}, "
                         f"{kd_steps_per_round}, {warmup_rounds}")
    dev = synthesizer.device
    teacher = teacher.to(dev).eval()
    student = student.to(dev)
    if getattr(synthesizer, "student", None) is None:
        synthesizer.student = student
    elif synthesizer.student is not student:
        raise ValueError("the synthesizer holds a different student than the one being distilled")
    image_size = tuple(synthesizer.image_size)
    norm = _normalizer(mean, std, image_size[0], dev)
    k = _check_models(student, teacher, torch.rand(2, *image_size, device=dev), norm, synthesizer.num_classes)
    aug = _augmenter(augment, image_size, backend, torch.Generator(device=dev).manual_seed(seed + 1))
    kd_rounds = max(0, rounds - warmup_rounds)
    opt, sched = make_optimizer(student, lr, kd_rounds * kd_steps_per_round, schedule, momentum, weight_decay)
    world = comm.world_size()
    if ddp is None:
        ddp = world > 1
    kd_model = student
    if ddp:
        synthesizer.setup_comm()
        synthesizer.generator.manual_seed(comm.rank_seed(synthesizer.seed, comm.rank()))
        kd_model = comm.wrap_ddp(student, dev)  # broadcasts rank 0's student, averages its gradients
    is_main = comm.rank() == 0
    pool = ImagePool(image_size, k, dev, pool_capacity)
    gen = torch.Generator().manual_seed(seed)
    res = DistillResult()
    bar = _progress(rounds, "distill-online", progress)
    for r in range(rounds):
        student.eval()
        batch = synthesizer.synthesize()
        res.synth_seconds += batch.seconds
        pool.add(batch.images, batch.teacher_logits)
        total = 0.0
        if r >= warmup_rounds and kd_steps_per_round:
            student.train()
            for _ in range(kd_steps_per_round):
                loss = kd_step(kd_model, teacher, pool.sample(batch_size, gen), aug, norm, opt, sched, T, backend)
                total += float(loss)
            res.train_loss.append(total / kd_steps_per_round)
        if test_data is not None and ((r + 1) % eval_every == 0 or r == rounds - 1):
            res.test_acc.append(evaluate_accuracy(student, test_data[0], test_data[1], mean, std))
            bar.set_postfix(pool=len(pool), acc=f"{res.test_acc[-1]:.4f}")
        bar.update(1)
    bar.close()
    res.epochs, res.images = rounds, len(pool)
    if res.test_acc:
        res.final_acc, res.best_acc = res.test_acc[-1], max(res.test_acc)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        if is_main:
            _save_checkpoint(os.path.join(out_dir, "student.pt"), student.state_dict())
        pool_meta = {"method": getattr(synthesizer, "name", "online"), "online": True, "rounds": rounds}
        if save_pool:
            pool.save(os.path.join(out_dir, "transfer_set"), pool_meta, collective=world > 1)
        if res.train_loss and is_main:
            res.curves = _save_curves(os.path.join(out_dir, "curves.png"), res.train_loss, res.test_acc, "round")
    res.seconds = time.perf_counter() - t_start
    return res
