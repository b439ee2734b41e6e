"""Helpers shared by the downstream tasks: Data Impressions of a model, feature taps, seeded batches."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast.classifiers import PenultimateTap
from dfkd_fast.models import last_linear
from dfkd_fast.tasks.robustness import model_device

__all__ = ["synthesize_impressions", "last_linear", "FeatureTap", "sample_batch"]


def synthesize_impressions(model: nn.Module, n: int, image_size: Sequence[int], num_classes: int | None = None,
                           *, classes: Sequence[int] | None = None, method: str = "data_impressions",
                           batch_size: int = 100, iterations: int = 200, lr: float = 0.05, init_scale: float = 0.1,
                           beta: tuple[float, ...] = (1.0, 0.1), temperature: float = 20.0,
                           mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``n`` Data (or Class) Impressions of ``model``, class-balanced over ``classes`` (default all K).

    Uses :class:`dfkd_fast.synthesis.DataImpressions` (Dirichlet soft targets, beta mixture) or
    ``ClassImpressions``: projected Adam on [0, 1] pixels from dim ``U[0, init_scale]`` noise, lr 0.05 with
    linear decay (the settings measured best on MNIST; see ``dfkd_fast.synthesis.data_impressions``). The
    model's parameters keep their ``requires_grad`` flags after the call.

    Shape: returns images (n, C, H, W) in [0, 1] (CPU), teacher logits (n, K) (CPU), synthesis seconds.
    """
    from dfkd_fast.synthesis import build_synthesizer

    if n < 1:
        raise ValueError(f"synthesize_impressions: n must be >= 1, got {n}")
    flags = [p.requires_grad for p in model.parameters()]
    was = model.training
    dev = model_device(model)
    c, h, w = (int(s) for s in image_size)
    if num_classes is None:
        with torch.no_grad():
            model.eval()
            num_classes = int(model(torch.zeros(1, c, h, w, device=dev)).shape[1])
    cls = list(range(num_classes)) if classes is None else [int(k) for k in classes]
    if not cls or min(cls) < 0 or max(cls) >= num_classes:
        raise ValueError(f"synthesize_impressions: classes must be a non-empty subset of [0, {num_classes}), got {cls}")
    # lr in [0, 1]-pixel units (the measured MNIST settings above), also when mean / std are given
    hp: dict[str, Any] = {"iterations": iterations, "lr": lr, "lr_units": "pixels", "temperature": temperature,
                          "init_scale": init_scale}
    if method == "data_impressions":
        hp["beta"] = tuple(beta)
    bs = min(batch_size, n)
    synth = build_synthesizer(method, model, num_classes, (c, h, w), batch_size=bs, mean=mean, std=std,
                              device=dev, backend=backend, seed=seed, **hp)
    images, logits = [], []
    t0 = time.perf_counter()
    done = 0
    cls_t = torch.tensor(cls, device=dev)
    try:
        while done < n:
            m = min(bs, n - done)
            targets = cls_t[(torch.arange(done, done + bs, device=dev) % len(cls))]
            res = synth.synthesize(targets)
            images.append(res.images[:m].cpu())
            logits.append(res.teacher_logits[:m].cpu())
            done += m
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was)
    return torch.cat(images), torch.cat(logits), time.perf_counter() - t0


#: The input of a module (default: the model's last ``nn.Linear``) on every forward; ``.features`` (N, F).
FeatureTap = PenultimateTap


def sample_batch(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` indices into ``range(n)`` drawn without replacement (with replacement if n is smaller)."""
    if n >= batch_size:
        return torch.randperm(n, generator=generator)[:batch_size]
    return torch.randint(0, n, (batch_size,), generator=generator)
