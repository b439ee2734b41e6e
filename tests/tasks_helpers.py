"""Shared tiny models for the tests/test_tasks_*.py files (trained once per test session, seconds on a CPU)."""
from __future__ import annotations

import functools

import torch

from dfkd_fast.datasets import digits, mnist5k
from dfkd_fast.models import build_model
from dfkd_fast.teachers import train_classifier

SIZE = 16  # LeNet-5 works from 14x14 up; 16x16 keeps every test fast


@functools.cache
def _trained(dataset: str, n: int, epochs: int) -> dict[str, torch.Tensor]:
    x, y = (digits if dataset == "digits" else mnist5k)("train", image_size=SIZE)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]  # the splits are class-sorted
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, SIZE)
    train_classifier(model, x[idx], y[idx], epochs=epochs, lr=5e-3, batch_size=64, seed=0, max_shift=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_model(dataset: str = "digits", n: int = 1438, epochs: int = 6) -> torch.nn.Module:
    """A LeNet-5 (1x16x16 input) trained on ``n`` training images of ``dataset``; a fresh copy per call."""
    model = build_model("lenet5", 10, 1, SIZE)
    model.load_state_dict(_trained(dataset, n, epochs))
    return model.eval()


def data(dataset: str = "digits", split: str = "test", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) at 16x16; ``n``: a seeded random subset (the splits are sorted by class)."""
    x, y = (digits if dataset == "digits" else mnist5k)(split, image_size=SIZE)
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:n]
        x, y = x[idx], y[idx]
    return x, y
