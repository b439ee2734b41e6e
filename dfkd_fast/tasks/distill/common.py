"""Pieces shared by offline and online distillation: the result type, the student's optimizer and schedule,
augmentation, checkpoints with RNG state, curves, and the input checks of the two models."""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_fast.classifiers import accuracy
from dfkd_fast.ops import kd_kl_div

__all__ = ["DistillResult", "CKPT_NAME", "as_image_tensor", "evaluate_accuracy", "make_optimizer"]

CKPT_NAME = "checkpoint.pt"


@dataclass
class DistillResult:
    """Outcome of a distillation run.

    Attributes:
        train_loss: mean KD loss per epoch (offline) or per round (online).
        test_acc: test accuracy (in [0, 1]) after each epoch / evaluation round; empty without a test set.
        final_acc: last test accuracy (``nan`` without a test set).
        best_acc: best test accuracy (``nan`` without a test set).
        epochs: epochs (offline) or rounds (online) completed.
        seconds: end-to-end wall-clock seconds of this call (synthesis + training + evaluation).
        synth_seconds: seconds spent synthesizing (online; 0 for offline).
        images: number of training images (offline: transfer-set size; online: final pool size).
        checkpoint: path of the last checkpoint, if any.
        curves: path of the loss/accuracy curve PNG, if written.
        teacher_acc: the teacher's accuracy on the test set (``nan`` without one or where not measured).
    """

    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    final_acc: float = float("nan")
    best_acc: float = float("nan")
    epochs: int = 0
    seconds: float = 0.0
    synth_seconds: float = 0.0
    images: int = 0
    checkpoint: str | None = None
    curves: str | None = None
    teacher_acc: float = float("nan")


def as_image_tensor(data: Any) -> torch.Tensor:
    """Images of a transfer set / tensor / (images, ...) tuple / Dataset as one float tensor in [0, 1].

    Shape: -> (N, C, H, W) float32. uint8 input is divided by 255.
    """
    if isinstance(data, torch.Tensor):
        x = data
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        x = data[0]
    elif hasattr(data, "images") and isinstance(data.images, torch.Tensor):
        x = data.images
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        if len(data) == 0:
            raise ValueError("the transfer set is empty: synthesize some images first (dfkd-fast synthesize)")
        items = []
        for i in range(len(data)):
            it = data[i]
            if isinstance(it, dict):
                it = it["image"] if "image" in it else it["images"]
            elif isinstance(it, (tuple, list)):
                it = it[0]
            items.append(torch.as_tensor(it))
        x = torch.stack(items)
    else:
        raise ValueError(f"expected a TransferSet, a Dataset, an image tensor or a tuple (images, ...); "
                         f"got {type(data).__name__}")
    if x.numel() == 0 or x.shape[0] == 0:
        raise ValueError("the transfer set is empty: synthesize some images first (dfkd-fast synthesize)")
    if x.dim() != 4:
        raise ValueError(f"transfer images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def restores_teacher(fn: Callable) -> Callable:
    """Decorator: ``fn`` may put its ``teacher`` argument in eval mode and freeze its parameters; on return (or an
    exception) every submodule's ``training`` flag and every parameter's ``requires_grad`` are as the caller left
    them. The caller's teacher is never changed for good."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        teacher = sig.bind_partial(*args, **kwargs).arguments.get("teacher")
        if not isinstance(teacher, nn.Module):
            return fn(*args, **kwargs)
        modes = [(m, m.training) for m in teacher.modules()]
        grads = [(p, p.requires_grad) for p in teacher.parameters()]
        try:
            return fn(*args, **kwargs)
        finally:
            for m, was in modes:
                m.training = was
            for p, was in grads:
                p.requires_grad_(was)

    return wrapper


def _check_models(student: nn.Module, teacher: nn.Module, sample: torch.Tensor, norm,
                  num_classes: int | None) -> int:
    """Run both models on a sample batch; mismatched input sizes or class counts raise ``ValueError``."""
    outs = []
    for name, model in (("teacher", teacher), ("student", student)):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(norm(sample))
        except RuntimeError as e:
            raise ValueError(f"the {name} cannot take images of shape {tuple(sample.shape[1:])} from the data "
                             f"({str(e).splitlines()[0]}); check --image-size and the transfer set") from None
        finally:
            model.train(was)
        if out.dim() != 2:
            raise ValueError(f"the {name} must return (N, K) logits, got shape {tuple(out.shape)}")
        outs.append(out.shape[1])
    if outs[0] != outs[1]:
        raise ValueError(f"the teacher has {outs[0]} classes but the student has {outs[1]}; build the student "
                         f"with num_classes={outs[0]}")
    if num_classes is not None and num_classes != outs[0]:
        raise ValueError(f"num_classes={num_classes} but the teacher outputs {outs[0]} classes")
    return outs[0]


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on images ``x`` (in [0, 1], normalized here) with labels ``y``
    (:func:`dfkd_fast.classifiers.accuracy`).

    Shape: x (N, C, H, W), y (N,) long.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"test images and labels must be non-empty and equally many, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    return accuracy(model, x, y, mean, std, batch_size=batch_size)


def make_optimizer(student: nn.Module, lr: float, total_steps: int, schedule: str = "cosine",
                   momentum: float = 0.9, weight_decay: float = 5e-4,
                   milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1):
    """SGD (momentum, weight decay) with a per-step schedule: cosine to 0, step (x gamma at the given
    fractions of ``total_steps``) or constant."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = max(1, int(total_steps))
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif schedule == "step":
        ms = sorted({max(1, int(f * total)) for f in milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=gamma)
    elif schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
    return opt, sched


def _augmenter(augment: bool | str, image_size: Sequence[int], backend: str, generator: torch.Generator):
    """``True``/``"crop_flip"``: pad-crop (H/8 pixels) + horizontal flip; ``"crop"``: no flip (digits)."""
    if augment is False or augment is None or augment == "none":
        return None
    if augment is True:
        augment = "crop_flip"
    if augment not in ("crop", "crop_flip"):
        raise ValueError(f"augment must be True/False, 'crop', 'crop_flip' or 'none', got {augment!r}")
    from dfkd_fast.augment import CropFlip

    h, w = int(image_size[-2]), int(image_size[-1])
    return CropFlip((h, w), mode="pad_crop", padding=max(1, h // 8), p_flip=0.5 if augment == "crop_flip" else 0.0,
                    backend=backend, generator=generator)


def kd_step(student: nn.Module, teacher: nn.Module, xb: torch.Tensor, aug, norm, opt: torch.optim.Optimizer,
            sched: Any, temperature: float, backend: str, grad_clip: float = 0.0) -> torch.Tensor:
    """One student KD step on a batch of [0, 1] images: augment -> normalize -> KL(teacher || student) * T^2
    (``batchmean``) -> gradient-norm clip at ``grad_clip`` (0: off) -> SGD step -> scheduler step. Returns the
    detached loss. Shape: xb (N, C, H, W)."""
    if aug is not None:
        xb = aug(xb)
    xb = norm(xb)
    with torch.no_grad():
        t_logits = teacher(xb)
    loss = kd_kl_div(student(xb), t_logits, temperature=temperature, backend=backend)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    sched.step()
    return loss.detach()


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    st: dict[str, Any] = {"cpu": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    torch.set_rng_state(st["cpu"])
    gen.set_state(st["gen"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable checkpoint
        raise ValueError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); delete it or run without "
                         "resume") from None


def _curves_figure(loss: Sequence[float], acc: Sequence[float], xlabel: str, teacher_acc: float | None = None):
    """The matplotlib figure of :func:`_save_curves`: KD loss (top axes) and test accuracy in % (bottom axes,
    only with ``acc``) against the 1-based epoch/round, the teacher's accuracy (in [0, 1]) as a dashed
    horizontal line on the accuracy axes. ``acc`` is in [0, 1]."""
    from dfkd_fast.viz import _pyplot

    plt = _pyplot()
    two = bool(acc)
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(6, 5.5 if two else 3.2), sharex=True, squeeze=False)
    ax_l = axes[0][0]
    ax_l.plot(range(1, len(loss) + 1), [float(v) for v in loss], marker=".", color="tab:blue", label="KD loss")
    ax_l.set_ylabel("KD loss (x T^2)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    if two:
        ax_a = axes[1][0]
        ax_a.plot(range(1, len(acc) + 1), [100.0 * float(v) for v in acc], marker=".", color="tab:green",
                  label="student test accuracy")
        if teacher_acc is not None and teacher_acc == teacher_acc:  # not nan
            ax_a.axhline(100.0 * float(teacher_acc), color="tab:red", linestyle="--",
                         label=f"teacher {100.0 * float(teacher_acc):.2f}%")
        ax_a.set_ylabel("test accuracy (%)")
        ax_a.grid(alpha=0.3)
        ax_a.legend(fontsize=8)
    axes[-1][0].set_xlabel(xlabel)
    fig.tight_layout()
    return fig


def _save_curves(path: str, loss: list[float], acc: list[float], xlabel: str,
                 teacher_acc: float | None = None) -> str | None:
    """Write :func:`_curves_figure` as a PNG at ``path`` (atomic: temp file + rename). Returns ``path``."""
    from dfkd_fast.viz import _pyplot

    fig = _curves_figure(loss, acc, xlabel, teacher_acc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)
