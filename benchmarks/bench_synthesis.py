"""End-to-end synthesis benchmark: seconds per optimization step, the reference design vs dfkd_fast vs the floor.

Cases: methods (DeepInversion, CMI with a full memory bank, FastMeta, Data Impressions) x teachers (LeNet-5-BN
at 1x32x32, WRN-40-2 and ResNet-34 at 3x32x32, random weights: the cost of a step does not depend on them) x
batch sizes. Providers, timed in ONE interleaved run (every repeat goes through all providers, in alternating
order, so a change of machine load hits all of them alike):

- ``reference``: an eager implementation, written here, of how the authors' public code does it
  (DeepInversion / CMI / Fast-Datafree / ZSKD): per-layer forward hooks on the BN layers computing ``mean`` and
  ``torch.var(unbiased=False)`` and the r_feature norms; the teacher's parameters left trainable (backward also
  computes weight gradients); augmentation by ``F.pad`` + ``affine_grid`` / ``grid_sample`` with per-sample
  parameters (CMI / FastMeta), DeepInversion's jitter by ``torch.roll`` with Python-int shifts and a batch flip;
  CMI's memory bank on the host, indexed with ``random.sample`` and copied to the device each step, the
  contrastive loss materializing the (N + n_neg)^2 logits with ``F.cross_entropy``; ``loss.item()`` per step for
  the best-batch bookkeeping; FastMeta's meta generator deep-copied per batch, inner Adam steps and the first-order
  MAML meta-gradient as a Python loop over the parameters.
- ``torch`` / ``auto``: ``dfkd_fast.synthesis.build_synthesizer(..., backend=...)`` (``auto``: the C++ extension
  on CPU, Triton on CUDA).
- ``compile``: ``build_synthesizer(..., backend="auto", compile="default")``; the first batch is timed apart
  (``compile_s``). A provider that raises is recorded as ``n/a: reason`` and the run goes on.
- ``floor``: the teacher's forward + backward to its input with frozen parameters (CMI: two views, as the method
  needs), plus the generator's forward + backward for the generator methods (CMI, FastMeta).

Per-step time: each provider exposes ``run(k)`` = one whole batch with k optimization steps (setup included).
s/step = (t(k2) - t(k1)) / (k2 - k1), so the per-batch setup (fresh generator, optimizers, targets, the final
teacher pass) cancels out. One warm-up batch runs first (and, for CMI, the bank is filled with random features
before it). Host syncs and aten ops per step are counted the same way, with :class:`dfkd_fast.profiling.
SyncCounter`, from batches of 1 and 2 steps at the smallest batch size of the run (they do not depend on it).

Usage::

    python benchmarks/bench_synthesis.py --quick          # LeNet-5-BN, batch 64, < 1 minute (smoke test)
    python benchmarks/bench_synthesis.py                  # full run (see benchmarks/README.md for its cost)
    python benchmarks/bench_synthesis.py --methods cmi --teachers wrn40_2 --batch-sizes 256 --steps 1 3

Results: a markdown table on stdout and ``benchmarks/results/synthesis_<device>.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bc  # noqa: E402

from dfkd_fast.models import Generator, build_model  # noqa: E402
from dfkd_fast.profiling import SyncCounter  # noqa: E402
from dfkd_fast.synthesis import build_synthesizer  # noqa: E402

PROVIDERS = ("reference", "torch", "auto", "compile", "floor")
METHODS = ("deep_inversion", "cmi", "fast_meta", "data_impressions")
#: teacher name -> image size (C, H, W)
TEACHERS = {"lenet5_bn": (1, 32, 32), "wrn40_2": (3, 32, 32), "resnet34": (3, 32, 32)}
GENERATOR_METHODS = ("cmi", "fast_meta")
#: Per-provider memory cap of CMI's bank on the CPU when --bank-size is not given (ResNet-34's D = 8512 would
#: need 2.8 GB per provider at 40960 entries; 4 providers hold one each).
CPU_BANK_BYTES = 1 << 30
MEAN = {1: (0.1307,), 3: (0.4914, 0.4822, 0.4465)}
STD = {1: (0.3081,), 3: (0.2470, 0.2435, 0.2616)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =====================================================================================================
# (a) the reference design: eager, as the authors' public code does it
# =====================================================================================================
class BNStatHook:
    """DeepInversion's feature hook: r_feature = ||var - running_var||_2 + ||mean - running_mean||_2 per layer.

    ``mmt_rate`` > 0: FastDFKD's moving-average blend with the statistics of earlier batches (``update_mmt``).
    """

    def __init__(self, module: _BatchNorm, mmt_rate: float = 0.0) -> None:
        self.module = module
        self.mmt_rate = mmt_rate
        self.mmt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.r_feature: torch.Tensor | None = None
        self.tmp_val: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handle = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        var = torch.var(x, dim=dims, unbiased=False)
        if self.mmt is None:
            self.r_feature = (torch.norm(module.running_var.data - var, 2)
                              + torch.norm(module.running_mean.data - mean, 2))
        else:
            mean_mmt, var_mmt = self.mmt
            self.r_feature = (
                torch.norm(module.running_var.data - (1 - self.mmt_rate) * var - self.mmt_rate * var_mmt, 2)
                + torch.norm(module.running_mean.data - (1 - self.mmt_rate) * mean - self.mmt_rate * mean_mmt, 2))
        self.tmp_val = (mean, var)

    def update_mmt(self) -> None:
        mean, var = self.tmp_val
        if self.mmt is None:
            self.mmt = (mean.data, var.data)
        else:
            mean_mmt, var_mmt = self.mmt
            self.mmt = (self.mmt_rate * mean_mmt + (1 - self.mmt_rate) * mean.data,
                        self.mmt_rate * var_mmt + (1 - self.mmt_rate) * var.data)

    def remove(self) -> None:
        self.handle.remove()


class InstanceMeanHook:
    """CMI's instance-feature hook: spatial mean of each BN input, (N, C)."""

    def __init__(self, module: nn.Module) -> None:
        self.instance_mean: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        self.instance_mean = x.mean(dim=list(range(2, x.dim()))) if x.dim() > 2 else x

    def remove(self) -> None:
        self.handle.remove()


def _bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _affine_crop(x: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, cw: torch.Tensor, ch: torch.Tensor,
                 out_hw: tuple[int, int]) -> torch.Tensor:
    """Per-sample crop boxes (pixel units) resampled to ``out_hw`` by affine_grid + grid_sample (kornia-style)."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta, [n, c, *out_hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def ref_random_crop_flip(x: torch.Tensor, padding: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RandomCrop(padding) + RandomHorizontalFlip + normalize, per-sample parameters (kornia's pipeline)."""
    n, _, h, w = x.shape
    xp = F.pad(x, [padding] * 4)
    off = torch.randint(0, 2 * padding + 1, (n, 2), device=x.device).to(x.dtype)
    size_w = torch.full((n,), float(w), device=x.device, dtype=x.dtype)
    size_h = torch.full((n,), float(h), device=x.device, dtype=x.dtype)
    y = _affine_crop(xp, off[:, 0], off[:, 1], size_w, size_h, (h, w))
    return _normalize(_random_flip(y), mean, std)


def ref_random_resized_crop_flip(x: torch.Tensor, scale: tuple[float, float], mean: torch.Tensor,
                                 std: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop(scale, ratio 3/4..4/3) + RandomHorizontalFlip + normalize, per-sample parameters."""
    n, _, h, w = x.shape
    area = (torch.rand(n, device=x.device) * (scale[1] - scale[0]) + scale[0]) * h * w
    log_r = torch.rand(n, device=x.device) * (math.log(4 / 3) - math.log(3 / 4)) + math.log(3 / 4)
    ratio = torch.exp(log_r)
    cw = torch.sqrt(area * ratio).clamp(1, w)
    ch = torch.sqrt(area / ratio).clamp(1, h)
    x0 = torch.rand(n, device=x.device) * (w - cw)
    y0 = torch.rand(n, device=x.device) * (h - ch)
    y = _affine_crop(x, x0, y0, cw, ch, (h, w))
    return _normalize(_random_flip(y), mean, std)


def _trainable_copy(teacher: nn.Module) -> nn.Module:
    t = copy.deepcopy(teacher).eval()
    for p in t.parameters():
        p.requires_grad_(True)  # the reference code never freezes the teacher: backward computes weight grads too
    return t


def _reset_model(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 0)


class RefDeepInversion:
    """DeepInversion (NVlabs): pixels in normalized space, roll jitter + flip, BN r_feature, TV and l2 priors."""

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int], batch_size: int,
                 device: torch.device, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.teacher = _trainable_copy(teacher)
        self.hooks = [BNStatHook(m) for m in _bn_layers(self.teacher)]
        self.num_classes, self.image_size, self.batch_size, self.device = num_classes, image_size, batch_size, device
        self.mean, self.std = mean, std
        self.lr, self.betas = 0.1, (0.5, 0.99)
        self.bn, self.first_bn_multiplier, self.oh, self.tv_l1, self.tv_l2, self.l2 = 10.0, 10.0, 1.0, 1e-3, 0.0, 1e-5
        self.jitter = image_size[1] // 8
        self.mean_host, self.std_host = mean.tolist(), std.tolist()

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        for c in range(x.shape[1]):  # per channel, mean / std as host numbers (NumPy arrays in the original)
            m, s = self.mean_host[c], self.std_host[c]
            x[:, c] = torch.clamp(x[:, c], -m / s, (1 - m) / s)
        return x

    def run(self, iterations: int) -> torch.Tensor:
        bs = self.batch_size
        targets = torch.tensor([random.randrange(self.num_classes) for _ in range(bs)], device=self.device)
        inputs = torch.randn((bs, *self.image_size), device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([inputs], lr=self.lr, betas=self.betas, eps=1e-8)
        best_cost, best_inputs = 1e4, None
        rescale = [self.first_bn_multiplier] + [1.0] * (len(self.hooks) - 1)
        for it in range(iterations):
            for g in optimizer.param_groups:  # lr_cosine_policy: a Python float per step
                g["lr"] = 0.5 * (1 + math.cos(math.pi * it / iterations)) * self.lr
            off1, off2 = random.randint(-self.jitter, self.jitter), random.randint(-self.jitter, self.jitter)
            inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))
            if random.random() > 0.5:
                inputs_jit = torch.flip(inputs_jit, dims=(3,))
            optimizer.zero_grad()
            self.teacher.zero_grad()
            outputs = self.teacher(inputs_jit)
            loss = F.cross_entropy(outputs, targets)
            d1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
            d2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
            d3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
            d4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
            loss_var_l2 = torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4)
            loss_var_l1 = (d1.abs() / 255.0).mean() + (d2.abs() / 255.0).mean() + (d3.abs() / 255.0).mean() \
                + (d4.abs() / 255.0).mean()
            loss_r_feature = sum(h.r_feature * rescale[i] for i, h in enumerate(self.hooks))
            loss_l2 = torch.norm(inputs_jit.view(bs, -1), dim=1).mean()
            loss_aux = self.tv_l2 * loss_var_l2 + self.tv_l1 * loss_var_l1 + self.bn * loss_r_feature \
                + self.l2 * loss_l2
            loss = self.oh * loss + loss_aux
            loss.backward()
            optimizer.step()
            inputs.data = self._clip(inputs.data)
            if best_cost > loss.item() or best_inputs is None:
                best_cost = loss.item()
                best_inputs = inputs.data.clone()
        return best_inputs


class RefDataImpressions:
    """ZSKD Data Impressions: pixels (Adam, linearly decayed lr) toward Dirichlet targets, CE at temperature 20."""

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int], batch_size: int,
                 device: torch.device, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.teacher = _trainable_copy(teacher)
        self.num_classes, self.image_size, self.batch_size, self.device = num_classes, image_size, batch_size, device
        self.mean, self.std = mean, std
        self.lr, self.init_scale, self.T = 0.05, 0.1, 20.0
        w = [m for m in self.teacher.modules() if isinstance(m, nn.Linear)][-1].weight.detach()
        sim = F.normalize(w, dim=1) @ F.normalize(w, dim=1).t()
        lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
        self.similarity = (sim - lo) / (hi - lo)

    def run(self, iterations: int) -> torch.Tensor:
        n = self.batch_size
        classes = torch.arange(n, device=self.device) % self.num_classes
        beta = torch.where(torch.arange(n, device=self.device) < n // 2, 1.0, 0.1).view(-1, 1)
        y = torch.distributions.Dirichlet(beta * self.similarity[classes] + 1e-4).sample()
        x = (torch.rand((n, *self.image_size), device=self.device) * self.init_scale).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        losses = []
        for it in range(iterations):
            for g in opt.param_groups:
                g["lr"] = self.lr * (1.0 - it / iterations)
            logits = self.teacher(_normalize(x, self.mean, self.std))
            loss = -(y * F.log_softmax(logits / self.T, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            x.data.clamp_(0, 1)
            losses.append(loss.item())
        return x.detach()


class HostMemoryBank:
    """CMI's memory bank: (max_size, 2D) on the host, ``random.sample`` indices, copied to the device each step."""

    def __init__(self, max_size: int, dim_feat: int) -> None:
        self.data = torch.randn(max_size, dim_feat)  # on the CPU, as in the authors' code
        self.max_size = max_size
        self.ptr = 0
        self.n_updates = 0

    def add(self, feat: torch.Tensor) -> None:
        feat = feat.cpu()
        n = feat.shape[0]
        self.data[self.ptr:self.ptr + n] = feat.detach()
        self.ptr = (self.ptr + n) % self.max_size
        self.n_updates += n

    def get_data(self, k: int) -> torch.Tensor:
        if self.n_updates > self.max_size:
            index = random.sample(list(range(self.max_size)), k=k)
        else:
            index = random.sample(list(range(self.ptr)), k=min(k, self.ptr))
        return self.data[index]


class MLPHead(nn.Module):
    def __init__(self, dim_in: int, dim_feat: int) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=1, p=2)


class RefCMI:
    """CMI (Fang et al.): fresh generator per batch, global + local views, BN prior, host bank, naive InfoNCE."""

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int], batch_size: int,
                 device: torch.device, mean: torch.Tensor, std: torch.Tensor, bank_size: int = 40960,
                 n_neg: int = 4096, head_dim: int = 256) -> None:
        self.teacher = _trainable_copy(teacher)
        bns = _bn_layers(self.teacher)
        self.hooks = [BNStatHook(m) for m in bns]
        self.cmi_hooks = [InstanceMeanHook(m) for m in bns]
        self.num_classes, self.image_size, self.batch_size, self.device = num_classes, image_size, batch_size, device
        self.mean, self.std = mean, std
        self.nz, self.lr_g, self.bn, self.oh, self.cr, self.cr_T, self.n_neg = 256, 1e-3, 1.0, 0.5, 0.8, 0.1, n_neg
        self.generator = Generator(nz=self.nz, ngf=64, img_size=image_size[1], nc=image_size[0]).to(device).train()
        dim = sum(m.num_features for m in bns)
        self.mem_bank = HostMemoryBank(bank_size, 2 * dim)
        self.mem_bank.n_updates = bank_size + 1  # full (the authors' bank starts as random features)
        self.head = MLPHead(dim, head_dim).to(device).train()
        self.optimizer_head = torch.optim.Adam(self.head.parameters(), lr=self.lr_g)

    def run(self, iterations: int) -> torch.Tensor:
        bs = self.batch_size
        z = torch.randn((bs, self.nz), device=self.device).requires_grad_()
        targets = torch.randint(0, self.num_classes, (bs,)).sort()[0].to(self.device)
        _reset_model(self.generator)
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], self.lr_g,
                                     betas=[0.5, 0.999])
        best_cost, best_inputs, best_features = 1e6, None, None
        for _ in range(iterations):
            inputs = self.generator(z)
            global_view = ref_random_crop_flip(inputs, 4, self.mean, self.std)
            local_view = ref_random_resized_crop_flip(inputs, (0.25, 1.0), self.mean, self.std)
            t_out = self.teacher(global_view)
            loss_bn = sum(h.r_feature for h in self.hooks)
            loss_oh = F.cross_entropy(t_out, targets)
            loss_inv = self.bn * loss_bn + self.oh * loss_oh
            global_feature = torch.cat([h.instance_mean for h in self.cmi_hooks], dim=1)
            self.teacher(local_view)
            local_feature = torch.cat([h.instance_mean for h in self.cmi_hooks], dim=1)
            cached = self.mem_bank.get_data(self.n_neg)
            cached_local, cached_global = torch.chunk(cached.to(self.device), chunks=2, dim=1)
            proj = self.head(torch.cat([local_feature, cached_local, global_feature, cached_global], dim=0))
            proj_local, proj_global = torch.chunk(proj, chunks=2, dim=0)
            cr_logits = torch.mm(proj_local, proj_global.detach().T) / self.cr_T
            cr_labels = torch.arange(0, len(cr_logits), device=self.device)
            loss_cr = F.cross_entropy(cr_logits, cr_labels, reduction="none")
            loss_cr = loss_cr[:bs].mean() + loss_cr[bs:].mean()
            loss = self.cr * loss_cr + loss_inv
            with torch.no_grad():
                if best_cost > loss.item() or best_inputs is None:
                    best_cost = loss.item()
                    best_inputs = inputs.data
                    best_features = torch.cat([local_feature.data, global_feature.data], dim=1).data
            optimizer.zero_grad()
            self.optimizer_head.zero_grad()
            loss.backward()
            optimizer.step()
            self.optimizer_head.step()
        self.mem_bank.add(best_features)
        return best_inputs


class RefFastMeta:
    """Fast-Datafree's FastMetaSynthesizer: meta generator cloned per batch, inner Adam, first-order MAML."""

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int], batch_size: int,
                 device: torch.device, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.teacher = _trainable_copy(teacher)
        self.num_classes, self.image_size, self.batch_size, self.device = num_classes, image_size, batch_size, device
        self.mean, self.std = mean, std
        self.nz, self.lr_g, self.lr_z, self.bn, self.oh, self.bn_mmt = 256, 3e-3, 0.01, 10.0, 0.5, 0.9
        self.generator = Generator(nz=self.nz, ngf=64, img_size=image_size[1], nc=image_size[0]).to(device).train()
        self.hooks = [BNStatHook(m, self.bn_mmt) for m in _bn_layers(self.teacher)]
        g_steps = 5  # the published inner steps: the meta lr is lr_g * g_steps (kept when timing other counts)
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), self.lr_g * g_steps, betas=[0.5, 0.999])

    def run(self, iterations: int) -> torch.Tensor:
        bs = self.batch_size
        best_cost, best_inputs = 1e6, None
        z = torch.randn(size=(bs, self.nz), device=self.device).requires_grad_()
        targets = torch.randint(low=0, high=self.num_classes, size=(bs,)).to(self.device)
        fast_generator = copy.deepcopy(self.generator)
        optimizer = torch.optim.Adam([{"params": fast_generator.parameters()}, {"params": [z], "lr": self.lr_z}],
                                     lr=self.lr_g, betas=[0.5, 0.999])
        for it in range(iterations):
            inputs = fast_generator(z)
            inputs_aug = ref_random_crop_flip(inputs, 4, self.mean, self.std)
            t_out = self.teacher(inputs_aug)
            loss_bn = sum(h.r_feature for h in self.hooks)
            loss_oh = F.cross_entropy(t_out, targets)
            loss = self.bn * loss_bn + self.oh * loss_oh
            with torch.no_grad():
                if best_cost > loss.item() or best_inputs is None:
                    best_cost = loss.item()
                    best_inputs = inputs.data
            optimizer.zero_grad()
            loss.backward()
            if it == 0:
                self.meta_optimizer.zero_grad()
            for p, fast_p in zip(self.generator.parameters(), fast_generator.parameters(), strict=True):
                if p.grad is None:
                    p.grad = torch.zeros(p.size(), device=p.device)
                p.grad.data.add_(fast_p.grad.data)
            if it == iterations - 1:
                self.meta_optimizer.step()
            optimizer.step()
        for h in self.hooks:
            h.update_mmt()
        return best_inputs


REFERENCE = {"deep_inversion": RefDeepInversion, "cmi": RefCMI, "fast_meta": RefFastMeta,
             "data_impressions": RefDataImpressions}


# =====================================================================================================
# (c) the floor: teacher forward + backward to the input (frozen), + the generator for generator methods
# =====================================================================================================
class Floor:
    """The least any implementation of the step must do.

    Pixel methods: teacher(x) and the gradient w.r.t. x. CMI: the same for its two views (each batch_size
    images) plus the generator's forward + backward; FastMeta: one teacher pass plus the generator's.
    """

    def __init__(self, method: str, teacher: nn.Module, image_size: tuple[int, int, int], batch_size: int,
                 device: torch.device) -> None:
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.views = 2 if method == "cmi" else 1
        self.image_size, self.batch_size, self.device = image_size, batch_size, device
        self.generator = None
        if method in GENERATOR_METHODS:
            self.generator = Generator(nz=256, ngf=64, img_size=image_size[1], nc=image_size[0]).to(device).train()

    def run(self, iterations: int) -> None:
        if self.generator is None:
            leaf = torch.rand((self.batch_size, *self.image_size), device=self.device, requires_grad=True)
            params = [leaf]
        else:
            leaf = torch.randn((self.batch_size, 256), device=self.device, requires_grad=True)
            params = [*self.generator.parameters(), leaf]
        for _ in range(iterations):
            x = leaf if self.generator is None else self.generator(leaf)
            loss = sum(self.teacher(x).sum() for _ in range(self.views))
            torch.autograd.grad(loss, params)


# =====================================================================================================
# (b) dfkd_fast
# =====================================================================================================
class Ours:
    """A dfkd_fast synthesizer; ``run(k)`` = one ``synthesize()`` with ``iterations=k``."""

    def __init__(self, method: str, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int],
                 batch_size: int, device: torch.device, backend: str, compile_mode: str, bank_size: int) -> None:
        kw = {"bank_size": bank_size} if method == "cmi" else {}
        c = image_size[0]
        self.synth = build_synthesizer(method, copy.deepcopy(teacher), num_classes, image_size,
                                       batch_size=batch_size, iterations=1, backend=backend, compile=compile_mode,
                                       mean=MEAN[c], std=STD[c], device=device, **kw)
        self.note = ""
        if method == "cmi":
            bank = self.synth.bank
            d_local, d_global = bank.dims
            bank.add(torch.randn(bank.capacity, d_local, device=device), torch.randn(bank.capacity, d_global,
                                                                                    device=device))
            if len(bank) != bank.capacity:
                self.note = f"bank holds {len(bank)} of {bank.capacity}"

    def run(self, iterations: int) -> None:
        self.synth.config = dataclasses.replace(self.synth.config, iterations=iterations)
        res = self.synth.synthesize()
        if len(res.losses) != iterations:
            raise RuntimeError(f"iterations={iterations} ran {len(res.losses)} steps (config not honoured)")


# =====================================================================================================
# harness
# =====================================================================================================
@dataclass
class Runner:
    name: str
    run: Callable[[int], object]
    times: list[float] = field(default_factory=list)  # per-step seconds, one per repeat
    compile_s: float | None = None
    warmup_s: float = 0.0
    note: str = ""


def _make(prov: str, method: str, teacher: nn.Module, num_classes: int, image_size: tuple[int, int, int],
          batch: int, device: torch.device, bank_size: int) -> Runner:
    c = image_size[0]
    mean = torch.tensor(MEAN[c], device=device)
    std = torch.tensor(STD[c], device=device)
    if prov == "reference":
        kw = {"bank_size": bank_size} if method == "cmi" else {}
        obj = REFERENCE[method](teacher, num_classes, image_size, batch, device, mean, std, **kw)
        return Runner(prov, obj.run)
    if prov == "floor":
        return Runner(prov, Floor(method, teacher, image_size, batch, device).run)
    backend = "torch" if prov == "torch" else "auto"
    ours = Ours(method, teacher, num_classes, image_size, batch, device, backend,
                "default" if prov == "compile" else "off", bank_size)
    return Runner(prov, ours.run, note=ours.note)


def _dynamo_graphs() -> int:
    """Graphs compiled so far by torch.compile in this process (to tell whether ``compile=`` did anything)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return 0


def _timed(fn: Callable[[int], object], k: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(k)
    _sync(device)
    return time.perf_counter() - t0


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _count(fn: Callable[[int], object], k1: int, k2: int) -> tuple[float, float, list[str]]:
    """Host syncs and aten ops per step: (count(k2) - count(k1)) / (k2 - k1); plus where the k2 syncs happen."""
    counts = []
    for k in (k1, k2):
        with SyncCounter() as sc:
            fn(k)
        counts.append((sc.syncs, sc.aten_ops, sorted(set(sc.where))))
    d = k2 - k1
    return (counts[1][0] - counts[0][0]) / d, (counts[1][1] - counts[0][1]) / d, counts[1][2][:8]


def _bank_size(args_bank: int | None, teacher: nn.Module, device: torch.device) -> int:
    if args_bank is not None:
        return args_bank
    if device.type != "cpu":
        return 40960
    dim = sum(m.num_features for m in _bn_layers(teacher))
    return max(4096, min(40960, CPU_BANK_BYTES // (2 * dim * 4) // 4096 * 4096))


def run_case(method: str, teacher_name: str, batch: int, providers: list[str], steps: tuple[int, int], repeats: int,
             device: torch.device, count: bool, bank_size: int | None, log: Callable[[str], None],
             window: float = 0.0) -> dict:
    image_size = TEACHERS[teacher_name]
    torch.manual_seed(0)
    random.seed(0)
    teacher = build_model(teacher_name, 10, image_size[0], image_size[1]).to(device).eval()
    bank = _bank_size(bank_size, teacher, device) if method == "cmi" else None
    k1, k2 = steps
    row: dict = {"method": method, "teacher": teacher_name, "image_size": list(image_size), "batch": batch,
                 "steps": [k1, k2], "repeats": repeats, "bank_size": bank, "s_per_step": {}, "iqr_s": {},
                 "syncs_per_step": {}, "aten_ops_per_step": {}, "sync_sites": {}, "compile_s": {}, "na": {},
                 "notes": {}}
    runners: list[Runner] = []
    for prov in providers:
        try:
            t0 = time.perf_counter()
            graphs0 = _dynamo_graphs()
            r = _make(prov, method, teacher, 10, image_size, batch, device, bank or 0)
            tw = time.perf_counter()
            r.run(1)  # warm-up batch (and compilation for "compile")
            _sync(device)
            r.warmup_s = time.perf_counter() - tw
            if prov == "compile":
                r.compile_s = time.perf_counter() - t0
                row["compile_s"][prov] = r.compile_s
                graphs = _dynamo_graphs() - graphs0
                row["compiled_graphs"] = graphs
                if graphs == 0:
                    r.note = "compile='default' compiled no graph: the step ran eagerly"
            runners.append(r)
        except Exception as e:  # a provider that cannot run is recorded (the synthesizers are being refactored)
            row["na"][prov] = _err(e)
            log(f"    {prov}: n/a ({row['na'][prov]})")
    if window and runners and min(r.warmup_s for r in runners) < window:
        # short steps: widen k2 so the timed difference spans ~window seconds (the batch overhead and load noise
        # would swamp a few ms); the step estimate comes from the first provider (the reference by default)
        est = max((_timed(runners[0].run, 3, device) - _timed(runners[0].run, 1, device)) / 2, 1e-4)
        k2 = max(k2, k1 + min(MAX_STEPS, math.ceil(window / est)))
        row["steps"] = [k1, k2]
    for rep in range(repeats):
        order = runners if rep % 2 == 0 else runners[::-1]
        for r in order:
            if r.name in row["na"]:
                continue
            try:
                t1 = _timed(r.run, k1, device)
                t2 = _timed(r.run, k2, device)
                if t2 > t1:
                    r.times.append((t2 - t1) / (k2 - k1))
                else:  # load noise larger than the (k2 - k1) steps: fall back to an upper bound, and say so
                    r.times.append(t2 / k2)
                    if "(noise)" not in r.note:
                        r.note = (r.note + f" t({k2}) <= t({k1}) in a repeat (noise): t({k2})/{k2} used").strip()
            except Exception as e:
                row["na"][r.name] = _err(e)
    for r in runners:
        if r.note:
            row["notes"][r.name] = r.note
        if r.name in row["na"] or not r.times:
            continue
        row["s_per_step"][r.name] = statistics.median(r.times)
        q = statistics.quantiles(r.times, n=4) if len(r.times) > 1 else [r.times[0]] * 3
        row["iqr_s"][r.name] = q[2] - q[0]
        if count and r.name == "compile":
            row["notes"][r.name] = (row["notes"].get(r.name, "") + " syncs / ops not counted: under SyncCounter's "
                                    "TorchDispatchMode dynamo skips the compiled frame").strip()
        elif count:
            try:
                s, a, where = _count(r.run, 1, 2)
                row["syncs_per_step"][r.name], row["aten_ops_per_step"][r.name] = s, a
                if where:
                    row["sync_sites"][r.name] = where
            except Exception as e:
                row["notes"][r.name] = (row["notes"].get(r.name, "") + f" counting failed: {_err(e)}").strip()
    ref = row["s_per_step"].get("reference")
    floor = row["s_per_step"].get("floor")
    row["speedup_vs_reference"] = {p: ref / t for p, t in row["s_per_step"].items() if ref and t > 0}
    row["x_floor"] = {p: t / floor for p, t in row["s_per_step"].items() if floor}
    return row


def _cell(row: dict, p: str) -> str:
    if p in row["na"]:
        return "n/a"
    if p not in row["s_per_step"]:
        return "-"
    t = row["s_per_step"][p]
    parts = [f"{t:.4f}" if t < 1 else f"{t:.2f}"]
    if p != "reference" and p in row["speedup_vs_reference"]:
        parts.append(f"{row['speedup_vs_reference'][p]:.2f}x ref")
    if p != "floor" and p in row["x_floor"]:
        parts.append(f"{row['x_floor'][p]:.2f} fl")
    if p in row["syncs_per_step"]:
        parts.append(f"{row['syncs_per_step'][p]:g} sync / {row['aten_ops_per_step'][p]:.0f} ops")
    return "<br>".join(parts) if len(parts) > 1 else parts[0]


def markdown(rows: list[dict], providers: list[str]) -> str:
    head = "| method | teacher | batch | " + " | ".join(providers) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(providers)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['teacher']} | {r['batch']} | "
                     + " | ".join(_cell(r, p) for p in providers) + " |")
    notes = []
    for r in rows:
        case = f"{r['method']} / {r['teacher']} / {r['batch']}"
        for p, msg in r["na"].items():
            notes.append(f"- {case}: `{p}` n/a: {msg}")
        for p, msg in r["notes"].items():
            notes.append(f"- {case}: `{p}`: {msg}")
        for p, s in r["compile_s"].items():
            notes.append(f"- {case}: `{p}` first batch (compilation) {s:.1f} s")
    legend = ("Cells: s/step (median over repeats); `x ref` = reference s/step / this s/step; `fl` = this s/step / "
              "floor s/step; host syncs and aten ops per optimization step.")
    return "\n".join([legend, "", *lines, *([""] + notes if notes else [])])


#: Default (k1, k2) steps by teacher and batch on the CPU (the full run's cost, see benchmarks/README.md).
def default_steps(teacher: str, batch: int, device: torch.device, quick: bool) -> tuple[int, int]:
    if quick:
        return (1, 3)
    if device.type == "cuda":
        return (5, 25)
    if teacher == "lenet5_bn":
        return (1, 4)
    return (1, 2) if batch >= 256 or teacher == "resnet34" else (1, 3)


def default_repeats(teacher: str, batch: int, device: torch.device, quick: bool) -> int:
    if quick:
        return 1
    if device.type == "cuda":
        return 3
    return 1 if batch >= 256 or teacher == "resnet34" else 2


#: Upper bound of K2 - K1 when --window widens the step counts.
MAX_STEPS = 200

#: Cases left out of the default CPU run (run them by naming the teacher): CMI on ResNet-34 projects
#: 2 (N + n_neg) rows through the D x D head, D = 8512: ~23 CPU-s per step whatever the batch, ~14 minutes of the run.
CPU_DEFAULT_SKIP = {("cmi", "resnet34")}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="LeNet-5-BN, batch 64, few steps (smoke test, < 1 minute)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--teachers", nargs="+", default=None, choices=list(TEACHERS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--steps", nargs=2, type=int, default=None, metavar=("K1", "K2"),
                   help="iterations of the two timed batches (s/step = (t(K2) - t(K1)) / (K2 - K1))")
    p.add_argument("--window", type=float, default=None,
                   help="without --steps: raise K2 so that K2 - K1 steps last about this many seconds (default 2; "
                        "quick 0.25); 0 keeps the default steps")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats per case, median reported (default: CPU 2, 1 for ResNet-34 and batch "
                        "256; CUDA 3; quick 1)")
    p.add_argument("--bank-size", type=int, default=None,
                   help="CMI bank entries (default 40960; on CPU capped at 1 GiB per provider)")
    p.add_argument("--no-count", action="store_true", help="skip the host-sync / aten-op counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; on a shared, oversubscribed machine 1 is steadier)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=bc.ROOT / "benchmarks" / "results")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    teachers = args.teachers or (["lenet5_bn"] if args.quick else list(TEACHERS))
    batches = args.batch_sizes or ([64] if args.quick else [64, 256])
    if args.steps is not None and not 0 <= args.steps[0] < args.steps[1]:
        p.error("--steps K1 K2 needs 0 <= K1 < K2")
    window = args.window if args.window is not None else (0.25 if args.quick else 2.0)
    t_start = time.perf_counter()
    rows = []
    interrupted = False
    try:
        for teacher in teachers:
            for batch in batches:
                for method in args.methods:
                    if device.type == "cpu" and args.teachers is None and (method, teacher) in CPU_DEFAULT_SKIP:
                        print(f"skipping {method} / {teacher} on the CPU by default "
                              f"(name --teachers {teacher} to run it)")
                        continue
                    steps = tuple(args.steps) if args.steps else default_steps(teacher, batch, device, args.quick)
                    repeats = args.repeats or default_repeats(teacher, batch, device, args.quick)
                    t0, c0 = time.perf_counter(), time.process_time()
                    row = run_case(method, teacher, batch, args.providers, steps, repeats, device,
                                   count=not args.no_count and batch == min(batches), bank_size=args.bank_size,
                                   log=lambda s: print(s, flush=True), window=0.0 if args.steps else window)
                    row["case_s"] = time.perf_counter() - t0
                    row["case_cpu_s"] = time.process_time() - c0  # CPU seconds of all threads (to size the run)
                    rows.append(row)
                    print(markdown([row], args.providers).splitlines()[4], f"({row['case_s']:.0f} s)", flush=True)
    except KeyboardInterrupt:  # a suite's timeout (SIGINT): keep and save the finished cases, say so
        interrupted = True
        print(f"\ninterrupted: saving the {len(rows)} finished cases", flush=True)
    table = markdown(rows, args.providers)
    cpu_total = sum(r["case_cpu_s"] for r in rows)
    print("\n" + table + f"\n\ntotal {time.perf_counter() - t_start:.0f} s wall, {cpu_total:.0f} CPU s")
    if not args.no_save:
        meta = bc.metadata(device, [os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/bench_synthesis.py",
                                    *(sys.argv[1:] if argv is None else argv)])
        meta["method"] = ("s/step = (t(k2) - t(k1)) / (k2 - k1) of whole batches with k1 and k2 optimization steps, "
                          "after one warm-up batch; providers interleaved per repeat; median over repeats")
        meta["total_s"] = round(time.perf_counter() - t_start, 1)
        meta["total_cpu_s"] = round(cpu_total, 1)
        meta["interrupted"] = interrupted
        stem = f"synthesis_{device.type}" + ("_quick" if args.quick else "")
        md, js = bc.save(rows, meta, args.out, stem, table)
        print(f"\nsaved {md} and {js}")
    if interrupted:
        sys.exit(130)
    return rows


if __name__ == "__main__":
    main()
