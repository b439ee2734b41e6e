"""Impression-Space tasks (Fang et al., "Impression Space from Deep Template Network", 2020).

The *impression code* of an image set is, per conv layer of a template network, the channel means and
variances of its outputs (:class:`dfkd_fast.synthesis.ImpressionSpace`). Three uses:

* :func:`impression_translate` -- unpaired translation (Alg. 1 / eq. 7): start from the source images and
  minimize :math:`\\|z(x) - z_t^*\\|^2 + \\lambda\\,\\mathrm{mean}(x - x_s)^2` where :math:`z_t^*` is the target
  set's ensembled code (the content term is a per-pixel mean, so lambda is not on the paper's sum scale).
* :func:`impression_select` -- data selection: rank an unlabeled pool by the distance of each image's code to
  the ensembled code of a few labeled images, keep the top k; :func:`distill_on_selection` trains a student
  on them by KD.
* :func:`one_shot` -- decode n varied images from one image's code (random crop + flip at every step).

Distances between codes use the matching loss: :math:`d(z, z') = \\sum_l \\mathrm{mean}_c(\\mu_l - \\mu'_l)^2
+ \\mathrm{mean}_c(\\sigma^2_l - \\sigma'^2_l)^2`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd_fast.tasks.robustness import NormalizedModel, check_images, model_device, num_outputs

__all__ = ["TranslateResult", "SelectResult", "OneShotResult", "impression_translate", "impression_select",
           "distill_on_selection", "one_shot", "impression_codes", "code_distance", "template_space"]


def template_space(template_model: nn.Module, image_shape: Sequence[int], *, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, lr: float = 0.1, padding: int = 4, p_flip: float = 0.5,
                   seed: int = 0, batch_size: int = 32, backend: str = "auto") -> Any:
    """An :class:`~dfkd_fast.synthesis.ImpressionSpace` over ``template_model`` for (C, H, W) images.

    The space holds a frozen copy of the template (the caller's model keeps its trainable parameters).
    """
    import copy

    from dfkd_fast.synthesis import ImpressionSpace

    template_model = copy.deepcopy(template_model)
    c, h, w = (int(s) for s in image_shape)
    dev = model_device(template_model)
    k = num_outputs(NormalizedModel(template_model, mean, std), torch.zeros(1, c, h, w, device=dev))
    return ImpressionSpace(template_model, k, (c, h, w), batch_size=batch_size, mean=mean, std=std, device=dev,
                           backend=backend, seed=seed, lr=lr, padding=padding, p_flip=p_flip)


def code_distance(space: Any, code_a: torch.Tensor, code_b: torch.Tensor) -> float:
    """Impression distance between two codes of the same template (the matching loss, var_weight 1)."""
    return float(space.code_loss(space.split_code(code_a.to(space.device)), code_b.to(space.device)))


@torch.no_grad()
def impression_codes(template_model: nn.Module, images: torch.Tensor, *, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,),
                     batch_size: int = 256) -> tuple[torch.Tensor, list[int]]:
    """Per-image impression codes: for each probed layer output, [mean over H, W; variance over H, W].

    Layers are the modules of ``layer_types`` in registration order (as the ensembled code of
    :class:`ImpressionSpace`). Shape: images (N, C, H, W) -> codes (N, D), channels per layer.
    """
    images = check_images(images, "images", "impression_codes")
    layers = [m for m in template_model.modules() if isinstance(m, layer_types)]
    if not layers:
        raise ValueError(f"impression_codes: the template has no {[t.__name__ for t in layer_types]} layers")
    net = NormalizedModel(template_model, mean, std)
    dev = model_device(net)
    was = template_model.training
    template_model.eval()
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        f = out.float().flatten(2)
        captured.append(torch.cat([f.mean(2), f.var(2, unbiased=False)], 1))

    handles = [m.register_forward_hook(hook) for m in layers]
    chunks, channels = [], []
    try:
        for xb in images.split(batch_size):
            captured.clear()
            net(xb.to(dev))
            chunks.append(torch.cat(captured, 1).cpu())
            channels = [t.shape[1] // 2 for t in captured]
    finally:
        for hd in handles:
            hd.remove()
        template_model.train(was)
    return torch.cat(chunks), channels


def _layerwise_distance(codes: torch.Tensor, ref: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """Sum over layers of mean_c (mu - mu')^2 + mean_c (var - var')^2. Shape: (N, D), (D,) -> (N,)."""
    out = torch.zeros(codes.shape[0])
    o = 0
    for c in channels:
        out += (codes[:, o:o + c] - ref[o:o + c]).pow(2).mean(1) + (codes[:, o + c:o + 2 * c] - ref[o + c:o + 2 * c]
                                                                      ).pow(2).mean(1)
        o += 2 * c
    return out


def _ensemble(codes: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """Ensembled code of a set from its per-image codes (pooled mean and variance over N, H, W)."""
    parts, o = [], 0
    for c in channels:
        mu, var = codes[:, o:o + c], codes[:, o + c:o + 2 * c]
        m = mu.mean(0)
        parts += [m, (var + mu.pow(2)).mean(0) - m.pow(2)]
        o += 2 * c
    return torch.cat(parts)


@dataclass
class TranslateResult:
    """Translated images (N, C, H, W) in [0, 1]; impression distance to the target set before and after."""

    images: torch.Tensor
    distance_before: float
    distance_after: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    paths: dict[str, str] = field(default_factory=dict)


def _check_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_images(a, na, fn)
    b = check_images(b, nb, fn)
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise ValueError(f"{fn}: {na} are {tuple(a.shape[1:])} images but {nb} are {tuple(b.shape[1:])}; "
                         "resize them to the same (C, H, W)")
    return a, b


def impression_translate(source_images: torch.Tensor, target_images: torch.Tensor, template_model: nn.Module,
                         lam: float = 1.0, steps: int = 200, *, lr: float = 0.05, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, padding: int = 0, p_flip: float = 0.0, seed: int = 0,
                         out_dir: str | os.PathLike | None = None, backend: str = "auto") -> TranslateResult:
    """Unpaired translation: pull the source set's impression toward the target set's ensembled code.

    .. math:: x^* = \\arg\\min_x \\|z(x) - z_t^*\\|^2 + \\lambda\\, \\mathrm{mean}((x - x_s)^2), \\quad x^{(0)} = x_s

    Args:
        source_images, target_images: (N_s, C, H, W) and (N_t, C, H, W) in [0, 1], same (C, H, W).
        template_model: any conv classifier (its conv outputs are probed; BN not needed).
        lam: content weight; steps, lr: Adam steps (betas 0.5, 0.9) and learning rate on the pixels.
        padding, p_flip: crop/flip augmentation during matching (0 keeps the pixels aligned with the content).
        out_dir: writes ``source.png``, ``translated.png`` and ``target.png`` grids there.

    Shape: returns images (N_s, C, H, W).
    """
    t0 = time.perf_counter()
    xs, xt = _check_pair(source_images, target_images, "source_images", "target_images", "impression_translate")
    if lam < 0 or steps < 1 or lr <= 0:
        raise ValueError(f"impression_translate: need lam >= 0, steps >= 1, lr > 0; got {lam}, {steps}, {lr}")
    space = template_space(template_model, xs.shape[1:], mean=mean, std=std, lr=lr, padding=padding, p_flip=p_flip,
                           seed=seed, backend=backend)
    z_t = space.encode(xt)
    before = code_distance(space, space.encode(xs), z_t)
    images, losses = space.match(xs, z_t, iterations=steps, content=xs, content_weight=lam)
    after = code_distance(space, space.encode(images), z_t)
    res = TranslateResult(images=images.cpu(), distance_before=before, distance_after=after, losses=losses)
    if out_dir is not None:
        from dfkd_fast.viz import save_grid

        for name, im in (("source", xs), ("translated", images), ("target", xt)):
            res.paths[name] = save_grid(im[:32].cpu(), os.path.join(os.fspath(out_dir), f"{name}.png"))
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class SelectResult:
    """Top-k pool indices (closest first) and every pool image's impression distance (N_pool,)."""

    indices: torch.Tensor
    distances: torch.Tensor
    seconds: float = 0.0


def impression_select(pool_x: torch.Tensor, labeled_x: torch.Tensor, template_model: nn.Module, k: int, *,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,)) -> SelectResult:
    """Rank an unlabeled pool by impression distance to the ensembled code of a few labeled images.

    .. math::
        d_i = \\sum_l \\mathrm{mean}_c(\\mu_l(x_i) - \\mu^*_l)^2 + \\mathrm{mean}_c(\\sigma^2_l(x_i) - \\sigma^{*2}_l)^2

    with per-image statistics over (H, W) and :math:`(\\mu^*, \\sigma^{*2})` pooled over the labeled set.

    Shape: pool_x (N, C, H, W), labeled_x (M, C, H, W) -> indices (k,) long, distances (N,).
    """
    t0 = time.perf_counter()
    pool_x, labeled_x = _check_pair(pool_x, labeled_x, "pool_x", "labeled_x", "impression_select")
    if not isinstance(k, int) or not 1 <= k <= len(pool_x):
        raise ValueError(f"impression_select: k must be an int in [1, {len(pool_x)}] (the pool size), got {k!r}")
    pool_codes, channels = impression_codes(template_model, pool_x, mean=mean, std=std, layer_types=layer_types)
    lab_codes, _ = impression_codes(template_model, labeled_x, mean=mean, std=std, layer_types=layer_types)
    dist = _layerwise_distance(pool_codes, _ensemble(lab_codes, channels), channels)
    idx = torch.argsort(dist)[:k]
    return SelectResult(indices=idx, distances=dist, seconds=time.perf_counter() - t0)


def distill_on_selection(student: nn.Module, teacher: nn.Module, pool_x: torch.Tensor, selection: SelectResult,
                         **distill_kwargs: Any) -> Any:
    """KD of ``student`` from ``teacher`` on the selected pool images (``dfkd_fast.tasks.distill.distill``).

    Returns the :class:`~dfkd_fast.tasks.distill.DistillResult`.
    """
    from dfkd_fast.tasks.distill import distill

    pool_x = check_images(pool_x, "pool_x", "distill_on_selection")
    distill_kwargs.setdefault("progress", False)
    distill_kwargs.setdefault("curves", False)
    return distill(student, teacher, pool_x[selection.indices.cpu()], **distill_kwargs)


@dataclass
class OneShotResult:
    """n images (n, C, H, W) decoded from one image's code; per-step loss; its code distance after decoding."""

    images: torch.Tensor
    losses: list[float] = field(default_factory=list)
    distance: float = float("nan")
    seconds: float = 0.0
    paths: dict[str, str] = field(default_factory=dict)


def one_shot(image: torch.Tensor, template_model: nn.Module, n: int = 8, steps: int = 200, *, lr: float = 0.1,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, padding: int = 4,
             p_flip: float = 0.5, seed: int = 0, out_dir: str | os.PathLike | None = None,
             backend: str = "auto") -> OneShotResult:
    """One-shot synthesis: decode ``n`` noise images to match a single image's impression code.

    Random crop (``padding``) + flip of the images at every step make the outputs varied (paper G.1).

    Shape: image (C, H, W) or (1, C, H, W) in [0, 1] -> images (n, C, H, W).
    """
    t0 = time.perf_counter()
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image[None]
    image = check_images(image, "image", "one_shot")
    if image.shape[0] != 1:
        raise ValueError(f"one_shot: give exactly one image, got {image.shape[0]}")
    if n < 1 or steps < 1:
        raise ValueError(f"one_shot: need n >= 1 and steps >= 1, got {n}, {steps}")
    space = template_space(template_model, image.shape[1:], mean=mean, std=std, lr=lr, padding=padding,
                           p_flip=p_flip, seed=seed, batch_size=n, backend=backend)
    code = space.encode(image)
    images, losses = space.decode(code, n, iterations=steps)
    res = OneShotResult(images=images.cpu(), losses=losses, distance=code_distance(space, space.encode(images), code))
    if out_dir is not None:
        from dfkd_fast.viz import save_grid

        res.paths["input"] = save_grid(image.cpu(), os.path.join(os.fspath(out_dir), "one_shot_input.png"))
        res.paths["samples"] = save_grid(images.cpu(), os.path.join(os.fspath(out_dir), "one_shot_samples.png"))
    res.seconds = time.perf_counter() - t0
    return res
