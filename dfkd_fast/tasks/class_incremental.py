"""Exemplar-free class-incremental learning with Data Impressions (TPAMI 2021, §4.3) and two baselines.

Step 1 trains a model on the old classes. Step 2 sees only labeled data of the new classes and the old model:

* ``finetune``: the old model's classifier is grown to K_old + K_new outputs and trained with CE on new data.
* ``lwf`` (Li & Hoiem, 2016): grown model, CE on new data + distillation of the old model's outputs on the
  *new* images into the old-class logits: :math:`\\mathrm{CE}(z, y) + \\lambda T^2
  \\mathrm{KL}(\\mathrm{softmax}(o/T) \\| \\mathrm{softmax}(z_{:K_{old}}/T))`.
* ``data_impressions`` (dual distillation, DMC, Zhang et al. 2020, with impressions instead of auxiliary data):
  a new-class model ``n`` is trained on the new data alone; Data Impressions ``x_DI`` of the old classes are
  synthesized from the old model ``o``; the combined model (initialized from the old one, classifier grown)
  regresses the concatenation of both models' mean-centred logits on the transfer set ``x_DI ∪ x_new``:

.. math::
    L = \\frac1{K}\\sum_j \\big(z_j(x) - \\hat y_j(x)\\big)^2, \\qquad
    \\hat y(x) = [\\,o(x) - \\overline{o(x)},\\; n(x) - \\overline{n(x)}\\,]

Accuracies are measured on real test images over the full label space: old classes, new classes, all.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast.tasks._common import last_linear, synthesize_impressions
from dfkd_fast.tasks.robustness import NormalizedModel, check_images, model_device, num_outputs

__all__ = ["IncrementalRow", "ClassIncrementalResult", "class_incremental", "grow_classifier", "METHODS"]

METHODS = ("finetune", "lwf", "data_impressions")


def grow_classifier(model: nn.Module, num_new: int, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose last ``nn.Linear`` has ``num_new`` more outputs (old rows kept).

    Shape: the copy maps (N, ...) -> (N, K_old + num_new).
    """
    if num_new < 1:
        raise ValueError(f"grow_classifier: num_new must be >= 1, got {num_new}")
    new = copy.deepcopy(model)
    old = last_linear(new)
    grown = nn.Linear(old.in_features, old.out_features + num_new, bias=old.bias is not None)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        bound = 1.0 / math.sqrt(old.in_features)
        grown.weight.uniform_(-bound, bound, generator=g)
        grown.weight[:old.out_features] = old.weight
        if old.bias is not None:
            grown.bias.zero_()
            grown.bias[:old.out_features] = old.bias
    grown = grown.to(old.weight.device)
    for mod in new.modules():
        for cname, child in mod.named_children():
            if child is old:
                setattr(mod, cname, grown)
                return new
    raise ValueError("grow_classifier: could not locate the classifier layer to replace")


@dataclass
class IncrementalRow:
    """Accuracies (in [0, 1]) of one method after a step, on real test images of the given classes."""

    method: str
    old_acc: float
    new_acc: float
    all_acc: float
    seconds: float


@dataclass
class ClassIncrementalResult:
    """Step 1 (old-class model) and step 2 rows per method; ``num_impressions`` used by the DI method."""

    step1: IncrementalRow
    rows: dict[str, IncrementalRow] = field(default_factory=dict)
    num_impressions: int = 0
    impression_seconds: float = 0.0
    old_classes: tuple[int, ...] = ()
    new_classes: tuple[int, ...] = ()

    def table(self) -> str:
        """Markdown table (accuracies in %)."""
        lines = ["| step / method | old classes | new classes | all | seconds |", "|---|---:|---:|---:|---:|"]
        for r in (self.step1, *self.rows.values()):
            lines.append(f"| {r.method} | {100 * r.old_acc:.2f} | {100 * r.new_acc:.2f} | {100 * r.all_acc:.2f} | "
                         f"{r.seconds:.1f} |")
        return "\n".join(lines)


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    from dfkd_fast.teachers import random_shift

    return random_shift(x, max_shift, g)


def _fit(model: nn.Module, n: int, loss_fn: Callable[[torch.Tensor], torch.Tensor], epochs: int, batch_size: int,
         lr: float, seed: int) -> None:
    """Adam + cosine schedule over ``epochs`` passes of ``n`` items; ``loss_fn(indices) -> scalar``."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    nb = max(1, math.ceil(n / batch_size))
    total = epochs * nb
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    g = torch.Generator().manual_seed(int(seed))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(nb):
            loss = loss_fn(perm[i * batch_size:(i + 1) * batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _accs(net: nn.Module, x: torch.Tensor, y: torch.Tensor, old_k: int) -> tuple[float, float, float]:
    net.eval()
    dev = model_device(net)
    pred = torch.cat([net(xb.to(dev)).argmax(1).cpu() for xb in x.split(512)])
    ok = pred == y
    old, new = y < old_k, y >= old_k
    f = lambda m: float(ok[m].float().mean()) if bool(m.any()) else float("nan")  # noqa: E731
    return f(old), f(new), float(ok.float().mean())


def class_incremental(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                      old_classes: Sequence[int] = (0, 1, 2, 3, 4), new_classes: Sequence[int] = (5, 6, 7, 8, 9),
                      arch: str = "lenet5", old_model: nn.Module | None = None,
                      methods: Sequence[str] = METHODS, epochs_old: int = 8, epochs_new: int = 8,
                      epochs_combined: int = 8, lr: float = 2e-3, batch_size: int = 64, num_impressions: int = 500,
                      impression_iterations: int = 150, impression_lr: float = 0.05, lwf_lambda: float = 1.0,
                      T: float = 2.0, max_shift: int = 2, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                      backend: str = "auto") -> ClassIncrementalResult:
    """Two-step class-incremental experiment: old classes, then new classes without old data.

    Args:
        x, y: labeled training images in [0, 1] with original class ids (step 1 uses those in ``old_classes``,
            step 2 those in ``new_classes``; other classes are ignored).
        x_test, y_test: real test images; labels outside both class sets are ignored.
        old_classes, new_classes: disjoint class ids; internally mapped to 0..K_old-1 and K_old..K-1.
        arch: zoo model for the old model and the new-class model; ``old_model`` (K_old outputs) skips step 1.
        methods: subset of :data:`METHODS`.
        epochs_old / epochs_new / epochs_combined, lr, batch_size: Adam training budgets.
        num_impressions, impression_iterations, impression_lr: Data Impressions of the old classes.
        lwf_lambda, T: LwF distillation weight and temperature.

    Shape: x (N, C, H, W), y (N,). Returns :class:`ClassIncrementalResult`.
    """
    from dfkd_fast.models import build_model

    old_c, new_c = tuple(int(c) for c in old_classes), tuple(int(c) for c in new_classes)
    if not old_c or not new_c or len(set(old_c)) != len(old_c) or len(set(new_c)) != len(new_c):
        raise ValueError(f"class_incremental: old_classes and new_classes must be non-empty lists without repeats, "
                         f"got {old_c} and {new_c}")
    if set(old_c) & set(new_c):
        raise ValueError(f"class_incremental: old_classes and new_classes overlap in {sorted(set(old_c) & set(new_c))}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"class_incremental: methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    x = check_images(x, "x", "class_incremental")
    x_test = check_images(x_test, "x_test", "class_incremental")
    if len(y) != len(x) or len(y_test) != len(x_test):
        raise ValueError("class_incremental: need one label per image in (x, y) and (x_test, y_test)")
    if tuple(x.shape[1:]) != tuple(x_test.shape[1:]):
        raise ValueError(f"class_incremental: x has {tuple(x.shape[1:])} images, x_test {tuple(x_test.shape[1:])}; "
                         "use the same image size")
    k_old, k_new = len(old_c), len(new_c)
    remap = torch.full((int(max(y.max(), y_test.max(), *old_c, *new_c)) + 1,), -1, dtype=torch.long)
    for i, c in enumerate(old_c + new_c):
        remap[c] = i
    y_all, yt_all = remap[y.long()], remap[y_test.long()]
    old_mask, new_mask = (y_all >= 0) & (y_all < k_old), y_all >= k_old
    for name, m, cls in (("old", old_mask, old_c), ("new", new_mask, new_c)):
        present = set(y[m].tolist())
        if present != set(cls):
            raise ValueError(f"class_incremental: the training data has no images of {name} classes "
                             f"{sorted(set(cls) - present)}; check old_classes / new_classes")
    x_old, y_old = x[old_mask], y_all[old_mask]
    x_new, y_new = x[new_mask], y_all[new_mask]
    keep = yt_all >= 0
    xt, yt = x_test[keep], yt_all[keep]
    dev = torch.device(device)
    c, h, _ = x.shape[1:]
    g = torch.Generator().manual_seed(int(seed) + 7)
    torch.manual_seed(seed)

    def wrap(m: nn.Module) -> NormalizedModel:
        return NormalizedModel(m.to(dev), mean, std)

    t0 = time.perf_counter()
    if old_model is None:
        old_model = build_model(arch, k_old, c, h).to(dev)
        old_net = wrap(old_model)
        _fit(old_net, len(x_old), lambda idx: F.cross_entropy(
            old_net(_shift(x_old[idx], max_shift, g).to(dev)), y_old[idx].to(dev)), epochs_old, batch_size, lr, seed)
    old_net = wrap(old_model).eval()
    k_got = num_outputs(old_net, x[:1].to(dev))
    if k_got != k_old:
        raise ValueError(f"class_incremental: old_model has {k_got} outputs but {k_old} old_classes were given; "
                         "pass the old model trained on exactly those classes")
    o_old, _, _ = _accs(old_net, xt[yt < k_old], yt[yt < k_old], k_old)
    res = ClassIncrementalResult(step1=IncrementalRow("step 1: old classes only", o_old, float("nan"), o_old,
                                                      time.perf_counter() - t0),
                                 old_classes=old_c, new_classes=new_c)
    for p in old_model.parameters():
        p.requires_grad_(False)
    y_new_local = y_new - k_old

    for method in methods:
        t1 = time.perf_counter()
        comb = wrap(grow_classifier(old_model, k_new, seed))
        for p in comb.parameters():
            p.requires_grad_(True)
        if method == "finetune":
            _fit(comb, len(x_new), lambda idx: F.cross_entropy(
                comb(_shift(x_new[idx], max_shift, g).to(dev)), y_new[idx].to(dev)), epochs_new, batch_size, lr, seed)
        elif method == "lwf":
            def lwf_loss(idx: torch.Tensor) -> torch.Tensor:
                xb = _shift(x_new[idx], max_shift, g).to(dev)
                z = comb(xb)
                with torch.no_grad():
                    o = old_net(xb)
                kd = F.kl_div(F.log_softmax(z[:, :k_old] / T, 1), F.log_softmax(o / T, 1), reduction="batchmean",
                              log_target=True)
                return F.cross_entropy(z, y_new[idx].to(dev)) + lwf_lambda * T * T * kd

            _fit(comb, len(x_new), lwf_loss, epochs_new, batch_size, lr, seed)
        else:
            new_net = wrap(build_model(arch, k_new, c, h))
            _fit(new_net, len(x_new), lambda idx: F.cross_entropy(
                new_net(_shift(x_new[idx], max_shift, g).to(dev)), y_new_local[idx].to(dev)), epochs_new,
                batch_size, lr, seed + 1)
            imp, _, secs = synthesize_impressions(old_model, num_impressions, (c, h, h), k_old,
                                                  iterations=impression_iterations, lr=impression_lr, mean=mean,
                                                  std=std, seed=seed, backend=backend)
            res.num_impressions, res.impression_seconds = len(imp), secs
            transfer = torch.cat([imp, x_new])
            for p in new_net.parameters():
                p.requires_grad_(False)

            def dual_loss(idx: torch.Tensor) -> torch.Tensor:
                xb = _shift(transfer[idx], max_shift, g).to(dev)
                with torch.no_grad():
                    o, n = old_net(xb), new_net.eval()(xb)
                    target = torch.cat([o - o.mean(1, keepdim=True), n - n.mean(1, keepdim=True)], 1)
                return F.mse_loss(comb(xb), target)

            _fit(comb, len(transfer), dual_loss, epochs_combined, batch_size, lr, seed + 2)
        o, nw, a = _accs(comb, xt, yt, k_old)
        res.rows[method] = IncrementalRow(method, o, nw, a, time.perf_counter() - t1)
    return res
