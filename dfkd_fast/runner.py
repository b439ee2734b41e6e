"""The synthesis run loop behind ``dfkd-fast synthesize``: batches -> shards of a resumable transfer set.

Batch ``b`` of a run is synthesized after reseeding the synthesizer's generator (and torch's global RNG)
with :func:`batch_seed` ``(seed, b)``, so a resumed run produces the same images as an uninterrupted one.
Shards hold whole batches (``shard_size`` is rounded up to a multiple of ``batch_size``); the
synthesizer's ``state_dict`` and the running summary statistics are saved with every shard, so
``resume=True`` continues exactly after the last finished shard: no finished shard is lost or duplicated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import dfkd_fast
from dfkd_fast.config import SynthesizeConfig, parse_floats, parse_image_size, parse_opts

__all__ = ["SynthesisSummary", "batch_seed", "resolve_device", "load_teacher", "build_from_config",
           "run_synthesis", "synthesize_from_config", "write_tensors", "run_meta"]


@dataclass
class SynthesisSummary:
    """Final statistics of a synthesis run (also stored in the transfer set's manifest).

    Attributes:
        images: images in the transfer set.
        seconds: synthesis seconds summed over all sessions of the run (resumes included).
        images_per_s: ``images / seconds``.
        mean_confidence: mean over images of the teacher's top-1 softmax probability.
        class_histogram: number of images per teacher top-1 class, length K.
        out: transfer-set directory; preview: the PNG grid, if written.
    """

    images: int
    seconds: float
    images_per_s: float
    mean_confidence: float
    class_histogram: list[int]
    out: str = ""
    preview: str | None = None
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        hist = " ".join(f"{k}:{c}" for k, c in enumerate(self.class_histogram))
        return (f"images {self.images} | seconds {self.seconds:.1f} | images/s {self.images_per_s:.2f} | "
                f"mean teacher confidence {self.mean_confidence:.4f}\nclass histogram (teacher top-1): {hist}")


def record_batch(stats: dict[str, Any], res: Any, take: int, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the first ``take`` images of a :class:`SynthesisResult` to the run statistics (class histogram of the
    teacher's top-1, confidence sum, synthesis seconds, image count) and return (images, logits, probs) of them."""
    images = res.images[:take].detach()
    logits = res.teacher_logits[:take].detach().float()
    probs = logits.softmax(1)
    conf, top1 = probs.max(1)
    counts = torch.bincount(top1.cpu(), minlength=k).tolist()
    stats["hist"] = [int(a + c) for a, c in zip(stats["hist"], counts, strict=True)]
    stats["conf_sum"] = float(stats["conf_sum"]) + float(conf.sum())
    stats["seconds"] = float(stats["seconds"]) + float(res.seconds)
    stats["images"] = int(stats["images"]) + take
    return images, logits, probs


def batch_seed(seed: int, index: int, rank: int = 0) -> int:
    """A 63-bit seed for batch ``index`` of rank ``rank`` of a run seeded with ``seed`` (SeedSequence mix)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> cuda when available else cpu; otherwise ``torch.device(device)`` (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_teacher(spec: str, weights: str | None, num_classes: int, image_size: tuple[int, int, int],
                 device: torch.device) -> nn.Module:
    """Build / load the teacher (``dfkd_fast.models.load_model``) in eval mode on ``device``.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ValueError: unknown model name or spec, unreadable weights, output width != ``num_classes``.
    """
    from dfkd_fast.models import load_model

    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights: file {weights!r} not found")
    if num_classes < 2:
        raise ValueError(f"--num-classes must be >= 2, got {num_classes}")
    c, h, _ = image_size
    model = load_model(spec, weights=weights, num_classes=num_classes, in_channels=c, image_size=h)
    model = model.to(device).eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, *image_size, device=device))
        except RuntimeError as e:
            raise ValueError(f"the teacher {spec!r} cannot take inputs of --image-size "
                             f"{','.join(map(str, image_size))} ({str(e).splitlines()[0]})") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"--num-classes {num_classes} does not match the teacher {spec!r}, which outputs "
                         f"{tuple(out.shape[1:])} logits; pass --num-classes {out.shape[-1]}")
    return model


def load_reference_images(path: str, image_size: tuple[int, int, int]) -> torch.Tensor:
    """Images in [0, 1] resized to ``image_size`` from a transfer-set directory or a folder of PNG/JPEG files.

    Shape: -> (M, C, H, W) float32.
    """
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    c, h, w = image_size
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--reference-images: directory {path!r} not found")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        from dfkd_fast.transfer_set import TransferSet

        x = TransferSet(path).images().float()
    else:
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not files:
            raise ValueError(f"--reference-images: no PNG/JPEG files under {path!r}")
        mode = "L" if c == 1 else "RGB"
        imgs = []
        for f in files:
            with Image.open(f) as im:
                a = np.asarray(im.convert(mode).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
            imgs.append(torch.from_numpy(a.reshape(h, w, -1)).permute(2, 0, 1))
        x = torch.stack(imgs)
    if x.shape[1] != c:
        raise ValueError(f"--reference-images have {x.shape[1]} channels but --image-size has {c}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _method_class(name: str) -> type:
    import dfkd_fast.synthesis as synthesis

    key = name.lower().replace("-", "_")
    if key not in synthesis.REGISTRY:
        raise ValueError(f"unknown synthesis method {name!r}; choose one of: {', '.join(synthesis.list_methods())}")
    return synthesis.REGISTRY[key]


def build_from_config(cfg: SynthesizeConfig, method_options: dict[str, Any] | None = None):
    """Validate ``cfg`` and build (teacher, synthesizer, parsed sizes) from it.

    ``method_options`` (already typed, e.g. from per-method CLI flags) are merged with ``cfg.opt``
    (``key=value`` strings; these win).
    """
    import dfkd_fast.synthesis as synthesis

    image_size = parse_image_size(cfg.image_size)
    if cfg.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {cfg.num_images}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if cfg.store not in ("uint8", "fp16"):
        raise ValueError(f"--store must be uint8 or fp16, got {cfg.store!r}")
    cls = _method_class(cfg.method)
    opts = dict(method_options or {})
    opts.update(parse_opts(cls.Config, cfg.opt))
    mean, std = parse_floats(cfg.mean, "mean"), parse_floats(cfg.std, "std")
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, device)
    student = None
    if cfg.student is not None:
        if cfg.student_weights is not None and not os.path.isfile(cfg.student_weights):
            raise FileNotFoundError(f"--student-weights: file {cfg.student_weights!r} not found")
        from dfkd_fast.models import load_model

        c, h, _ = image_size
        student = load_model(cfg.student, weights=cfg.student_weights, num_classes=cfg.num_classes, in_channels=c,
                             image_size=h).to(device)
    elif cfg.student_weights is not None:
        raise ValueError("--student-weights needs --student (the student's architecture)")
    extra: dict[str, Any] = {}
    if cfg.reference_images is not None:
        if cls.name != "impression_space":
            raise ValueError(f"--reference-images is an option of impression_space, not of {cfg.method!r}")
        extra["reference_images"] = load_reference_images(cfg.reference_images, image_size).to(device)
    elif cls.name == "impression_space":
        raise ValueError("impression_space synthesizes the impression of given images: pass --reference-images "
                         "(a folder of PNG/JPEG files or a transfer-set directory)")
    synth = synthesis.build_synthesizer(cfg.method, teacher, cfg.num_classes, image_size, batch_size=cfg.batch_size,
                                        mean=mean, std=std, device=device, backend=cfg.backend, seed=cfg.seed,
                                        student=student, **opts, **extra)
    return teacher, synth, image_size


def _new_stats(k: int) -> dict[str, Any]:
    return {"hist": [0] * k, "conf_sum": 0.0, "seconds": 0.0, "images": 0}


def run_synthesis(synth: Any, out: str, num_images: int, *, meta: dict[str, Any] | None = None,
                  shard_size: int = 1024, store: str = "uint8", resume: bool = False, seed: int = 0,
                  preview: int = 64, progress: bool = True) -> SynthesisSummary:
    """Synthesize ``num_images`` images with ``synth`` into a transfer set at ``out``, resumably.

    Args:
        synth: a ``dfkd_fast.synthesis.Synthesizer``.
        out: transfer-set directory (``dfkd_fast.transfer_set.TransferSetWriter``).
        meta: manifest metadata (method, hyper-parameters, teacher fingerprint ...).
        shard_size: images per shard, rounded up to a multiple of the batch size.
        resume: continue the run found in ``out`` (its synthesizer state and statistics are restored).
        seed: base seed; batch ``b`` is synthesized from :func:`batch_seed` ``(seed, b)``.
        preview: images in the grid ``out/preview.png`` (teacher top-1 class and confidence per image).

    Returns:
        :class:`SynthesisSummary` (stored in the manifest as ``summary``).
    """
    from tqdm.auto import tqdm

    from dfkd_fast.transfer_set import TransferSetWriter

    bs = int(synth.batch_size)
    shard = int(math.ceil(shard_size / bs) * bs)
    k = int(synth.num_classes)
    meta = dict(meta or {})
    meta.setdefault("method", getattr(synth, "name", type(synth).__name__))
    meta.setdefault("hparams", dataclasses.asdict(synth.config) if dataclasses.is_dataclass(synth.config) else {})
    meta.update(batch_size=bs, seed=int(seed), num_classes=k, image_size=list(synth.image_size),
                dfkd_fast=dfkd_fast.__version__)
    writer = TransferSetWriter(out, meta, shard_size=shard, store=store, soft_kind="logits", resume=resume)
    done = int(writer.num_committed)
    stats = _new_stats(k)
    saved = writer.state if done else None
    if done:
        if not isinstance(saved, dict) or "synth" not in saved or "runner" not in saved:
            raise ValueError(f"{out}: the transfer set has {done} images but no saved synthesizer state; it was not "
                             "written by `dfkd-fast synthesize` and cannot be resumed")
        synth.load_state_dict(saved["synth"])
        stats = dict(saved["runner"])
        stats["hist"] = list(stats["hist"])
        if int(stats["images"]) != done:
            raise ValueError(f"{out}: saved state covers {stats['images']} images but {done} are committed")
    if done % bs and done < num_images:
        raise ValueError(f"{out}: {done} images written, not a multiple of --batch-size {bs}; resume with the "
                         "batch size of the interrupted run")
    preview_path = os.path.join(out, "preview.png")
    t0 = time.perf_counter()
    bar = tqdm(total=num_images, initial=min(done, num_images), desc=f"synthesize {meta['method']}", unit="img",
               disable=not progress, dynamic_ncols=True)
    b = done // bs
    n = done
    while n < num_images:
        bseed = batch_seed(seed, b)
        synth.generator.manual_seed(bseed)
        torch.manual_seed(bseed)
        res = synth.synthesize()
        take = min(bs, num_images - n)
        images, logits, probs = record_batch(stats, res, take, k)
        if preview and not os.path.exists(preview_path):
            _save_preview(images[:preview], probs[:preview], preview_path)
        writer.add(images, logits, res.targets[:take].detach(), seed=bseed)
        n += take
        b += 1
        if n % shard == 0 or n >= num_images:  # a shard was just committed (or the run ends): save the state
            writer.state = {"synth": synth.state_dict(), "runner": dict(stats), "batches": b}
        bar.update(take)
        bar.set_postfix(img_s=f"{(n - done) / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    imgs = int(stats["images"])
    secs = float(stats["seconds"])
    summary = SynthesisSummary(images=imgs, seconds=secs, images_per_s=imgs / secs if secs > 0 else float("nan"),
                               mean_confidence=float(stats["conf_sum"]) / max(imgs, 1),
                               class_histogram=[int(c) for c in stats["hist"]], out=out,
                               preview=preview_path if os.path.exists(preview_path) else None, resumed_from=done)
    manifest = writer.close()
    if manifest is not None:
        _add_to_manifest(manifest, {"summary": dataclasses.asdict(summary)})
    return summary


def _add_to_manifest(path: str, extra: dict[str, Any]) -> None:
    """Add top-level keys to a finished ``manifest.json`` (atomic rewrite)."""
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(extra)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_preview(images: torch.Tensor, probs: torch.Tensor, path: str) -> None:
    from dfkd_fast.viz import save_grid

    save_grid(images.cpu(), path, probs=probs.cpu(), title="teacher top-1 class and confidence")


def run_meta(cfg: SynthesizeConfig, synth: Any, teacher: nn.Module) -> dict[str, Any]:
    """The manifest metadata of a run: method, hyper-parameters, teacher spec and fingerprint, normalization."""
    from dfkd_fast.transfer_set import teacher_fingerprint

    return {"method": synth.name, "hparams": dataclasses.asdict(synth.config),
            "teacher": {"spec": cfg.teacher, "weights": os.path.abspath(cfg.weights) if cfg.weights else None,
                        "fingerprint": teacher_fingerprint(teacher)},
            "mean": parse_floats(cfg.mean, "mean"), "std": parse_floats(cfg.std, "std"), "backend": cfg.backend}


def synthesize_from_config(cfg: SynthesizeConfig, method_options: dict[str, Any] | None = None,
                           progress: bool = True) -> SynthesisSummary:
    """``dfkd-fast synthesize``: build teacher + synthesizer from ``cfg`` and run :func:`run_synthesis`.

    With ``cfg.distributed`` (under torchrun) this process runs its rank's part of the set instead
    (:func:`dfkd_fast.distributed.synthesize_distributed_from_config`).
    """
    if cfg.distributed:
        from dfkd_fast.distributed import synthesize_distributed_from_config

        return synthesize_distributed_from_config(cfg, method_options, progress=progress)
    teacher, synth, image_size = build_from_config(cfg, method_options)
    meta = run_meta(cfg, synth, teacher)
    return run_synthesis(synth, cfg.out, cfg.num_images, meta=meta, shard_size=cfg.shard_size, store=cfg.store,
                         resume=cfg.resume, seed=cfg.seed, preview=cfg.preview, progress=progress)


def write_tensors(out: str, images: torch.Tensor, logits: torch.Tensor, meta: dict[str, Any],
                  shard_size: int = 4096) -> str:
    """Write in-memory images (uint8, or float in [0, 1]) and teacher logits as a transfer set at ``out``.

    Shape: images (N, C, H, W), logits (N, K).
    """
    from dfkd_fast.transfer_set import TransferSetWriter

    if images.shape[0] != logits.shape[0]:
        raise ValueError(f"images and logits must be equally many, got {images.shape[0]} and {logits.shape[0]}")
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    meta = dict(meta)
    meta.update(num_images=int(x.shape[0]), num_classes=int(logits.shape[1]), image_size=list(x.shape[1:]))
    writer = TransferSetWriter(out, meta, shard_size=shard_size, store="uint8", soft_kind="logits")
    for i in range(0, x.shape[0], shard_size):
        lg = logits[i:i + shard_size].float().cpu()
        writer.add(x[i:i + shard_size].cpu(), lg, lg.argmax(1))
    writer.close()
    return out
