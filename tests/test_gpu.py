"""GPU suite: every Triton kernel against its reference at the SPEC §6 sizes, fp32 and bf16, values and gradients,
and one CMI synthesis step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).

Every test is marked ``gpu``: skipped unless ``DFKD_FAST_GPU_TESTS=1`` on a CUDA machine (tests/conftest.py; with
that variable set, Triton runs compiled, not interpreted). One command runs them with the benchmarks:
``bash benchmarks/gpu_suite.sh``.

Accuracy rules (STYLE.md): fp32 against a float64 reference with a per-op (rtol, atol-relative-to-max) pair;
bf16 inputs: the fused path's error against the float64 reference of the SAME (bf16-rounded) inputs must be at
most 2x the error of eager PyTorch computing in bf16 (flash-attention's rule), plus a small floor, for the
output and every gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dfkd_fast.kernels import LAUNCHES
from dfkd_fast.kernels.bn_stats import bn_stat_loss_ref, channel_stats_ref
from dfkd_fast.kernels.crop_flip import crop_flip_grid, crop_flip_ref
from dfkd_fast.kernels.dirichlet import class_similarity_ref
from dfkd_fast.kernels.info_nce import info_nce_ref
from dfkd_fast.kernels.soft_ce import kd_kl_div_ref, soft_target_cross_entropy_ref

import dfkd_fast.ops as ops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
# fp32 fused vs float64 reference: (rtol, atol as a fraction of max |reference|)
# (bilinear taps are computed in fp32 from coordinates up to ~40 px: ~4e-6 px error -> crop_flip's looser pair)
FP32_TOL = {"bn_stat_loss": (1e-4, 1e-5), "info_nce": (1e-4, 1e-5), "soft_ce": (1e-4, 1e-6),
            "crop_flip": (1e-4, 2e-5), "class_similarity": (1e-4, 1e-5)}


def _close_fp32(actual: torch.Tensor, expected: torch.Tensor, op: str, what: str) -> None:
    rtol, atol_rel = FP32_TOL[op]
    atol = atol_rel * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{op} {what} (fp32): {m}")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _within_2x_eager(fast: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, op: str, what: str) -> None:
    """flash-attention's rule: |fast - ref| <= 2 |eager_lowp - ref| + floor (floor: 1e-6 of max |ref|)."""
    e_fast, e_eager = _max_err(fast, ref), _max_err(eager, ref)
    floor = 1e-6 * float(ref.abs().max()) + 1e-9
    assert e_fast <= 2 * e_eager + floor, f"{op} {what} (bf16): fused error {e_fast:.3e} > 2 x eager {e_eager:.3e}"


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


# ------------------------------------------------------------------------------------------------ BN statistics
def _resnet34_bn_inputs(batch: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The input of every BatchNorm layer of a CIFAR ResNet-34 at ``batch`` (SPEC §6), and random running stats."""
    from dfkd_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet34", num_classes=10).to(CUDA).eval()
    feats: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
             for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(torch.randn(batch, 3, 32, 32, device=CUDA))
    for h in hooks:
        h.remove()
    rms = [torch.randn(f.shape[1], device=CUDA) * 0.1 for f in feats]
    rvs = [torch.rand(f.shape[1], device=CUDA) + 0.5 for f in feats]
    return feats, rms, rvs


@pytest.fixture(scope="module")
def resnet34_feats():
    return _resnet34_bn_inputs()


@pytest.mark.parametrize("kind", ["l2", "kl", "mse"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bn_stat_loss_resnet34_fp32(resnet34_feats, kind, momentum):
    feats, rms, rvs = resnet34_feats
    xs = [f.clone().requires_grad_(True) for f in feats]
    mstats = ([(torch.randn_like(m) * 0.1, torch.rand_like(v) + 0.5) for m, v in zip(rms, rvs, strict=True)]
              if momentum else None)
    weights = [10.0] + [1.0] * (len(xs) - 1)  # DeepInversion's first_bn_multiplier
    LAUNCHES.clear()
    loss = ops.bn_stat_loss(xs, rms, rvs, weights, kind=kind, momentum_stats=mstats, momentum=momentum,
                            backend="triton")
    g = _grads(loss, xs)
    assert LAUNCHES["bn_stats_fwd"] >= 1 and LAUNCHES["stat_loss_fwd"] >= 1  # the Triton path ran
    x64 = [f.double().requires_grad_(True) for f in feats]
    m64 = [(a.double(), b.double()) for a, b in mstats] if mstats else None
    ref = bn_stat_loss_ref(x64, [m.double() for m in rms], [v.double() for v in rvs], weights, kind, m64, momentum)
    g_ref = _grads(ref, x64)
    _close_fp32(loss, ref, "bn_stat_loss", "loss")
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        _close_fp32(a, b, "bn_stat_loss", f"grad of layer {i} {tuple(a.shape)}")


def test_bn_stat_loss_resnet34_channels_last_fp32(resnet34_feats):
    feats, rms, rvs = resnet34_feats
    xs = [f.contiguous(memory_format=torch.channels_last).requires_grad_(True) for f in feats]
    loss = ops.bn_stat_loss(xs, rms, rvs, backend="triton")
    g = _grads(loss, xs)
    x64 = [f.double().requires_grad_(True) for f in feats]
    ref = bn_stat_loss_ref(x64, [m.double() for m in rms], [v.double() for v in rvs])
    g_ref = _grads(ref, x64)
    _close_fp32(loss, ref, "bn_stat_loss", "loss (channels_last)")
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert a.is_contiguous(memory_format=torch.channels_last), i
        _close_fp32(a, b, "bn_stat_loss", f"grad of layer {i} (channels_last)")


def test_bn_stat_loss_resnet34_bf16(resnet34_feats):
    feats, rms, rvs = resnet34_feats
    xs = [f.to(torch.bfloat16).requires_grad_(True) for f in feats]
    loss = ops.bn_stat_loss(xs, rms, rvs, backend="triton")
    g = _grads(loss, xs)
    x64 = [x.detach().double().requires_grad_(True) for x in xs]
    ref = bn_stat_loss_ref(x64, [m.double() for m in rms], [v.double() for v in rvs])
    g_ref = _grads(ref, x64)
    # eager bf16: DeepInversion's hook computing the statistics in bf16
    xe = [x.detach().clone().requires_grad_(True) for x in xs]
    eager = sum(torch.norm(rv.to(torch.bfloat16) - x.var([0, 2, 3], unbiased=False), 2)
                + torch.norm(rm.to(torch.bfloat16) - x.mean([0, 2, 3]), 2)
                for x, rm, rv in zip(xe, rms, rvs, strict=True))
    g_eager = _grads(eager, xe)
    _within_2x_eager(loss, eager, ref, "bn_stat_loss", "loss")
    for i, (a, e, b) in enumerate(zip(g, g_eager, g_ref, strict=True)):
        assert a.dtype == torch.bfloat16
        _within_2x_eager(a, e, b, "bn_stat_loss", f"grad of layer {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_stats_instance_gradient(resnet34_feats, dtype):
    """CMI's instance features: the backward with the instance-mean gradient (HAS_GI) on the largest layer."""
    x = resnet34_feats[0][0].to(dtype).requires_grad_(True)
    mean, var, inst = ops.channel_stats(x, backend="triton")
    w_m, w_v, w_i = torch.randn_like(mean), torch.randn_like(var), torch.randn_like(inst)
    g = _grads((mean * w_m).sum() + (var * w_v).sum() + (inst * w_i).sum(), [x])[0]
    x64 = x.detach().double().requires_grad_(True)
    m64, v64, i64 = channel_stats_ref(x64)
    g_ref = _grads((m64 * w_m.double()).sum() + (v64 * w_v.double()).sum() + (i64 * w_i.double()).sum(), [x64])[0]
    if dtype == torch.float32:
        for a, b, what in ((mean, m64, "mean"), (var, v64, "var"), (inst, i64, "inst"), (g, g_ref, "grad")):
            _close_fp32(a, b, "bn_stat_loss", what)
    else:
        xe = x.detach().clone().requires_grad_(True)
        me, ve, ie = xe.mean([0, 2, 3]), xe.var([0, 2, 3], unbiased=False), xe.mean([2, 3])
        g_e = _grads((me * w_m).sum() + (ve * w_v).sum() + (ie * w_i).sum(), [xe])[0]
        for a, e, b, what in ((mean, me, m64, "mean"), (var, ve, v64, "var"), (inst, ie, i64, "inst"),
                              (g, g_e, g_ref, "grad")):
            _within_2x_eager(a, e, b, "channel_stats", what)


# ------------------------------------------------------------------------------------------------ InfoNCE
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_info_nce_cmi_size(d, dtype):
    m = 256 + 4096  # a batch of 256 + n_neg = 4096 bank entries (SPEC §6)
    torch.manual_seed(1)
    q = F.normalize(torch.randn(m, d, device=CUDA), dim=1).to(dtype).requires_grad_(True)
    k = F.normalize(torch.randn(m, d, device=CUDA), dim=1).to(dtype).requires_grad_(True)
    g_out = torch.rand(m, device=CUDA)
    LAUNCHES.clear()
    loss = ops.info_nce(q, k, 0.1, backend="triton")
    gq, gk = _grads((loss * g_out).sum(), [q, k])
    assert LAUNCHES["info_nce_fwd"] >= 1 and LAUNCHES["info_nce_bwd_dk"] >= 1  # the Triton path ran
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    ref = info_nce_ref(q64, k64, 0.1)
    gq_ref, gk_ref = _grads((ref * g_out.double()).sum(), [q64, k64])
    if dtype == torch.float32:
        for a, b, what in ((loss, ref, "loss"), (gq, gq_ref, "dq"), (gk, gk_ref, "dk")):
            _close_fp32(a, b, "info_nce", what)
        return
    qe, ke = (t.detach().clone().requires_grad_(True) for t in (q, k))
    eager = F.cross_entropy(qe @ ke.t() / 0.1, torch.arange(m, device=CUDA), reduction="none")
    gq_e, gk_e = _grads((eager * g_out.to(eager.dtype)).sum(), [qe, ke])
    for a, e, b, what in ((loss, eager, ref, "loss"), (gq, gq_e, gq_ref, "dq"), (gk, gk_e, gk_ref, "dk")):
        _within_2x_eager(a, e, b, "info_nce", what)


# ------------------------------------------------------------------------------------------------ soft CE / KD
SOFT_SHAPES = [(256, 10), (256, 1000), (8192, 10), (8192, 1000), (256, 10000)]  # last: K > 4096, several tiles


@pytest.mark.parametrize("n,k", SOFT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["soft_ce", "kd_kl_div"])
def test_soft_losses(op, n, k, dtype):
    torch.manual_seed(2)
    a = (torch.randn(n, k, device=CUDA) * 5).to(dtype).requires_grad_(True)
    if op == "soft_ce":
        b = torch.distributions.Dirichlet(torch.full((k,), 0.5, device=CUDA)).sample((n,)).to(dtype)
        fast_fn, ref_fn, temp = ops.soft_target_cross_entropy, soft_target_cross_entropy_ref, 20.0
    else:
        b = (torch.randn(n, k, device=CUDA) * 5).to(dtype)
        fast_fn, ref_fn, temp = ops.kd_kl_div, kd_kl_div_ref, 4.0
    b.requires_grad_(True)
    loss = fast_fn(a, b, temp, backend="triton")
    ga, gb = _grads(loss, [a, b])
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    ref = ref_fn(a64, b64, temp)
    ga_ref, gb_ref = _grads(ref, [a64, b64])
    if dtype == torch.float32:
        for x, y, what in ((loss, ref, "loss"), (ga, ga_ref, "grad a"), (gb, gb_ref, "grad b")):
            _close_fp32(x, y, "soft_ce", what)
        return
    ae, be = (t.detach().clone().requires_grad_(True) for t in (a, b))
    if op == "soft_ce":
        eager = -(be * F.log_softmax(ae / temp, dim=1)).sum(1).mean()
    else:
        eager = F.kl_div(F.log_softmax(ae / temp, dim=1), F.softmax(be / temp, dim=1),
                         reduction="batchmean") * temp * temp
    ga_e, gb_e = _grads(eager, [ae, be])
    for x, e, y, what in ((loss, eager, ref, "loss"), (ga, ga_e, ga_ref, "grad a"), (gb, gb_e, gb_ref, "grad b")):
        _within_2x_eager(x, e, y, op, what)


# ------------------------------------------------------------------------------------------------ crop_flip
def _cifar_boxes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global view (4-pixel padded crop) for the first half, random resized crop for the second (SPEC §3.2)."""
    shift = torch.randint(-4, 5, (n, 2), generator=generator).double()
    boxes = torch.cat([shift, shift + 32], dim=1)
    h = n // 2
    area = torch.empty(h).uniform_(0.25, 1.0, generator=generator) * 32 * 32
    ratio = torch.exp(torch.empty(h).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    w, hh = (area * ratio).sqrt().clamp(max=32), (area / ratio).sqrt().clamp(max=32)
    x0 = torch.rand(h, generator=generator) * (32 - w)
    y0 = torch.rand(h, generator=generator) * (32 - hh)
    boxes[h:] = torch.stack([x0, y0, x0 + w, y0 + hh], dim=1).double()
    flip = torch.rand(n, generator=generator) < 0.5
    return boxes.to(CUDA), flip.to(CUDA), torch.randn(n, 3, 32, 32, generator=generator).to(CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out", [32, 8])
def test_crop_flip_cifar_batch(dtype, normalize, channels_last, out):
    gen = torch.Generator().manual_seed(3)
    boxes, flip, x = _cifar_boxes(256, gen)
    mean, std = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)) if normalize else (None, None)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g_out = torch.randn(256, 3, out, out, device=CUDA)
    y = ops.crop_flip(x, boxes, flip, out, mean, std, backend="triton")
    gx = _grads((y.float() * g_out).sum(), [x])[0]
    x64 = x.detach().double().requires_grad_(True)
    ref = crop_flip_ref(x64, boxes, flip, out, mean, std)
    gx_ref = _grads((ref * g_out.double()).sum(), [x64])[0]
    if dtype == torch.float32:
        _close_fp32(y, ref, "crop_flip", "output")
        _close_fp32(gx, gx_ref, "crop_flip", "grad x")
        return
    xe = x.detach().clone().requires_grad_(True)  # the eager pipeline: grid_sample in bf16
    grid = crop_flip_grid(boxes, flip, (32, 32), (out, out)).to(dtype)
    ye = F.grid_sample(xe, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if normalize:
        ye = (ye - torch.tensor(mean, device=CUDA, dtype=dtype).view(1, -1, 1, 1)) \
            / torch.tensor(std, device=CUDA, dtype=dtype).view(1, -1, 1, 1)
    gxe = _grads((ye.float() * g_out).sum(), [xe])[0]
    _within_2x_eager(y, ye, ref, "crop_flip", "output")
    _within_2x_eager(gx, gxe, gx_ref, "crop_flip", "grad x")


# ------------------------------------------------------------------------------------------------ class similarity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_similarity_1000_classes(dtype):
    w = torch.randn(1000, 512, device=CUDA).to(dtype)
    out = ops.class_similarity(w, backend="triton")
    ref = class_similarity_ref(w.double())
    if dtype == torch.float32:
        _close_fp32(out, ref, "class_similarity", "similarity")
    else:
        wn = w / w.norm(dim=1, keepdim=True)
        c = wn @ wn.t()
        lo, hi = c.min(1, keepdim=True).values, c.max(1, keepdim=True).values
        _within_2x_eager(out, (c - lo) / (hi - lo), ref, "class_similarity", "similarity")


# ------------------------------------------------------------------------------------------------ CUDA graphs
def test_cmi_step_reduce_overhead_cuda_graphs():
    """One CMI synthesis (2 optimization steps, twice: the second batch has a non-empty memory bank) with the
    per-step function under ``torch.compile(mode="reduce-overhead")``: finite images in [0, 1], finite losses."""
    from dfkd_fast.models import build_model
    from dfkd_fast.synthesis import build_synthesizer

    torch.manual_seed(4)
    teacher = build_model("wrn16_1", num_classes=10).to(CUDA).eval()
    synth = build_synthesizer("cmi", teacher, 10, (3, 32, 32), batch_size=64, iterations=2,
                              compile="reduce-overhead")
    for _ in range(2):
        res = synth.synthesize()
        assert res.images.shape == (64, 3, 32, 32) and res.images.device.type == "cuda"
        assert bool(torch.isfinite(res.images).all())
        assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
        assert len(res.losses) >= 1 and all(math.isfinite(v) for v in res.losses)
