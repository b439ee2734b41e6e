"""The embedded default demo (``dfkd-fast demo``): data-free KD on MNIST-5k in minutes on a CPU.

1. LeNet-5 teacher trained once on the fixed 4,000-image MNIST-5k train split, then cached.
2. Data Impressions (ZSKD; no BatchNorm needed) synthesized from the teacher alone, written as a
   transfer set with a preview grid. Defaults (``DemoConfig``): 12,000 impressions, 150 Adam steps at lr 0.05
   from dim U[0, 0.1] noise (the published lr 10 from U[0, 1] saturates [0, 1] pixels; see
   ``dfkd_fast.synthesis.data_impressions``), then KD with SGD lr 0.01, T 4, 30 epochs, pad-crop.
3. LeNet-5-half distilled from the impressions (data-free) and, for reference, from the 4,000 real images.
4. Everything evaluated on the 1,000 held-out images; a table, the grid and the curves go to ``out``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from dfkd_fast.config import DemoConfig

__all__ = ["DemoResult", "run_demo", "ratio_verdict", "QUICK", "RATIO_TARGET", "CHANCE_MARGIN"]

#: ``--quick`` overrides: a smoke run in well under a minute (accuracies are not meaningful: the table says so
#: when a student stays at chance level).
QUICK = {"num_images": 40, "iterations": 10, "batch_size": 20, "kd_epochs": 2, "teacher_epochs": 1}

#: The cached MNIST teachers take raw [0, 1] pixels (no input normalization).
MEAN, STD = None, None

#: Target of the data-free / student-KD-on-real accuracy ratio: the ZSKD paper's MNIST figures (98.77 / 99.25).
RATIO_TARGET = 0.995
#: A student counts as learned only above chance 1/K by this margin (accuracy in [0, 1]); below it the ratio of
#: two accuracies says nothing and no target is reported as met.
CHANCE_MARGIN = 0.1


def ratio_verdict(synthetic_acc: float, real_acc: float, num_classes: int = 10, target: float = RATIO_TARGET,
                  margin: float = CHANCE_MARGIN) -> str:
    """One line: the data-free / student-KD-on-real accuracy ratio against ``target``.

    "met" needs both students above chance, ``acc >= 1/K + margin``; otherwise the line says which student is
    at chance level and that the ratio is not meaningful (e.g. both at 11 % give a ratio of 1.0).
    """
    floor = 1.0 / num_classes + margin
    ratio = synthetic_acc / real_acc if real_acc > 0 else float("nan")
    at_chance = [name for name, acc in (("data-free", synthetic_acc), ("real-data", real_acc)) if acc < floor]
    if at_chance:
        return (f"data-free / student-KD-on-real ratio: {ratio:.4f} (not meaningful: the {' and '.join(at_chance)} "
                f"student{'s are' if len(at_chance) > 1 else ' is'} at chance level, below {100 * floor:.0f}% = "
                f"1/{num_classes} + {100 * margin:.0f} points; target {target} not met)")
    return (f"data-free / student-KD-on-real ratio: {ratio:.4f} (target {target}, from the ZSKD paper's MNIST "
            f"figures: {'met' if ratio >= target else 'not met'})")


@dataclass
class DemoResult:
    """Accuracies (in [0, 1]) on the 1,000 held-out MNIST-5k images, speeds and timings of the demo."""

    teacher_acc: float
    student_real_acc: float
    student_synthetic_acc: float
    synthesis_images_per_s: float
    num_images: int
    seconds: dict[str, float] = field(default_factory=dict)
    num_classes: int = 10
    out: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of the results."""
        ratio = self.student_synthetic_acc / self.teacher_acc if self.teacher_acc > 0 else float("nan")
        rows = [
            ("teacher LeNet-5 (4,000 real images)", f"{100 * self.teacher_acc:.2f}",
             f"{self.seconds.get('teacher', 0):.1f}"),
            ("student LeNet-5-half, KD on the real 4,000", f"{100 * self.student_real_acc:.2f}",
             f"{self.seconds.get('kd_real', 0):.1f}"),
            (f"student LeNet-5-half, KD on {self.num_images} Data Impressions (data-free)",
             f"{100 * self.student_synthetic_acc:.2f}",
             f"{self.seconds.get('synthesis', 0) + self.seconds.get('kd_synthetic', 0):.1f}"),
        ]
        w = max(len(r[0]) for r in rows)
        lines = [f"| {'model':{w}s} | test acc % | seconds |", f"|{'-' * (w + 2)}|-----------:|--------:|"]
        lines += [f"| {a:{w}s} | {b:>10s} | {c:>7s} |" for a, b, c in rows]
        lines.append(ratio_verdict(self.student_synthetic_acc, self.student_real_acc, self.num_classes))
        lines.append(f"data-free / teacher accuracy ratio: {ratio:.4f} | synthesis: "
                     f"{self.synthesis_images_per_s:.1f} images/s | total {self.seconds.get('total', 0):.1f} s")
        lines.append("outputs: " + ", ".join(f"{k}={v}" for k, v in self.files.items()))
        return "\n".join(lines)


def run_demo(cfg: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    """Run the demo described in the module docstring; returns the table's numbers."""
    from dfkd_fast.datasets import mnist5k
    from dfkd_fast.models import build_model
    from dfkd_fast.runner import resolve_device, run_synthesis
    from dfkd_fast.synthesis import build_synthesizer
    from dfkd_fast.tasks.distill import distill, evaluate_accuracy
    from dfkd_fast.teachers import cached_mnist_teacher
    from dfkd_fast.transfer_set import TransferSet

    cfg = cfg or DemoConfig()
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if cfg.num_images < 1 or cfg.iterations < 1 or cfg.batch_size < 1 or cfg.kd_epochs < 1:
        raise ValueError("demo: --num-images, --iterations, --batch-size and --kd-epochs must be >= 1")
    device = resolve_device(cfg.device)
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    kw: dict = {"device": device, "seed": cfg.seed}
    if cfg.teacher_epochs is not None:
        kw["epochs"] = cfg.teacher_epochs
    if cfg.cache_dir is not None:
        kw["cache_dir"] = cfg.cache_dir
    teacher, _ = cached_mnist_teacher("lenet5", **kw)
    teacher = teacher.to(device).eval()
    seconds["teacher"] = time.perf_counter() - t0
    x_train, _ = mnist5k("train", image_size=32)
    x_test, y_test = mnist5k("test", image_size=32)
    teacher_acc = evaluate_accuracy(teacher, x_test, y_test, MEAN, STD)

    t0 = time.perf_counter()
    synth = build_synthesizer("data_impressions", teacher, 10, (1, 32, 32), batch_size=cfg.batch_size, mean=MEAN,
                              std=STD, device=device, backend=cfg.backend, seed=cfg.seed, iterations=cfg.iterations,
                              lr=cfg.lr, lr_schedule="linear", temperature=cfg.temperature,
                              init_scale=cfg.init_scale)
    ts_dir = os.path.join(cfg.out, "transfer_set")
    summary = run_synthesis(synth, ts_dir, cfg.num_images, meta={"teacher": {"spec": "lenet5 (mnist5k cache)"},
                                                                 "mean": MEAN, "std": STD},
                            shard_size=max(cfg.batch_size, 1024), resume=False, seed=cfg.seed, preview=64,
                            progress=progress)
    seconds["synthesis"] = time.perf_counter() - t0

    kd = {"epochs": cfg.kd_epochs, "lr": cfg.kd_lr, "T": cfg.kd_temperature, "batch_size": 64, "mean": MEAN,
          "std": STD, "test_data": (x_test, y_test), "device": device, "backend": cfg.backend, "seed": cfg.seed,
          "progress": progress}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    student_syn = build_model("lenet5_half", num_classes=10, in_channels=1, image_size=32)
    res_syn = distill(student_syn, teacher, TransferSet(ts_dir).images(), augment=cfg.kd_augment,
                      out_dir=os.path.join(cfg.out, "student_synthetic"), **kd)
    seconds["kd_synthetic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    student_real = build_model("lenet5_half", num_classes=10, in_channels=1, image_size=32)
    res_real = distill(student_real, teacher, x_train, out_dir=os.path.join(cfg.out, "student_real"), **kd)
    seconds["kd_real"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    files = {"grid": summary.preview or "", "curves_synthetic": res_syn.curves or "",
             "curves_real": res_real.curves or "", "transfer_set": ts_dir}
    result = DemoResult(teacher_acc=teacher_acc, student_real_acc=res_real.final_acc,
                        student_synthetic_acc=res_syn.final_acc, synthesis_images_per_s=summary.images_per_s,
                        num_images=summary.images, seconds=seconds, out=cfg.out, files=files)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(result.table() + "\n")
    return result
