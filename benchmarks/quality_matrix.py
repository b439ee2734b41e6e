"""Cross-architecture quality matrix: every synthesis method on teachers it was not tuned on (issue 13, item 1).

Teachers of four families are trained here on bundled real data (cached): LeNet-5 (no BN, fully connected head),
LeNet-5-BN, a ResNet-8-style BN net with global average pooling (:class:`ResNet8GAP`, widths 16/32/64) and
WRN-16-1, each on MNIST-5k (4,000 / 1,000) and on scikit-learn digits (1,438 / 359, bilinearly upsampled to
32x32). Each teacher gets a student of another family (:data:`STUDENT_OF`: LeNet-5-half, the BN-free
:class:`SmallCNN`, the half-width ResNet-8 ``ResNet8GAP(width=8)``).

Every method runs in its paper's mode with its library defaults; only sizes (iterations, rounds, set size) are set
here:

* online (generator methods ``dafl``, ``zskt``, ``dfq``, ``cmi``, ``fast_meta``):
  :func:`dfkd_fast.tasks.distill.distill_online`, ``rounds`` x ``kd_steps`` student steps (as many as offline KD:
  20 x 15 = 30 epochs x 640 / 64), generators of width ``gen_ngf`` (32: 1-channel 32x32 digits; the CIFAR
  width 64 costs 0.6 s per generator step on one core, 5 minutes per DAFL cell);
* offline (pixel methods ``data_impressions``, ``class_impressions``, ``deep_inversion``): synthesize
  ``num_images`` class-balanced images (DeepInversion with ``adv=0``: there is no student in the loop), then
  :func:`dfkd_fast.tasks.distill.distill` for ``kd_epochs``.
  ``impression_space`` is not in the matrix: it inverts given *real* reference images, so it is not data-free.

Methods that need BatchNorm statistics (``needs_bn``: dfq, cmi, fast_meta, deep_inversion) are skipped on the
BN-free LeNet-5 teacher, and the cell says so. Each cell records the student's real test accuracy, the same
student distilled from the same teacher on the real training images with the same KD recipe (KD-on-real), the
ratio of the two, and the synthesis seconds; when :mod:`dfkd_fast.health` is installed, also the health score of
the transfer set (online: the last ``num_images`` synthesized images) and, over all cells, its Spearman rank
correlation with the students' accuracy. Targets (issue 13): every method's worst cell >= 0.85x, the best
method's worst cell >= 0.95x, rank correlation >= 0.7.

Outputs ``quality_matrix.{json,md,png}`` in ``--out`` (``--quick``: ``quality_matrix_quick.*``), rewritten after
every cell; ``--resume`` skips the cells already finished in the json (a killed run loses at most one cell).
``--estimate`` times each method's cell at ``--estimate-fraction`` of the sizes on two anchor teachers (LeNet-5-BN
and WRN-16-1), extrapolates to every cell by the teachers' measured cost and prints the full run's total.
Single-threaded by default (``--threads 1``): the fastest setting for these small nets on a shared 2-core machine.

Run: ``nice -n 19 python benchmarks/quality_matrix.py`` (full), ``--quick`` (2 methods x 2 teachers, < 2 min),
``--estimate`` (sizing), ``--methods a,b --pairs lenet5:digits,wrn16_1:mnist5k`` (a subset).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dfkd_fast.datasets import digits, mnist5k
from dfkd_fast.models import build_model, load_state_dict_file, save_model
from dfkd_fast.models.resnet import BasicBlock
from dfkd_fast.synthesis import REGISTRY, build_synthesizer
from dfkd_fast.tasks._common import synthesize_impressions
from dfkd_fast.tasks.distill import distill, distill_online
from dfkd_fast.teachers import default_cache_dir, evaluate, train_classifier

K, C, S = 10, 1, 32
ONLINE = ("dafl", "zskt", "dfq", "cmi", "fast_meta")
OFFLINE = ("data_impressions", "class_impressions", "deep_inversion")
METHODS = OFFLINE + ONLINE
TEACHERS = ("lenet5", "lenet5_bn", "resnet8", "wrn16_1")
DATASETS = ("mnist5k", "digits")
#: each teacher's student, of another family
STUDENT_OF = {"lenet5": "resnet8_half", "lenet5_bn": "small_cnn", "resnet8": "lenet5_half", "wrn16_1": "small_cnn"}
TARGET_EVERY, TARGET_BEST, TARGET_RHO = 0.85, 0.95, 0.7

#: sizes of the full run: ``--estimate`` gave 82.9 min on the shared 2-core machine (56 cells 72 min, teachers and
#: KD-on-real 11 min); single full cells ran 5-30% over their estimate, so plan for ~90-100 min
FULL: dict[str, Any] = {
    "teacher_epochs": 12, "kd_real_steps": 600, "kd_epochs": 30, "num_images": 1280, "synth_batch": 64,
    "kd_batch": 64, "kd_lr": 0.05, "kd_T": 4.0, "kd_clip": 5.0, "rounds": 40, "kd_steps": 15,
    "iterations": {"data_impressions": 120, "class_impressions": 120, "deep_inversion": 160, "cmi": 20,
                   "fast_meta": 5, "dafl": 1, "zskt": 1, "dfq": 1},
    "fast_meta_warmup": 3, "gen_ngf": 32,
}
QUICK: dict[str, Any] = {
    "teacher_epochs": 2, "kd_real_steps": 80, "kd_epochs": 3, "num_images": 64, "synth_batch": 32,
    "kd_batch": 32, "kd_lr": 0.05, "kd_T": 4.0, "kd_clip": 5.0, "rounds": 3, "kd_steps": 3,
    "iterations": {"data_impressions": 8, "class_impressions": 8, "deep_inversion": 8, "cmi": 4,
                   "fast_meta": 2, "dafl": 1, "zskt": 1, "dfq": 1},
    "fast_meta_warmup": 1, "gen_ngf": 8,
}
QUICK_METHODS, QUICK_PAIRS = ("data_impressions", "dfq"), (("lenet5", "digits"), ("lenet5_bn", "digits"))


class ResNet8GAP(nn.Module):
    """ResNet-8, CIFAR style: 3x3 conv (``width``) + BN, three stages of one :class:`BasicBlock` (widths w, 2w, 4w;
    strides 1, 2, 2), global average pooling, linear. 8 weight layers. (N, C, H, W) -> (N, K)."""

    def __init__(self, num_classes: int = K, in_channels: int = C, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class SmallCNN(nn.Module):
    """BN-free small CNN: three 3x3 conv + ReLU + 2x2 max-pool (16, 32, 64 channels), one linear layer on the
    flattened (64, H/8, W/8) map. (N, C, H, W) -> (N, K)."""

    def __init__(self, num_classes: int = K, in_channels: int = C, image_size: int = S) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(64 * (image_size // 8) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def make_net(name: str) -> nn.Module:
    """A fresh classifier for a 1x32x32, 10-class input: a zoo name or one of the benchmark's own nets."""
    if name == "resnet8":
        return ResNet8GAP(width=16)
    if name == "resnet8_half":
        return ResNet8GAP(width=8)
    if name == "small_cnn":
        return SmallCNN()
    return build_model(name, K, C, S)


def load_data(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, 32, 32) in [0, 1], y (N,)) of ``dataset`` (``mnist5k`` or ``digits``)."""
    if dataset == "mnist5k":
        return mnist5k(split, S)
    if dataset == "digits":
        return digits(split, S)
    raise ValueError(f"--pairs: unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_teacher(arch: str, dataset: str, p: dict, cache_dir: str, seed: int) -> tuple[nn.Module, float, float]:
    """Train (or load from ``cache_dir``) ``arch`` on ``dataset``'s train split: Adam lr 3e-3, weight decay 5e-4,
    batch 64, one-cycle, affine augmentation (the recipe of ``cached_mnist_teacher``).

    Returns (teacher in eval mode, test accuracy, training seconds; 0 when loaded)."""
    path = os.path.join(cache_dir, f"qmatrix-{dataset}-{arch}-e{p['teacher_epochs']}-seed{seed}.safetensors")
    model = make_net(arch)
    xt, yt = load_data(dataset, "test")
    secs = 0.0
    loaded = False
    if os.path.isfile(path):
        try:
            model.load_state_dict(load_state_dict_file(path))
            loaded = True
        except (RuntimeError, ValueError) as e:  # e.g. the net's definition changed since it was cached
            _log(f"teacher cache {path} is unusable ({type(e).__name__}); retraining")
    if not loaded:
        x, y = load_data(dataset, "train")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_net(arch)
        h = train_classifier(model, x, y, epochs=p["teacher_epochs"], lr=3e-3, batch_size=64, seed=seed,
                             weight_decay=5e-4)
        secs = float(h["seconds"])
        os.makedirs(cache_dir, exist_ok=True)
        save_model(model, path, {"arch": arch, "dataset": dataset, "epochs": str(p["teacher_epochs"])})
    model.eval()
    return model, evaluate(model, xt, yt), secs


def _student(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make_net(name)


def _kd(student: nn.Module, teacher: nn.Module, images: torch.Tensor, test: tuple, p: dict, epochs: int,
        seed: int) -> float:
    """Offline KD with the matrix's one recipe: SGD lr ``kd_lr``, T ``kd_T``, gradient-norm clip ``kd_clip``,
    cosine, pad-crop. -> test acc."""
    res = distill(student, teacher, images, epochs=epochs, lr=p["kd_lr"], T=p["kd_T"], batch_size=p["kd_batch"],
                  grad_clip=p["kd_clip"], augment="crop", test_data=test, progress=False, curves=False, seed=seed)
    return float(res.final_acc)


def real_epochs(n: int, p: dict) -> int:
    """KD-on-real epochs: the fewest whole epochs of ``ceil(n / kd_batch)`` steps that reach ``kd_real_steps``."""
    return max(1, math.ceil(p["kd_real_steps"] / math.ceil(n / p["kd_batch"])))


def _offline_images(method: str, teacher: nn.Module, p: dict, seed: int) -> tuple[torch.Tensor, float]:
    n, it = p["num_images"], p["iterations"][method]
    if method in ("data_impressions", "class_impressions"):
        imgs, _, secs = synthesize_impressions(teacher, n, (C, S, S), K, method=method, batch_size=p["synth_batch"],
                                               iterations=it, seed=seed)
        return imgs, secs
    flags = [q.requires_grad for q in teacher.parameters()]
    bs = min(p["synth_batch"], n)
    synth = build_synthesizer(method, teacher, K, (C, S, S), batch_size=bs, seed=seed, iterations=it, adv=0.0)
    out, secs, done = [], 0.0, 0
    try:
        while done < n:
            targets = (torch.arange(done, done + bs) % K).to(synth.device)  # class-balanced
            r = synth.synthesize(targets)
            secs += r.seconds
            out.append(r.images[:n - done].detach().cpu())
            done += len(out[-1])
    finally:
        for q, f in zip(teacher.parameters(), flags, strict=True):
            q.requires_grad_(f)
    return torch.cat(out), secs


def _online(method: str, teacher: nn.Module, student: nn.Module, test: tuple, p: dict,
            seed: int) -> tuple[float, float, torch.Tensor]:
    """distill_online in the paper's schedule. -> (student test acc, synthesis s, last ``num_images`` images)."""
    synth = build_synthesizer(method, teacher, K, (C, S, S), batch_size=p["synth_batch"], seed=seed,
                              student=student, iterations=p["iterations"][method], ngf=p["gen_ngf"])
    kept: list[torch.Tensor] = []
    orig = synth.synthesize

    def recording(*a: Any, **kw: Any) -> Any:  # keep what the method synthesized, for the health score
        r = orig(*a, **kw)
        kept.append(r.images.detach().cpu())
        while sum(len(k) for k in kept[1:]) >= p["num_images"]:
            kept.pop(0)
        return r

    synth.synthesize = recording  # type: ignore[method-assign]
    warm = p["fast_meta_warmup"] if method == "fast_meta" else None  # None: the library's rule
    res = distill_online(student, teacher, synth, p["rounds"], p["kd_steps"], rounds_per_epoch=p["rounds"],
                         lr=p["kd_lr"], T=p["kd_T"], batch_size=p["kd_batch"], grad_clip=p["kd_clip"],
                         warmup_rounds=warm, augment="crop",
                         test_data=test, progress=False, seed=seed)
    for q in teacher.parameters():
        q.requires_grad_(False)
    return float(res.final_acc), float(res.synth_seconds), torch.cat(kept)[-p["num_images"]:]


def _health() -> Callable[..., dict] | None:
    try:
        from dfkd_fast.health import health_report
    except ImportError:
        return None
    return health_report


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties): Pearson correlation of the ranks; nan if constant."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else float("nan")


def cell_key(method: str, teacher: str, dataset: str) -> str:
    return f"{method}|{teacher}|{dataset}|{STUDENT_OF[teacher]}"


class Matrix:
    """The run's state: teachers, KD-on-real references and cells, saved as json/md/png after every change."""

    def __init__(self, res: dict, out: str, stem: str, p: dict, seed: int, cache_dir: str,
                 save_sets: str | None = None) -> None:
        self.res, self.out, self.stem, self.p, self.seed, self.cache_dir = res, out, stem, p, seed, cache_dir
        self.save_sets = save_sets
        self._teachers: dict[tuple[str, str], nn.Module] = {}
        self._t0 = time.perf_counter() - float(res.get("total_s", 0.0))

    def teacher(self, arch: str, dataset: str) -> nn.Module:
        if (arch, dataset) not in self._teachers:
            t, acc, secs = get_teacher(arch, dataset, self.p, self.cache_dir, self.seed)
            self._teachers[(arch, dataset)] = t
            self.res["teachers"][f"{arch}|{dataset}"] = {"acc": acc, "train_s": secs}
            _log(f"teacher {arch} on {dataset}: {100 * acc:.2f}% ({secs:.0f} s training)")
        return self._teachers[(arch, dataset)]

    def reference(self, arch: str, dataset: str) -> float:
        """KD-on-real: the student distilled from the teacher on the real training images (same recipe)."""
        key = f"{arch}|{dataset}|{STUDENT_OF[arch]}"
        if key not in self.res["references"]:
            teacher = self.teacher(arch, dataset)
            x, _ = load_data(dataset, "train")
            t0 = time.perf_counter()
            acc = _kd(_student(STUDENT_OF[arch], self.seed), teacher, x, load_data(dataset, "test"), self.p,
                      real_epochs(len(x), self.p), self.seed)
            self.res["references"][key] = {"acc": acc, "seconds": time.perf_counter() - t0, "images": len(x)}
            _log(f"KD-on-real {key}: {100 * acc:.2f}%")
            self.save()
        return float(self.res["references"][key]["acc"])

    def run_cell(self, method: str, arch: str, dataset: str) -> dict:
        """One cell: synthesize + distill, its ratio to KD-on-real, the health score of the transfer set."""
        student_name = STUDENT_OF[arch]
        cell: dict[str, Any] = {"method": method, "teacher": arch, "dataset": dataset, "student": student_name,
                                "mode": "online" if method in ONLINE else "offline"}
        teacher = self.teacher(arch, dataset)
        if REGISTRY[method].needs_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in teacher.modules()):
            cell.update(status="skipped", reason=f"{method} needs BatchNorm statistics; {arch} has no BN")
            return cell
        ref = self.reference(arch, dataset)
        test = load_data(dataset, "test")
        t0 = time.perf_counter()
        student = _student(student_name, self.seed)
        if method in ONLINE:
            acc, secs, imgs = _online(method, teacher, student, test, self.p, self.seed)
        else:
            imgs, secs = _offline_images(method, teacher, self.p, self.seed)
            acc = _kd(student, teacher, imgs, test, self.p, self.p["kd_epochs"], self.seed)
        cell.update(status="done", acc=acc, kd_real=ref, ratio=acc / ref if ref > 0 else float("nan"),
                    synth_s=secs, cell_s=time.perf_counter() - t0, images=len(imgs))
        if self.save_sets:  # the transfer set (fp16), e.g. to study data-free health statistics against ``acc``
            os.makedirs(self.save_sets, exist_ok=True)
            torch.save(imgs.half(), os.path.join(self.save_sets, cell_key(method, arch, dataset).replace("|", "-")
                                                 + ".pt"))
        health = _health()
        if health is not None:
            try:
                rep = health(imgs, teacher, seed=self.seed)
                cell["health"] = float(rep["score"])
                cell["health_warnings"] = [str(w) for w in rep.get("warnings", [])][:5]
            except Exception as e:  # the health report is optional; its failure is recorded, the cell stands
                cell["health_error"] = f"{type(e).__name__}: {e}"
        return cell

    def summarize(self) -> None:
        cells = [c for c in self.res["cells"].values() if c.get("status") == "done"]
        worst: dict[str, dict] = {}
        for c in cells:
            if c["method"] not in worst or c["ratio"] < worst[c["method"]]["ratio"]:
                worst[c["method"]] = {"ratio": c["ratio"], "cell": f"{c['teacher']}/{c['dataset']}->{c['student']}"}
        for m in worst:
            rs = sorted(c["ratio"] for c in cells if c["method"] == m)
            worst[m]["median"] = rs[len(rs) // 2] if len(rs) % 2 else 0.5 * (rs[len(rs) // 2 - 1] + rs[len(rs) // 2])
            worst[m]["cells_ge_085"] = f"{sum(r >= TARGET_EVERY for r in rs)}/{len(rs)}"
        summ: dict[str, Any] = {"worst": worst}
        if worst:
            best = max(worst, key=lambda m: worst[m]["ratio"])
            summ["every_method_worst_ge_085"] = all(w["ratio"] >= TARGET_EVERY for w in worst.values())
            summ["best_method"] = best
            summ["best_method_worst_ge_095"] = worst[best]["ratio"] >= TARGET_BEST
        hc = [c for c in cells if "health" in c]
        if len(hc) >= 2:
            rho = spearman([c["health"] for c in hc], [c["acc"] for c in hc])
            summ["health_spearman"] = rho
            summ["health_cells"] = len(hc)
            summ["health_rho_ge_07"] = bool(rho >= TARGET_RHO) if rho == rho else False
        self.res["summary"] = summ

    def save(self) -> None:
        self.res["total_s"] = time.perf_counter() - self._t0
        self.summarize()
        os.makedirs(self.out, exist_ok=True)
        base = os.path.join(self.out, self.stem)
        tmp = base + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=2, default=str)
        os.replace(tmp, base + ".json")
        with open(base + ".md", "w") as f:
            f.write(to_markdown(self.res))
        heatmap(self.res, base + ".png")


def _columns(res: dict) -> list[tuple[str, str, str]]:
    cols = []
    for c in res["cells"].values():
        k = (c["teacher"], c["dataset"], c["student"])
        if k not in cols:
            cols.append(k)
    return cols


def _methods(res: dict) -> list[str]:
    seen = {c["method"] for c in res["cells"].values()}
    return [m for m in METHODS if m in seen]


def heatmap(res: dict, path: str) -> None:
    """Methods x (teacher/dataset->student) cells, colour = student / KD-on-real, annotated; n/a cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols, rows = _columns(res), _methods(res)
    data = np.full((max(1, len(rows)), max(1, len(cols))), np.nan)
    text = [["" for _ in range(data.shape[1])] for _ in range(data.shape[0])]
    for c in res["cells"].values():
        i, j = rows.index(c["method"]), cols.index((c["teacher"], c["dataset"], c["student"]))
        if c.get("status") == "done":
            data[i, j] = c["ratio"]
            text[i][j] = f"{c['ratio']:.2f}" + (f"\nh {c['health']:.2f}" if "health" in c else "")
        else:
            text[i][j] = "no BN" if c.get("status") == "skipped" else c.get("status", "?")
    fig, ax = plt.subplots(figsize=(1.3 * data.shape[1] + 2.5, 0.55 * data.shape[0] + 2.2))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), [f"{t}/{d}\n->{s}" for t, d, s in cols], fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(im, ax=ax, label="student / KD-on-real")
    ax.set_title(f"quality matrix{' (--quick)' if res['quick'] else ''}: student acc / KD-on-real acc", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _parts(res: dict) -> str:
    t = res.get("parts_total_s")
    return f" (parts run side by side: {', '.join(f'{v:.0f}' for v in t)} s)" if t else ""


def to_markdown(res: dict) -> str:
    p = res["params"]
    out = [f"# Cross-architecture quality matrix {'[--quick]' if res['quick'] else ''}", "",
           f"command: `{res['command']}`  ", f"date: {res['date']}  ", f"versions: {res['versions']}  ",
           f"total: {res.get('total_s', 0):.0f} s{_parts(res)}  ",
           *([f"health: rescored with the current dfkd_fast.health: {res['health_rescored']}  "]
             if res.get("health_rescored") else []),
           f"sizes: transfer sets of {p['num_images']} images (offline: class-balanced batches of {p['synth_batch']}, "
           f"then KD {p['kd_epochs']} epochs); online: {p['rounds']} rounds x {p['kd_steps']} student steps, "
           f"batch {p['kd_batch']}; KD-on-real >= {p['kd_real_steps']} steps (whole epochs) on the real train split; "
           f"one KD recipe "
           f"(SGD lr {p['kd_lr']}, T {p['kd_T']}, gradient-norm clip {p.get('kd_clip', 0)}, cosine, pad-crop); "
           f"iterations {p['iterations']}; generator "
           f"width ngf {p['gen_ngf']}  ",
           "ratio = student test accuracy / KD-on-real test accuracy (same teacher, same student, real train "
           "images). Methods that need BatchNorm statistics are skipped on the BN-free LeNet-5. impression_space "
           "is not in the matrix: it inverts given real images, so it is not data-free.", ""]
    if res["teachers"]:
        out += ["| teacher | dataset | test acc % | training s |", "|---|---|---:|---:|"]
        out += [f"| {k.split('|')[0]} | {k.split('|')[1]} | {_pct(v['acc'])} | {v['train_s']:.0f} |"
                for k, v in res["teachers"].items()]
        out.append("")
    if res["references"]:
        out += ["| KD-on-real: teacher | dataset | student | test acc % | images | seconds |",
                "|---|---|---|---:|---:|---:|"]
        out += [f"| {k.split('|')[0]} | {k.split('|')[1]} | {k.split('|')[2]} | {_pct(v['acc'])} | {v['images']} | "
                f"{v['seconds']:.0f} |" for k, v in res["references"].items()]
        out.append("")
    out += ["| method | mode | teacher | dataset | student | student acc % | KD-on-real % | ratio | synthesis s | "
            "cell s | health |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in res["cells"].values():
        head = f"| {c['method']} | {c['mode']} | {c['teacher']} | {c['dataset']} | {c['student']} |"
        if c.get("status") == "done":
            h = f"{c['health']:.3f}" if "health" in c else ("error" if "health_error" in c else "-")
            out.append(f"{head} {_pct(c['acc'])} | {_pct(c['kd_real'])} | {c['ratio']:.3f} | {c['synth_s']:.1f} | "
                       f"{c['cell_s']:.0f} | {h} |")
        else:
            why = c.get("reason") or (c.get("error", "").splitlines() or ["?"])[-1][:100]
            out.append(f"{head} {c.get('status')}: {why} | | | | | |")
    kd_rows = [c for c in res["cells"].values() if "set_kd_acc" in c]
    if kd_rows:
        out += ["", "## Online cells: the student of the run vs a fresh student distilled offline on the run's final "
                f"set ({p['num_images']} images, same KD recipe, {p['kd_epochs']} epochs)", "",
                "| method | teacher | dataset | student | online student % | offline on final set % |",
                "|---|---|---|---|---:|---:|"]
        out += [f"| {c['method']} | {c['teacher']} | {c['dataset']} | {c['student']} | {_pct(c['acc'])} | "
                f"{_pct(c['set_kd_acc'])} |" for c in kd_rows]
    s = res.get("summary", {})
    if s.get("worst"):
        out += ["", "## Worst cell per method", "", "| method | worst ratio | cell | median ratio | cells >= 0.85 |",
                "|---|---:|---|---:|---:|"]
        out += [f"| {m} | {w['ratio']:.3f} | {w['cell']} | {w.get('median', float('nan')):.3f} | "
                f"{w.get('cells_ge_085', '')} |" for m, w in s["worst"].items()]
        out += ["", "## Targets", "",
                f"- every method's worst cell >= {TARGET_EVERY}x: {_met(s.get('every_method_worst_ge_085'))}",
                f"- best method ({s.get('best_method')}) worst cell >= {TARGET_BEST}x: "
                f"{_met(s.get('best_method_worst_ge_095'))}"]
        if "health_spearman" in s:
            out.append(f"- health score rank correlation with student accuracy >= {TARGET_RHO}: "
                       f"{s['health_spearman']:.3f} over {s['health_cells']} cells: {_met(s['health_rho_ge_07'])}")
        else:
            out.append(f"- health score rank correlation >= {TARGET_RHO}: n/a (dfkd_fast.health not available)")
    return "\n".join(out) + "\n"


def _plan(methods: list[str], pairs: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [(m, t, d) for t, d in pairs for m in methods]


def _parse(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; use some of {', '.join(METHODS)}")
    if args.pairs:
        pairs = []
        for tok in args.pairs.split(","):
            t, _, d = tok.partition(":")
            if t not in TEACHERS or d not in DATASETS:
                raise ValueError(f"--pairs: {tok!r} must be TEACHER:DATASET with TEACHER in {', '.join(TEACHERS)} "
                                 f"and DATASET in {', '.join(DATASETS)}")
            pairs.append((t, d))
    else:
        pairs = list(QUICK_PAIRS) if args.quick else [(t, d) for d in DATASETS for t in TEACHERS]
    return methods, pairs


def _step_seconds(net: nn.Module, backward: bool, reps: int = 3) -> float:
    """Median seconds of one forward (+ backward) of ``net`` on a (64, 1, 32, 32) batch."""
    x = torch.rand(64, C, S, S)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if backward:
            net.train()
            net(x).sum().backward()
        else:
            with torch.no_grad():
                net.eval()(x)
        ts.append(time.perf_counter() - t0)
    return sorted(ts[1:])[reps // 2]


def estimate(methods: list[str], pairs: list[tuple[str, str]], p: dict, fraction: float, seed: int,
             cache_dir: str) -> dict:
    """Sizing: time each method's cell at ``fraction`` of the sizes (rounds; offline: iterations and KD epochs)
    on two anchor teachers, the cheapest BN teacher (LeNet-5-BN) and the costliest (WRN-16-1), both on the first
    dataset of ``pairs``; scale by 1 / fraction; fit ``cell_s = a + b * cost`` through the two anchors, where
    ``cost`` is the measured forward+backward seconds of teacher + student (+ teacher forward) on a batch of 64,
    and sum it over every cell of the plan. Teacher training and KD-on-real are estimated from per-step timings
    x step counts. Returns the estimate (seconds)."""
    small = dict(p, rounds=max(1, round(p["rounds"] * fraction)), kd_epochs=max(1, round(p["kd_epochs"] * fraction)),
                 fast_meta_warmup=round(p["fast_meta_warmup"] * fraction),
                 iterations={m: max(1, round(v * fraction)) if m in OFFLINE else v
                             for m, v in p["iterations"].items()})
    cost: dict[str, float] = {}
    teacher_step: dict[str, float] = {}
    for t in TEACHERS:
        tn, sn = make_net(t), make_net(STUDENT_OF[t])
        teacher_step[t] = _step_seconds(tn, True)
        cost[t] = teacher_step[t] + _step_seconds(sn, True) + _step_seconds(tn, False)
    out: dict[str, Any] = {"fraction": fraction, "per_method": {}, "cost_per_teacher_s": cost, "sizes": p}
    total = 0.0
    d0 = pairs[0][1]
    anchors = ("lenet5_bn", "wrn16_1")
    for m in methods:
        cells = [(t, d) for t, d in pairs if not (REGISTRY[m].needs_bn and t == "lenet5")]
        if not cells:
            continue
        full = {}
        for t in anchors:
            refs = {f"{t}|{d0}|{STUDENT_OF[t]}": {"acc": 1.0, "seconds": 0.0, "images": 0}}  # KD-on-real: not timed
            mat = Matrix({"teachers": {}, "references": refs, "cells": {}}, "", "", small, seed, cache_dir)
            mat.teacher(t, d0)
            t0 = time.perf_counter()
            mat.run_cell(m, t, d0)
            secs = time.perf_counter() - t0
            if m in ONLINE:
                full[t] = secs * p["rounds"] / small["rounds"]
            else:  # synthesis scales with iterations, KD with epochs: bound both by the larger factor
                full[t] = secs * max(p["iterations"][m] / small["iterations"][m], p["kd_epochs"] / small["kd_epochs"])
            _log(f"estimate {m} on {t}/{d0}: {secs:.1f} s at fraction {fraction} -> {full[t]:.0f} s per full cell")
        lo, hi = anchors
        b = (full[hi] - full[lo]) / max(cost[hi] - cost[lo], 1e-9)
        a = full[lo] - b * cost[lo]
        per_cell = {t: max(a + b * cost[t], min(full.values())) for t in TEACHERS}
        m_total = sum(per_cell[t] for t, _ in cells)
        out["per_method"][m] = {"anchors_full_s": full, "cells": len(cells), "per_teacher_s": per_cell,
                                "total_s": m_total}
        total += m_total
        _log(f"estimate {m}: {m_total:.0f} s over {len(cells)} cells")
    n_train = {"mnist5k": 4000, "digits": 1438}
    extra = sum(p["teacher_epochs"] * math.ceil(n_train[d] / 64) * teacher_step[t] * 1.3 +
                real_epochs(n_train[d], p) * math.ceil(n_train[d] / p["kd_batch"]) * cost[t] for t, d in pairs)
    out["teachers_and_kd_real_s"] = extra
    out["total_s"] = total + extra
    _log(f"estimated full run: {total:.0f} s cells + {extra:.0f} s teachers and KD-on-real = "
         f"{(total + extra) / 60:.1f} min (cached teachers save part of the second term)")
    return out


def rescore(path: str, sets: str | None, cache_dir: str, health: bool = True, set_kd: bool = False) -> int:
    """From the sets saved by the run that made ``path`` (its ``--save-sets``): ``health`` recomputes every finished
    cell's health score with the installed :mod:`dfkd_fast.health`; ``set_kd`` distills a fresh student offline on
    each online cell's final set (``set_kd_acc``). Rewrites the json/md/png beside ``path``."""
    health_fn = _health() if health else None
    if (health and health_fn is None) or not sets or not os.path.isdir(sets):
        raise ValueError("--rescore/--set-kd need --save-sets DIR with the sets of the run in --out (and "
                         "dfkd_fast.health for --rescore)")
    with open(path) as f:
        res = json.load(f)
    out, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    mat = Matrix(res, out, stem, res["params"], res["seed"], cache_dir)
    run_s = float(res.get("total_s", 0.0))  # the run's time, kept: rescoring is not part of it
    done = 0
    for key, c in res["cells"].items():
        f = os.path.join(sets, key.replace("|", "-") + ".pt")
        if c.get("status") != "done" or not os.path.isfile(f):
            continue
        imgs, teacher = torch.load(f, weights_only=True).float(), mat.teacher(c["teacher"], c["dataset"])
        if health_fn is not None:
            rep = health_fn(imgs, teacher, seed=res["seed"])
            c["health"] = float(rep["score"])
            c["health_warnings"] = [str(w) for w in rep.get("warnings", [])][:5]
        if set_kd and c["mode"] == "online":
            p = res["params"]
            c["set_kd_acc"] = _kd(_student(c["student"], res["seed"]), teacher, imgs,
                                  load_data(c["dataset"], "test"), p, p["kd_epochs"], res["seed"])
            _log(f"{key}: online {100 * c['acc']:.2f}%, offline KD on its final set {100 * c['set_kd_acc']:.2f}%")
            mat._t0 = time.perf_counter() - run_s
            mat.save()
        done += 1
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if health_fn is not None:
        res["health_rescored"] = f"{done} cells, {now} (health recomputed from the saved sets)"
    mat._t0 = time.perf_counter() - run_s
    mat.save()
    _log(f"rescored {done} cells of {path}")
    return 0


def merge(paths: list[str], out: str, stem: str) -> int:
    """Union of the teachers, references and cells of several result files made with the same sizes and seed;
    ``command``/``date``/``total_s`` list each part. Writes ``out/stem.{json,md,png}``."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    for path, r in zip(paths, parts, strict=True):
        if r.get("params") != first.get("params") or r.get("seed") != first.get("seed"):
            raise ValueError(f"--merge: {path} was made with other sizes or --seed than {paths[0]}")
    res: dict[str, Any] = {"teachers": {}, "references": {}, "cells": {}}
    for r in parts:
        for key in ("teachers", "references", "cells"):
            res[key].update(r[key])
    res.update({"quick": first["quick"], "params": first["params"], "seed": first["seed"],
                "command": " ; ".join(r["command"] for r in parts) + " ; then --merge",
                "date": ", ".join(r["date"] for r in parts), "versions": first["versions"],
                "parts_total_s": [r.get("total_s", 0.0) for r in parts]})
    if any("health_rescored" in r for r in parts):
        res["health_rescored"] = "; ".join(r.get("health_rescored", "not rescored") for r in parts)
    mat = Matrix(res, out, stem, first["params"], first["seed"], "")
    mat._t0 = time.perf_counter() - max(res["parts_total_s"])  # wall time: the parts ran side by side
    mat.save()
    _log(f"merged {len(paths)} runs ({len(res['cells'])} cells) into {os.path.join(out, stem)}.{{json,md,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 methods x 2 teachers (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--pairs", default=None, help="comma-separated TEACHER:DATASET subset, e.g. lenet5:digits")
    ap.add_argument("--resume", action="store_true", help="skip the cells already finished in the output json")
    ap.add_argument("--estimate", action="store_true", help="time one cell per method and print the full run's "
                                                            "estimated total (writes no results)")
    ap.add_argument("--estimate-fraction", type=float, default=0.1, help="--estimate: fraction of the sizes timed")
    ap.add_argument("--cache-dir", default=None, help="trained teachers (default: the dfkd_fast cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest for these small "
                                                           "nets on a shared 2-core machine; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-sets", default=None, help="also save each cell's transfer set (fp16 .pt) in this folder")
    ap.add_argument("--rescore", action="store_true",
                    help="recompute the health score of every finished cell of --out's json from the sets saved "
                         "in --save-sets by an earlier run (after a change to dfkd_fast.health), then rewrite it")
    ap.add_argument("--set-kd", action="store_true",
                    help="for every finished online cell of --out's json, distill a fresh student offline (the "
                         "matrix's KD recipe, kd_epochs) on the cell's saved final set: tells a set that does not "
                         "teach from an online run whose student did not learn")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge the results of runs made with the same sizes (e.g. one process per dataset) into "
                         "--out/quality_matrix.{json,md,png}, the summary computed over all their cells")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = json.loads(json.dumps(QUICK if args.quick else FULL))
    methods, pairs = _parse(args)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.estimate:
        if not 0 < args.estimate_fraction <= 1:
            raise ValueError(f"--estimate-fraction must be in (0, 1], got {args.estimate_fraction}")
        est = estimate(methods, pairs, p, args.estimate_fraction, args.seed, cache_dir)
        print(json.dumps(est, indent=2))
        return 0
    stem = "quality_matrix_quick" if args.quick else "quality_matrix"
    if args.merge:
        return merge(args.merge, args.out, stem)
    if args.rescore or args.set_kd:
        return rescore(os.path.join(args.out, stem + ".json"), args.save_sets, cache_dir, health=args.rescore,
                       set_kd=args.set_kd)
    path = os.path.join(args.out, stem + ".json")
    res: dict[str, Any] = {"teachers": {}, "references": {}, "cells": {}}
    if args.resume and os.path.isfile(path):
        with open(path) as f:
            res = json.load(f)
        if res.get("params") != p or res.get("seed") != args.seed:
            raise ValueError(f"--resume: {path} was made with other sizes or --seed; use the same --quick/--seed "
                             "or drop --resume")
    res.update({"quick": args.quick, "params": p, "seed": args.seed,
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                            f"threads {torch.get_num_threads()}, {platform.machine()}, "
                            f"health {'yes' if _health() else 'not installed'}"})
    mat = Matrix(res, args.out, stem, p, args.seed, cache_dir, args.save_sets)
    for m, t, d in _plan(methods, pairs):
        key = cell_key(m, t, d)
        if res["cells"].get(key, {}).get("status") in ("done", "skipped"):
            _log(f"{key}: done before, skipped (--resume)")
            continue
        _log(f"cell {key}")
        try:
            res["cells"][key] = mat.run_cell(m, t, d)
        except Exception:  # a failing cell is recorded and the matrix goes on (and is retried by --resume)
            res["cells"][key] = {"method": m, "teacher": t, "dataset": d, "student": STUDENT_OF[t],
                                 "mode": "online" if m in ONLINE else "offline", "status": "error",
                                 "error": traceback.format_exc()}
        c = res["cells"][key]
        _log(f"  -> {c['status']}" + (f": acc {100 * c['acc']:.2f}% ratio {c['ratio']:.3f} synthesis "
                                      f"{c['synth_s']:.1f} s" if c["status"] == "done" else
                                      f": {c.get('reason') or c.get('error', '').splitlines()[-1]}"))
        mat.save()
    mat.save()
    with contextlib.suppress(OSError), open(os.path.join(args.out, stem + ".md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
