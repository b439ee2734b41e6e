"""The ops under graph capture and without host syncs (issue 9, items 2 and 3, op level).

- ``torch.library.opcheck`` of every registered ``dfkd_fast::`` op (cpp backend; triton in the interpreter).
- ``torch.compile(fullgraph=True)`` of every public op on the torch and cpp backends: values and gradients equal
  to eager (``aot_eager`` keeps CPU time low; one op also through the default inductor backend; the triton ops
  at tiny shapes in the interpreter). Eager calls go through an autograd.Function, compiled ones through the
  custom op (``dfkd_fast.ops._registry``), so these comparisons also check that both doors agree.
- A ``TeacherProbe`` BN-prior + instance-feature step on LeNet-5-BN compiles with 0 graph breaks.
- ``SyncCounter``: each hot op does 0 host syncs per call inside ``_checks.deferred()``, and a NaN still raises a
  ``ValueError`` naming the op, argument and layer, with exactly one host read when the block ends.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_fast import _backend, _checks, ops
from dfkd_fast.hooks import BNStatHook, TeacherProbe
from dfkd_fast.models import build_model
from dfkd_fast.ops.bn_stats import bn_stat_loss_packed, pack_momentum, pack_stat_constants
from dfkd_fast.profiling import SyncCounter

CPP_OK, CPP_WHY = _backend.cpp_available("bn_stats_fwd")
TRITON_OK, TRITON_WHY = _backend.triton_available(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(not CPP_OK, reason=CPP_WHY or "")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY or "")
COMPILE_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]
SYNC_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _checks_on():
    """The deferred-error tests need value checks on, whatever DFKD_FAST_CHECKS says."""
    prev = _checks._enabled
    _checks.set_checks(True)
    yield
    _checks.set_checks(prev)


def _aten(name: str):
    return getattr(torch.ops.dfkd_fast, name).default


def _stat_inputs(chans=(3, 1, 4), momentum=False):
    n = sum(chans)
    starts = [0]
    for c in chans:
        starts.append(starts[-1] + c)
    mean = torch.randn(n, requires_grad=True)
    var = (torch.rand(n) + 0.2).requires_grad_()
    rm, rv = torch.randn(n), torch.rand(n) + 0.5
    offsets = torch.tensor(starts)
    segment = torch.tensor([i for i, c in enumerate(chans) for _ in range(c)])
    w = torch.tensor([2.0, 1.0, 0.5][:len(chans)])
    mb = vb = beta = None
    if momentum:
        mb, vb = torch.randn(n), torch.rand(n) + 0.5
        beta = torch.tensor([0.9] * chans[0] + [0.0] * (n - chans[0]))
    return mean, var, rm, rv, offsets, segment, w, mb, vb, beta


# ------------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------------
def _opcheck_cases(backend: str):
    x4 = torch.randn(3, 4, 5, 2, requires_grad=True)  # non-pow2 C and HW
    x3 = torch.randn(2, 3, 7, requires_grad=True)  # (N, C, L)
    x2 = torch.randn(5, 3, requires_grad=True)  # (N, C)
    xcl = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()  # channels_last
    cases = [("bn_stats", (x, backend)) for x in (x4, x3, x2, xcl)]
    cases += [("channel_stats", (x, backend)) for x in (x4, x3, xcl)]
    mean = x4.detach().mean(dim=(0, 2, 3))
    g = torch.randn(4)
    cases += [("bn_stats_bwd", (x4.detach(), mean, g, g * 0.5, torch.randn(3, 4), backend)),
              ("bn_stats_bwd", (x4.detach(), mean, g, None, None, backend))]
    for kind in ("l2", "kl", "mse"):
        for momentum in (False, True):
            m, v, rm, rv, off, seg, w, mb, vb, beta = _stat_inputs(momentum=momentum)
            cases.append(("bn_stat_loss_terms", (m, v, rm, rv, off, seg, w, kind, mb, vb, beta, backend)))
    z = torch.randn(4, 6, requires_grad=True)
    y = torch.softmax(torch.randn(4, 6), -1).requires_grad_()
    for name in ("soft_target_cross_entropy", "kd_kl_div"):
        for red, na, nb in (("mean", True, False), ("none", True, True), ("sum", False, True)):
            cases.append((name, (z, y, 2.0, red, na, nb, backend)))
    return cases


def _run_opcheck(cases):
    for name, args in cases:
        torch.library.opcheck(_aten(name), args)


@needs_cpp
def test_opcheck_cpp():
    cases = _opcheck_cases("cpp")
    x = torch.rand(2, 3, 6, 5)
    boxes = torch.tensor([[0.5, -1.0, 4.5, 5.0], [1.0, 1.0, 3.0, 4.0]], dtype=torch.float64)
    flip = torch.tensor([True, False])
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    cases += [("crop_flip_fwd", (x.clone().requires_grad_(), boxes, flip, 4, 3, mean, std, "cpp")),
              ("crop_flip_fwd", (x, boxes, flip, 4, 3, None, None, "cpp")),
              ("crop_flip_bwd", (torch.randn(2, 3, 4, 3), boxes, flip, 6, 5, std, "cpp"))]
    _run_opcheck(cases)


def test_opcheck_torch_stat_loss():
    """The loss op also takes backend='torch' (the vectorized reference behind the same schema)."""
    _run_opcheck([c for c in _opcheck_cases("torch") if c[0] == "bn_stat_loss_terms"])


@needs_triton
def test_opcheck_triton_interpreter():
    """Tiny shapes: every triton launch costs interpreter time (opcheck runs each op several times)."""
    x4 = torch.randn(2, 3, 2, 2, requires_grad=True)
    mean = x4.detach().mean(dim=(0, 2, 3))
    m, v, rm, rv, off, seg, w, mb, vb, beta = _stat_inputs(momentum=True)
    z = torch.randn(2, 5, requires_grad=True)
    y = torch.softmax(torch.randn(2, 5), -1)
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    k = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    cases = [("bn_stats", (x4, "triton")), ("channel_stats", (x4, "triton")),
             ("bn_stats_bwd", (x4.detach(), mean, torch.randn(3), torch.randn(3), torch.randn(2, 3), "triton")),
             ("bn_stat_loss_terms", (m, v, rm, rv, off, seg, w, "l2", mb, vb, beta, "triton")),
             ("soft_target_cross_entropy", (z, y, 2.0, "mean", True, False, "triton")),
             ("kd_kl_div", (z, y, 2.0, "none", True, False, "triton")),
             ("class_similarity", (torch.randn(4, 6, requires_grad=True), "triton")),
             ("info_nce_fwd", (q.requires_grad_(), k, 0.1)),
             ("info_nce_bwd", (q.detach(), k, torch.rand(3) + 1.0, torch.randn(3), 0.1, True, False))]
    _run_opcheck(cases)


# ------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public ops: values and gradients equal to eager
# ------------------------------------------------------------------------------------------------------
def _compare(fn, inputs, compiler="aot_eager"):
    """Eager vs compiled fn(*inputs) (a scalar): value and gradients w.r.t. every input requiring grad."""
    torch._dynamo.reset()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref = fn(*inputs)
    ref_g = torch.autograd.grad(ref, leaves) if leaves else ()
    got = torch.compile(fn, fullgraph=True, backend=compiler)(*inputs)
    got_g = torch.autograd.grad(got, leaves) if leaves else ()
    torch.testing.assert_close(got, ref, **TOL)
    for a, b in zip(got_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_bn_ops(backend):
    x = (2.0 + torch.randn(3, 4, 5, 3)).requires_grad_()  # non-pow2 C and HW
    x2 = torch.randn(5, 6, requires_grad=True)  # (N, C): BN1d input
    rms = [torch.randn(4), torch.randn(6)]
    rvs = [torch.rand(4) + 0.5, torch.rand(6) + 0.5]
    wts = torch.linspace(-1, 1, 30)  # >= N * C of both inputs

    def stats(x):
        m, v, i = ops.channel_stats(x, backend=backend)
        m2, v2 = ops.bn_stats(x, backend=backend)
        return m.sum() + (v * v).sum() + (i.reshape(-1) * wts[: i.numel()]).sum() + m2.square().sum() + v2.sum()

    _compare(stats, [x])
    _compare(stats, [x2])

    for kind in ("l2", "kl", "mse"):
        def loss(x, x2, kind=kind):
            return ops.bn_stat_loss([x, x2], rms, rvs, weights=[3.0, 1.0], kind=kind,
                                    momentum_stats=[(rms[0] * 0.5, rvs[0] * 2.0), None], momentum=0.9,
                                    backend=backend)

        _compare(loss, [x, x2])

    def from_stats(x, x2):
        (m, v), (m2, v2) = ops.bn_stats(x, backend=backend), ops.bn_stats(x2, backend=backend)
        terms = ops.bn_stat_loss_from_stats([m, m2], [v, v2], rms, rvs, [2.0, 1.0], "l2", backend=backend)
        return terms.sum()

    _compare(from_stats, [x, x2])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_soft_losses(backend, reduction):
    z = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    y = torch.softmax(torch.randn(5, 7), -1)
    w = torch.linspace(0.5, 1.5, 5)

    def fn(z, t):
        a = ops.soft_target_cross_entropy(z, y, 3.0, reduction, backend=backend)
        b = ops.kd_kl_div(z, t, 2.0, reduction, backend=backend)
        return (a * w).sum() + (b * w).sum() if reduction == "none" else a + b

    _compare(fn, [z, t])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_crop_flip_info_nce_similarity(backend):
    x = torch.rand(2, 3, 6, 5, requires_grad=True)
    boxes = torch.tensor([[0.5, -1.0, 4.5, 5.0], [1.0, 1.0, 3.0, 4.0]])
    flip = torch.tensor([True, False])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    wts = torch.randn(2, 3, 4, 4)
    _compare(lambda x: (ops.crop_flip(x, boxes, flip, 4, mean, std, backend=backend) * wts).sum(), [x])
    q = torch.randn(6, 8, requires_grad=True)
    k = torch.randn(6, 8, requires_grad=True)
    nce_backend = "auto" if backend == "cpp" else backend  # no cpp info_nce: auto is the reference on CPU
    _compare(lambda q, k: ops.info_nce(q, k, 0.2, backend=nce_backend).sum(), [q, k])
    wt = torch.randn(5, 9, requires_grad=True)
    g = torch.randn(5, 5)
    _compare(lambda w: (ops.class_similarity(w, backend=nce_backend) * g).sum(), [wt])


def test_compile_dirichlet_targets():
    """Sampling stays in torch's gamma-based ``_sample_dirichlet`` (traceable with the default generator)."""
    sim = ops.class_similarity(torch.randn(4, 6), backend="torch")
    classes = torch.tensor([0, 3, 1, 1, 2])
    beta = ops.beta_mixture(5, (1.0, 0.1))

    def fn(sim, classes, beta):
        return ops.dirichlet_targets(sim, classes, beta)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    ref = fn(sim, classes, beta)
    torch.manual_seed(3)
    got = compiled(sim, classes, beta)
    torch.testing.assert_close(got, ref)  # same draws from the same global generator state
    torch.testing.assert_close(got.sum(1), torch.ones(5))


@needs_cpp
def test_compile_inductor_once():
    """One op through the default backend (inductor): the custom op is an extern call in generated code."""
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.softmax(torch.randn(6, 5), -1)
    _compare(lambda z: ops.soft_target_cross_entropy(z, y, 2.0, backend="cpp") * 2.0 + z.square().sum(), [z],
             compiler="inductor")


# ------------------------------------------------------------------------------------------------------
# TeacherProbe under compile
# ------------------------------------------------------------------------------------------------------
def _lenet():
    torch.manual_seed(0)
    net = build_model("lenet5_bn", num_classes=10, in_channels=1, image_size=32)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_teacher_probe_step_compiles_fullgraph(backend):
    net = _lenet()
    probe = TeacherProbe(net, first_bn_multiplier=3.0, momentum=0.9, backend=backend)
    net(torch.rand(4, 1, 32, 32))
    probe.update_momentum()  # the blend with the moving averages is part of the traced loss
    wf = torch.linspace(-1, 1, probe.feature_dim)

    def step(x):
        logits = net(x)
        return probe.bn_loss() + 0.1 * (probe.instance_features() * wf).sum() + 0.01 * logits.square().sum()

    x = torch.rand(4, 1, 32, 32, requires_grad=True)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    _compare(step, [x])
    probe.remove()


# ------------------------------------------------------------------------------------------------------
# Host syncs: 0 per call inside deferred(); the deferred check still names op / argument / layer
# ------------------------------------------------------------------------------------------------------
def _zero_syncs(fn, calls: int = 2) -> None:
    with _checks.deferred():
        fn()  # warm-up (first-call packing of constants)
        for _ in range(calls):
            with SyncCounter() as sc:
                fn()
            assert sc.syncs == 0, sc.where


def _one_read_then_raises(fn, match: str) -> None:
    with SyncCounter() as sc, pytest.raises(ValueError, match=match):
        with _checks.deferred():
            fn()
    assert sc.syncs == 1, sc.where  # the single read of all flags at the block's end


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_stat_ops_sync_free_and_deferred_errors(backend):
    x = (1.0 + torch.randn(2, 3, 4, 4)).requires_grad_()
    x2 = torch.randn(3, 5, requires_grad=True)
    rms, rvs = [torch.randn(3), torch.randn(5)], [torch.rand(3) + 0.5, torch.rand(5) + 0.5]
    mmt = [(rms[0] * 0.5, rvs[0]), None]

    def stats():
        m, v, i = ops.channel_stats(x, backend=backend)
        (m.sum() + v.sum() + i.sum()).backward()

    def loss():
        ops.bn_stat_loss([x, x2], rms, rvs, [2.0, 1.0], momentum_stats=mmt, momentum=0.9, backend=backend).backward()

    _zero_syncs(stats)
    _zero_syncs(loss)
    bad = x.detach().clone()
    bad[1, 2, 0, 3] = float("nan")
    _one_read_then_raises(lambda: ops.channel_stats(bad, backend=backend), r"channel_stats: 'x' contains NaN or Inf")
    _one_read_then_raises(lambda: ops.bn_stat_loss([x, bad], [rms[0], rms[0]], [rvs[0], rvs[0]], backend=backend),
                          r"bn_stat_loss: 'feats\[1\]' contains NaN or Inf")


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_teacher_probe_sync_free_and_names_layer(backend):
    net = _lenet()
    probe = TeacherProbe(net, momentum=0.9, backend=backend)
    x = torch.rand(2, 1, 32, 32, requires_grad=True)

    def step():
        net(x)
        loss = probe.bn_loss() + probe.instance_features().sum() + sum(m.sum() for m, _ in probe.layer_stats())
        loss.backward()
        probe.update_momentum()

    _zero_syncs(step, calls=3)
    assert all(s is not None for s in probe.momentum_stats)
    names = [n for n, m in net.named_modules() if m is probe.layers[1]]
    # a NaN weight feeding the second BN layer: the error names that layer (index and module name)
    with torch.no_grad():
        _conv_before(net, probe.layers[1]).weight[0].fill_(float("nan"))
    _one_read_then_raises(lambda: (net(x), probe.bn_loss()),
                          rf"TeacherProbe: the input of BN layer 1 \('{names[0]}'\) contains NaN or Inf")
    probe.remove()


def _conv_before(net: nn.Module, bn: nn.Module) -> nn.Module:
    prev = None
    for m in net.modules():
        if m is bn:
            return prev
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prev = m
    raise AssertionError("BN layer not found")


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_bn_stat_hook_sync_free(backend):
    net = _lenet()
    hooks = [BNStatHook(m, momentum=0.5, backend=backend) for m in net.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    x = torch.rand(2, 1, 32, 32, requires_grad=True)

    def step():
        net(x)
        sum(h.r_feature for h in hooks).backward()
        for h in hooks:
            h.update_mmt()

    _zero_syncs(step)
    for h in hooks:
        h.remove()


def test_packed_constants_reused_and_equal():
    """pack_stat_constants once + bn_stat_loss_packed == bn_stat_loss_from_stats (with momentum)."""
    chans = [3, 2]
    means = [torch.randn(c, requires_grad=True) for c in chans]
    vars_ = [(torch.rand(c) + 0.1).requires_grad_() for c in chans]
    rms, rvs = [torch.randn(c) for c in chans], [torch.rand(c) + 0.5 for c in chans]
    mst = [(torch.randn(3), torch.rand(3) + 0.5), None]
    consts = pack_stat_constants(chans, rms, rvs, [2.0, 0.5], "kl")
    assert consts.channels == (3, 2) and consts.offsets.tolist() == [0, 3, 5]
    assert consts.segment.tolist() == [0, 0, 0, 1, 1]
    got = bn_stat_loss_packed(torch.cat(means), torch.cat(vars_), consts, *pack_momentum(consts, mst, 0.9),
                              backend="torch")
    ref = ops.bn_stat_loss_from_stats(means, vars_, rms, rvs, [2.0, 0.5], "kl", mst, 0.9, backend="torch")
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got.sum(), means + vars_)
    g2 = torch.autograd.grad(ref.sum(), means + vars_)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="running_vars"):
        pack_stat_constants(chans, rms, [rvs[0], torch.tensor([1.0, float("inf")])])


@pytest.mark.parametrize("backend", SYNC_BACKENDS)
def test_soft_losses_crop_flip_info_nce_sync_free(backend):
    z = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    y = torch.softmax(torch.randn(4, 6), -1)
    img = torch.rand(2, 3, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 6.0, 6.0]])
    flip = torch.tensor([False, True])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4)
    nce_backend = "torch" if backend == "cpp" else backend

    def step():
        (ops.soft_target_cross_entropy(z, y, 2.0, backend=backend)
         + ops.kd_kl_div(z, t, 2.0, backend=backend)
         + ops.crop_flip(img, boxes, flip, 4, mean, std, backend=backend).sum()
         + ops.info_nce(q, k, 0.1, backend=nce_backend).sum()).backward()

    _zero_syncs(step)
    zb = z.detach().clone()
    zb[2, 1] = float("nan")
    _one_read_then_raises(lambda: ops.soft_target_cross_entropy(zb, y, 2.0, backend=backend),
                          r"soft_target_cross_entropy: 'logits' or 'targets' contains NaN or Inf|"
                          r"soft_target_cross_entropy: 'logits' contains NaN or Inf")
    _one_read_then_raises(lambda: ops.kd_kl_div(z.detach(), zb, 2.0, backend=backend),
                          r"kd_kl_div: '(student_logits' or 'teacher_logits|teacher_logits)' contains NaN or Inf")
    _one_read_then_raises(lambda: ops.crop_flip(img.detach(), boxes, flip, 4, mean, -std, backend=backend),
                          r"crop_flip: 'std' must be > 0")
    _one_read_then_raises(lambda: ops.info_nce(q.detach(), k * float("nan"), 0.1, backend=nce_backend),
                          r"info_nce: 'keys' contains NaN or Inf")


def test_deferred_flags_accumulate_over_steps():
    """Many steps with one check site keep one flag (AND-ed); the first failing step's message wins at the end."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="'x' contains NaN"):
        with _checks.deferred() as guard:
            for step in range(4):
                xi = x.clone()
                if step == 2:
                    xi[0, 0, 0] = float("inf")
                ops.channel_stats(xi, backend="torch")
            assert len(guard) == 1


@needs_triton
def test_compile_triton_interpreter_tiny():
    """The triton custom ops trace too (fake implementations); tiny shapes keep the interpreter fast."""
    x = (1.0 + torch.randn(2, 3, 2, 2)).requires_grad_()
    rms, rvs = [torch.randn(3)], [torch.rand(3) + 0.5]
    _compare(lambda x: ops.bn_stat_loss([x], rms, rvs, kind="kl", backend="triton")
             + ops.channel_stats(x, backend="triton")[2].square().sum(), [x])
    z = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    _compare(lambda z, t: ops.kd_kl_div(z, t, 2.0, backend="triton"), [z, t])
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    _compare(lambda q, k: (ops.info_nce(q, k, 0.5, backend="triton") * torch.tensor([1.0, 2.0, 3.0])).sum(), [q, k])
    img = torch.rand(1, 2, 3, 3, requires_grad=True)
    boxes = torch.tensor([[0.5, 0.0, 2.5, 3.0]])
    _compare(lambda im: ops.crop_flip(im, boxes, torch.tensor([True]), 2, backend="triton").square().sum(), [img])
