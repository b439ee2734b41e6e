"""Configs and runners of the task subcommands.

``dfkd-fast robustness | robust-distill | uap | uda | class-incremental | impression``.

Each ``run_*`` takes its config dataclass, runs the task on the bundled real data (MNIST-5k, scikit-learn
digits, scikit-image photos), writes ``result.json`` (and images) to ``--out`` and returns a printable report.
Without ``--weights`` the model is trained here (MNIST-5k: ``dfkd_fast.teachers.cached_mnist_teacher``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from dfkd_fast.config import _f

__all__ = ["TaskConfig", "RobustnessConfig", "RobustDistillConfig", "UAPConfig", "UDAConfig", "ClassIncrementalConfig",
           "ImpressionConfig", "run_robustness", "run_robust_distill", "run_uap", "run_uda", "run_class_incremental",
           "run_impression"]

DATASETS = ("mnist5k", "digits")


@dataclass
class TaskConfig:
    """Options shared by the task subcommands."""

    teacher: str = _f("lenet5", "model: a zoo name or 'package.module:factory'")
    weights: str | None = _f(None, "model weights; default: train one on --dataset (MNIST-5k: cached)")
    dataset: str = _f("mnist5k", "real data: mnist5k or digits")
    image_size: int = _f(32, "image side (1 channel)")
    teacher_epochs: int = _f(8, "epochs when the model is trained here (no --weights)")
    num_images: int = _f(1000, "real test images used for evaluation (at most the split size)")
    out: str = _f("runs/task", "output directory (result.json, images)")
    seed: int = _f(0, "seed")
    device: str = _f("cpu", "device")
    backend: str = _f("auto", "fused-op backend")


@dataclass
class RobustnessConfig(TaskConfig):
    """``dfkd-fast robustness``: FGSM / iFGSM / PGD accuracy and fooling rate, optionally after PGD training."""

    attacks: str = _f("fgsm,ifgsm,pgd", "comma-separated attacks")
    eps: float = _f(0.3, "L-inf radius in [0, 1] pixel units")
    steps: int = _f(10, "iterative-attack steps")
    adv_train_epochs: int = _f(0, "also PGD-adversarially train a copy for this many epochs and attack it")


@dataclass
class RobustDistillConfig(TaskConfig):
    """``dfkd-fast robust-distill``: Data Impressions' robustness experiment (paper Table 4).

    Students distilled via Data Impressions from the natural ``--teacher`` and from a PGD-trained copy; FGSM /
    iFGSM / PGD accuracy and fooling rate of all four models on real test images.
    """

    student: str = _f("lenet5_half", "student model: a zoo name or 'package.module:factory'")
    robust_weights: str | None = _f(None, "weights of the robust teacher; default: PGD-train a copy of the teacher")
    attacks: str = _f("fgsm,ifgsm,pgd", "comma-separated attacks")
    eps: float = _f(0.2, "L-inf radius in [0, 1] pixel units (attacks and PGD training)")
    steps: int = _f(10, "iterative-attack steps")
    adv_train_epochs: int = _f(3, "PGD adversarial-training epochs of the robust teacher")
    adv_train_steps: int = _f(5, "PGD steps per adversarial-training batch")
    adv_clean_weight: float = _f(0.3, "weight of the clean-image CE in adversarial training (0: PGD images only)")
    num_impressions: int = _f(1200, "Data Impressions per teacher (the students' only training images)")
    iterations: int = _f(200, "Adam steps per impression batch")
    kd_epochs: int = _f(40, "KD epochs of each student on its impressions")
    kd_lr: float = _f(0.02, "student SGD learning rate")
    kd_batch_size: int = _f(64, "student KD batch size")
    kd_augment: str = _f("crop", "student augmentation: crop (pad-crop), crop_flip or none")
    temperature: float = _f(4.0, "KD temperature")


@dataclass
class UAPConfig(TaskConfig):
    """``dfkd-fast uap``: data-free universal adversarial perturbation trained on Data Impressions."""

    num_impressions: int = _f(400, "Data Impressions synthesized as the transfer set")
    iterations: int = _f(150, "Adam steps per impression batch")
    eps: float = _f(10 / 255, "L-inf budget of the UAP")
    epochs: int = _f(10, "generator epochs over the transfer set")
    lr: float = _f(1e-2, "generator Adam learning rate")
    diversity: float = _f(0.1, "diversity-loss weight alpha")


@dataclass
class UDAConfig(TaskConfig):
    """``dfkd-fast uda``: source-free ADDA with Data Impressions between MNIST-5k and digits."""

    direction: str = _f("mnist->digits", "mnist->digits or digits->mnist")
    num_impressions: int = _f(400, "Data Impressions of the source model")
    iterations: int = _f(150, "Adam steps per impression batch")
    steps: int = _f(300, "adversarial adaptation steps")
    kd: float = _f(1.0, "impression-consistency weight (0: plain ADDA)")


@dataclass
class ClassIncrementalConfig(TaskConfig):
    """``dfkd-fast class-incremental``: classes 0-4 then 5-9; fine-tuning, LwF and Data Impressions."""

    methods: str = _f("finetune,lwf,data_impressions", "comma-separated methods")
    epochs: int = _f(8, "epochs of each training stage")
    num_impressions: int = _f(500, "Data Impressions of the old classes")
    iterations: int = _f(150, "Adam steps per impression batch")


@dataclass
class ImpressionConfig(TaskConfig):
    """``dfkd-fast impression``: Impression-Space translation (mnist->digits), selection or one-shot synthesis."""

    mode: str = _f("translate", "translate, select or one-shot")
    steps: int = _f(200, "Adam steps (translate, one-shot)")
    lam: float = _f(1.0, "content weight of translation")
    num_source: int = _f(32, "source images translated / labeled images for selection")
    top_k: int = _f(100, "selected pool images (select)")
    num_samples: int = _f(8, "images synthesized (one-shot)")
    photo: str = _f("", "one-shot input: a scikit-image photo name (camera, coins ...); empty: a test digit")


def _device(cfg: TaskConfig) -> Any:
    from dfkd_fast.runner import resolve_device

    return resolve_device(cfg.device)


def _data(name: str, split: str, size: int) -> tuple[Any, Any]:
    from dfkd_fast import datasets

    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {name!r}")
    return getattr(datasets, name)(split, image_size=size)


def _model(cfg: TaskConfig, dataset: str | None = None, num_classes: int = 10) -> Any:
    from dfkd_fast.models import build_model, load_model
    from dfkd_fast.teachers import cached_mnist_teacher, train_classifier

    dataset = dataset or cfg.dataset
    dev = _device(cfg)
    if cfg.weights is not None:
        if not os.path.isfile(cfg.weights):
            raise FileNotFoundError(f"--weights: file {cfg.weights!r} not found")
        return load_model(cfg.teacher, cfg.weights, num_classes, 1, cfg.image_size).to(dev).eval()
    if cfg.teacher_epochs < 1:
        raise ValueError(f"--teacher-epochs must be >= 1, got {cfg.teacher_epochs}")
    if dataset == "mnist5k":
        return cached_mnist_teacher(cfg.teacher, epochs=cfg.teacher_epochs, seed=cfg.seed, image_size=cfg.image_size,
                                    device=dev)[0]
    x, y = _data(dataset, "train", cfg.image_size)
    model = build_model(cfg.teacher, num_classes, 1, cfg.image_size)
    train_classifier(model, x, y, epochs=cfg.teacher_epochs, lr=2e-3, device=dev, seed=cfg.seed)
    return model.eval()


def _test(cfg: TaskConfig, dataset: str | None = None) -> tuple[Any, Any]:
    if cfg.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {cfg.num_images}")
    x, y = _data(dataset or cfg.dataset, "test", cfg.image_size)
    return x[:cfg.num_images], y[:cfg.num_images]


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _write(cfg: TaskConfig, payload: dict[str, Any]) -> str:
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "result.json")
    with open(path, "w") as f:
        json.dump(_clean({"config": dataclasses.asdict(cfg), **payload}), f, indent=2)
    return path


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.2f}"


def run_robustness(cfg: RobustnessConfig) -> str:
    """Attack the model (and a PGD-trained copy) on real test images; returns a markdown table."""
    import copy

    from dfkd_fast.tasks.robustness import ATTACKS, adversarial_train, robustness

    attacks = [a.strip() for a in cfg.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ValueError(f"--attacks must list some of {ATTACKS}, got {cfg.attacks!r}")
    model = _model(cfg)
    x, y = _test(cfg)
    models = {"natural": model}
    if cfg.adv_train_epochs > 0:
        robust = copy.deepcopy(model)
        xtr, ytr = _data(cfg.dataset, "train", cfg.image_size)
        adversarial_train(robust, xtr, ytr, eps=cfg.eps, steps=min(cfg.steps, 7), epochs=cfg.adv_train_epochs,
                          seed=cfg.seed)
        models["pgd-trained"] = robust
    rows = []
    for name, m in models.items():
        for a in attacks:
            r = robustness(m, x, y, a, cfg.eps, cfg.steps, seed=cfg.seed)
            rows.append({"model": name, **dataclasses.asdict(r)})
    path = _write(cfg, {"rows": rows})
    lines = ["| model | attack | eps | natural % | adversarial % | fooling rate % |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['attack']} | {r['eps']:.3f} | {_pct(r['natural_acc'])} | "
              f"{_pct(r['adversarial_acc'])} | {_pct(r['fooling_rate'])} |" for r in rows]
    return "\n".join(lines + [f"result: {path}"])


def run_robust_distill(cfg: RobustDistillConfig) -> str:
    """Table 4 of the Data Impressions paper: writes ``result.json``, ``robust_distill.md`` and the three trained
    models (``robust_teacher``, ``student``, ``robust_student`` ``.safetensors``) to ``--out``; returns the table."""
    from dfkd_fast.models import build_model, load_model, save_model
    from dfkd_fast.tasks.robustness import ATTACKS, robust_distill

    attacks = [a.strip() for a in cfg.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ValueError(f"--attacks must list some of {ATTACKS}, got {cfg.attacks!r}")
    if cfg.kd_augment not in ("crop", "crop_flip", "none"):
        raise ValueError(f"--kd-augment must be crop, crop_flip or none, got {cfg.kd_augment!r}")
    dev = _device(cfg)
    teacher = _model(cfg)
    robust = None
    if cfg.robust_weights is not None:
        if not os.path.isfile(cfg.robust_weights):
            raise FileNotFoundError(f"--robust-weights: file {cfg.robust_weights!r} not found")
        robust = load_model(cfg.teacher, cfg.robust_weights, 10, 1, cfg.image_size).to(dev).eval()
    train = None if robust is not None else _data(cfg.dataset, "train", cfg.image_size)
    test = _test(cfg)
    r = robust_distill(teacher, lambda: build_model(cfg.student, 10, 1, cfg.image_size).to(dev), train, test,
                       robust_teacher=robust, attacks=attacks, eps=cfg.eps, steps=cfg.steps,
                       adv_train_epochs=cfg.adv_train_epochs, adv_train_steps=cfg.adv_train_steps,
                       adv_clean_weight=cfg.adv_clean_weight, num_impressions=cfg.num_impressions,
                       impression_iterations=cfg.iterations, kd_epochs=cfg.kd_epochs, kd_lr=cfg.kd_lr,
                       temperature=cfg.temperature, kd_batch_size=cfg.kd_batch_size,
                       kd_augment=False if cfg.kd_augment == "none" else cfg.kd_augment, seed=cfg.seed,
                       backend=cfg.backend)
    os.makedirs(cfg.out, exist_ok=True)
    weights = {}
    for key in ("robust_teacher", "student", "robust_student"):
        weights[key] = os.path.join(cfg.out, f"{key}.safetensors")
        save_model(r.models[key], weights[key])
    table = r.table()
    md = os.path.join(cfg.out, "robust_distill.md")
    with open(md, "w") as f:
        f.write(f"# Data Impressions robustness (paper Table 4): {cfg.teacher} -> {cfg.student} on {cfg.dataset}\n\n"
                f"{table}\n")
    path = _write(cfg, {"rows": r.rows, "attacks": list(r.attacks), "eps": r.eps, "steps": r.steps,
                        "num_images": len(test[1]), "num_impressions": r.num_impressions,
                        "student_kd_loss": r.student_kd_loss, "seconds": r.seconds, "weights": weights})
    return f"{table}\ntable: {md} | result: {path}"


def run_uap(cfg: UAPConfig) -> str:
    """Data-free UAP from Data Impressions; fooling rate on real images vs random noise of the same norm."""
    from dfkd_fast.tasks._common import synthesize_impressions
    from dfkd_fast.tasks.uap import uap

    model = _model(cfg)
    x, _ = _test(cfg)
    imp, _, secs = synthesize_impressions(model, cfg.num_impressions, (1, cfg.image_size, cfg.image_size),
                                          iterations=cfg.iterations, seed=cfg.seed, backend=cfg.backend)
    r = uap(model, imp, x, eps=cfg.eps, epochs=cfg.epochs, lr=cfg.lr, diversity=cfg.diversity, seed=cfg.seed,
            out_png=os.path.join(cfg.out, "uap.png"))
    path = _write(cfg, {"fooling_rate": r.fooling_rate, "random_fooling_rate": r.random_fooling_rate,
                        "transfer_fooling_rate": r.transfer_fooling_rate, "l2_norm": r.l2_norm,
                        "linf_norm": r.linf_norm, "impression_seconds": secs, "seconds": r.seconds, "png": r.path})
    return (f"UAP (eps {cfg.eps:.4f}, {len(imp)} Data Impressions): fooling rate {_pct(r.fooling_rate)}% on "
            f"{len(x)} real images vs {_pct(r.random_fooling_rate)}% for random noise of the same L2 norm "
            f"({r.l2_norm:.3f}) | image: {r.path} | result: {path}")


def run_uda(cfg: UDAConfig) -> str:
    """Source-free ADDA in one direction; returns source-only vs adapted target accuracy."""
    from dfkd_fast.tasks._common import synthesize_impressions
    from dfkd_fast.tasks.source_free_uda import source_free_uda

    pairs = {"mnist->digits": ("mnist5k", "digits"), "digits->mnist": ("digits", "mnist5k")}
    if cfg.direction not in pairs:
        raise ValueError(f"--direction must be one of {list(pairs)}, got {cfg.direction!r}")
    src, tgt = pairs[cfg.direction]
    model = _model(cfg, src)
    xt, _ = _data(tgt, "train", cfg.image_size)
    test = _test(cfg, tgt)
    imp, _, secs = synthesize_impressions(model, cfg.num_impressions, (1, cfg.image_size, cfg.image_size),
                                          iterations=cfg.iterations, seed=cfg.seed, backend=cfg.backend)
    r = source_free_uda(model, imp, xt, test, steps=cfg.steps, kd=cfg.kd, seed=cfg.seed)
    path = _write(cfg, {"direction": cfg.direction, "source_only_acc": r.source_only_acc,
                        "adapted_acc": r.adapted_acc, "impression_seconds": secs, "seconds": r.seconds})
    return (f"{cfg.direction}: source-only {_pct(r.source_only_acc)}% -> adapted {_pct(r.adapted_acc)}% on "
            f"{len(test[1])} target test images ({len(imp)} impressions, {r.steps} steps) | result: {path}")


def run_class_incremental(cfg: ClassIncrementalConfig) -> str:
    """Classes 0-4 then 5-9 of ``--dataset``; returns the per-method table."""
    from dfkd_fast.tasks.class_incremental import class_incremental

    x, y = _data(cfg.dataset, "train", cfg.image_size)
    xt, yt = _test(cfg)
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    r = class_incremental(x, y, xt, yt, arch=cfg.teacher, methods=methods, epochs_old=cfg.epochs,
                          epochs_new=cfg.epochs, epochs_combined=cfg.epochs, num_impressions=cfg.num_impressions,
                          impression_iterations=cfg.iterations, seed=cfg.seed, device=_device(cfg),
                          backend=cfg.backend)
    path = _write(cfg, {"step1": dataclasses.asdict(r.step1), "rows": {k: dataclasses.asdict(v)
                                                                         for k, v in r.rows.items()},
                        "num_impressions": r.num_impressions})
    return r.table() + f"\nresult: {path}"


def run_impression(cfg: ImpressionConfig) -> str:
    """Impression-Space translation (dataset -> the other dataset), selection, or one-shot synthesis."""
    from dfkd_fast.tasks.impression import impression_select, impression_translate, one_shot

    model = _model(cfg)
    if cfg.mode == "translate":
        other = "digits" if cfg.dataset == "mnist5k" else "mnist5k"
        xs, _ = _test(cfg)
        xt, _ = _data(other, "test", cfg.image_size)
        r = impression_translate(xs[:cfg.num_source], xt[:256], model, cfg.lam, cfg.steps, seed=cfg.seed,
                                 out_dir=cfg.out, backend=cfg.backend)
        path = _write(cfg, {"distance_before": r.distance_before, "distance_after": r.distance_after,
                            "pngs": r.paths})
        return (f"translate {cfg.dataset} -> {other}: impression distance {r.distance_before:.4g} -> "
                f"{r.distance_after:.4g} | grids: {', '.join(r.paths.values())} | result: {path}")
    if cfg.mode == "select":
        pool, pool_y = _test(cfg)
        other = "digits" if cfg.dataset == "mnist5k" else "mnist5k"
        lab_x, lab_y = _data(cfg.dataset, "train", cfg.image_size)
        cls = int(lab_y[0])
        labeled = lab_x[lab_y == cls][:cfg.num_source]
        ox, _ = _data(other, "test", cfg.image_size)
        import torch

        mixed = torch.cat([pool, ox[:len(pool)]])
        in_domain = torch.cat([torch.ones(len(pool)), torch.zeros(min(len(ox), len(pool)))])
        k = min(cfg.top_k, len(mixed))
        r = impression_select(mixed, labeled, model, k)
        frac_dom = float(in_domain[r.indices].mean())
        same = r.indices[r.indices < len(pool)]
        frac_cls = float((pool_y[same] == cls).float().mean()) if len(same) else float("nan")
        path = _write(cfg, {"class": cls, "k": k, "fraction_in_domain": frac_dom, "fraction_same_class": frac_cls,
                            "indices": r.indices.tolist()})
        return (f"select top {k} of {len(mixed)} ({cfg.dataset} + {other}) near {len(labeled)} labeled images of "
                f"class {cls}: {100 * frac_dom:.1f}% from {cfg.dataset}, {_pct(frac_cls)}% of those of class {cls} "
                f"| result: {path}")
    if cfg.mode == "one-shot":
        if cfg.photo:
            from dfkd_fast.datasets import sample_photos

            img = sample_photos(cfg.image_size, (cfg.photo,))[0].mean(0, keepdim=True)
        else:
            img = _test(cfg)[0][0]
        r = one_shot(img, model, cfg.num_samples, cfg.steps, seed=cfg.seed, out_dir=cfg.out, backend=cfg.backend)
        path = _write(cfg, {"distance": r.distance, "pngs": r.paths})
        return f"one-shot: {len(r.images)} images, code distance {r.distance:.4g} | grids: " \
               f"{', '.join(r.paths.values())} | result: {path}"
    raise ValueError(f"--mode must be translate, select or one-shot, got {cfg.mode!r}")
