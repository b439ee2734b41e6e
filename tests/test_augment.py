"""dfkd_fast.augment: box/flip samplers stay within their specs; CropFlip and jitter_flip are differentiable."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dfkd_fast.kernels.crop_flip import crop_flip_ref

from dfkd_fast.augment import (
    CropFlip,
    jitter_flip,
    roll_flip,
    sample_crop_boxes,
    sample_flips,
    sample_jitter,
    sample_resized_crop_boxes,
)
from dfkd_fast.profiling import SyncCounter


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("hw,padding", [((32, 32), 4), ((9, 7), 2), ((5, 6), 0)])  # CMI default, non-square, none
def test_crop_boxes_are_whole_pixel_shifts_within_padding(hw, padding):
    h, w = hw
    boxes = sample_crop_boxes(500, hw, padding=padding, generator=_gen())
    assert boxes.shape == (500, 4) and boxes.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    dx, dy = boxes[:, 0], boxes[:, 1]
    assert dx.abs().max() <= padding and dy.abs().max() <= padding
    assert torch.equal(boxes[:, 2] - dx, torch.full_like(dx, w))
    assert torch.equal(boxes[:, 3] - dy, torch.full_like(dy, h))
    # every shift in {-p..p} occurs (uniform over 2p+1 values, 500 draws)
    assert set(dx.long().tolist()) == set(range(-padding, padding + 1))


def test_samplers_are_reproducible_with_a_generator():
    a = sample_resized_crop_boxes(16, (32, 32), generator=_gen(3))
    b = sample_resized_crop_boxes(16, (32, 32), generator=_gen(3))
    assert torch.equal(a, b)
    assert torch.equal(sample_crop_boxes(16, 32, generator=_gen(1)), sample_crop_boxes(16, 32, generator=_gen(1)))
    assert torch.equal(sample_flips(16, generator=_gen(2)), sample_flips(16, generator=_gen(2)))


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])  # square CIFAR size, non-square
def test_resized_crop_boxes_within_scale_and_ratio(hw):
    h, w = hw
    scale, ratio = (0.25, 1.0), (3 / 4, 4 / 3)
    boxes = sample_resized_crop_boxes(2000, hw, scale=scale, ratio=ratio, generator=_gen())
    assert boxes.shape == (2000, 4)
    assert torch.equal(boxes, boxes.round())
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (bw > 0).all() and (bh > 0).all()
    # w, h are sqrt(area * r) and sqrt(area / r) rounded to integers: allow half a pixel on each side
    area_lo = (math.sqrt(scale[0] * h * w * ratio[0]) - 0.5) * (math.sqrt(scale[0] * h * w / ratio[1]) - 0.5)
    frac = bw * bh
    assert frac.min() >= area_lo and frac.max() <= h * w
    r = bw / bh
    assert r.min() >= (math.sqrt(scale[0] * h * w * ratio[0]) - 0.5) / (math.sqrt(scale[0] * h * w / ratio[0]) + 0.5)
    assert r.max() <= (math.sqrt(scale[0] * h * w * ratio[1]) + 0.5) / (math.sqrt(scale[0] * h * w / ratio[1]) - 0.5)
    # the sampler really spreads over the range (not a constant crop)
    assert frac.float().min() < 0.35 * h * w and frac.float().max() > 0.75 * h * w
    assert r.min() < 0.85 and r.max() > 1.2
    # offsets cover the free room
    assert boxes[:, 0].min() == 0 and (boxes[:, 2] == w).any()


def test_resized_crop_fallback_is_a_center_crop():
    # area > image for every try -> torchvision's fallback: central crop with the aspect clamped into ratio
    boxes = sample_resized_crop_boxes(5, (10, 30), scale=(2.0, 3.0), ratio=(0.5, 2.0), generator=_gen())
    # in_ratio = 3 > 2 -> h = 10, w = round(10 * 2) = 20, centered: x0 = (30 - 20) // 2 = 5
    assert torch.equal(boxes, torch.tensor([[5.0, 0.0, 25.0, 10.0]]).expand(5, 4))
    boxes = sample_resized_crop_boxes(3, (12, 12), scale=(2.0, 3.0), generator=_gen())
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 12.0, 12.0]]).expand(3, 4))


def test_sample_flips_probability():
    assert not sample_flips(100, p=0.0, generator=_gen()).any()
    assert sample_flips(100, p=1.0, generator=_gen()).all()
    f = sample_flips(4000, p=0.5, generator=_gen())
    assert f.dtype == torch.bool and f.shape == (4000,)
    assert abs(f.float().mean().item() - 0.5) < 0.04  # 5 sigma
    assert abs(sample_flips(4000, p=0.2, generator=_gen()).float().mean().item() - 0.2) < 0.04


@pytest.mark.parametrize("fn,kwargs", [
    (sample_crop_boxes, dict(padding=-1)),
    (sample_resized_crop_boxes, dict(scale=(0.0, 1.0))),
    (sample_resized_crop_boxes, dict(ratio=(2.0, 1.0))),
    (sample_flips, dict(p=1.5)),
])
def test_sampler_bad_arguments(fn, kwargs):
    with pytest.raises(ValueError):
        fn(4, **kwargs) if fn is sample_flips else fn(4, (8, 8), **kwargs)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cropflip_pad_crop_is_padded_crop_and_differentiable(backend):
    aug = CropFlip(None, mode="pad_crop", padding=2, backend=backend, generator=_gen(5))
    x = torch.rand(4, 3, 9, 7, requires_grad=True)
    y = aug(x)
    assert y.shape == x.shape
    pad = F.pad(x.detach(), (2, 2, 2, 2))
    for n in range(4):
        dx, dy = int(aug.last_boxes[n, 0]), int(aug.last_boxes[n, 1])
        want = pad[n, :, dy + 2:dy + 11, dx + 2:dx + 9]
        torch.testing.assert_close(y[n].detach(), want.flip(-1) if aug.last_flip[n] else want, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().requires_grad_()
    (gxr,) = torch.autograd.grad(crop_flip_ref(xr, aug.last_boxes, aug.last_flip, (9, 7)), xr, g)
    assert gx.abs().sum() > 0
    torch.testing.assert_close(gx, gxr, rtol=0, atol=1e-5)


def test_cropflip_resized_crop_with_normalization():
    mean, std = (0.5, 0.4), (0.2, 0.3)
    aug = CropFlip((6, 5), mode="resized_crop", mean=mean, std=std, generator=_gen(7))
    x = torch.rand(3, 2, 12, 10, requires_grad=True)
    y = aug(x)
    assert y.shape == (3, 2, 6, 5)
    assert aug.last_boxes.shape == (3, 4) and aug.last_flip.shape == (3,)
    want = crop_flip_ref(x.detach(), aug.last_boxes, aug.last_flip, (6, 5), mean, std)
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # explicit parameters are used as given
    b = torch.tensor([[0.0, 0.0, 10.0, 12.0]] * 3)
    f = torch.tensor([False, True, False])
    torch.testing.assert_close(aug(x.detach(), b, f), crop_flip_ref(x.detach(), b, f, (6, 5), mean, std),
                               rtol=0, atol=1e-5)
    assert aug.last_boxes is b and aug.last_flip is f


def test_cropflip_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        CropFlip(8, mode="rotate")
    with pytest.raises(ValueError, match="p_flip"):
        CropFlip(8, p_flip=2.0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        CropFlip(8)(torch.rand(3, 8, 8))


def test_jitter_flip_is_roll_then_flip_for_the_whole_batch():
    x = torch.rand(3, 2, 8, 6, requires_grad=True)
    seen = set()
    gen = _gen(11)
    for _ in range(40):
        y, (dy, dx, flipped) = jitter_flip(x, (2, 1), p_flip=0.5, generator=gen, return_params=True)
        assert dy.dtype == torch.int64 and flipped.dtype == torch.bool  # parameters stay tensors (no host read)
        dy, dx, flipped = int(dy), int(dx), bool(flipped)
        assert abs(dy) <= 2 and abs(dx) <= 1
        want = torch.roll(x, (dy, dx), dims=(2, 3))
        torch.testing.assert_close(y, want.flip(3) if flipped else want, rtol=0, atol=0)
        seen.add((dy, dx, flipped))
    assert len(seen) > 8  # shifts and flips really vary
    y = jitter_flip(x, 3, p_flip=1.0, generator=gen)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=0, atol=1e-6)  # a permutation: grad is 2x
    with pytest.raises(ValueError):
        jitter_flip(x, -1)


def test_jitter_draws_match_the_host_reference_and_make_no_sync():
    """Same random stream as the former ``.item()`` version: randint dy, randint dx, rand flip; no host read."""
    gen, ref = _gen(5), _gen(5)
    x = torch.rand(2, 1, 7, 5)
    with SyncCounter() as sc:
        outs = [sample_jitter((3, 2), 0.5, generator=gen) for _ in range(20)]
        views = [roll_flip(x, shift, flip) for shift, flip in outs]
    assert sc.syncs == 0, sc.where
    for (shift, flip), view in zip(outs, views, strict=True):
        dy = int(torch.randint(-3, 4, (1,), generator=ref))
        dx = int(torch.randint(-2, 3, (1,), generator=ref))
        fl = bool(torch.rand(1, generator=ref) < 0.5)
        assert shift.tolist() == [dy, dx] and bool(flip) == fl
        want = torch.roll(x, (dy, dx), dims=(2, 3))
        assert torch.equal(view, want.flip(3) if fl else want)


def test_jitter_shift_and_flip_distribution():
    """d_y, d_x uniform over {-m..m}, flip Bernoulli(p): empirical frequencies within ~4.5 sigma (2000 draws)."""
    gen = _gen(7)
    draws = [sample_jitter(2, 0.3, generator=gen) for _ in range(2000)]
    shifts = torch.stack([s for s, _ in draws])
    flips = torch.stack([f for _, f in draws]).float()
    for d in range(2):
        counts = torch.bincount(shifts[:, d] + 2, minlength=5).float() / 2000
        assert counts.numel() == 5 and float((counts - 0.2).abs().max()) < 0.04
    assert abs(float(flips.mean()) - 0.3) < 0.04
    assert int(sample_jitter(0, 0.0, generator=gen)[0].abs().sum()) == 0  # m = 0: no shift


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 1, 1, 1), (3, 2, 5, 7)])  # non-square, minimal, odd sizes
def test_roll_flip_compiles_fullgraph_with_exact_gradients(shape):
    x = torch.rand(*shape, requires_grad=True)
    shift = torch.tensor([-3, 2])
    flip = torch.tensor(True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(roll_flip)(x, shift, flip)
    assert explained.graph_break_count == 0
    compiled = torch.compile(roll_flip, fullgraph=True, backend="aot_eager")
    for fl in (True, False):
        flip = torch.tensor(fl)
        want = torch.roll(x, (-3, 2), dims=(2, 3))
        want = want.flip(3) if fl else want
        got = compiled(x, shift, flip)
        assert torch.equal(got, want)
        g = torch.randn(shape)
        (gx,) = torch.autograd.grad(got, x, g)
        (wx,) = torch.autograd.grad(want, x, g)
        assert torch.equal(gx, wx)  # the inverse permutation, exactly
    cl = x.detach().contiguous(memory_format=torch.channels_last)  # channels_last input
    assert torch.equal(roll_flip(cl, shift, torch.tensor(False)), torch.roll(cl, (-3, 2), dims=(2, 3)))
