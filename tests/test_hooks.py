"""Hooks: TeacherProbe / BNStatHook / FeatureProbe against naive DeepInversion-style hooks on a tiny conv net."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_fast import _backend
from dfkd_fast.hooks import BNStatHook, DeepInversionHook, FeatureProbe, TeacherProbe

CPP_OK, CPP_WHY = _backend.cpp_available("bn_stats_fwd")
TRITON_OK, TRITON_WHY = _backend.triton_available(torch.device("cpu"))
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not CPP_OK, reason=CPP_WHY or "")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY or "")),
]


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, a BN1d in the head: three BN layers of 4, 6 and 5 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _teacher() -> TinyNet:
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


class NaiveHook:
    """The common DeepInversion / FastDFKD hook (permute + contiguous + view, mean, var, norms)."""

    def __init__(self, module: nn.Module, mmt_rate: float = 0.0) -> None:
        self.mmt_rate = mmt_rate
        self.mmt = None
        self.handle = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, output):
        x = inputs[0]
        nch = x.shape[1]
        flat = x.transpose(0, 1).contiguous().view(nch, -1) if x.dim() == 2 else \
            x.permute(1, 0, 2, 3).contiguous().view(nch, -1)
        mean = flat.mean(1)
        var = flat.var(1, unbiased=False)
        if self.mmt is not None:
            mm, vm = self.mmt
            self.r_feature = torch.norm(module.running_var - (1 - self.mmt_rate) * var - self.mmt_rate * vm, 2) + \
                torch.norm(module.running_mean - (1 - self.mmt_rate) * mean - self.mmt_rate * mm, 2)
        else:
            self.r_feature = torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)
        self.tmp = (mean, var)
        self.inst = x.mean(dim=(2, 3)) if x.dim() == 4 else x

    def update_mmt(self):
        mean, var = self.tmp
        if self.mmt is None:
            self.mmt = (mean.data, var.data)
        else:
            mm, vm = self.mmt
            self.mmt = (self.mmt_rate * mm + (1 - self.mmt_rate) * mean.data,
                        self.mmt_rate * vm + (1 - self.mmt_rate) * var.data)

    def remove(self):
        self.handle.remove()


def _bns(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _naive(net, x, mult, hooks=None):
    hooks = hooks or [NaiveHook(m) for m in _bns(net)]
    net(x)
    loss = sum((mult if i == 0 else 1.0) * h.r_feature for i, h in enumerate(hooks))
    return loss, hooks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_teacher_probe_matches_naive_hooks(backend, channels_last):
    net = _teacher()
    img = torch.rand(4, 3, 6, 6)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        img = img.to(memory_format=torch.channels_last)
    x1 = img.clone().requires_grad_()
    with TeacherProbe(net, first_bn_multiplier=3.0, backend=backend) as probe:
        net(x1)
        loss = probe.bn_loss()
        feats = probe.instance_features()
        stats = probe.layer_stats()
        assert probe.channels == [4, 6, 5] and probe.feature_dim == 15 and feats.shape == (4, 15)
        (loss + (feats * torch.linspace(-1, 1, 15)).sum()).backward()
    x2 = img.clone().requires_grad_()
    ref, hooks = _naive(net, x2, 3.0)
    ref_feats = torch.cat([h.inst for h in hooks], 1)
    (ref + (ref_feats * torch.linspace(-1, 1, 15)).sum()).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    for (m, v), h in zip(stats, hooks, strict=True):
        torch.testing.assert_close(m, h.tmp[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, h.tmp[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert len(net.body[1]._forward_hooks) == 1  # the probe's hook was removed, the naive one is left


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_probe_momentum_matches_fastdfkd(backend):
    net = _teacher()
    beta = 0.9
    probe = TeacherProbe(net, momentum=beta, backend=backend)
    naive = [NaiveHook(m, beta) for m in _bns(net)]
    for step in range(3):
        img = torch.rand(4, 3, 6, 6)
        x1 = img.clone().requires_grad_()
        with probe.paused():
            net(torch.rand(2, 3, 6, 6))  # not captured
        net(x1)  # both the probe and the naive hooks see this forward
        loss = probe.bn_loss()
        ref = sum(h.r_feature for h in naive)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        g1 = torch.autograd.grad(loss, x1, retain_graph=True)[0]
        g2 = torch.autograd.grad(ref, x1)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        probe.update_momentum()
        for h in naive:
            h.update_mmt()
        assert step == 0 or probe.momentum_stats[0] is not None
    probe.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_stat_hook_matches_naive(backend):
    net = _teacher()
    hooks = [DeepInversionHook(m, momentum=0.5, backend=backend) for m in _bns(net)]
    assert DeepInversionHook is BNStatHook
    naive = [NaiveHook(m, 0.5) for m in _bns(net)]
    for _ in range(2):
        x = torch.rand(3, 3, 5, 5, requires_grad=True)
        net(x)
        for h, n in zip(hooks, naive, strict=True):
            torch.testing.assert_close(h.r_feature, n.r_feature, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h.var, n.tmp[1], rtol=1e-5, atol=1e-5)
        g1 = torch.autograd.grad(sum(h.r_feature for h in hooks), x, retain_graph=True)[0]
        g2 = torch.autograd.grad(sum(n.r_feature for n in naive), x)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        for h, n in zip(hooks, naive, strict=True):
            h.update_mmt()
            n.update_mmt()
    for h in hooks:
        h.remove()
    assert all(len(m._forward_hooks) == 1 for m in _bns(net))  # only the naive hooks are left


def test_paused_forward_keeps_previous_capture():
    net = _teacher()
    probe = TeacherProbe(net, backend="torch")
    net(torch.rand(4, 3, 6, 6))
    feats = probe.instance_features()
    with probe.paused():
        net(torch.rand(2, 3, 6, 6))
    assert probe.instance_features().shape == feats.shape == (4, 15)
    probe.remove()
    with pytest.raises(RuntimeError, match="forward"):
        TeacherProbe(net, backend="torch").bn_loss()


def test_kinds_and_layers_subset():
    from dfkd_fast.kernels.bn_stats import bn_stat_loss_ref

    net = _teacher()
    bns = _bns(net)
    seen = []
    handle = bns[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    for kind in ("kl", "mse"):
        probe = TeacherProbe(net, kind=kind, layers=[bns[1]], first_bn_multiplier=2.0)
        net(torch.rand(3, 3, 6, 6))
        ref = 2.0 * bn_stat_loss_ref([seen[-1]], [bns[1].running_mean], [bns[1].running_var], kind=kind)
        torch.testing.assert_close(probe.bn_loss(), ref, rtol=1e-5, atol=1e-5)
        probe.remove()
    handle.remove()


def test_no_bn_model_raises_with_alternatives():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="DataImpressions.*DAFL.*ZSKT.*ImpressionSpace"):
        TeacherProbe(net)
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatHook(net[0])
    with pytest.raises(ValueError, match="kind"):
        TeacherProbe(_teacher(), kind="bad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_probe_code(backend):
    net = _teacher()
    outs = []
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    handles = [c.register_forward_hook(lambda m, i, o: outs.append(o)) for c in convs]
    with FeatureProbe(net, backend=backend) as probe:
        x = torch.rand(3, 3, 6, 6, requires_grad=True)
        net(x)
        code = probe.code()
    for h in handles:
        h.remove()
    ref = torch.cat([t for o in outs for t in (o.mean(dim=(0, 2, 3)), o.var(dim=(0, 2, 3), unbiased=False))])
    assert code.shape == (2 * (4 + 6),)
    torch.testing.assert_close(code, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(code)
    g1 = torch.autograd.grad((code * w).sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad((ref * w).sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no module"):
        FeatureProbe(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_probe_survives_inplace_activations(backend):
    """Conv -> ReLU(inplace=True): the fused backward re-reads the conv output, which the ReLU must not clobber."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 3, 3), nn.ReLU(inplace=True)).double()
    ref_net = nn.Sequential(*[nn.ReLU(inplace=False) if isinstance(m, nn.ReLU) else m for m in net])
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dtype = torch.float64 if backend == "torch" else torch.float32
    net, ref_net = net.to(dtype), ref_net.to(dtype)
    probe = FeatureProbe(net, backend=backend)
    net(x.to(dtype))
    probe.code().sum().backward()
    ref = FeatureProbe(ref_net, backend="torch")
    ref_net(x_ref.to(dtype))
    ref.code().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_probe_repacks_changed_running_stats_and_restores_momentum(backend):
    """Constants are packed once, but an in-place change of a running statistic (load_state_dict, train-mode BN)
    is picked up; the moving averages round-trip through momentum_stats / set_momentum_stats (resume)."""
    net = _teacher()
    probe = TeacherProbe(net, momentum=0.9, backend=backend)
    x = torch.rand(3, 3, 6, 6)
    net(x)
    before = probe.bn_loss()
    consts = probe.constants
    assert probe.constants is consts  # reused, not re-packed per call
    with torch.no_grad():
        net.body[1].running_mean.add_(1.0)  # in place: same tensor, new version
    net(x)
    after = probe.bn_loss()
    assert probe.constants is not consts
    ref, hooks = _naive(net, x, 1.0)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    probe.update_momentum()
    saved = [(m.clone(), v.clone()) for m, v in probe.momentum_stats]
    net(torch.rand(3, 3, 6, 6))
    probe.update_momentum()
    probe.set_momentum_stats(saved)
    for (m, v), (sm, sv) in zip(probe.momentum_stats, saved, strict=True):
        torch.testing.assert_close(m, sm)
        torch.testing.assert_close(v, sv)
    probe.set_momentum_stats(None)
    assert probe.momentum_stats == [None, None, None]
    probe.clear()
    with pytest.raises(RuntimeError, match="no BN input captured"):
        probe.bn_loss()
    probe.remove()
