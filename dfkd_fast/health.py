"""Data-free health report of a transfer set: is it worth distilling from? No real data is used.

Every statistic is computed for the set AND for uniform-noise images ``U[0, 1]`` of the same shape and count
(the reference), so each number is read against what noise scores on the same teacher:

- teacher confidence ``max_k p_k`` and normalized entropy ``H(p) / log K`` (means + 10-bin histograms on [0, 1]);
- class balance: per-class counts of the teacher's top-1, normalized entropy of that histogram
  ``H(counts / N) / log K`` (1 = balanced) and the largest class fraction; agreement with ``targets`` if given;
- diversity: exact duplicates (equal after uint8 quantization) and near duplicates (the cosine of the teacher's
  penultimate features to the nearest other image >= ``NEAR_DUP_COS``), as fractions of the images, and the
  mean pairwise cosine of the penultimate features (off-diagonal); feature spread: the participation ratio
  ``PR = (sum_i l_i)^2 / sum_i l_i^2`` of the eigenvalues ``l_i`` of the covariance of the penultimate features (the
  effective number of directions that carry the set's feature variance), read against K - 1 (the number of
  directions that separate K classes; a one-class set can still spread, the class balance catches it);
- BN teachers: for every BatchNorm layer the per-channel mean ``mu`` / variance ``v`` of its input over the set
  against ``running_mean`` / ``running_var`` (``mu_r``, ``v_r``), as the mean over channels of the Gaussian KL
  ``0.5 (v / v_r + (mu - mu_r)^2 / v_r - 1 - log(v / v_r))`` (0: the set matches the training statistics).

Score (in [0, 1]), the geometric mean of the components (each in [0, 1], floored at 1e-3)::

    confidence = mean teacher confidence of the set
    balance    = normalized entropy of the class histogram
    diversity  = 1 - fraction of near (or exact) duplicates
    spread     = min(1, PR / (K - 1))
    prior      = BN teacher:  clip(1 - d_set / d_noise, 0, 1), d = mean over layers of the BN KL above
                 no BN:       clip((1 - cos_set) / (1 - cos_noise), 0, 1), cos = mean pairwise feature cosine
    score      = (confidence * balance * diversity * spread * prior) ** (1 / 5)

(without the noise reference ``prior`` is left out and the root is the 4th root). ``spread`` was added after the
issue-13 quality matrix (56 transfer sets, 8 methods, 4 teacher families, 2 datasets): the Spearman correlation of
the score with the students' real accuracy went from 0.48 to 0.71 (``benchmarks/results/quality_matrix.md``; chosen
on those sets, not validated on others). Warnings (one line each):
``one-class`` (largest class fraction > ``max(0.5, 1.5 / K)``), ``collapsed`` (near-duplicate fraction >= 0.5),
``texture-like`` (mean confidence >= 0.8 while, for a BN teacher, ``d_set >= TEXTURE_BN_RATIO * d_noise``;
for a teacher without BN, while noise is classified at >= 0.8 too and the set's features are no more diverse
than noise's), ``low-confidence`` (mean confidence < 0.5).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dfkd_fast.classifiers import PenultimateTap, model_device, normalizer

__all__ = ["health_report", "format_health", "save_health_figure", "save_health_json", "transfer_set_health",
           "load_sample", "NEAR_DUP_COS", "TEXTURE_BN_RATIO", "HIST_BINS", "HEALTH_FILE"]

#: the report's file name beside a transfer set's ``manifest.json``.
HEALTH_FILE = "health.json"

#: feature cosine to the nearest other image at or above which an image counts as a near duplicate.
NEAR_DUP_COS = 0.999
#: a BN teacher's set is texture-like when its BN KL is at least this fraction of noise's (and it is confident).
TEXTURE_BN_RATIO = 0.5
#: histogram bins of confidence and normalized entropy on [0, 1].
HIST_BINS = 10
_CONFIDENT = 0.8
_LOW_CONF = 0.5
_EPS = 1e-5


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)  # noqa: SLF001 - the public BN base class
            and m.running_mean is not None and m.running_var is not None]


def _hist(v: torch.Tensor) -> list[int]:
    return [int(c) for c in torch.histc(v.float().clamp(0, 1), bins=HIST_BINS, min=0.0, max=1.0).tolist()]


@torch.no_grad()
def _forward_stats(x: torch.Tensor, teacher: nn.Module, norm, batch_size: int, dev: torch.device,
                   bns: list[tuple[str, nn.Module]]) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """Teacher logits (N, K), penultimate features (N, F) or None, and the BN KL per layer."""
    sums: list[list[torch.Tensor | None]] = [[None, None] for _ in bns]
    count = [0] * len(bns)

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].detach().double()
            dims = [0] + list(range(2, a.dim()))
            s1, s2 = a.sum(dims), (a * a).sum(dims)
            sums[i][0] = s1 if sums[i][0] is None else sums[i][0] + s1
            sums[i][1] = s2 if sums[i][1] is None else sums[i][1] + s2
            count[i] += a.numel() // a.shape[1]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, (_, m) in enumerate(bns)]
    try:
        tap = PenultimateTap(teacher)
    except ValueError:  # no nn.Linear head: the logits stand in for the features
        tap = None
    logits, feats = [], []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            out = teacher(norm(xb))
            logits.append(out.float().cpu())
            if tap is not None and tap.features is not None:
                feats.append(tap.pop().float().cpu())
    finally:
        for h in handles:
            h.remove()
        if tap is not None:
            tap.remove()
    kl = []
    for (_, m), (s1, s2), n in zip(bns, sums, count, strict=True):
        mu = s1 / n
        var = (s2 / n - mu * mu).clamp_min(0) + _EPS
        mu_r, var_r = m.running_mean.double().cpu(), m.running_var.double().cpu() + _EPS
        mu, var = mu.cpu(), var.cpu()
        kl.append(float((0.5 * (var / var_r + (mu - mu_r) ** 2 / var_r - 1 - torch.log(var / var_r))).mean()))
    f = torch.cat(feats) if feats and len(feats) == -(-len(x) // batch_size) else None
    return torch.cat(logits), f, kl


def _duplicates(x: torch.Tensor, feats: torch.Tensor) -> tuple[float, float, float | None]:
    """(exact duplicate fraction, near-duplicate fraction, mean pairwise feature cosine; None for one image)."""
    n = len(x)
    q = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).flatten(1)
    exact = n - len(torch.unique(q, dim=0)) if n else 0
    if n < 2:
        return float(exact) / max(n, 1), 0.0, None
    f = torch.nn.functional.normalize(feats.double().flatten(1), dim=1)
    cos = f @ f.T
    cos.fill_diagonal_(float("-inf"))
    near = cos.max(1).values >= NEAR_DUP_COS
    cos.fill_diagonal_(0.0)
    mean_cos = float(cos.sum() / (n * (n - 1)))
    # an exact duplicate has identical features, so it is counted as a near duplicate as well
    return exact / n, float(near.double().mean()), mean_cos


def _participation_ratio(feats: torch.Tensor) -> float | None:
    """``(sum l)^2 / sum l^2`` over the eigenvalues ``l`` of the (N, F) features' covariance; None if N < 2 or
    the features are constant."""
    if feats.shape[0] < 2:
        return None
    f = feats.double().flatten(1)
    f = f - f.mean(0)
    ev = torch.linalg.eigvalsh(f.T @ f / f.shape[0]).clamp_min(0) if f.shape[1] <= f.shape[0] else \
        torch.linalg.eigvalsh(f @ f.T / f.shape[0]).clamp_min(0)  # same non-zero spectrum, smaller matrix
    s2 = float((ev * ev).sum())
    return float(ev.sum()) ** 2 / s2 if s2 > 0 else None


def _set_stats(x: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor | None, kl: list[float],
               k: int) -> dict[str, Any]:
    p = logits.float().softmax(1)
    conf = p.max(1).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(k)
    counts = torch.bincount(p.argmax(1), minlength=k).double()
    frac = counts / counts.sum()
    class_entropy = max(0.0, float(-(frac * frac.clamp_min(1e-12).log()).sum() / math.log(k)))
    exact, near, mean_cos = _duplicates(x, feats if feats is not None else logits)
    pr = _participation_ratio(feats if feats is not None else logits)
    return {"mean_confidence": float(conf.mean()), "mean_entropy": float(ent.mean()),
            "confidence_hist": _hist(conf), "entropy_hist": _hist(ent),
            "class_counts": [int(c) for c in counts.tolist()], "class_entropy": class_entropy,
            "max_class_fraction": float(frac.max()), "exact_duplicates": exact, "near_duplicates": near,
            "mean_feature_cosine": mean_cos, "feature_participation": pr,
            "feature_spread": None if pr is None else min(1.0, pr / max(k - 1, 1)), "bn_kl": kl,
            "bn_kl_mean": float(sum(kl) / len(kl)) if kl else None}


def health_report(images: torch.Tensor, teacher: nn.Module, *, logits: torch.Tensor | None = None,
                  targets: torch.Tensor | None = None, mean: Sequence[float] | torch.Tensor | None = None,
                  std: Sequence[float] | torch.Tensor | None = None, batch_size: int = 256,
                  noise_reference: bool = True, seed: int = 0, max_images: int | None = 2000) -> dict[str, Any]:
    """The health report of a transfer set (see the module docstring for every statistic and the score).

    Args:
        images: (N, C, H, W) in [0, 1] (uint8 is scaled), before the teacher's normalization.
        teacher: the classifier (put in eval mode for the call; its mode is restored).
        logits: the stored teacher logits (N, K); when given they are used for confidence, entropy and classes
            (the teacher is still run for its features and BN statistics).
        targets: (N,) class ids or (N, K) soft targets, for ``agreement`` (fraction top-1 == target).
        mean, std: the teacher's input normalization.
        noise_reference: also score U[0, 1] noise of the same shape and count (needed for ``prior`` and the
            ``texture-like`` warning).
        seed: seed of the subsample and of the noise.
        max_images: at most this many images (a seeded random subsample) are evaluated; None: all.

    Returns:
        dict with ``images``, ``evaluated``, ``num_classes``, ``bn_teacher``, ``bn_layers``, ``set`` and
        ``noise`` (per-set statistics; ``noise`` is None without the reference), ``agreement``, ``components``,
        ``score`` in [0, 1] and ``warnings`` (list of one-line strings).
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"health_report: images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    if logits is not None and len(logits) != len(images):
        raise ValueError(f"health_report: logits has {len(logits)} rows for {len(images)} images")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"health_report: targets has {len(targets)} rows for {len(images)} images")
    n_all = len(images)
    g = torch.Generator().manual_seed(int(seed))
    if max_images is not None and n_all > max_images:
        idx = torch.randperm(n_all, generator=g)[:max_images].sort().values
        images = images[idx]
        logits = None if logits is None else logits[idx]
        targets = None if targets is None else targets[idx]
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    dev = model_device(teacher)
    norm = normalizer(mean, std, x.shape[1], dev)
    bns = _bn_layers(teacher)
    was = teacher.training
    teacher.eval()
    try:
        t_logits, feats, kl = _forward_stats(x, teacher, norm, batch_size, dev, bns)
        noise = None
        if noise_reference:
            xn = torch.rand(x.shape, generator=g)
            n_logits, n_feats, n_kl = _forward_stats(xn, teacher, norm, batch_size, dev, bns)
            noise = _set_stats(xn, n_logits, n_feats, n_kl, n_logits.shape[1])
    finally:
        teacher.train(was)
    k = t_logits.shape[1]
    if logits is not None and logits.shape[1] != k:
        raise ValueError(f"health_report: the stored logits have {logits.shape[1]} classes but the teacher outputs {k}"
                         "; check --num-classes / --teacher")
    used = logits.float().cpu() if logits is not None else t_logits
    stats = _set_stats(x, used, feats if feats is not None else t_logits, kl, k)
    agreement = None
    if targets is not None:
        t = targets.argmax(1) if targets.dim() == 2 else targets
        agreement = float((used.argmax(1) == t.cpu().long()).double().mean())
    comps = {"confidence": stats["mean_confidence"], "balance": stats["class_entropy"],
             "diversity": 1.0 - max(stats["near_duplicates"], stats["exact_duplicates"])}
    if stats["feature_spread"] is not None:
        comps["spread"] = stats["feature_spread"]
    if noise is not None:
        if bns:
            comps["prior"] = min(1.0, max(0.0, 1.0 - stats["bn_kl_mean"] / max(noise["bn_kl_mean"], 1e-12)))
        elif stats["mean_feature_cosine"] is not None:
            comps["prior"] = min(1.0, max(0.0, (1 - stats["mean_feature_cosine"])
                                          / max(1 - noise["mean_feature_cosine"], 1e-12)))
    score = math.exp(sum(math.log(max(v, 1e-3)) for v in comps.values()) / len(comps))
    return {"images": n_all, "evaluated": len(x), "num_classes": k, "bn_teacher": bool(bns),
            "bn_layers": [name for name, _ in bns], "set": stats, "noise": noise, "agreement": agreement,
            "components": comps, "score": score, "warnings": _warnings(stats, noise, bool(bns), k)}


def _warnings(s: dict[str, Any], noise: dict[str, Any] | None, bn: bool, k: int) -> list[str]:
    out = []
    one = max(0.5, 1.5 / k)
    if s["max_class_fraction"] > one:
        c = max(range(k), key=lambda i: s["class_counts"][i])
        out.append(f"one-class: {100 * s['max_class_fraction']:.0f}% of the images are teacher class {c} "
                   f"(class-histogram entropy {s['class_entropy']:.2f} of 1)")
    dup = max(s["near_duplicates"], s["exact_duplicates"])
    if dup >= 0.5:
        out.append(f"collapsed: {100 * dup:.0f}% of the images are near duplicates (feature cosine >= "
                   f"{NEAR_DUP_COS}; mean pairwise cosine {s['mean_feature_cosine']:.3f})")
    conf = s["mean_confidence"]
    if noise is not None and conf >= _CONFIDENT:
        if bn and s["bn_kl_mean"] >= TEXTURE_BN_RATIO * noise["bn_kl_mean"]:
            out.append(f"texture-like: teacher confidence {conf:.2f} but BN statistics as far from the running "
                       f"statistics as noise's (KL {s['bn_kl_mean']:.3g} vs noise {noise['bn_kl_mean']:.3g})")
        elif not bn and noise["mean_confidence"] >= _CONFIDENT and s["mean_feature_cosine"] is not None and (
                s["mean_feature_cosine"] >= noise["mean_feature_cosine"]):
            out.append(f"texture-like: teacher confidence {conf:.2f}, but noise scores {noise['mean_confidence']:.2f}"
                       f" and the features are no more diverse than noise's (cosine {s['mean_feature_cosine']:.3f} "
                       f"vs {noise['mean_feature_cosine']:.3f})")
    if conf < _LOW_CONF:
        ref = f" (noise: {noise['mean_confidence']:.2f})" if noise is not None else ""
        out.append(f"low-confidence: mean teacher confidence {conf:.2f}{ref}")
    return out


def format_health(report: dict[str, Any]) -> str:
    """A few lines of text: score and warnings, then each statistic of the set against noise's."""
    s, nz = report["set"], report["noise"]

    def vs(key: str, fmt: str = ".3f") -> str:
        v = s[key]
        txt = "n/a" if v is None else format(v, fmt)
        if nz is not None and nz[key] is not None:
            txt += f" (noise {format(nz[key], fmt)})"
        return txt

    warn = "; ".join(report["warnings"]) or "no warnings"
    lines = [f"health: score {report['score']:.2f} ({warn})",
             f"images {report['images']} (evaluated {report['evaluated']}) | classes {report['num_classes']} | "
             f"BN layers {len(report['bn_layers'])}",
             f"confidence {vs('mean_confidence')} | entropy {vs('mean_entropy')} | class balance "
             f"{vs('class_entropy')} | largest class {vs('max_class_fraction')}",
             f"near duplicates {vs('near_duplicates')} | exact duplicates {vs('exact_duplicates')} | mean feature "
             f"cosine {vs('mean_feature_cosine')} | feature participation ratio "
             f"{vs('feature_participation', '.2f')} of K - 1 = {report['num_classes'] - 1}"]
    if report["bn_teacher"]:
        lines.append(f"BN statistics KL from running stats (mean over layers) {vs('bn_kl_mean', '.4g')}")
    if report["agreement"] is not None:
        lines.append(f"agreement with targets {report['agreement']:.3f}")
    lines.append("components " + " ".join(f"{k} {v:.2f}" for k, v in report["components"].items()))
    return "\n".join(lines)


def save_health_json(report: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``report`` as JSON atomically (temp file + ``os.replace``). Returns the path."""
    from dfkd_fast.transfer_set.manifest import _atomic_write_json

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write_json(os.path.abspath(path), report)
    return path


def save_health_figure(report: dict[str, Any], path: str | os.PathLike) -> str:
    """PNG (written atomically): confidence and entropy histograms, class balance bars and the per-layer BN
    KL, each set against noise. Returns the path."""
    from dfkd_fast.viz import _pyplot, _save_atomic

    plt = _pyplot()
    s, nz = report["set"], report["noise"]
    ncols = 4 if report["bn_teacher"] else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.2))
    centers = [(i + 0.5) / HIST_BINS for i in range(HIST_BINS)]
    w = 0.4 / HIST_BINS
    try:
        for ax, key, title in ((axes[0], "confidence_hist", "teacher confidence"),
                               (axes[1], "entropy_hist", "normalized entropy")):
            ax.bar([c - w / 2 for c in centers], s[key], width=w, label="set")
            if nz is not None:
                ax.bar([c + w / 2 for c in centers], nz[key], width=w, label="noise", alpha=0.7)
            ax.set_title(title)
            ax.set_xlim(0, 1)
            ax.legend(fontsize=7)
        k = report["num_classes"]
        axes[2].bar(range(k), s["class_counts"], label="set")
        if nz is not None:
            axes[2].plot(range(k), nz["class_counts"], "o", color="C1", label="noise")
        axes[2].set_title(f"class balance (entropy {s['class_entropy']:.2f})")
        axes[2].set_xlabel("teacher top-1 class")
        axes[2].legend(fontsize=7)
        if report["bn_teacher"]:
            layers = range(len(s["bn_kl"]))
            axes[3].plot(layers, s["bn_kl"], "o-", label="set")
            if nz is not None:
                axes[3].plot(layers, nz["bn_kl"], "s--", label="noise")
            axes[3].set_yscale("log")
            axes[3].set_title("BN statistics KL per layer")
            axes[3].set_xlabel("BN layer (forward order)")
            if len(layers) <= 20:
                axes[3].set_xticks(list(layers))
            axes[3].legend(fontsize=7)
        fig.suptitle(f"health score {report['score']:.2f}: " + ("; ".join(m.split(":")[0] for m in
                                                                        report["warnings"]) or "no warnings"))
        fig.tight_layout()
        _save_atomic(fig, os.fspath(path))
    finally:
        plt.close(fig)
    return os.fspath(path)


def load_sample(path: str | os.PathLike, max_images: int | None = 2000, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random sample of at most ``max_images`` images of the transfer set at ``path``, reading only
    the shards it needs. Returns images float (n, C, H, W) in [0, 1], teacher logits (n, K), targets."""
    from dfkd_fast.transfer_set import TransferSet

    ts = TransferSet(path)
    n = len(ts)
    if n == 0:
        raise ValueError(f"{path}: the transfer set holds no images")
    g = torch.Generator().manual_seed(int(seed))
    if max_images is None or n <= max_images:
        return ts.images(), ts.teacher_logits(), ts.targets()
    shards = ts.manifest["shards"]
    order = torch.randperm(len(shards), generator=g).tolist()
    chosen, have = [], 0
    for j in order:  # whole random shards until the sample is covered, then a random subset of their images
        chosen.append(j)
        have += int(shards[j]["count"])
        if have >= max_images:
            break
    idx = [shards[j]["start"] + i for j in sorted(chosen) for i in range(int(shards[j]["count"]))]
    pick = sorted(idx[i] for i in torch.randperm(len(idx), generator=g)[:max_images].tolist())
    items = [ts[i] for i in pick]
    return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
            torch.stack([torch.as_tensor(it[2]) for it in items]))


def transfer_set_health(path: str | os.PathLike, teacher: nn.Module, *, mean: Sequence[float] | torch.Tensor | None
                        = None, std: Sequence[float] | torch.Tensor | None = None, max_images: int | None = 2000,
                        seed: int = 0, out: str | os.PathLike | None = None, figure: bool = False,
                        batch_size: int = 256) -> dict[str, Any]:
    """:func:`health_report` of the transfer set at ``path`` (a sample of at most ``max_images``, with its stored
    logits and targets), written as ``health.json`` (and ``health.png`` with ``figure``) into ``out``
    (default: ``path``, beside the manifest). Returns the report."""
    from dfkd_fast.transfer_set import TransferSet

    ts = TransferSet(path)  # manifest only (checked); the shards are read by load_sample
    x, logits, targets = load_sample(path, max_images, seed)
    report = health_report(x, teacher, logits=logits.clamp_min(1e-12).log() if ts.soft_kind == "probs" else logits,
                           targets=targets, mean=mean, std=std, batch_size=batch_size, seed=seed, max_images=None)
    report["images"] = len(ts)
    dest = os.fspath(out if out is not None else path)
    save_health_json(report, os.path.join(dest, HEALTH_FILE))
    if figure:
        save_health_figure(report, os.path.join(dest, "health.png"))
    return report

