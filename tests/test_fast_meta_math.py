"""FastMeta's meta-update checked against a by-hand re-implementation on a tiny generator and teacher.

The inner loop is replayed here from theta and z_0 with our own loss (l2 BN prior from forward hooks + CE), our
own autograd and ``torch.optim.Adam`` on copies; only the random draws (z_0, crop boxes, flips) are taken from the
synthesizer. Expected meta-gradients:

- first-order MAML: :math:`g = \\sum_k \\nabla_{\\theta'} L(\\theta'_k, z_k)` over the inner steps k;
- Reptile: :math:`g = \\theta - \\theta'_K` (theta' after the last inner step);

and the meta step is Adam at lr = lr_g * g_steps, betas (0.5, 0.999), written out below.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_fast import ops
from dfkd_fast.synthesis.fast_meta import FastMeta

K, IMG, STEPS, BS = 4, (3, 8, 8), 3, 8
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
HP = {"nz": 16, "ngf": 8, "g_steps": STEPS, "lr_g": 0.01, "lr_z": 0.05, "bn": 10.0, "oh": 0.5, "bn_mmt": 0.0,
      "batch_size": BS, "mean": MEAN, "std": STD, "backend": "torch"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _hand_loss(teacher: nn.Module, gen: nn.Module, z, targets, boxes, flips) -> torch.Tensor:
    """bn * sum_l (||var_l - rvar_l||_2 + ||mean_l - rmean_l||_2) + oh * CE(T(aug(G(z))), y); batch stats of
    each BN layer's input over (N, H, W), biased variance."""
    feats = []
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: feats.append(inp[0])) for m in bns]
    try:
        x = gen(z)
        x_aug = ops.crop_flip(x, boxes, flips, IMG[1:], MEAN, STD, backend="torch")
        logits = teacher(x_aug)
    finally:
        for h in hooks:
            h.remove()
    bn = 0.0
    for f, m in zip(feats, bns, strict=True):
        mean = f.mean(dim=(0, 2, 3))
        var = ((f - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        bn = bn + (var - m.running_var).norm(2) + (mean - m.running_mean).norm(2)
    return HP["bn"] * bn + HP["oh"] * F.cross_entropy(logits, targets)


def _record(synth: FastMeta) -> list[dict]:
    """Wrap the synthesizer's step to record its random inputs (z, boxes, flips, targets) and its loss."""
    calls: list[dict] = []
    step = synth._step

    def recording(z, targets, boxes, flips, use_adv):
        assert not use_adv
        calls.append({"z": z.detach().clone(), "targets": targets.clone(), "boxes": boxes.clone(),
                      "flips": flips.clone()})
        out = step(z, targets, boxes, flips, use_adv)
        calls[-1]["loss"] = float(out[0])
        return out

    synth._step_fn = recording
    return calls


def _replay(synth: FastMeta, teacher: nn.Module, theta: list[torch.Tensor], calls: list[dict]):
    """Our inner loop from (theta, z_0): returns (sum of inner gradients, theta'_K, inner losses)."""
    gen = copy.deepcopy(synth.fast)
    with torch.no_grad():
        for p, t in zip(gen.parameters(), theta, strict=True):
            p.copy_(t)
    z = calls[0]["z"].clone().requires_grad_()
    params = list(gen.parameters())
    opt = torch.optim.Adam([{"params": params}, {"params": [z], "lr": HP["lr_z"]}], lr=HP["lr_g"],
                           betas=(0.5, 0.999))
    total = [torch.zeros_like(p) for p in params]
    losses = []
    for c in calls:
        torch.testing.assert_close(z.detach(), c["z"], rtol=1e-5, atol=1e-6)  # the same inner trajectory
        loss = _hand_loss(teacher, gen, z, c["targets"], c["boxes"], c["flips"])
        grads = torch.autograd.grad(loss, [*params, z])
        losses.append(float(loss.detach()))
        for t, g in zip(total, grads, strict=False):
            t.add_(g)
        for p, g in zip([*params, z], grads, strict=True):
            p.grad = g
        opt.step()
    return total, [p.detach().clone() for p in params], losses


def _adam_steps(theta, grads_seq, lr, betas=(0.5, 0.999), eps=1e-8):
    """Adam (no weight decay) written out: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
    theta -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
    out = []
    for i, th in enumerate(theta):
        m = torch.zeros_like(th)
        v = torch.zeros_like(th)
        p = th.clone()
        for t, grads in enumerate(grads_seq, start=1):
            g = grads[i]
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("meta", ["fomaml", "reptile"])
def test_meta_update_matches_hand_computation(meta):
    synth = FastMeta(_teacher(), K, IMG, meta=meta, **HP)
    teacher = _teacher()  # an identical, independent copy for the by-hand loss
    theta0 = [p.detach().clone() for p in synth.netG.parameters()]
    meta_grads, thetas = [], [theta0]
    for _ in range(2):  # two batches: the second checks that meta-gradients do not accumulate across batches
        calls = _record(synth)
        theta = thetas[-1]
        synth.synthesize()
        assert len(calls) == STEPS
        total, theta_k, losses = _replay(synth, teacher, theta, calls)
        assert losses == pytest.approx([c["loss"] for c in calls], rel=1e-5)
        want = total if meta == "fomaml" else [a - b for a, b in zip(theta, theta_k, strict=True)]
        # the inner displacement is not the summed gradient: the two rules really differ
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(total, [a - b for a, b in
                                                                       zip(theta, theta_k, strict=True)],
                                                              strict=True))
        for got, exp in zip([p.grad for p in synth.netG.parameters()], want, strict=True):
            torch.testing.assert_close(got, exp, rtol=2e-4, atol=1e-6)
        meta_grads.append(want)
        expected = _adam_steps(theta0, meta_grads, HP["lr_g"] * STEPS)
        for got, exp in zip(synth.netG.parameters(), expected, strict=True):
            torch.testing.assert_close(got.detach(), exp, rtol=1e-4, atol=1e-6)
        thetas.append([p.detach().clone() for p in synth.netG.parameters()])
