"""The ``datafree`` package's API (CMI / DataFree, Fast-Datafree, KamalEngine, NAYER code) on dfkd_fast.

Code written against the authors' package switches with one import line::

    from dfkd_fast.compat import datafree          # instead of: import datafree

Flat names (``datafree.kldiv``) and the reference sub-namespaces (``datafree.criterions.KLDiv``,
``datafree.hooks.DeepInversionHook``, ``datafree.utils.Normalizer``, ``datafree.synthesis.CMISynthesizer``,
``datafree.models.generator.Generator``) both resolve.

What is here, with the reference semantics:

- Hooks: :class:`DeepInversionHook` ``(module, mmt_rate=0)`` (``r_feature``, ``tmp_val``, ``mmt``, ``mmt_rate``,
  ``update_mmt()``, ``remove()``; a :class:`dfkd_fast.hooks.BNStatHook` with ``kind="l2"``),
  :class:`InstanceMeanHook` / :class:`FeatureMeanHook` (``instance_mean``), :class:`FeatureHook`
  (``input``, ``output``), :func:`register_hooks`.
- Criterions: :func:`kldiv` / :class:`KLDiv` (``F.kl_div`` semantics at temperature T times T^2; the fused
  :func:`dfkd_fast.ops.kd_kl_div` for ``batchmean`` / ``sum`` / ``mean`` on (N, K) logits), :func:`jsdiv`.
- :class:`Normalizer` / :func:`normalize` (``reverse=True`` maps normalized images back).
- Synthesizers with the reference constructor keywords: :class:`DeepInvSyntheiszer` (sic; alias
  :class:`DeepInvSynthesizer`), :class:`CMISynthesizer`, :class:`FastMetaSynthesizer`. Each wraps the dfkd_fast
  synthesizer of that method (``.synth``); ``synthesize()`` returns ``{"synthetic": x}`` (x (N, C, H, W) in
  [0, 1]) -- or ``({"synthetic": x}, seconds)`` with ``return_cost=True``, the Fast-Datafree convention and
  :class:`FastMetaSynthesizer`'s default -- and keeps the batch; ``sample()`` returns the next batch of
  ``sample_batch_size`` kept images (a reshuffled pass over all of them after every ``synthesize``).
  ``last_result`` holds the last :class:`dfkd_fast.synthesis.SynthesisResult` (targets, teacher logits, loss curve).
"""
from __future__ import annotations

import abc
import copy
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast import ops
from dfkd_fast.buffers import RingBuffer
from dfkd_fast.hooks import BNStatHook
from dfkd_fast.models import Generator
from dfkd_fast.synthesis import CMI, DeepInversion, FastMeta, Synthesizer
from dfkd_fast.synthesis.losses import tv_loss

__all__ = [
    "DeepInversionHook", "InstanceMeanHook", "FeatureMeanHook", "FeatureHook", "register_hooks",
    "kldiv", "KLDiv", "jsdiv", "cross_entropy", "class_balance_loss", "onehot_loss", "get_image_prior_losses",
    "Normalizer", "normalize",
    "BaseSynthesis", "DeepInvSyntheiszer", "DeepInvSynthesizer", "CMISynthesizer", "FastMetaSynthesizer",
    "Generator", "hooks", "criterions", "utils", "synthesis", "models",
]


# ----------------------------------------------------------------------------------------------------- hooks
class DeepInversionHook(BNStatHook):
    """DeepInversion BN-prior hook, reference signature ``DeepInversionHook(module, mmt_rate)``.

    After each forward of ``module`` (a BatchNorm layer with running statistics, input x (N, C, ...)):

    .. math::
        r\\_feature = \\|v_{run} - ((1-r)\\,\\sigma^2 + r\\,\\bar\\sigma^2)\\|_2
                    + \\|m_{run} - ((1-r)\\,\\mu + r\\,\\bar\\mu)\\|_2

    with mu, sigma^2 the biased batch statistics of x per channel, r = ``mmt_rate`` and (mu_bar, sigma^2_bar) =
    ``mmt`` (no blend while ``mmt`` is None). ``tmp_val`` = (mu, sigma^2) of the last forward;
    ``update_mmt()``: mmt <- (mu, sigma^2) the first time, then mmt <- r mmt + (1 - r) (mu, sigma^2).

    Args:
        module: the BatchNorm layer.
        mmt_rate: r in [0, 1] (0: CMI / DeepInversion; FastDFKD's ``bn_mmt``, e.g. 0.9).
        backend: backend of the fused statistics (``"auto" | "triton" | "cpp" | "torch"``).
    """

    def __init__(self, module: nn.Module, mmt_rate: float = 0.0, backend: str = "auto") -> None:
        super().__init__(module, kind="l2", momentum=float(mmt_rate), backend=backend)

    @property
    def mmt_rate(self) -> float:
        return self.momentum

    @mmt_rate.setter
    def mmt_rate(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"DeepInversionHook: mmt_rate must be in [0, 1], got {value}")
        self.momentum = float(value)
        self._beta = None

    @property
    def tmp_val(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean (C,), var (C,)) of the last forward's BN input (biased variance, fp32), or None before one."""
        return None if self.mean is None else (self.mean, self.var)

    @property
    def hook(self) -> torch.utils.hooks.RemovableHandle:
        """The forward-hook handle (the reference's ``.hook``)."""
        return self._handle

    def __repr__(self) -> str:
        return f"<DeepInversionHook mmt_rate={self.momentum}>: {self.module}"


class InstanceMeanHook:
    """Forward hook keeping ``instance_mean`` = spatial mean of the module's input (CMI's instance features).

    Shape: input (N, C, H, W) -> instance_mean (N, C), differentiable. One reduction, so eager torch.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.instance_mean: torch.Tensor | None = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        x = inputs[0]
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: the input of {type(module).__name__} must be (N, C, H, W), "
                             f"got shape {tuple(x.shape)}; hook a 2-D conv/BN layer")
        self.instance_mean = x.mean(dim=(2, 3))

    def remove(self) -> None:
        self.hook.remove()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>: {self.module}"


class FeatureMeanHook(InstanceMeanHook):
    """Same as :class:`InstanceMeanHook` (the reference keeps both names)."""


class FeatureHook:
    """Forward hook keeping the module's last ``input`` (its first positional input) and ``output``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.input: torch.Tensor | None = None
        self.output: Any = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        self.output = output
        self.input = inputs[0]

    def remove(self) -> None:
        self.hook.remove()

    def __repr__(self) -> str:
        return f"<FeatureHook>: {self.module}"


def register_hooks(modules: Sequence[nn.Module]) -> list[FeatureHook]:
    """One :class:`FeatureHook` per module."""
    return [FeatureHook(m) for m in modules]


# ------------------------------------------------------------------------------------------------ criterions
_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _reduce(elem: torch.Tensor, reduction: str) -> torch.Tensor:
    """``F.kl_div``'s reductions of an element-wise loss: batchmean = sum / N, mean = sum / numel, sum, none."""
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    return elem.sum() / (elem.shape[0] if reduction == "batchmean" else elem.numel())


def kldiv(logits: torch.Tensor, targets: torch.Tensor, T: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """``F.kl_div(log_softmax(logits / T), softmax(targets / T), reduction) * T^2`` (softmax over dim 1).

    .. math:: \\ell_{ik} = T^2 p_{ik} (\\log p_{ik} - \\log q_{ik}),\\quad p = \\mathrm{softmax}(t/T),\\;
              q = \\mathrm{softmax}(s/T)

    ``batchmean``: sum / N; ``sum``; ``mean``: sum / numel (N K for 2-D logits); ``none``: the element-wise
    tensor, same shape as ``logits``. For (N, K) logits the three reductions run the fused
    :func:`dfkd_fast.ops.kd_kl_div` (differentiable in both arguments); ``none`` and other shapes are eager.

    Args:
        logits: student logits s, (N, K) or (N, K, ...).
        targets: teacher logits t, same shape.
        T: temperature > 0.
        reduction: ``"batchmean" | "mean" | "sum" | "none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"kldiv: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if T <= 0:
        raise ValueError(f"kldiv: T must be > 0, got {T}")
    if logits.shape != targets.shape:
        raise ValueError(f"kldiv: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have one shape")
    if logits.dim() == 2 and reduction != "none":
        if reduction == "mean":
            return ops.kd_kl_div(logits, targets, T, "sum") / logits.numel()
        return ops.kd_kl_div(logits, targets, T, reduction)
    log_q = F.log_softmax(logits / T, dim=1)
    p = F.softmax(targets / T, dim=1)
    return _reduce(torch.xlogy(p, p) - p * log_q, reduction) * (T * T)


class KLDiv(nn.Module):
    """Module form of :func:`kldiv`: ``KLDiv(T=1.0, reduction='batchmean')(logits, targets)``."""

    def __init__(self, T: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"KLDiv: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.T = T
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return kldiv(logits, targets, T=self.T, reduction=self.reduction)


def jsdiv(logits: torch.Tensor, targets: torch.Tensor, T: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """Jensen-Shannon divergence as the reference computes it (eager; no T^2 factor).

    .. math:: \\tfrac12 \\mathrm{KL}(M \\| P) + \\tfrac12 \\mathrm{KL}(M \\| Q),\\quad P = \\mathrm{softmax}(s/T),\\;
              Q = \\mathrm{softmax}(t/T),\\; M = (P + Q)/2

    where every one of P, Q, M is clamped to [0.01, 0.99] after M is formed; each KL is ``F.kl_div(log P, M,
    reduction)`` with ``reduction`` as in :func:`kldiv`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"jsdiv: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    p = F.softmax(logits / T, dim=1)
    q = F.softmax(targets / T, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    log_m, log_p, log_q = m.log(), p.clamp(0.01, 0.99).log(), q.clamp(0.01, 0.99).log()
    return 0.5 * (_reduce(m * (log_m - log_p), reduction) + _reduce(m * (log_m - log_q), reduction))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits, targets, reduction=reduction)``. Shape (N, K), (N,)."""
    return F.cross_entropy(logits, targets, reduction=reduction)


def class_balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the batch-mean prediction, sum_k pbar_k log pbar_k (DAFL's information term).
    Shape (N, K) -> scalar."""
    p = F.softmax(logits, dim=1).mean(dim=0)
    return (p * p.log()).sum()


def onehot_loss(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """CE to ``targets``, or to the argmax of ``logits`` when None (DAFL's one-hot term). Shape (N, K)."""
    return F.cross_entropy(logits, logits.argmax(dim=1) if targets is None else targets)


def get_image_prior_losses(inputs_jit: torch.Tensor) -> torch.Tensor:
    """TV-l1 prior: sum over the 4 neighbour directions (right, down, both diagonals) of mean |difference|
    (:func:`dfkd_fast.synthesis.losses.tv_loss`). Shape (N, C, H, W) -> scalar."""
    return tv_loss(inputs_jit, "l1")


# ---------------------------------------------------------------------------------------------- normalizer
def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], reverse: bool = False
              ) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dim 1); ``reverse=True``: ``x * std + mean``. Shape (N, C, H, W)."""
    m = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).reshape(1, -1, 1, 1)
    return tensor * s + m if reverse else (tensor - m) / s


class Normalizer:
    """The teacher's input normalization: ``Normalizer(mean, std)(x)`` and ``(x, reverse=True)`` for the inverse.

    Args:
        mean, std: per-channel values (``std`` > 0).
        reverse: default direction of ``__call__`` (a call's own ``reverse=`` overrides it).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], reverse: bool = False) -> None:
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std):
            raise ValueError(f"Normalizer: mean has {len(mean)} values and std {len(std)}; give one per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalizer: every std must be > 0, got {std}")
        self.mean, self.std, self.reverse = mean, std, bool(reverse)

    def __call__(self, x: torch.Tensor, reverse: bool | None = None) -> torch.Tensor:
        return normalize(x, self.mean, self.std, self.reverse if reverse is None else reverse)

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean}, std={self.std}, reverse={self.reverse})"


# -------------------------------------------------------------------------------------------- image pool
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPEG")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 as a PNG round trip keeps them (x * 255 truncated). (N, C, H, W)."""
    return (x.detach().clamp(0, 1) * 255).to(torch.uint8).cpu()


def _pil(img: torch.Tensor) -> Any:
    """(C, H, W) uint8 -> PIL image ("L" for C = 1, "RGB" for C = 3)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _load_image_folder(root: str | os.PathLike, img_size: tuple[int, int, int]) -> torch.Tensor:
    """Every png/jpg under ``root`` (recursively, sorted) as uint8 (N, C, H, W); each must be (C, H, W)."""
    from PIL import Image

    c, h, w = img_size
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(_IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"init_dataset: no png/jpg images under {os.fspath(root)!r}")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                raise ValueError(f"init_dataset: {f} is {im.size[0]}x{im.size[1]}, expected {w}x{h} (img_size)")
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        out.append(t.view(h, w, c).permute(2, 0, 1))
    return torch.stack(out)


class _ImagePool:
    """The kept images (uint8 on the host, a growing :class:`dfkd_fast.buffers.RingBuffer`) and the sampler.

    ``add`` keeps a batch (and writes ``<save_dir>/<batch>-<i>.png`` when ``save_dir`` is set); ``next_batch(n)``
    returns the next ``n`` indices of a pass over a random permutation of everything kept (the last batch of a
    pass may be shorter, as a shuffled ``DataLoader`` without ``drop_last``); a pass ends when it is used up or
    when a batch is added (a new loader per ``synthesize``, as in the reference).
    """

    def __init__(self, img_size: tuple[int, int, int], save_dir: str | os.PathLike | None) -> None:
        self.buffer = RingBuffer(None, {"images": (img_size, torch.uint8)}, device="cpu")
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.batches = 0
        self._order: torch.Tensor | None = None
        self._pos = 0

    def add(self, images_u8: torch.Tensor, save: bool = True) -> None:
        self.buffer.add(images=images_u8)
        if save and self.save_dir is not None:
            os.makedirs(self.save_dir, exist_ok=True)
            for i, img in enumerate(images_u8):
                _pil(img).save(os.path.join(self.save_dir, f"{self.batches}-{i}.png"))
            self.batches += 1
        self._order = None

    def __len__(self) -> int:
        return len(self.buffer)

    def images(self) -> torch.Tensor:
        return self.buffer.view("images")

    def next_batch(self, n: int) -> torch.Tensor:
        if len(self) == 0:
            raise RuntimeError("sample(): no images kept yet; call synthesize() first")
        if self._order is None or self._pos >= self._order.numel():
            self._order = torch.randperm(len(self))
            self._pos = 0
        idx = self._order[self._pos:self._pos + n]
        self._pos += n
        return idx


# --------------------------------------------------------------------------------------------- synthesizers
class BaseSynthesis(abc.ABC):
    """Reference base class: ``synthesize()`` makes a batch (returns images for visualization in [0, 1]);
    ``sample()`` fetches a training batch."""

    def __init__(self, teacher: nn.Module, student: nn.Module | None) -> None:
        self.teacher = teacher
        self.student = student

    @abc.abstractmethod
    def synthesize(self, targets: torch.Tensor | None = None) -> Any:
        """Take optimization steps to synthesize a batch; returns ``{"synthetic": images}``."""

    @abc.abstractmethod
    def sample(self) -> torch.Tensor:
        """Fetch a batch of training data."""


def _normalizer_stats(normalizer: Any, cls: str) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) of a reference normalizer (anything with ``.mean`` / ``.std``), or (None, None)."""
    if normalizer is None:
        return None, None
    mean, std = getattr(normalizer, "mean", None), getattr(normalizer, "std", None)
    if mean is None or std is None:
        raise ValueError(f"{cls}: normalizer must have .mean and .std (e.g. datafree.Normalizer(mean, std)), got "
                         f"{type(normalizer).__name__}")
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten().tolist()
    std = torch.as_tensor(std, dtype=torch.float32).flatten().tolist()
    return mean, std


def _teacher_device(teacher: nn.Module) -> torch.device:
    for p in teacher.parameters():
        return p.device
    return torch.device("cpu")


def _image_size(img_size: Any, cls: str) -> tuple[int, int, int]:
    size = tuple(int(s) for s in img_size)
    if len(size) != 3:
        raise ValueError(f"{cls}: img_size must be (C, H, W), e.g. (3, 32, 32), got {tuple(img_size)}")
    return size  # type: ignore[return-value]


class _Synthesis(BaseSynthesis):
    """Shared part of the wrappers: keyword bookkeeping, the image pool, ``synthesize`` / ``sample``."""

    default_return_cost = False

    def __init__(self, teacher: nn.Module, student: nn.Module | None, num_classes: int, img_size: Any,
                 iterations: int, lr_g: float, synthesis_batch_size: int, sample_batch_size: int,
                 adv: float, bn: float, oh: float, save_dir: str | os.PathLike | None, transform: Callable | None,
                 normalizer: Any, device: Any, autocast: Any, use_fp16: bool, distributed: bool,
                 return_cost: bool | None) -> None:
        super().__init__(teacher, student)
        cls = type(self).__name__
        self.img_size = _image_size(img_size, cls)
        if int(sample_batch_size) < 1:
            raise ValueError(f"{cls}: sample_batch_size must be >= 1, got {sample_batch_size}")
        self.num_classes = int(num_classes)
        self.iterations, self.lr_g = int(iterations), float(lr_g)
        self.synthesis_batch_size, self.sample_batch_size = int(synthesis_batch_size), int(sample_batch_size)
        self.adv, self.bn, self.oh = float(adv), float(bn), float(oh)
        self.save_dir, self.transform, self.normalizer = save_dir, transform, normalizer
        self.device = _teacher_device(teacher) if device is None else torch.device(device)  # int i -> cuda:i
        self.autocast, self.use_fp16, self.distributed = autocast, bool(use_fp16), bool(distributed)
        self.return_cost = self.default_return_cost if return_cost is None else bool(return_cost)
        self.mean, self.std = _normalizer_stats(normalizer, cls)
        self.data_pool = _ImagePool(self.img_size, save_dir)
        self.synth: Synthesizer | None = None

    def _common(self, backend: str, seed: int, compile: str) -> dict[str, Any]:
        """Keywords every wrapped dfkd_fast synthesizer takes."""
        return dict(batch_size=self.synthesis_batch_size, mean=self.mean, std=self.std, device=self.device,
                    backend=backend, seed=seed, compile=compile, precision="fp16" if self.use_fp16 else "fp32",
                    iterations=self.iterations, bn=self.bn, oh=self.oh, adv=self.adv)

    def _before(self) -> None:
        """Per-batch work of a method before the wrapped synthesizer runs (none by default)."""

    def synthesize(self, targets: torch.Tensor | None = None) -> Any:
        """One batch: ``{"synthetic": x}`` with x (synthesis_batch_size, C, H, W) in [0, 1] (or
        ``({"synthetic": x}, seconds)`` with ``return_cost``). The batch is kept for :meth:`sample`."""
        assert self.synth is not None
        start = time.perf_counter()
        self._before()
        res = self.synth.synthesize(targets)
        self.data_pool.add(_to_uint8(res.images))
        self.last_result = res
        out = {"synthetic": res.images}
        return (out, time.perf_counter() - start) if self.return_cost else out

    def sample(self) -> torch.Tensor:
        """The next batch of ``sample_batch_size`` kept images, on ``device``: ``transform`` applied to each as a
        PIL image and the results stacked (the reference's image-folder loader), or, without ``transform``,
        the images as float in [0, 1] passed through ``normalizer``. Shape (B, C, H, W)."""
        idx = self.data_pool.next_batch(self.sample_batch_size)
        imgs = self.data_pool.images()[idx]
        if self.transform is not None:
            batch = torch.stack([torch.as_tensor(self.transform(_pil(img))) for img in imgs])
        else:
            batch = imgs.float().div_(255)
            if self.normalizer is not None:
                batch = self.normalizer(batch)
        return batch.to(self.device)


def _adv_student(student: nn.Module | None, adv: float) -> nn.Module | None:
    return student if adv != 0 else None


class DeepInvSyntheiszer(_Synthesis):
    """DeepInversion with the reference keywords (the reference's spelling; :class:`DeepInvSynthesizer` too).

    Wraps :class:`dfkd_fast.synthesis.DeepInversion`: ``lr_g`` -> ``lr``, ``synthesis_batch_size`` ->
    ``batch_size``, ``normalizer`` -> ``mean`` / ``std``, ``img_size`` (C, H, W), ``bn``, ``oh``, ``adv``
    (JS competition at T = 3 with the student when ``adv`` > 0), ``tv`` (TV-l1 over 4 directions), ``l2``;
    jitter H/8 + flip, Adam betas (0.5, 0.99), the lowest-loss batch kept, every BN layer weighted 1 (the
    reference has no first-layer multiplier). Differences: the priors act on pixels in [0, 1] (the reference
    adds them in normalized space), the reference's extra ``-0.001 * student BN prior`` is not applied, and
    default targets are balanced (reference: uniform random).

    ``device``: None (default) = the teacher's device; an int i = ``cuda:i`` (the reference's ``args.gpu``).
    ``progressive_scale`` is unused (as in the reference); ``autocast`` is ignored (``use_fp16=True`` selects
    dfkd_fast's ``precision="fp16"``); ``distributed``: each rank keeps its own pool. ``save_dir``: when set,
    the kept images are also written there as PNGs. Extra keywords: ``backend``, ``seed``, ``compile``,
    ``return_cost``.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module | None, num_classes: int, img_size: Any,
                 iterations: int = 1000, lr_g: float = 0.1, progressive_scale: bool = False,
                 synthesis_batch_size: int = 128, sample_batch_size: int = 128,
                 adv: float = 0.0, bn: float = 1, oh: float = 1, tv: float = 1e-5, l2: float = 0.0,
                 save_dir: str | os.PathLike | None = None, transform: Callable | None = None,
                 normalizer: Any = None, device: Any = None, autocast: Any = None, use_fp16: bool = False,
                 distributed: bool = False, *, backend: str = "auto", seed: int = 0, compile: str = "off",
                 return_cost: bool | None = None) -> None:
        super().__init__(teacher, student, num_classes, img_size, iterations, lr_g, synthesis_batch_size,
                         sample_batch_size, adv, bn, oh, save_dir, transform, normalizer, device, autocast,
                         use_fp16, distributed, return_cost)
        self.progressive_scale = progressive_scale
        self.tv, self.l2 = float(tv), float(l2)
        self.synth = DeepInversion(teacher, self.num_classes, self.img_size, student=_adv_student(student, self.adv),
                                   lr=self.lr_g, first_bn_multiplier=1.0, tv=self.tv, tv_l2=0.0, l2=self.l2,
                                   **self._common(backend, seed, compile))


DeepInvSynthesizer = DeepInvSyntheiszer


def _check_generator(generator: nn.Module, nz: int, cls: str) -> nn.Module:
    if not isinstance(generator, nn.Module):
        raise ValueError(f"{cls}: generator must be an nn.Module (e.g. datafree.Generator(nz={nz})), got "
                         f"{type(generator).__name__}")
    g_nz = getattr(generator, "nz", nz)
    if int(g_nz) != int(nz):
        raise ValueError(f"{cls}: nz={nz} but the generator takes nz={g_nz}; pass the generator's latent size")
    return generator


class CMISynthesizer(_Synthesis):
    """Contrastive Model Inversion with the reference keywords; wraps :class:`dfkd_fast.synthesis.CMI`.

    ``generator`` (output in [0, 1]) is the one optimized (re-initialized every batch, as in the reference),
    with a fresh z of ``nz``; ``lr_g`` drives the generator, z and the projection head (``head_dim``);
    ``bank_size``, ``n_neg``, ``cr``, ``cr_T``; ``bn``, ``oh``, ``adv`` (decision-adversarial KL at T = 1
    against the student when ``adv`` > 0). Instance features are the spatial means of every BN input
    (the reference default ``feature_layers=None``; other layers raise). ``init_dataset``: a folder of
    images of ``img_size`` added to the pool. Keywords after ``img_size`` only by name (the reference's CMI and
    Fast-Datafree's differ in order there). Other keywords as :class:`DeepInvSyntheiszer`.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module | None, generator: nn.Module, nz: int,
                 num_classes: int, img_size: Any, *, feature_reuse: bool = False, feature_layers: Any = None,
                 bank_size: int = 40960, n_neg: int = 4096, head_dim: int = 128,
                 init_dataset: str | os.PathLike | None = None, iterations: int = 100, lr_g: float = 0.1,
                 progressive_scale: bool = False, synthesis_batch_size: int = 128, sample_batch_size: int = 128,
                 adv: float = 0.0, bn: float = 1, oh: float = 1, cr: float = 0.8, cr_T: float = 0.1,
                 save_dir: str | os.PathLike | None = None, transform: Callable | None = None,
                 autocast: Any = None, use_fp16: bool = False, normalizer: Any = None, device: Any = None,
                 distributed: bool = False, backend: str = "auto", seed: int = 0, compile: str = "off",
                 return_cost: bool | None = None) -> None:
        super().__init__(teacher, student, num_classes, img_size, iterations, lr_g, synthesis_batch_size,
                         sample_batch_size, adv, bn, oh, save_dir, transform, normalizer, device, autocast,
                         use_fp16, distributed, return_cost)
        cls = type(self).__name__
        if feature_layers is not None:
            raise ValueError(f"{cls}: feature_layers is not supported; dfkd_fast's CMI uses the inputs of every "
                             "BatchNorm layer (the reference default): pass feature_layers=None")
        self.nz, self.feature_reuse, self.progressive_scale = int(nz), feature_reuse, progressive_scale
        self.bank_size, self.n_neg, self.head_dim = int(bank_size), int(n_neg), int(head_dim)
        self.cr, self.cr_T, self.init_dataset = float(cr), float(cr_T), init_dataset
        self.generator = _check_generator(generator, self.nz, cls).to(self.device).train()
        self.synth = CMI(teacher, self.num_classes, self.img_size, student=_adv_student(student, self.adv),
                         nz=self.nz, lr_g=self.lr_g, lr_head=self.lr_g, cr=self.cr, cr_T=self.cr_T, T=1.0,
                         bank_size=self.bank_size, n_neg=self.n_neg, head_dim=self.head_dim,
                         **self._common(backend, seed, compile))
        self.synth.netG = self.generator
        self.head = self.synth.head
        if init_dataset is not None:
            self.data_pool.add(_load_image_folder(init_dataset, self.img_size), save=False)


def _reset_l0(generator: nn.Module) -> None:
    """The reference's ``reset_l0``: modules named ``l1.0`` / ``conv_blocks.0``: weight ~ N(0, 0.02), bias 0."""
    with torch.no_grad():
        for name, m in generator.named_modules():
            if name in ("l1.0", "conv_blocks.0"):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.constant_(m.bias, 0)


class FastMetaSynthesizer(_Synthesis):
    """FastDFKD meta-generator synthesis with the reference keywords; wraps :class:`dfkd_fast.synthesis.FastMeta`.

    ``generator`` is the meta generator (updated in place after every batch, as in the reference) with a
    meta Adam of lr ``lr_g * iterations``; per batch ``iterations`` inner Adam steps on a clone (``lr_g``)
    and on z (``lr_z``); ``is_maml`` 1 -> first-order MAML, 0 -> Reptile (meta-gradient theta - theta'; the
    reference scales it by 67, which Adam normalizes away); ``bn_mmt``: BN moving-average rate (< 1);
    ``warmup``: batches before the adversarial term starts (the reference counts from 1 and turns it on at
    batch ``warmup``; the same batch here); ``reset_l0``: re-draw the generator's first layer at batch
    120 + warmup (as the reference); ``reset_bn`` is stored only (the reference never applies it).
    ``synthesize()`` returns ``({"synthetic": x}, seconds)`` like Fast-Datafree (``return_cost=False``:
    the dict alone). Other keywords as :class:`CMISynthesizer`.
    """

    default_return_cost = True

    def __init__(self, teacher: nn.Module, student: nn.Module | None, generator: nn.Module, nz: int,
                 num_classes: int, img_size: Any, init_dataset: str | os.PathLike | None = None,
                 iterations: int = 100, lr_g: float = 0.1, synthesis_batch_size: int = 128,
                 sample_batch_size: int = 128, adv: float = 0.0, bn: float = 1, oh: float = 1,
                 save_dir: str | os.PathLike | None = None, transform: Callable | None = None, autocast: Any = None,
                 use_fp16: bool = False, normalizer: Any = None, device: Any = None, distributed: bool = False,
                 lr_z: float = 0.01, warmup: int = 10, reset_l0: int = 0, reset_bn: int = 0, bn_mmt: float = 0,
                 is_maml: int = 1, *, backend: str = "auto", seed: int = 0, compile: str = "off",
                 return_cost: bool | None = None) -> None:
        super().__init__(teacher, student, num_classes, img_size, iterations, lr_g, synthesis_batch_size,
                         sample_batch_size, adv, bn, oh, save_dir, transform, normalizer, device, autocast,
                         use_fp16, distributed, return_cost)
        cls = type(self).__name__
        self.nz, self.lr_z, self.bn_mmt, self.ismaml = int(nz), float(lr_z), float(bn_mmt), int(is_maml)
        self.ep, self.ep_start = 0, int(warmup)
        self.reset_l0, self.reset_bn, self.init_dataset = reset_l0, reset_bn, init_dataset
        self.generator = _check_generator(generator, self.nz, cls).to(self.device).train()
        synth = FastMeta(teacher, self.num_classes, self.img_size, student=_adv_student(student, self.adv),
                         nz=self.nz, lr_g=self.lr_g, lr_z=self.lr_z, bn_mmt=self.bn_mmt, T=1.0,
                         warmup=max(self.ep_start - 1, 0), meta="fomaml" if self.ismaml else "reptile",
                         **self._common(backend, seed, compile))
        # the caller's generator becomes the meta generator (the per-batch clone and the meta Adam follow it)
        synth.netG = self.generator
        synth.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr_g * self.iterations,
                                                betas=tuple(synth.config.betas))
        synth.fast = copy.deepcopy(self.generator)
        synth._meta_tensors = [*self.generator.parameters(), *self.generator.buffers()]
        synth._fast_tensors = [*synth.fast.parameters(), *synth.fast.buffers()]
        synth._fast_params = list(synth.fast.parameters())
        self.synth = synth
        self.meta_optimizer = synth.meta_optimizer
        if init_dataset is not None:
            self.data_pool.add(_load_image_folder(init_dataset, self.img_size), save=False)

    def _before(self) -> None:
        self.ep += 1
        if self.reset_l0 and self.ep == 120 + self.ep_start:
            _reset_l0(self.generator)


# ------------------------------------------------------------------------- the reference's sub-namespaces
def _submodule(name: str, doc: str, **members: Any) -> types.ModuleType:
    """A module ``dfkd_fast.compat.datafree.<name>`` holding ``members``, registered in ``sys.modules`` (as
    ``os.path`` is), so both ``datafree.hooks.X`` and ``from dfkd_fast.compat.datafree.hooks import X`` work."""
    mod = types.ModuleType(f"{__name__}.{name}", doc)
    mod.__dict__.update(members)
    mod.__all__ = list(members)
    sys.modules[mod.__name__] = mod
    return mod


hooks = _submodule("hooks", "Forward hooks (the reference's ``datafree.hooks``).",
                   DeepInversionHook=DeepInversionHook, InstanceMeanHook=InstanceMeanHook,
                   FeatureMeanHook=FeatureMeanHook, FeatureHook=FeatureHook, register_hooks=register_hooks)
criterions = _submodule("criterions", "Losses (the reference's ``datafree.criterions``).",
                        kldiv=kldiv, KLDiv=KLDiv, jsdiv=jsdiv, cross_entropy=cross_entropy,
                        class_balance_loss=class_balance_loss, onehot_loss=onehot_loss,
                        get_image_prior_losses=get_image_prior_losses)
utils = _submodule("utils", "Input normalization (the reference's ``datafree.utils``).",
                   Normalizer=Normalizer, normalize=normalize)
synthesis = _submodule("synthesis", "Synthesizers (the reference's ``datafree.synthesis``).",
                       BaseSynthesis=BaseSynthesis, DeepInvSyntheiszer=DeepInvSyntheiszer,
                       DeepInvSynthesizer=DeepInvSynthesizer, CMISynthesizer=CMISynthesizer,
                       FastMetaSynthesizer=FastMetaSynthesizer)
models = _submodule("models", "Generators (the reference's ``datafree.models``).", Generator=Generator,
                    generator=_submodule("models.generator", "The CMI / FastDFKD generator.", Generator=Generator))
