"""Pieces every user of a trained classifier needs once: input normalization, top-1 accuracy, penultimate features.

- :func:`normalizer` / :func:`normalize`: ``(x - mean) / std`` with the teacher's per-channel mean/std
  (images are in [0, 1] before it); ``None`` is the identity.
- :func:`accuracy`: top-1 accuracy of a model on [0, 1] images (normalized here), eval mode during the call.
- :class:`PenultimateTap`: captures the input of a module (default: the model's last ``nn.Linear``) on every
  forward -- the penultimate features of DAFL's activation term and of the feature-space tasks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dfkd_fast.models import last_linear

__all__ = ["model_device", "normalizer", "normalize", "accuracy", "PenultimateTap"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-free module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def normalizer(mean: Sequence[float] | torch.Tensor | None, std: Sequence[float] | torch.Tensor | None, c: int,
               device: torch.device | str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> (x - mean) / std`` for C = ``c`` channels (checked once, here).

    Raises:
        ValueError: mean / std with neither 1 nor ``c`` values, or a std <= 0.
    """
    m = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device).flatten()
    s = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=device).flatten()
    for name, v in (("mean", m), ("std", s)):
        if v is not None and v.numel() not in (1, c):
            raise ValueError(f"{name} must have 1 or {c} values (one per image channel), got {v.numel()}")
    if s is not None and bool((s <= 0).any()):
        raise ValueError("std must be > 0 for every channel")
    m4 = None if m is None else m.view(1, -1, 1, 1)
    s4 = None if s is None else s.view(1, -1, 1, 1)

    def norm(x: torch.Tensor) -> torch.Tensor:
        if m4 is not None:
            x = x - m4
        if s4 is not None:
            x = x / s4
        return x

    return norm


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor | None,
              std: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """``(x - mean) / std`` per channel in ``x``'s dtype and device (identity when both are None).

    Shape: x (N, C, H, W); mean, std: 1 or C values.
    """
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = torch.as_tensor(0.0 if mean is None else mean, dtype=x.dtype, device=x.device).reshape(-1)
    s = torch.as_tensor(1.0 if std is None else std, dtype=x.dtype, device=x.device).reshape(-1)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(f"mean/std must have 1 or {c} entries, got {m.numel()} and {s.numel()}")
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, batch_size: int = 512, device: torch.device | str | None = None,
             name: str = "accuracy") -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on images ``x`` in [0, 1] (uint8 is scaled), normalized here.

    The model is in eval mode during the call; its ``training`` flag is restored after.

    Shape: x (N, C, H, W), y (N,) long.

    Raises:
        ValueError: ``x`` and ``y`` differ in length (message "same length") or are empty; bad mean/std.
    """
    if len(x) != len(y):
        raise ValueError(f"{name}: x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError(f"{name}: empty input (no test images)")
    dev = torch.device(device) if device is not None else model_device(model)
    norm = normalizer(mean, std, x.shape[1], dev)
    was = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
            correct += int((model(norm(xb)).argmax(1).cpu() == y[i:i + batch_size].cpu()).sum())
    finally:
        model.train(was)
    return correct / len(x)


class PenultimateTap:
    """Captures the input of ``module`` (default: ``model``'s last ``nn.Linear``) on every forward.

    ``.features`` is the last captured (N, F) tensor (flattened, with autograd). Use as a context manager or
    call ``.remove()``.

    Args:
        model: the classifier.
        module: the module whose input is captured (default :func:`dfkd_fast.models.last_linear`).
        method: when given, a model without ``nn.Linear`` raises ``ValueError`` naming it and the term to
            disable (``act=0``).
    """

    def __init__(self, model: nn.Module, module: nn.Module | None = None, *, method: str | None = None) -> None:
        if module is None:
            try:
                module = last_linear(model)
            except ValueError as e:
                if method is None:
                    raise
                raise ValueError(f"{method}: the activation term needs the teacher's penultimate features, but the "
                                 "teacher has no nn.Linear classifier; set act=0 to disable the term") from e
        self.module = module
        self.features: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.features = torch.flatten(args[0], 1)

    def pop(self) -> torch.Tensor:
        """The features of the last forward, released (a compiled step that differentiates through them must
        not keep them alive past its ``autograd.grad``). Shape: (N, F)."""
        feats, self.features = self.features, None
        if feats is None:
            raise RuntimeError("PenultimateTap.pop: no features captured; run a forward of the model first")
        return feats

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> PenultimateTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
