"""PNG figures with matplotlib's Agg backend: image grids labelled with the teacher's top-1, and loss curves."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["save_grid", "save_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_grid(images: torch.Tensor, path: str | os.PathLike | torch.Tensor,
              labels: torch.Tensor | str | os.PathLike | None = None,
              probs: torch.Tensor | str | os.PathLike | None = None, nrow: int = 8,
              class_names: Sequence[str] | None = None, title: str | None = None, max_images: int = 64) -> str:
    """Save a grid of images, each captioned with its class and the teacher's confidence.

    Caption: ``"{class} {p:.2f}"`` with class = argmax of ``probs`` (else ``labels``) and p its probability.
    The order ``save_grid(images, probs, path)`` is also accepted (a tensor second, a path third).

    Args:
        images: (N, C, H, W) in [0, 1], C in {1, 3}; at most ``max_images`` are drawn.
        path: output PNG path (parent directories are created).
        labels: (N,) int class indices, optional.
        probs: (N, K) probabilities (rows summing to 1) or logits (softmax is applied), optional.
        nrow: images per row.
        class_names: names for the class indices.

    Returns:
        the path written.
    """
    if isinstance(path, torch.Tensor):  # save_grid(images, probs, path[, ...]) order
        if labels is not None and not isinstance(labels, torch.Tensor):
            path, probs, labels = labels, path, None
        elif probs is not None and not isinstance(probs, torch.Tensor):
            path, probs = probs, path
        else:
            raise ValueError("save_grid: path must be a str or os.PathLike")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: images must be (N, 1|3, H, W), got {tuple(getattr(images, 'shape', ()))}")
    if nrow < 1:
        raise ValueError(f"save_grid: nrow must be >= 1, got {nrow}")
    path = os.fspath(path)
    n = min(images.shape[0], max_images)
    imgs = images[:n].detach().float().cpu().clamp(0, 1)
    top = conf = None
    if probs is not None:
        p = probs[:n].detach().float().cpu()
        if p.shape[0] != n or p.dim() != 2:
            raise ValueError(f"save_grid: probs must be (N, K) with N = {images.shape[0]}, got {tuple(probs.shape)}")
        if not torch.allclose(p.sum(1), torch.ones(n), atol=1e-3) or bool((p < 0).any()):
            p = p.softmax(1)
        conf, top = p.max(1)
    elif labels is not None:
        top = labels[:n].detach().cpu().long()
    plt = _pyplot()
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = imgs[k].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        if top is not None:
            c = int(top[k])
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            ax.set_title(name if conf is None else f"{name} {float(conf[k]):.2f}", fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_atomic(fig, path)
    plt.close(fig)
    return path


def _save_atomic(fig, path: str) -> None:
    """``fig.savefig`` (format from the extension, default PNG) to a temp file beside ``path``, then
    ``os.replace``: a crash never leaves a partial or empty ``path`` (the old file stays until the new one is
    complete)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1].lstrip(".").lower() or "png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str | None = None,
                xlabel: str = "step", logy: bool = False) -> str:
    """Plot each named series (e.g. losses, accuracies) against its index and save a PNG.

    Returns:
        the path written.
    """
    if not curves:
        raise ValueError("save_curves: curves is empty; pass e.g. {'loss': [...]}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ys = [float(v) for v in ys]
        ax.plot(range(len(ys)), ys, label=name)
    ax.set_xlabel(xlabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.fspath(path)
    _save_atomic(fig, path)
    plt.close(fig)
    return path
