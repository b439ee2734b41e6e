"""Offline KD: the student learns from the teacher on a fixed set of (synthesized) images.

.. math::
    L = \\frac{T^2}{N} \\sum_i \\mathrm{KL}(\\mathrm{softmax}(t_i/T) \\| \\mathrm{softmax}(s_i/T))

(``dfkd_fast.ops.kd_kl_div``, ``batchmean``) with SGD (momentum 0.9, weight decay 5e-4) and a cosine or
step schedule, the teacher's logits computed on the same (augmented) batch.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast.classifiers import normalizer as _normalizer
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
    as_image_tensor,
    evaluate_accuracy,
    kd_step,
    make_optimizer,
)

__all__ = ["distill"]


def distill(student: nn.Module, teacher: nn.Module, transfer_set_or_tensors: Any, epochs: int = 20,
            lr: float = 0.01, T: float = 4.0, *, batch_size: int = 128, momentum: float = 0.9,
            weight_decay: float = 5e-4, schedule: str = "cosine", milestones: Sequence[float] = (0.5, 0.75),
            gamma: float = 0.1, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            augment: bool | str = False, test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
            num_classes: int | None = None, out_dir: str | None = None, resume: bool = False,
            device: torch.device | str | None = None, backend: str = "auto", seed: int = 0,
            progress: bool = True, curves: bool = True,
            on_epoch_end: Callable[[int, DistillResult], bool | None] | None = None) -> DistillResult:
    """Offline KD: train ``student`` to match ``teacher`` on a fixed set of (synthesized) images.

    Args:
        student, teacher: classifiers taking normalized images; the teacher is frozen (eval mode).
        transfer_set_or_tensors: a ``TransferSet``, any Dataset of images, an image tensor or (images, ...).
            Images in [0, 1] (uint8 is scaled); the teacher's logits are recomputed on each (augmented) batch.
        epochs, lr, T: KD epochs, SGD learning rate, temperature (loss scaled by T^2). Defaults lr 0.01, T 4
            (not the CIFAR lr 0.1, T 20 of the papers): measured on LeNet-5-half (no BatchNorm) on MNIST, SGD at
            lr 0.05 diverged at T 4 and T 20 and lr 0.02 (T 4, 30 epochs) once diverged on the 4,000 real
            images; T 4 beat T 20 on Data Impressions (79% vs 65%, 600 images); lr 0.005 under-trained.
        schedule: ``"cosine"`` (per step, to 0), ``"step"`` (x ``gamma`` at ``milestones`` fractions) or
            ``"constant"``.
        mean, std: the input normalization of both models.
        augment: on-device ``dfkd_fast.augment.CropFlip``: ``True``/``"crop_flip"`` pad-crop (H/8) + flip,
            ``"crop"`` pad-crop only (digits), ``False`` none.
        test_data: (x (N,C,H,W) in [0,1], y (N,)) real held-out images; accuracy is measured every epoch.
        out_dir: checkpoints (``checkpoint.pt``, atomic, every epoch), ``student.pt`` and ``curves.png``.
        resume: continue from ``out_dir/checkpoint.pt`` (student, optimizer, scheduler, RNG, history).
        on_epoch_end: called as ``f(epochs_done, result)`` after each epoch's checkpoint; returning ``True``
            stops training early (the run can later be resumed).

    Shape:
        images (N, C, H, W); both models map (B, C, H, W) -> (B, K).

    Returns:
        :class:`DistillResult` with per-epoch loss and accuracy.
    """
    t_start = time.perf_counter()
    if epochs < 0 or batch_size < 1 or T <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and T > 0; got {epochs}, {batch_size}, {T}")
    dev = torch.device(device) if device is not None else next(iter(teacher.parameters()), torch.empty(0)).device
    x = as_image_tensor(transfer_set_or_tensors).to(dev)
    n = x.shape[0]
    teacher = teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.to(dev)
    norm = _normalizer(mean, std, x.shape[1], dev)
    k = _check_models(student, teacher, x[:2], norm, num_classes)
    if test_data is not None:
        tx, ty = test_data
        if tuple(tx.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"test images have shape {tuple(tx.shape[1:])} but the transfer images "
                             f"{tuple(x.shape[1:])}; use the same --image-size")
        if ty.numel() and int(ty.max()) >= k:
            raise ValueError(f"test labels go up to {int(ty.max())} but the models have {k} classes")
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    aug = _augmenter(augment, x.shape[1:], backend, aug_gen)
    steps_per_epoch = math.ceil(n / batch_size)
    opt, sched = make_optimizer(student, lr, epochs * steps_per_epoch, schedule, momentum, weight_decay,
                                milestones, gamma)
    gen = torch.Generator().manual_seed(seed)
    res = DistillResult(images=n)
    start_epoch = 0
    ckpt = os.path.join(out_dir, CKPT_NAME) if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        if os.path.isfile(ckpt):
            st = _load_checkpoint(ckpt)
            student.load_state_dict(st["student"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            _set_rng_state(gen, st["rng"])
            aug_gen.set_state(st["rng"]["aug"])
            start_epoch = int(st["epoch"])
            res.train_loss, res.test_acc = list(st["train_loss"]), list(st["test_acc"])
    bar = _progress((epochs - start_epoch) * steps_per_epoch, "distill", progress)
    for epoch in range(start_epoch, epochs):
        student.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        total, seen = 0.0, 0
        for i in range(0, n, batch_size):
            xb = x[perm[i:i + batch_size]]
            loss = kd_step(student, teacher, xb, aug, norm, opt, sched, T, backend)
            total += float(loss) * xb.shape[0]
            seen += xb.shape[0]
            bar.update(1)
        res.train_loss.append(total / seen)
        if test_data is not None:
            res.test_acc.append(evaluate_accuracy(student, test_data[0], test_data[1], mean, std))
            bar.set_postfix(loss=f"{res.train_loss[-1]:.4f}", acc=f"{res.test_acc[-1]:.4f}")
        if ckpt is not None:
            rng = {**_rng_state(gen), "aug": aug_gen.get_state()}
            _save_checkpoint(ckpt, {"student": student.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "rng": rng,
                                    "epoch": epoch + 1, "train_loss": res.train_loss, "test_acc": res.test_acc})
        if on_epoch_end is not None and on_epoch_end(epoch + 1, res):
            break
    bar.close()
    res.epochs = len(res.train_loss)
    if res.test_acc:
        res.final_acc, res.best_acc = res.test_acc[-1], max(res.test_acc)
    if out_dir:
        res.checkpoint = ckpt
        _save_checkpoint(os.path.join(out_dir, "student.pt"), student.state_dict())
        if curves and res.train_loss:
            res.curves = _save_curves(os.path.join(out_dir, "curves.png"), res.train_loss, res.test_acc, "epoch")
    res.seconds = time.perf_counter() - t_start
    return res
