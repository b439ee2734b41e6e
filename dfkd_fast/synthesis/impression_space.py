"""Impression Space: encode images into per-layer [mu, var] codes of a template network, decode by matching.

Fang et al., "Impression Space from Deep Template Network" (2020).

The *impression code* of a set of images X is, for every probed layer l of the template network (any conv
net; BatchNorm is not needed), the channel means and biased variances of its output over the whole set
(N, H, W), concatenated layer by layer (the ensembled code, eq. 6):

.. math::
    z = [\\mu(r_1), \\sigma^2(r_1), \\dots, \\mu(r_L), \\sigma^2(r_L)]

Decoding optimizes noise pixels x (Adam lr 0.1, betas (0.5, 0.9), 2000 steps, a random crop + flip of x
at every step by :class:`dfkd_fast.augment.CropFlip`, which also applies the teacher's normalization) so
that the code of x matches a target code,

.. math::
    \\min_x \\sum_l \\operatorname{mean}_c(\\mu_l(x) - \\hat\\mu_l)^2 + \\operatorname{mean}_c(\\sigma^2_l(x) -
    \\hat\\sigma^2_l)^2 \\; (+ \\lambda \\|x - x_s\\|^2 \\text{ for translation, eq. 7})

Pixels are optimized in [0, 1] with projected Adam (clamped after every step) by the shared loop of
:class:`dfkd_fast.synthesis.pixel_base.PixelSynthesizer` (no host sync per step); each step's crop boxes and
flips are drawn on the device before the step (pad-crop: one ``randint`` (N, 2), then one ``rand`` (N,) for
the flips). One :class:`~dfkd_fast.hooks.FeatureProbe` serves every batch and every ``encode``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfkd_fast.augment import CropFlip
from dfkd_fast.hooks import FeatureProbe
from dfkd_fast.synthesis.base import SynthesisConfig, SynthesisResult, register
from dfkd_fast.synthesis.pixel_base import PixelSynthesizer

__all__ = ["ImpressionSpace"]


def _stats_to_code(stats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([torch.cat([m.float().flatten(), v.float().flatten()]) for m, v in stats])


@register("impression_space")
class ImpressionSpace(PixelSynthesizer):
    """Impression-Space synthesis with the teacher as the template network.

    Give the images to imitate at construction: ``reference_images`` (M, C, H, W) in [0, 1] (their
    ensembled code is stored) or a precomputed ``code`` (D,) from :meth:`encode`. ``synthesize()`` then
    decodes that code into a batch of ``batch_size`` new images; the method is not class-conditional, so
    ``targets`` must be ``None`` and the result's ``targets`` are the teacher's predicted classes (N,).

    Args:
        reference_images: images whose impression is synthesized (optional when ``code`` is given).
        code: a code from :meth:`encode` (used when ``reference_images`` is not given).
        layer_types: module types whose outputs are probed (default ``nn.Conv2d``).
        other arguments: see :class:`~dfkd_fast.synthesis.base.Synthesizer`.

    Shape: images (N, C, H, W) in [0, 1], code (D,) with D = 2 * sum_l C_l.
    """

    @dataclass
    class Config(SynthesisConfig):
        iterations: int = 2000  # Adam steps per decoded batch
        lr: float = 0.1  # Adam learning rate on the pixels
        betas: tuple[float, float] = (0.5, 0.9)  # Adam betas
        crop: str = "pad_crop"  # "pad_crop" (zero-padded random crop) or "resized_crop" (random resized crop)
        padding: int = 4  # pad_crop: whole-pixel shift range (0 disables cropping)
        scale: tuple[float, float] = (0.25, 1.0)  # resized_crop: area range
        p_flip: float = 0.5  # probability of a horizontal flip per image and step
        var_weight: float = 1.0  # weight of the variance half of the code (0 -> mean-only code, eq. 1)

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: Sequence[int],
                 config: SynthesisConfig | None = None, *, reference_images: torch.Tensor | None = None,
                 code: torch.Tensor | None = None, layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,),
                 **kwargs: Any) -> None:
        super().__init__(teacher, num_classes, image_size, config, **kwargs)
        cfg = self.config
        if cfg.iterations < 1:
            raise ValueError(f"impression_space: iterations must be >= 1, got {cfg.iterations}")
        if cfg.lr <= 0:
            raise ValueError(f"impression_space: lr must be > 0, got {cfg.lr}")
        if cfg.padding < 0 or not 0.0 <= cfg.p_flip <= 1.0:
            raise ValueError(f"impression_space: need padding >= 0 and p_flip in [0, 1], "
                             f"got padding={cfg.padding}, p_flip={cfg.p_flip}")
        if cfg.crop not in ("pad_crop", "resized_crop"):
            raise ValueError(f"impression_space: crop must be 'pad_crop' or 'resized_crop', got {cfg.crop!r}")
        self.augment = CropFlip(None, mode=cfg.crop, padding=cfg.padding, scale=tuple(cfg.scale), p_flip=cfg.p_flip,
                                mean=self.mean, std=self.std, backend=self.backend, generator=self.generator)
        self.layer_types = tuple(layer_types)
        #: one probe for every batch and encode (paused outside them); its hooks go with the synthesizer
        self.probe = self.own_probe(FeatureProbe(self.teacher, layer_types=self.layer_types, backend=self.backend))
        self.channels = self._probe_channels()
        if reference_images is not None:
            self.code: torch.Tensor | None = self.encode(reference_images)
        elif code is not None:
            self.code = self._check_code(torch.as_tensor(code, dtype=torch.float32, device=self.device))
        else:
            self.code = None

    # ----- encoding -----
    def _probe_channels(self) -> list[int]:
        c, h, w = self.image_size
        with self.probe.capturing() as probe, torch.no_grad():
            self.teacher(torch.zeros(1, c, h, w, device=self.device))
            return [int(m.numel()) for m, _ in probe.layer_stats()]

    def _check_code(self, code: torch.Tensor) -> torch.Tensor:
        want = 2 * sum(self.channels)
        if code.dim() != 1 or code.numel() != want:
            raise ValueError(f"impression_space: code must be a 1-D tensor of {want} values (from encode() with "
                             f"this template network), got shape {tuple(code.shape)}")
        return code

    def _check_images(self, images: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_size:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"impression_space: {name} must be (N, {', '.join(map(str, self.image_size))}) images "
                             f"in [0, 1], got {shape}")
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Ensembled impression code of a set of images (eq. 6): per layer [mu, var] over all N, H, W.

        Large sets are processed in chunks of ``batch_size`` and combined exactly (pooled mean and
        variance). Shape: images (N, C, H, W) in [0, 1] -> (D,) with D = 2 * sum_l C_l.
        """
        images = self._check_images(images, "images")
        if images.shape[0] == 0:
            raise ValueError("impression_space: encode needs at least one image")
        total = 0
        sums: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self.probe.capturing() as probe:
            for chunk in images.split(batch_size):
                self.teacher(self.normalize(chunk))
                n = chunk.shape[0]
                stats = probe.layer_stats()
                if not sums:
                    sums = [(m.double() * n, (v.double() + m.double() ** 2) * n) for m, v in stats]
                else:
                    sums = [(s1 + m.double() * n, s2 + (v.double() + m.double() ** 2) * n)
                            for (s1, s2), (m, v) in zip(sums, stats, strict=True)]
                total += n
        stats = [(s1 / total, s2 / total - (s1 / total) ** 2) for s1, s2 in sums]
        return _stats_to_code(stats)

    def split_code(self, code: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (mean[C_l], var[C_l]) views of a code. Shape: (D,) -> list of ((C_l,), (C_l,))."""
        code = self._check_code(code)
        out, o = [], 0
        for c in self.channels:
            out.append((code[o:o + c], code[o + c:o + 2 * c]))
            o += 2 * c
        return out

    def code_loss(self, stats: Sequence[tuple[torch.Tensor, torch.Tensor]], code: torch.Tensor) -> torch.Tensor:
        """Impression matching loss: sum over layers of MSE(mean) + var_weight * MSE(var). -> scalar."""
        if len(stats) != len(self.channels):
            raise ValueError(f"impression_space: got statistics of {len(stats)} layers, "
                             f"the code has {len(self.channels)}")
        loss = torch.zeros((), device=self.device)
        for (m, v), (mt, vt) in zip(stats, self.split_code(code), strict=True):
            loss = loss + (m.float() - mt).pow(2).mean() + self.config.var_weight * (v.float() - vt).pow(2).mean()
        return loss

    # ----- decoding -----
    def match(self, init: torch.Tensor, code: torch.Tensor, iterations: int | None = None,
              content: torch.Tensor | None = None, content_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
        """Optimize images from ``init`` so their ensembled code matches ``code`` (eq. 2 / eq. 7).

        ``content`` and ``content_weight`` add lambda * mean((x - content)^2) (unpaired translation keeps the
        source content). Returns the final images (detached copy) and the loss per step.

        Shape: init (N, C, H, W) in [0, 1], code (D,) -> (N, C, H, W), list of floats.
        """
        cfg = self.config
        code = self._check_code(torch.as_tensor(code, dtype=torch.float32, device=self.device))
        x = self._check_images(init, "init").detach().clone().clamp_(0.0, 1.0)
        if content is not None:
            content = self._check_images(content, "content")
            if content.shape != x.shape:
                raise ValueError(f"impression_space: content must match init's shape {tuple(x.shape)}, "
                                 f"got {tuple(content.shape)}")
        steps = cfg.iterations if iterations is None else int(iterations)
        target = (code, content if content_weight else None, float(content_weight))
        run = self.optimize(x, target, steps, cfg.lr, cfg.betas)
        return run.images, list(run.losses)

    def sample_view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's crop boxes (N, 4) and flips (N,), drawn on the device."""
        return self.augment.sample_params(x.shape[0], x.shape[-2:], x.device)

    def step_loss(self, x: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor | None, float],
                  boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Code-matching loss of one crop + flip view (+ content term). ``targets`` = (code, content, weight).

        Shape: x (N, C, H, W), code (D,), content (N, C, H, W) or None, boxes (N, 4), flip (N,) -> scalar.
        """
        code, content, content_weight = targets
        self.teacher_forward(self.augment(x, boxes, flip))  # crop + flip, then the teacher's normalization
        loss = self.code_loss(self.probe.layer_stats(), code)
        if content is not None:
            loss = loss + content_weight * (x - content).pow(2).mean()
        return loss

    def decode(self, code: torch.Tensor, n: int, iterations: int | None = None) -> tuple[torch.Tensor, list[float]]:
        """Decode ``code`` into ``n`` new images from uniform noise (uses this synthesizer's generator).

        Shape: code (D,) -> (n, C, H, W) in [0, 1], list of per-step losses.
        """
        if n < 1:
            raise ValueError(f"impression_space: n must be >= 1, got {n}")
        return self.match(self.rand(n, *self.image_size), code, iterations)

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        if targets is not None:
            raise ValueError("impression_space is not class-conditional: call synthesize() without targets "
                             "(the batch imitates the stored reference code)")
        if self.code is None:
            raise ValueError("impression_space: no code to decode; construct it with reference_images=... or "
                             "code=..., or set .code = encode(images)")
        images, losses = self.decode(self.code, self.batch_size)
        logits = self.teacher_logits(images)
        return SynthesisResult(images=images, targets=logits.argmax(1), teacher_logits=logits,
                               losses=tuple(losses), seconds=0.0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["code"] = None if self.code is None else self.code.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        code = state.get("code")
        self.code = None if code is None else self._check_code(code.to(self.device, torch.float32))
