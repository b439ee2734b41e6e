"""Offline KD: the student learns from the teacher on a fixed set of (synthesized) images.

.. math::
    L = \\frac{T^2}{N} \\sum_i \\mathrm{KL}(\\mathrm{softmax}(t_i/T) \\| \\mathrm{softmax}(s_i/T))

(``dfkd_fast.ops.kd_kl_div``, ``batchmean``) with SGD (momentum 0.9, weight decay 5e-4) and a cosine or
step schedule, the teacher's logits computed on the same (augmented) batch.

Outputs in ``out_dir`` (locked with :class:`dfkd_fast._lock.OutputLock` while the run writes):
``checkpoint.pt`` (every epoch, atomic), ``metrics.jsonl`` (one JSON object per epoch), ``curves.png`` and
``student.safetensors`` (older versions wrote ``student.pt``: still read on resume).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast.classifiers import normalizer as _normalizer
from dfkd_fast.config import DistillConfig
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
    restores_teacher,
)

__all__ = ["distill", "check_transfer_set", "set_teacher_fingerprint", "METRICS_NAME", "STUDENT_NAME",
           "LEGACY_STUDENT_NAME"]

METRICS_NAME = "metrics.jsonl"
STUDENT_NAME = "student.safetensors"
LEGACY_STUDENT_NAME = "student.pt"  # the older name (a torch.save'd state_dict): still read on resume

#: the library defaults are the CLI defaults (one source of truth: :class:`dfkd_fast.config.DistillConfig`)
_DEF = {f.name: f.default for f in dataclasses.fields(DistillConfig)}

#: arguments a resumed run must repeat -> the ``dfkd-fast distill`` flag that sets them
_SCHEDULE_FLAGS = {"epochs": "--epochs", "lr": "--lr", "schedule": "--schedule", "batch_size": "--batch-size",
                   "T": "--temperature", "weight_decay": "--weight-decay", "momentum": "momentum",
                   "grad_clip": "--grad-clip", "milestones": "milestones", "gamma": "gamma",
                   "images": "--transfer-set (its size)"}


def set_teacher_fingerprint(manifest: Mapping[str, Any]) -> str | None:
    """The fingerprint of the teacher that made a transfer set, from its manifest: ``meta.teacher.fingerprint``
    (``dfkd-fast synthesize``) or ``meta.teacher`` (``TransferSetWriter(..., teacher=...)``); ``None`` if absent."""
    t = (manifest.get("meta") or {}).get("teacher")
    if isinstance(t, dict):
        t = t.get("fingerprint")
    return t if isinstance(t, str) and t else None


def check_transfer_set(manifest: Mapping[str, Any], num_classes: int | None = None,
                       image_size: Sequence[int] | None = None, where: str = "the transfer set") -> None:
    """Refuse a transfer set made for other inputs: its manifest's ``num_classes`` / image shape (``layout``,
    else ``meta``) must equal ``num_classes`` / ``image_size`` (C, H, W) where both are known.

    Raises:
        ValueError: one line naming the flag (``--num-classes`` / ``--image-size``) and both values.
    """
    layout = manifest.get("layout") or {}
    meta = manifest.get("meta") or {}
    k = layout.get("num_classes", meta.get("num_classes"))
    if num_classes is not None and k is not None and int(k) != int(num_classes):
        raise ValueError(f"--num-classes is {int(num_classes)} but {where} was made for {int(k)} classes (manifest "
                         f"num_classes); pass --num-classes {int(k)} or use a set made for {int(num_classes)}")
    shape = layout.get("image_shape", meta.get("image_size"))
    if image_size is not None and shape is not None and [int(v) for v in shape] != [int(v) for v in image_size]:
        want, have = ",".join(map(str, image_size)), ",".join(str(int(v)) for v in shape)
        raise ValueError(f"--image-size is {want} but {where} holds {have} images (manifest image_shape); pass "
                         f"--image-size {have} or use a set made at {want}")


def _teacher_mismatch(data: Any, teacher: nn.Module, allow: bool) -> dict[str, str] | None:
    """Compare the teacher with the fingerprint in ``data.manifest`` (a ``TransferSet``); see :func:`distill`."""
    manifest = getattr(data, "manifest", None)
    want = set_teacher_fingerprint(manifest) if isinstance(manifest, Mapping) else None
    if want is None:
        return None
    from dfkd_fast.transfer_set import teacher_fingerprint

    have = teacher_fingerprint(teacher)
    if have == want:
        return None
    msg = (f"the teacher (fingerprint {have[:12]}) is not the one that made the transfer set (manifest "
           f"fingerprint {want[:12]})")
    if not allow:
        raise ValueError(f"{msg}; pass that set's --teacher/--weights, or --allow-teacher-mismatch to distill anyway")
    warnings.warn(f"{msg}; distilling anyway (--allow-teacher-mismatch)", UserWarning, stacklevel=3)
    return {"transfer_set": want, "teacher": have}


def _check_schedule(old: Mapping[str, Any], new: Mapping[str, Any], ckpt: str) -> None:
    """A resumed run must repeat the schedule its checkpoint was trained with (one line naming the flag)."""
    for key, flag in _SCHEDULE_FLAGS.items():
        if key not in old:
            continue
        a, b = old[key], new[key]
        same = (math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0) if isinstance(b, float)
                else list(a) == list(b) if isinstance(b, (list, tuple)) else a == b)
        if not same:
            raise ValueError(f"resume: {flag} is {b!r} but {ckpt} was trained with {a!r}; resume with {flag} {a!r} "
                             "or start a new --out")


def _check_legacy_schedule(st: Mapping[str, Any], lr: float, total_steps: int, schedule: str, ckpt: str) -> None:
    """Checkpoints written before ``config`` was stored: compare what the scheduler state holds."""
    sd = st.get("scheduler") or {}
    base = sd.get("base_lrs") or []
    if base and not math.isclose(float(base[0]), lr, rel_tol=1e-12):
        raise ValueError(f"resume: --lr is {lr!r} but {ckpt} was trained with {float(base[0])!r}; resume with "
                         f"--lr {float(base[0])!r} or start a new --out")
    if schedule == "cosine" and "T_max" in sd and int(sd["T_max"]) != int(total_steps):
        raise ValueError(f"resume: --epochs x steps per epoch is {total_steps} steps but {ckpt} was trained for "
                         f"{int(sd['T_max'])}; resume with the old --epochs/--batch-size or start a new --out")


def _read_metrics(path: str, upto: int) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` with ``epoch <= upto`` (unparseable lines, e.g. a torn last line, skipped)."""
    out: list[dict[str, Any]] = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= upto:
                out.append(rec)
    return out


def _write_metrics(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_metrics(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


@restores_teacher
def distill(student: nn.Module, teacher: nn.Module, transfer_set_or_tensors: Any, epochs: int = _DEF["epochs"],
            lr: float = _DEF["lr"], T: float = _DEF["temperature"], *, batch_size: int = _DEF["batch_size"],
            momentum: float = 0.9, weight_decay: float = _DEF["weight_decay"], schedule: str = _DEF["schedule"],
            grad_clip: float = _DEF["grad_clip"], milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
            mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, augment: bool | str = False,
            test_data: tuple[torch.Tensor, torch.Tensor] | None = None, num_classes: int | None = None,
            out_dir: str | None = None, resume: bool = False, device: torch.device | str | None = None,
            backend: str = "auto", seed: int = _DEF["seed"], progress: bool = True, curves: bool = True,
            allow_teacher_mismatch: bool = False,
            on_epoch_end: Callable[[int, DistillResult], bool | None] | None = None) -> DistillResult:
    """Offline KD: train ``student`` to match ``teacher`` on a fixed set of (synthesized) images.

    Args:
        student, teacher: classifiers taking normalized images; the teacher is frozen (eval mode).
        transfer_set_or_tensors: a ``TransferSet``, any Dataset of images, an image tensor or (images, ...).
            Images in [0, 1] (uint8 is scaled); the teacher's logits are recomputed on each (augmented) batch.
            A ``TransferSet``'s manifest must match ``num_classes`` and the teacher's fingerprint.
        epochs, lr, T, batch_size, weight_decay, schedule, seed: defaults are those of ``dfkd-fast distill``
            (:class:`dfkd_fast.config.DistillConfig`: 20 epochs, lr 0.1, T 20, batch 128 -- the CIFAR recipe
            of SPEC §4). For a small BN-free student (LeNet-5-half on MNIST) use lr 0.01, T 4: there SGD at
            lr 0.05 diverged at T 4 and T 20, T 4 beat T 20 on Data Impressions (79% vs 65%, 600 images) and
            lr 0.005 under-trained. The loss is scaled by T^2.
        grad_clip: the student's gradient norm is clipped at this value in every step (0: off). Default 5 (the
            ZSKT student clip): on the issue-13 quality matrix it let SGD lr 0.05 train a BN-free LeNet-5-half
            that lr 0.01 left at chance in 300 steps, and it stops KD from diverging on over-confident sets
            (Class Impressions with teacher logits up to 42).
        schedule: ``"cosine"`` (per step, to 0), ``"step"`` (x ``gamma`` at ``milestones`` fractions) or
            ``"constant"``.
        mean, std: the input normalization of both models.
        augment: on-device ``dfkd_fast.augment.CropFlip``: ``True``/``"crop_flip"`` pad-crop (H/8) + flip,
            ``"crop"`` pad-crop only (digits), ``False`` none.
        test_data: (x (N,C,H,W) in [0,1], y (N,)) real held-out images; the student's accuracy is measured
            every epoch, the teacher's once.
        out_dir: ``checkpoint.pt`` (atomic, every epoch), ``metrics.jsonl`` (per epoch: ``epoch``, ``lr`` at
            the epoch's first step, ``kd_loss``, ``test_acc`` in [0, 1] with a test set, ``images_seen``,
            ``seconds`` of the epoch), ``curves.png`` and ``student.safetensors``; held
            under an exclusive :class:`~dfkd_fast._lock.OutputLock` (a second run raises ``OutputLockedError``).
        resume: continue from ``out_dir/checkpoint.pt`` (student, optimizer, scheduler, RNG, history). The
            schedule (epochs, lr, T, batch_size, schedule, weight_decay, ...) and the set size must be the
            checkpoint's, else ``ValueError`` naming the flag and both values. Without a checkpoint, a saved
            ``student.safetensors`` (or the older ``student.pt``) is loaded and training starts at epoch 0.
        seed: batch order and augmentation; the caller seeds the student's initialization (the CLI seeds
            ``torch.manual_seed(seed)`` before building it).
        allow_teacher_mismatch: a teacher whose fingerprint differs from the transfer set's manifest is
            refused (``ValueError``) unless this is set; then a warning is issued and the mismatch is recorded
            in ``metrics.jsonl`` and the checkpoint.
        on_epoch_end: called as ``f(epochs_done, result)`` after each epoch's checkpoint; returning ``True``
            stops training early (the run can later be resumed).

    Shape:
        images (N, C, H, W); both models map (B, C, H, W) -> (B, K).

    Returns:
        :class:`DistillResult` with per-epoch loss and accuracy (and the teacher's test accuracy).
    """
    t_start = time.perf_counter()
    if epochs < 0 or batch_size < 1 or T <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and T > 0; got {epochs}, {batch_size}, {T}")
    if not grad_clip >= 0:
        raise ValueError(f"grad_clip must be >= 0 (0: off), got {grad_clip}")
    manifest = getattr(transfer_set_or_tensors, "manifest", None)
    if isinstance(manifest, Mapping):
        check_transfer_set(manifest, num_classes=num_classes)
    mismatch = _teacher_mismatch(transfer_set_or_tensors, teacher, allow_teacher_mismatch)
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
    if out_dir is None and resume:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    from dfkd_fast._lock import OutputLock

    with OutputLock(out_dir, "distill") if out_dir else contextlib.nullcontext():
        aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)
        aug = _augmenter(augment, x.shape[1:], backend, aug_gen)
        steps_per_epoch = math.ceil(n / batch_size)
        opt, sched = make_optimizer(student, lr, epochs * steps_per_epoch, schedule, momentum,
                                    weight_decay, milestones, gamma)
        config = {"epochs": int(epochs), "lr": float(lr), "schedule": schedule, "batch_size": int(batch_size),
                  "T": float(T), "weight_decay": float(weight_decay), "momentum": float(momentum),
                  "grad_clip": float(grad_clip),
                  "milestones": [float(m) for m in milestones], "gamma": float(gamma), "images": int(n)}
        gen = torch.Generator().manual_seed(seed)
        res = DistillResult(images=n)
        if test_data is not None:
            res.teacher_acc = evaluate_accuracy(teacher, test_data[0], test_data[1], mean, std)
        start_epoch = 0
        ckpt = os.path.join(out_dir, CKPT_NAME) if out_dir else None
        metrics_path = os.path.join(out_dir, METRICS_NAME) if out_dir else None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        if resume and ckpt is not None:
            if os.path.isfile(ckpt):
                st = _load_checkpoint(ckpt)
                if "config" in st:
                    _check_schedule(st["config"], config, ckpt)
                else:
                    _check_legacy_schedule(st, float(lr), epochs * steps_per_epoch, schedule, ckpt)
                student.load_state_dict(st["student"])
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
                _set_rng_state(gen, st["rng"])
                aug_gen.set_state(st["rng"]["aug"])
                start_epoch = int(st["epoch"])
                res.train_loss, res.test_acc = list(st["train_loss"]), list(st["test_acc"])
            else:
                _load_saved_student(student, out_dir)
        if metrics_path is not None:
            _write_metrics(metrics_path, _read_metrics(metrics_path, start_epoch))
        bar = _progress((epochs - start_epoch) * steps_per_epoch, "distill", progress)
        for epoch in range(start_epoch, epochs):
            t_epoch = time.perf_counter()
            student.train()
            lr_now = float(opt.param_groups[0]["lr"])
            perm = torch.randperm(n, generator=gen).to(dev)
            total, seen = 0.0, 0
            for i in range(0, n, batch_size):
                xb = x[perm[i:i + batch_size]]
                loss = kd_step(student, teacher, xb, aug, norm, opt, sched, T, backend, grad_clip)
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
                                        "scheduler": sched.state_dict(), "rng": rng, "config": config,
                                        "teacher_mismatch": mismatch, "teacher_acc": res.teacher_acc,
                                        "epoch": epoch + 1, "train_loss": res.train_loss, "test_acc": res.test_acc})
            if metrics_path is not None:
                rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_now, "kd_loss": res.train_loss[-1]}
                if test_data is not None:
                    rec.update(test_acc=res.test_acc[-1], teacher_test_acc=res.teacher_acc)
                rec.update(images_seen=(epoch + 1) * n, seconds=time.perf_counter() - t_epoch)
                if mismatch is not None:
                    rec["teacher_mismatch"] = mismatch
                _append_metrics(metrics_path, rec)
            if on_epoch_end is not None and on_epoch_end(epoch + 1, res):
                break
        bar.close()
        res.epochs = len(res.train_loss)
        if res.test_acc:
            res.final_acc, res.best_acc = res.test_acc[-1], max(res.test_acc)
        if out_dir:
            from dfkd_fast.models import save_model

            res.checkpoint = ckpt
            save_model(student, os.path.join(out_dir, STUDENT_NAME))
            if curves and res.train_loss:
                res.curves = _save_curves(os.path.join(out_dir, "curves.png"), res.train_loss, res.test_acc, "epoch",
                                          teacher_acc=res.teacher_acc)
        res.seconds = time.perf_counter() - t_start
        return res


def _load_saved_student(student: nn.Module, out_dir: str) -> None:
    """Resume without a checkpoint: start from the student weights a finished run saved, if any."""
    from dfkd_fast.models import load_state_dict_file

    for name in (STUDENT_NAME, LEGACY_STUDENT_NAME):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            try:
                student.load_state_dict(load_state_dict_file(path))
            except RuntimeError as e:
                raise ValueError(f"resume: {path} does not fit the student ({str(e).splitlines()[0]}); check "
                                 "--student or start a new --out") from None
            warnings.warn(f"resume: no {CKPT_NAME} in {out_dir}; starting at epoch 0 from the student weights in "
                          f"{path}", UserWarning, stacklevel=3)
            return
