"""Source-free unsupervised domain adaptation with Data Impressions (TPAMI 2021, §4.2; ADDA backbone).

ADDA (Tzeng et al., 2017) needs labeled source data; here the source model's *impressions* stand in for it:

1. the source model ``f = h o g`` (encoder g, classifier h = its last ``nn.Linear``) is frozen;
2. the target encoder ``g_t`` starts as a copy of ``g`` and shares the frozen classifier ``h``;
3. a discriminator ``D`` (``F -> 500 -> 500 -> 2``, leaky ReLU) learns to tell ``g(impressions)`` (label 1)
   from ``g_t(target images)`` (label 0), and ``g_t`` is trained to fool it (inverted labels):

.. math::
    L_D = \\mathrm{CE}(D(g(x_s)), 1) + \\mathrm{CE}(D(g_t(x_t)), 0), \\qquad
    L_{g_t} = \\mathrm{CE}(D(g_t(x_t)), 1) + \\lambda_{kd}\\, T^2\\, \\mathrm{KL}(f(x_s) \\,\\|\\, h(g_t(x_s)))_T

The optional ``kd`` term (default 1) keeps ``g_t`` consistent with the source model on the impressions, a
stabilizer for the small-budget CPU setting (``kd=0`` is plain ADDA). The target model ``h o g_t`` is
evaluated on labeled target test images; the labels are never used for training.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.classifiers import accuracy as _accuracy
from dfkd_fast.tasks._common import FeatureTap, last_linear, sample_batch
from dfkd_fast.tasks.robustness import NormalizedModel, check_images, model_device, num_outputs

__all__ = ["Discriminator", "UDAResult", "source_free_uda", "accuracy"]


class Discriminator(nn.Module):
    """ADDA domain discriminator: ``in_dim -> hidden -> hidden -> 2`` with LeakyReLU(0.2) (hidden 500).

    Shape: (N, in_dim) -> logits (N, 2) (class 1 = source / impressions).
    """

    def __init__(self, in_dim: int, hidden: int = 500) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"Discriminator: in_dim and hidden must be >= 1, got {in_dim}, {hidden}")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 2))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of a [0, 1]-pixel model (eval mode during the call). Shape: x (N, C, H, W), y (N,)."""
    return _accuracy(model, x, y, batch_size=batch_size)


@dataclass
class UDAResult:
    """Outcome of :func:`source_free_uda` (accuracies in [0, 1]; ``nan`` without a labeled target test set).

    Attributes:
        source_only_acc: the unadapted source model on the target test images.
        adapted_acc: the adapted target model on the same images.
        d_loss, g_loss: per-step discriminator / target-encoder losses.
        steps, seconds: adaptation steps and wall time.
        target_model: the adapted classifier (takes normalized images, like the source model).
    """

    source_only_acc: float
    adapted_acc: float
    d_loss: list[float] = field(default_factory=list)
    g_loss: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    target_model: Any = None


def source_free_uda(source_model: nn.Module, impressions: torch.Tensor, target_x: torch.Tensor,
                    target_test: tuple[torch.Tensor, torch.Tensor] | None = None, *, steps: int = 500,
                    batch_size: int = 64, lr: float = 1e-4, d_lr: float = 1e-4, hidden: int = 500,
                    kd: float = 1.0, T: float = 4.0, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, seed: int = 0) -> UDAResult:
    """Adapt ``source_model`` to unlabeled ``target_x`` using its impressions instead of source data.

    Args:
        source_model: trained source classifier (frozen), whose last ``nn.Linear`` is the classifier.
        impressions: (N_s, C, H, W) in [0, 1]: Data Impressions of the source model (no source data).
        target_x: (N_t, C, H, W) in [0, 1]: unlabeled target-domain images (same size as the impressions).
        target_test: labeled target images (x, y) for the reported accuracies (never trained on).
        steps: adversarial steps (each one D update and one target-encoder update).
        batch_size, lr, d_lr: Adam (betas 0.5, 0.999) for the target encoder and the discriminator.
        hidden: discriminator width (500 as in ADDA); kd, T: impression-consistency weight and temperature.
        mean, std: the models' input normalization.

    Shape: see above. Returns :class:`UDAResult`.
    """
    t0 = time.perf_counter()
    xs = check_images(impressions, "impressions", "source_free_uda")
    xt = check_images(target_x, "target_x", "source_free_uda")
    if tuple(xs.shape[1:]) != tuple(xt.shape[1:]):
        raise ValueError(f"source_free_uda: impressions are {tuple(xs.shape[1:])} images, target_x "
                         f"{tuple(xt.shape[1:])}; resize the target images to the source model's input size")
    if target_test is not None:
        tx = check_images(target_test[0], "target_test[0]", "source_free_uda")
        if tuple(tx.shape[1:]) != tuple(xs.shape[1:]) or len(target_test[1]) != len(tx):
            raise ValueError("source_free_uda: target_test must be (x, y) with images like target_x and one label "
                             "per image")
    if steps < 0 or batch_size < 2 or lr <= 0 or d_lr <= 0 or kd < 0 or T <= 0:
        raise ValueError(f"source_free_uda: need steps >= 0, batch_size >= 2, lr, d_lr, T > 0, kd >= 0; got {steps}, "
                         f"{batch_size}, {lr}, {d_lr}, {kd}, {T}")
    torch.manual_seed(seed)
    src = NormalizedModel(source_model, mean, std).eval()
    dev = model_device(src)
    k = num_outputs(src, xs[:1].to(dev))
    if target_test is not None and len(target_test[1]) and int(target_test[1].max()) >= k:
        raise ValueError(f"source_free_uda: target labels go up to {int(target_test[1].max())} but the source model "
                         f"has {k} classes; the label sets must be shared (closed-set adaptation)")
    flags = [p.requires_grad for p in source_model.parameters()]
    for p in source_model.parameters():
        p.requires_grad_(False)
    tgt_core = copy.deepcopy(source_model)
    for p in tgt_core.parameters():
        p.requires_grad_(True)
    head = last_linear(tgt_core)
    for p in head.parameters():
        p.requires_grad_(False)
    tgt = NormalizedModel(tgt_core, mean, std).train()
    src_tap, tgt_tap = FeatureTap(source_model), FeatureTap(tgt_core, head)
    src_only = accuracy(src, *target_test) if target_test is not None else float("nan")
    try:
        with torch.no_grad():
            src(xs[:2].to(dev))
        feat_dim = src_tap.features.shape[1]
        disc = Discriminator(feat_dim, hidden).to(dev)
        opt_t = torch.optim.Adam([p for p in tgt_core.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=d_lr, betas=(0.5, 0.999))
        g = torch.Generator().manual_seed(int(seed))
        res = UDAResult(source_only_acc=src_only, adapted_acc=float("nan"))
        ones = torch.ones(batch_size, dtype=torch.long, device=dev)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=dev)
        for _ in range(steps):
            bs_x = xs[sample_batch(len(xs), batch_size, g)].to(dev)
            bt_x = xt[sample_batch(len(xt), batch_size, g)].to(dev)
            with torch.no_grad():
                t_logits = src(bs_x)
                f_s = src_tap.features
            # discriminator step
            tgt(bt_x)
            f_t = tgt_tap.features
            d_loss = F.cross_entropy(disc(f_s), ones) + F.cross_entropy(disc(f_t.detach()), zeros)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # target encoder step (inverted labels)
            g_loss = F.cross_entropy(disc(f_t), ones)
            if kd > 0:
                s_logits = tgt(bs_x)
                g_loss = g_loss + kd * T * T * F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1),
                                                        reduction="batchmean", log_target=True)
            opt_t.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_t.step()
            res.d_loss.append(float(d_loss.detach()))
            res.g_loss.append(float(g_loss.detach()))
        res.steps = steps
    finally:
        src_tap.remove()
        tgt_tap.remove()
        for p, f in zip(source_model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    tgt_core.eval()
    res.adapted_acc = accuracy(tgt, *target_test) if target_test is not None else float("nan")
    res.target_model = tgt_core
    res.seconds = time.perf_counter() - t0
    return res
