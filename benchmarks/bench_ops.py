"""One harness for every fused op: cases x providers (eager | compile | cpp | triton) x modes (fwd | full).

``eager`` is the op written the way the reference research code writes it (DeepInversion's BN hook with
permute/contiguous/view + var(unbiased=False) + norms per layer, ``F.kl_div(...)*T*T``, the M x M logits of
the contrastive loss, the ``grid_sample`` augmentation pipeline); ``compile`` is ``torch.compile`` of the same
eager function (compile time measured separately, then warmed up); ``cpp`` / ``triton`` call
``dfkd_fast.ops`` with that backend (``triton`` only on CUDA). A provider that raises is recorded as
``n/a: reason`` and the run goes on. Mode ``full`` = forward + backward (the default), ``fwd`` = forward.

Usage::

    python benchmarks/bench_ops.py                       # all ops, full shapes (slow on CPU)
    python benchmarks/bench_ops.py --quick               # tiny shapes, smoke test
    python benchmarks/bench_ops.py --ops soft_ce kd_kl_div --providers eager compile cpp

Results: a markdown table on stdout and ``benchmarks/results/ops_<device>.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bc  # noqa: E402

import dfkd_fast.ops as ops  # noqa: E402

PROVIDERS = ("eager", "compile", "cpp", "triton")
OPS = ("soft_ce", "kd_kl_div", "bn_stat_loss", "info_nce", "crop_flip")


@dataclass
class Case:
    """One benchmark case: ``make()`` builds the inputs once (outside the timed region)."""

    op: str
    name: str
    dtype: torch.dtype
    make: Callable[[], dict]
    eager: Callable[..., torch.Tensor]
    ours: Callable[..., torch.Tensor]  # ours(backend=..., **inputs)
    grad_inputs: tuple[str, ...]  # inputs that get gradients in mode "full"
    nbytes: Callable[[dict], int]  # minimal bytes moved by one fwd+bwd (for GB/s)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ eager references (research-code style)
def eager_soft_ce(logits: torch.Tensor, targets: torch.Tensor, T: float = 20.0) -> torch.Tensor:
    return -(targets * F.log_softmax(logits / T, dim=1)).sum(dim=1).mean()


def eager_kd(student: torch.Tensor, teacher: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="batchmean") * T * T


def eager_bn_hooks(feats: list[torch.Tensor], rms: list[torch.Tensor], rvs: list[torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for x, rm, rv in zip(feats, rms, rvs, strict=False):  # DeepInversionFeatureHook.hook_fn, one layer at a time
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        total = total + torch.norm(rv.data - var, 2) + torch.norm(rm.data - mean, 2)
    return total


def eager_info_nce(query: torch.Tensor, keys: torch.Tensor, T: float = 0.1) -> torch.Tensor:
    logits = query @ keys.t() / T
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device), reduction="none")


def eager_crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out: int, mean: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)  # affine_grid from the boxes (kornia-style)
    theta[:, 0, 0] = (boxes[:, 2] - boxes[:, 0]) / w
    theta[:, 0, 2] = (boxes[:, 0] + boxes[:, 2]) / w - 1
    theta[:, 1, 1] = (boxes[:, 3] - boxes[:, 1]) / h
    theta[:, 1, 2] = (boxes[:, 1] + boxes[:, 3]) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
    return (y - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ------------------------------------------------------------------ BN input shapes of the CIFAR nets
def resnet34_bn_shapes(batch: int, hw: int = 32) -> list[tuple[int, int, int, int]]:
    """All BN inputs of a CIFAR ResNet-34 (BasicBlock [3, 4, 6, 3], widths 64-512, 1x1-conv+BN shortcuts)."""
    shapes = [(batch, 64, hw, hw)]
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=False)):
        s = hw >> stage
        shapes += [(batch, width, s, s)] * (2 * blocks + (1 if stage > 0 else 0))
    return shapes


def wrn_bn_shapes(batch: int, depth: int = 40, widen: int = 2, hw: int = 32) -> list[tuple[int, int, int, int]]:
    """All BN inputs of a pre-activation WRN-depth-widen (each block: BN before both convs, final BN)."""
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    shapes = []
    for g in range(3):
        s_in, s_out = hw >> max(g - 1, 0), hw >> g  # the group's input keeps the previous resolution
        shapes.append((batch, widths[g], s_in, s_in))  # block 1 bn1 sees the group input
        shapes.append((batch, widths[g + 1], s_out, s_out))
        shapes += [(batch, widths[g + 1], s_out, s_out)] * (2 * (n - 1))
    shapes.append((batch, widths[3], hw >> 2, hw >> 2))
    return shapes


# ------------------------------------------------------------------ cases
def _logit_cases(quick: bool, dtype: torch.dtype, device: torch.device) -> list[Case]:
    grid = [(8, 10), (16, 100)] if quick else [(n, k) for n in (256, 8192) for k in (10, 100, 1000)]
    cases = []
    for n, k in grid:
        def make_ce(n=n, k=k):
            z = torch.randn(n, k, device=device).mul(3).to(dtype)
            y = torch.distributions.Dirichlet(torch.full((k,), 0.5)).sample((n,)).to(device=device, dtype=dtype)
            return {"logits": z, "targets": y}

        def make_kd(n=n, k=k):
            return {"student": torch.randn(n, k, device=device).mul(3).to(dtype),
                    "teacher": torch.randn(n, k, device=device).mul(3).to(dtype)}

        esize = torch.finfo(dtype).bits // 8
        nb = 4 * n * k * esize  # read 2 inputs fwd, read + write the gradient
        cases.append(Case("soft_ce", f"N={n} K={k} T=20", dtype, make_ce, eager_soft_ce,
                          lambda backend, logits, targets: ops.soft_target_cross_entropy(
                              logits, targets, 20.0, backend=backend), ("logits",), lambda _i, nb=nb: nb))
        cases.append(Case("kd_kl_div", f"N={n} K={k} T=4", dtype, make_kd, eager_kd,
                          lambda backend, student, teacher: ops.kd_kl_div(student, teacher, 4.0, backend=backend),
                          ("student",), lambda _i, nb=nb: nb))
    return cases


def _bn_cases(quick: bool, dtype: torch.dtype, device: torch.device) -> list[Case]:
    nets = {"resnet34": resnet34_bn_shapes, "wrn40_2": wrn_bn_shapes}
    cases = []
    for net, fn in nets.items():
        shapes = fn(4, hw=8) if quick else fn(256)

        def make(shapes=shapes):
            feats = [torch.randn(s, device=device).to(dtype) for s in shapes]
            rms = [torch.randn(s[1], device=device) * 0.1 for s in shapes]
            rvs = [torch.rand(s[1], device=device) + 0.5 for s in shapes]
            return {"feats": feats, "rms": rms, "rvs": rvs}

        numel = sum(math.prod(s) for s in shapes)
        esize = torch.finfo(dtype).bits // 8
        cases.append(Case("bn_stat_loss", f"{net} B={shapes[0][0]} ({len(shapes)} BN layers)", dtype, make,
                          eager_bn_hooks,
                          lambda backend, feats, rms, rvs: ops.bn_stat_loss(feats, rms, rvs, backend=backend),
                          ("feats",), lambda _i, n=numel, e=esize: 3 * n * e))
    return cases


def _info_nce_cases(quick: bool, dtype: torch.dtype, device: torch.device) -> list[Case]:
    m, d = (64, 32) if quick else (256 + 4096, 256)

    def make():
        q = F.normalize(torch.randn(m, d, device=device), dim=1).to(dtype)
        k = F.normalize(torch.randn(m, d, device=device), dim=1).to(dtype)
        return {"query": q, "keys": k}

    esize = torch.finfo(dtype).bits // 8
    return [Case("info_nce", f"M={m} D={d} T=0.1", dtype, make, eager_info_nce,
                 lambda backend, query, keys: ops.info_nce(query, keys, 0.1, backend=backend),
                 ("query",), lambda _i: 4 * m * d * esize)]


def _crop_cases(quick: bool, dtype: torch.dtype, device: torch.device) -> list[Case]:
    shapes = [(2, 3, 8, 8), (2, 3, 16, 16)] if quick else [(256, 3, 32, 32), (64, 3, 224, 224)]
    cases = []
    for n, c, h, w in shapes:
        def make(n=n, c=c, h=h, w=w):
            g = torch.Generator().manual_seed(0)
            x = torch.rand(n, c, h, w, generator=g).to(device=device, dtype=dtype)
            scale = torch.empty(n).uniform_(0.5, 1.0, generator=g)
            bw, bh = w * scale, h * scale
            x0 = torch.rand(n, generator=g) * (w - bw)
            y0 = torch.rand(n, generator=g) * (h - bh)
            boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1).to(device=device, dtype=dtype)
            flip = (torch.rand(n, generator=g) < 0.5).to(device)
            mean = torch.tensor([0.4914, 0.4822, 0.4465][:c], device=device, dtype=dtype)
            std = torch.tensor([0.2470, 0.2435, 0.2616][:c], device=device, dtype=dtype)
            return {"x": x, "boxes": boxes, "flip": flip, "out": h, "mean": mean, "std": std}

        esize = torch.finfo(dtype).bits // 8
        cases.append(Case("crop_flip", f"{n}x{c}x{h}x{w} -> {h}", dtype, make, eager_crop_flip,
                          lambda backend, x, boxes, flip, out, mean, std: ops.crop_flip(
                              x, boxes, flip, out, mean, std, backend=backend),
                          ("x",), lambda _i, e=n * c * h * w * esize: 4 * e))
    return cases


def build_cases(op_names: list[str], quick: bool, dtype: torch.dtype, device: torch.device) -> list[Case]:
    cases: list[Case] = []
    if "soft_ce" in op_names or "kd_kl_div" in op_names:
        cases += [c for c in _logit_cases(quick, dtype, device) if c.op in op_names]
    if "bn_stat_loss" in op_names:
        cases += _bn_cases(quick, dtype, device)
    if "info_nce" in op_names:
        cases += _info_nce_cases(quick, dtype, device)
    if "crop_flip" in op_names:
        cases += _crop_cases(quick, dtype, device)
    return cases


# ------------------------------------------------------------------ running
def _leaves(inputs: dict, grad_inputs: tuple[str, ...], mode: str) -> tuple[dict, list[torch.Tensor]]:
    out, leaves = {}, []
    for key, v in inputs.items():
        want = mode == "full" and key in grad_inputs
        if isinstance(v, list):
            v = [t.detach().requires_grad_(want) for t in v]
            leaves += v if want else []
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().requires_grad_(want)
            leaves += [v] if want else []
        out[key] = v
    return out, leaves


def _step_fn(fn: Callable[..., torch.Tensor], inputs: dict, leaves: list[torch.Tensor], mode: str):
    def step():
        out = fn(**inputs)
        if mode == "full":
            torch.autograd.backward(out.sum() if out.dim() else out, inputs=leaves)
            for t in leaves:
                t.grad = None
        return out

    return step


def run_case(case: Case, providers: list[str], mode: str, device: torch.device, min_run_time: float) -> dict:
    inputs, leaves = _leaves(case.make(), case.grad_inputs, mode)
    row = {"op": case.op, "case": case.name, "dtype": str(case.dtype).replace("torch.", ""), "mode": mode,
           "ms": {}, "iqr_ms": {}, "na": {}}
    for prov in providers:
        try:
            if prov == "eager":
                fn = case.eager
            elif prov == "compile":
                fn = torch.compile(case.eager)
                t0 = time.perf_counter()
                _step_fn(fn, inputs, leaves, mode)()
                row["compile_s"] = time.perf_counter() - t0
            else:
                if prov == "triton" and device.type != "cuda":
                    raise RuntimeError("triton is timed on CUDA only")
                fn = (lambda p: lambda **kw: case.ours(backend=p, **kw))(prov)
            step = _step_fn(fn, inputs, leaves, mode)
            for _ in range(2):  # warm-up
                step()
            med, iqr = bc.time_fn(step, device, min_run_time)
            row["ms"][prov], row["iqr_ms"][prov] = med, iqr
        except Exception as e:  # a provider that cannot run is recorded, not fatal (ops are written in parallel)
            row["na"][prov] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    ours_prov = "triton" if device.type == "cuda" else "cpp"
    ours = row["ms"].get(ours_prov)
    row["ours_provider"] = ours_prov
    row["speedup_vs_eager"] = row["ms"]["eager"] / ours if ours and "eager" in row["ms"] else None
    row["speedup_vs_compile"] = row["ms"]["compile"] / ours if ours and "compile" in row["ms"] else None
    nbytes = case.nbytes(inputs)
    row["gbs"] = nbytes / (ours * 1e-3) / 1e9 if ours else None
    peak = bc.gpu_peak_gbs(device)
    row["pct_peak"] = 100 * row["gbs"] / peak if peak and row["gbs"] else None
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| op | case | dtype | mode | eager ms | compile ms | ours ms | ours | x eager | x compile | GB/s "
            "| % peak |\n|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        def cell(p):
            if p in r["ms"]:
                return f"{r['ms'][p]:.3f} ± {r['iqr_ms'][p]:.3f}"
            return f"n/a: {r['na'][p]}" if p in r["na"] else "-"

        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {cell('eager')} | {cell('compile')} "
                     f"| {cell(r['ours_provider'])} | {r['ours_provider']} | {bc.fmt(r['speedup_vs_eager'], 2)} "
                     f"| {bc.fmt(r['speedup_vs_compile'], 2)} | {bc.fmt(r['gbs'], 1)} | {bc.fmt(r['pct_peak'], 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timing (smoke test)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=["full"], choices=["fwd", "full"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (CPU)")
    p.add_argument("--out", type=Path, default=bc.ROOT / "benchmarks" / "results")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    rows = []
    interrupted = False
    try:
        for dt in args.dtypes:
            for case in build_cases(args.ops, args.quick, getattr(torch, dt), device):
                for mode in args.modes:
                    rows.append(run_case(case, args.providers, mode, device, min_run_time))
                    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    except KeyboardInterrupt:  # a suite's timeout (SIGINT): keep and save the finished rows, say so
        interrupted = True
        print(f"\ninterrupted: saving the {len(rows)} finished rows", flush=True)
    table = markdown(rows)
    print("\n" + table)
    if not args.no_save:
        meta = bc.metadata(device, [os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/bench_ops.py",
                                    *(sys.argv[1:] if argv is None else argv)])
        meta["interrupted"] = interrupted
        stem = f"ops_{device.type}" + ("_quick" if args.quick else "")
        md, js = bc.save(rows, meta, args.out, stem, table)
        print(f"\nsaved {md} and {js}")
    if interrupted:
        sys.exit(130)
    return rows


if __name__ == "__main__":
    main()
