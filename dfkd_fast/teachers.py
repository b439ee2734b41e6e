"""Train and cache classifiers on the bundled real data (teachers for synthesis, real-data baselines).

:func:`train_classifier` is a plain supervised (or KD) loop; :func:`cached_mnist_teacher` trains a zoo model
on the MNIST-5k train split once and caches its weights as safetensors, keyed by arch, epochs, seed, image size
and :data:`TEACHER_CODE_VERSION` (bump it when the recipe changes so stale caches are not reused).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.classifiers import accuracy
from dfkd_fast.classifiers import normalize as _normalize
from dfkd_fast.datasets import mnist5k, tensor_loader
from dfkd_fast.models import build_model, load_model, save_model

__all__ = ["train_classifier", "evaluate", "cached_mnist_teacher", "default_cache_dir", "random_shift", "random_affine",
           "TEACHER_CODE_VERSION", "MNIST_TEACHER_EPOCHS"]

TEACHER_CODE_VERSION = "1"
MNIST_TEACHER_EPOCHS = 20


def default_cache_dir() -> str:
    """``$DFKD_FAST_CACHE`` if set, else ``~/.cache/dfkd_fast``."""
    return os.environ.get("DFKD_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dfkd_fast")




def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by an integer (dy, dx) in [-max_shift, max_shift], zero fill (a padded random crop).

    Shape:
        x: (N, C, H, W) -> (N, C, H, W).
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p))
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=generator).to(x.device)
    rows = (off[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (off[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    bidx = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    cidx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return xp[bidx, cidx, rows, cols]


def random_affine(x: torch.Tensor, max_rotate: float = 10.0, max_scale: float = 0.1, max_shift: float = 2.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation (+-``max_rotate`` degrees), isotropic scale (1 +- ``max_scale``) and translation
    (+-``max_shift`` pixels) per image, bilinear with zero fill.

    Shape:
        x: (N, C, H, W) -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=generator).to(x.device, x.dtype) * 2 - 1
    a = u[:, 0] * (max_rotate * torch.pi / 180.0)
    s = 1.0 + u[:, 1] * max_scale
    tx, ty = u[:, 2] * (2.0 * max_shift / w), u[:, 3] * (2.0 * max_shift / h)
    cos, sin = s * torch.cos(a), s * torch.sin(a)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode during the call, restored after) on images in [0, 1].

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) int64. Returns a float in [0, 1].
    """
    return accuracy(model, x, y, mean, std, batch_size=batch_size, device=device, name="evaluate")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, epochs: int = 10, lr: float = 1e-3,
                     batch_size: int = 64, device: str | torch.device = "cpu", seed: int = 0,
                     x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
                     kd_teacher: nn.Module | None = None, T: float = 4.0, alpha: float = 1.0,
                     optimizer: str = "adam", weight_decay: float = 0.0, augment: str = "affine", max_shift: int = 2,
                     mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                     num_threads: int | None = None, verbose: bool = False) -> dict[str, list[float] | float]:
    """Train ``model`` in place on images in [0, 1].

    Loss: CE(model(x), y) without a teacher; with ``kd_teacher``,
    :math:`\\alpha T^2 KL(softmax(t/T) \\| softmax(s/T)) + (1 - \\alpha) CE(s, y)` (``y`` may be None if alpha=1).
    Augmentation (``augment``): ``"affine"`` (rotation +-10 deg, scale +-10%, shift +-``max_shift`` px),
    ``"shift"`` (integer translation up to ``max_shift`` px) or ``"none"``. One-cycle learning-rate schedule
    (15% warm-up to ``lr``, cosine to ~0). Adam (``optimizer="adam"``) or SGD, momentum 0.9 (``"sgd"``).
    ``num_threads`` temporarily sets ``torch.set_num_threads`` (1 is fastest for LeNet-size models on a
    busy machine).

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) int64 or None.

    Returns:
        ``{"loss": per-epoch mean loss, "test_acc": per-epoch accuracy (if x_test given),
        "final_test_acc": last accuracy or nan, "seconds": wall time}``.
    """
    if y is None and (kd_teacher is None or alpha != 1.0):
        raise ValueError("train_classifier: labels y are required unless kd_teacher is given with alpha=1")
    if y is not None and len(y) != len(x):
        raise ValueError(f"train_classifier: x and y must have the same length, got {len(x)} and {len(y)}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"train_classifier: need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, "
                         f"{batch_size}, {lr}")
    if augment not in ("affine", "shift", "none"):
        raise ValueError(f"train_classifier: augment must be 'affine', 'shift' or 'none', got {augment!r}")
    if (x_test is None) != (y_test is None):
        raise ValueError("train_classifier: pass both x_test and y_test, or neither")
    dev = torch.device(device)
    model.to(dev)
    if kd_teacher is not None:
        kd_teacher.to(dev).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    else:
        raise ValueError(f"train_classifier: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    loader = tensor_loader(x, y if y is not None else torch.zeros(len(x), dtype=torch.long), batch_size,
                           shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.15)
    gen = torch.Generator().manual_seed(seed + 1)
    hist: dict[str, list[float] | float] = {"loss": [], "test_acc": []}
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    try:
        _train_epochs(model, loader, opt, sched, gen, hist, epochs, augment, max_shift, dev, kd_teacher, T, alpha,
                      mean, std, x_test, y_test, verbose)
    finally:
        torch.set_num_threads(old_threads)
    hist["final_test_acc"] = hist["test_acc"][-1] if hist["test_acc"] else float("nan")
    hist["seconds"] = time.perf_counter() - t0
    model.eval()
    return hist


def _train_epochs(model: nn.Module, loader: torch.utils.data.DataLoader, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                  hist: dict[str, list[float] | float], epochs: int, augment: str, max_shift: int,
                  dev: torch.device, kd_teacher: nn.Module | None, T: float, alpha: float,
                  mean: torch.Tensor | None, std: torch.Tensor | None, x_test: torch.Tensor | None,
                  y_test: torch.Tensor | None, verbose: bool) -> None:
    losses, accs = hist["loss"], hist["test_acc"]
    assert isinstance(losses, list) and isinstance(accs, list)
    for ep in range(epochs):
        model.train()
        tot, cnt = 0.0, 0
        for xb, yb in loader:
            if augment == "affine":
                xb = random_affine(xb, max_shift=max_shift, generator=gen)
            elif augment == "shift":
                xb = random_shift(xb, max_shift, gen)
            xb = xb.to(dev)
            yb = yb.to(dev)
            logits = model(_normalize(xb, mean, std))
            if kd_teacher is None:
                loss = F.cross_entropy(logits, yb)
            else:
                with torch.no_grad():
                    t_logits = kd_teacher(_normalize(xb, mean, std))
                loss = alpha * (T * T) * F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t_logits / T, 1),
                                                  reduction="batchmean", log_target=True)
                if alpha != 1.0:
                    loss = loss + (1.0 - alpha) * F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(xb)
            cnt += len(xb)
        losses.append(tot / cnt)
        if x_test is not None and y_test is not None:
            accs.append(evaluate(model, x_test, y_test, mean=mean, std=std, device=dev))
        if verbose:
            acc = f" test_acc {accs[-1]:.4f}" if accs else ""
            print(f"epoch {ep + 1}/{epochs} loss {losses[-1]:.4f}{acc}")


def cached_mnist_teacher(arch: str = "lenet5", cache_dir: str | os.PathLike | None = None,
                         epochs: int = MNIST_TEACHER_EPOCHS, seed: int = 0, image_size: int = 32, lr: float = 3e-3,
                         batch_size: int = 64, weight_decay: float = 5e-4, device: str | torch.device = "cpu",
                         num_threads: int | None = 1) -> tuple[nn.Module, float]:
    """A zoo classifier trained on MNIST-5k train (4,000 images), cached as safetensors.

    The first call trains (Adam, one-cycle schedule, random affine augmentation; single-threaded by default,
    which is the fastest setting for LeNet on a shared 2-core machine) and writes
    ``{cache_dir}/mnist5k-{arch}-s{image_size}-e{epochs}-seed{seed}-lr{lr}-b{batch_size}-wd{weight_decay}
    -v{TEACHER_CODE_VERSION}.safetensors`` atomically; later calls load it. An unreadable cache file is
    retrained with a warning.
    lenet5 / lenet5_bn reach >= 98% on the 1,000 test images with the default recipe.

    Returns:
        (model in eval mode on ``device``, accuracy on the MNIST-5k test split).
    """
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (f"mnist5k-{arch}-s{image_size}-e{epochs}-seed{seed}-lr{lr:g}-b{batch_size}-wd{weight_decay:g}"
           f"-v{TEACHER_CODE_VERSION}.safetensors")
    path = os.path.join(cache_dir, key)
    x_te, y_te = mnist5k("test", image_size)
    if os.path.isfile(path):
        try:
            model = load_model(arch, path, num_classes=10, in_channels=1, image_size=image_size).to(device).eval()
            return model, evaluate(model, x_te, y_te, device=device)
        except ValueError as e:
            warnings.warn(f"cached_mnist_teacher: cache {path!r} is unusable ({e}); retraining", stacklevel=2)
    x, y = mnist5k("train", image_size)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=10, in_channels=1, image_size=image_size)
    train_classifier(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed,
                     weight_decay=weight_decay, num_threads=num_threads)
    acc = evaluate(model, x_te, y_te, device=device)
    save_model(model, path, metadata={"arch": arch, "dataset": "mnist5k", "test_acc": f"{acc:.4f}",
                                      "epochs": str(epochs), "seed": str(seed)})
    return model.eval(), acc
