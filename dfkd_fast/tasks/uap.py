"""Data-free universal adversarial perturbations from a transfer set (Data Impressions, TPAMI 2021, §4.4).

A generator maps a 10-d latent ``z ~ U[-1, 1]`` through 4 transposed convolutions to a perturbation
``delta = eps * tanh(.)`` (eps = 10/255 by default, the L-inf budget of the paper). It is trained on the
transfer set (impressions, no real data) with the objective of Mopuri et al. (AAA / NAG, 2018):

.. math::
    L = \\underbrace{-\\frac1B\\sum_i \\log\\big(1 - q_{c_i}(x_i + \\delta_i)\\big)}_{\\text{fooling}}
        \\; - \\; \\alpha \\underbrace{\\frac1B \\sum_i
        \\big\\|p(x_i + \\delta_i) - p(x_i + \\delta_{\\pi(i)})\\big\\|_2}_{\\text{diversity}}

where ``c_i`` is the model's clean prediction, ``q = softmax(f(.))``, ``p`` the model's softmax output and
``pi`` a random permutation of the batch (perturbations from different latents must act differently). The
UAP reported is the generated perturbation with the highest fooling rate on the transfer set (chosen
without real data); its fooling rate (fraction of real images whose predicted label changes) is compared
with random noise of the same L2 norm.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_fast.tasks.robustness import NormalizedModel, check_images, model_device, num_outputs

__all__ = ["UAPGenerator", "UAPResult", "uap", "fooling_rate", "save_perturbation"]


class UAPGenerator(nn.Module):
    """Four transposed convolutions from a ``nz``-d latent to a perturbation in [-eps, eps].

    ``z (nz,1,1) -> ConvT(k=s0) s0 x s0 -> ConvT(4,2,1) 2 s0 -> ConvT(4,2,1) 4 s0 -> ConvT(4,2,1) 8 s0``
    with BatchNorm + ReLU between layers and ``eps * tanh`` at the output; ``s0 = ceil(image_size / 8)``
    (4 for 32x32). When ``8 s0 > image_size`` the output is center-cropped.

    Shape: z (N, nz) -> (N, nc, image_size, image_size).
    """

    def __init__(self, nz: int = 10, ngf: int = 64, image_size: int = 32, nc: int = 3, eps: float = 10 / 255) -> None:
        super().__init__()
        if nz < 1 or ngf < 1 or nc < 1 or image_size < 8:
            raise ValueError(f"UAPGenerator: need nz, ngf, nc >= 1 and image_size >= 8; got {nz}, {ngf}, {nc}, "
                             f"{image_size}")
        if not 0 < eps <= 1:
            raise ValueError(f"UAPGenerator: eps must be in (0, 1] (pixel units), got {eps}")
        self.nz, self.image_size, self.nc, self.eps = nz, image_size, nc, float(eps)
        s0 = math.ceil(image_size / 8)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, s0, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"UAPGenerator: z must be (N, {self.nz}), got {tuple(z.shape)}")
        out = self.net(z[:, :, None, None])
        off = (out.shape[-1] - self.image_size) // 2
        out = out[..., off:off + self.image_size, off:off + self.image_size]
        return self.eps * torch.tanh(out)


@torch.no_grad()
def fooling_rate(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images whose predicted label changes when ``delta`` is added (result clamped to [0, 1]).

    ``model`` takes [0, 1] pixels (wrap with :class:`NormalizedModel`). Shape: x (N, C, H, W), delta (C, H, W).
    """
    if delta.dim() == 4:
        delta = delta[0]
    if tuple(delta.shape) != tuple(x.shape[1:]):
        raise ValueError(f"fooling_rate: delta must have the image shape {tuple(x.shape[1:])}, "
                         f"got {tuple(delta.shape)}")
    was = model.training
    model.eval()
    dev = model_device(model)
    changed = 0
    for xb in x.split(batch_size):
        xb = xb.to(dev)
        changed += int((model(xb).argmax(1) != model((xb + delta.to(dev)).clamp(0, 1)).argmax(1)).sum())
    model.train(was)
    return changed / len(x)


def save_perturbation(delta: torch.Tensor, path: str | os.PathLike, eps: float | None = None) -> str:
    """Write a perturbation as a PNG, mapped from [-eps, eps] to [0, 1] (``viz.save_grid``). Returns the path.

    Shape: delta (C, H, W) or (N, C, H, W).
    """
    from dfkd_fast.viz import save_grid

    d = delta.detach().float().cpu()
    if d.dim() == 3:
        d = d[None]
    scale = float(eps) if eps else float(d.abs().max().clamp_min(1e-12))
    img = (d / scale + 1.0).mul(0.5).clamp(0.0, 1.0)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_grid(img, path)
    return path


@dataclass
class UAPResult:
    """Outcome of :func:`uap` (rates in [0, 1]).

    Attributes:
        perturbation: the selected UAP (C, H, W) in [-eps, eps].
        fooling_rate: on the real evaluation images (``nan`` without them).
        random_fooling_rate: random noise of the same L2 norm on the same images (mean over ``noise_trials``).
        transfer_fooling_rate: the UAP's fooling rate on the transfer set it was trained on.
        eps, l2_norm, linf_norm: budget and norms of the UAP.
        losses: training loss per step; seconds: wall time; path: PNG written, if any.
        generator: the trained :class:`UAPGenerator`.
    """

    perturbation: torch.Tensor
    fooling_rate: float
    random_fooling_rate: float
    transfer_fooling_rate: float
    eps: float
    l2_norm: float
    linf_norm: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    path: str | None = None
    generator: Any = None


def uap(model: nn.Module, transfer_images: torch.Tensor, eval_images: torch.Tensor | None = None, *,
        eps: float = 10 / 255, nz: int = 10, ngf: int = 32, epochs: int = 20, batch_size: int = 32,
        lr: float = 1e-2, diversity: float = 0.1, candidates: int = 16, noise_trials: int = 5,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0,
        out_png: str | os.PathLike | None = None) -> UAPResult:
    """Train a UAP generator on a transfer set and measure the UAP's fooling rate.

    Args:
        model: the classifier to fool (frozen), taking normalized images; ``mean``/``std`` are applied inside.
        transfer_images: (N, C, H, W) in [0, 1]: impressions (data-free) or any images.
        eval_images: real images for the reported fooling rate (labels are not needed).
        eps: L-inf budget in [0, 1] pixel units (10/255 as in the paper).
        nz, ngf: latent size (10 in the paper) and generator width.
        epochs, batch_size, lr: Adam training of the generator (paper: 20 epochs, batch 32; lr 1e-5 for their
            GPU budget, 1e-2 here for short CPU runs).
        diversity: alpha, the weight of the diversity term.
        candidates: latents sampled at the end; the UAP with the best transfer-set fooling rate is kept.
        noise_trials: random-noise draws averaged for the baseline.
        out_png: write the UAP image there.

    Shape: returns ``perturbation`` (C, H, W).
    """
    t0 = time.perf_counter()
    x = check_images(transfer_images, "transfer_images", "uap")
    if x.shape[0] < 2:
        raise ValueError(f"uap: the transfer set needs at least 2 images (diversity pairs), got {x.shape[0]}")
    if eval_images is not None:
        eval_images = check_images(eval_images, "eval_images", "uap")
        if tuple(eval_images.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"uap: eval_images have shape {tuple(eval_images.shape[1:])}, the transfer images "
                             f"{tuple(x.shape[1:])}; give images of the same size")
    _, c, h, w = x.shape
    if h != w:
        raise ValueError(f"uap: square images required, got {h}x{w}")
    if epochs < 1 or batch_size < 2 or lr <= 0 or diversity < 0 or candidates < 1 or noise_trials < 1:
        raise ValueError("uap: need epochs >= 1, batch_size >= 2, lr > 0, diversity >= 0, candidates >= 1, "
                         f"noise_trials >= 1; got {epochs}, {batch_size}, {lr}, {diversity}, {candidates}, "
                         f"{noise_trials}")
    net = NormalizedModel(model, mean, std)
    dev = model_device(net)
    net.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    num_outputs(net, x[:1].to(dev))
    torch.manual_seed(seed)
    gen = UAPGenerator(nz, ngf, h, c, eps).to(dev)
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    with torch.no_grad():
        clean_pred = torch.cat([net(xb.to(dev)).argmax(1) for xb in x.split(512)])
    losses: list[float] = []
    bs = min(batch_size, x.shape[0])
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - bs + 1, bs):
            idx = perm[i:i + bs]
            xb, cb = x[idx].to(dev), clean_pred[idx.to(dev)]
            z = (torch.rand(bs, nz, generator=g) * 2 - 1).to(dev)
            delta = gen(z)
            prob = torch.softmax(net((xb + delta).clamp(0, 1)), 1)
            q_c = prob.gather(1, cb[:, None]).squeeze(1)
            fool = -torch.log((1 - q_c).clamp_min(1e-6)).mean()
            shift = torch.roll(torch.arange(bs, device=dev), 1)
            prob_swapped = torch.softmax(net((xb + delta[shift]).clamp(0, 1)), 1)
            div = (prob - prob_swapped).norm(dim=1).mean()
            loss = fool - diversity * div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    gen.eval()
    with torch.no_grad():
        z = (torch.rand(candidates, nz, generator=g) * 2 - 1).to(dev)
        deltas = gen(z)
    frs = [fooling_rate(net, x, d) for d in deltas]
    best = int(torch.tensor(frs).argmax())
    delta = deltas[best].detach()
    fr = rnd = float("nan")
    if eval_images is not None:
        fr = fooling_rate(net, eval_images, delta)
        trials = []
        for _ in range(noise_trials):
            noise = torch.randn(delta.shape, generator=g).to(dev)
            noise = noise * (delta.norm() / noise.norm().clamp_min(1e-12))
            trials.append(fooling_rate(net, eval_images, noise))
        rnd = sum(trials) / len(trials)
    path = save_perturbation(delta, out_png, eps) if out_png is not None else None
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return UAPResult(perturbation=delta.cpu(), fooling_rate=fr, random_fooling_rate=rnd,
                     transfer_fooling_rate=frs[best], eps=float(eps), l2_norm=float(delta.norm()),
                     linf_norm=float(delta.abs().max()), losses=losses, seconds=time.perf_counter() - t0,
                     path=path, generator=gen.cpu())
