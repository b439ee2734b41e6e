"""crop_flip: torch / cpp / Triton (interpreter) vs the grid_sample reference, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backend_ran import check_param_backend
from dfkd_fast.kernels.crop_flip import crop_flip_ref

from dfkd_fast import _backend, kernels
from dfkd_fast.ops import crop_flip

_CPP_OK, _CPP_WHY = _backend.cpp_available("crop_flip_fwd")
_TRITON_OK, _TRITON_WHY = _backend.triton_available(torch.device("cpu"))
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not _CPP_OK, reason=_CPP_WHY)),
    pytest.param("triton", marks=pytest.mark.skipif(not _TRITON_OK, reason=_TRITON_WHY)),
]
FAST = BACKENDS[1:]


@pytest.fixture(autouse=True)
def _fused_path_ran(request):
    """Every test parametrized with a fused backend must launch that backend's kernel (no silent fallback)."""
    yield from check_param_backend(request, {"triton": ("crop_flip_fwd",), "cpp": ("crop_flip_fwd",)})

# (shape, boxes (x0, y0, x1, y1) per image, flips, out_size)
CASES = [
    ((2, 3, 9, 7), [[0, 0, 7, 9], [0, 0, 7, 9]], [False, True], (9, 7)),  # identity box and its mirror
    ((2, 3, 9, 7), [[-3, 2, 4, 11], [2, -4, 9, 5]], [True, False], (9, 7)),  # whole-pixel shifts, partly outside
    ((2, 3, 9, 7), [[0.3, 1.7, 4.6, 8.2], [-0.4, -0.6, 6.9, 9.3]], [False, True], (5, 6)),  # sub-pixel, non-square
    ((2, 3, 9, 7), [[1.5, 2.0, 3.5, 4.5], [-2.0, -1.0, 0.5, 1.0]], [True, True], (11, 13)),  # upsampling, corner
    ((1, 1, 12, 10), [[-1.0, -2.0, 11.0, 14.0]], [True], (3, 4)),  # N=1, C=1, downsampling
    ((3, 2, 6, 5), [[20.0, 20.0, 25.0, 26.0], [-9.0, 0, -6.0, 6.0], [0, 0, 5, 6]], [False, True, True], (4, 4)),
    # ^ boxes entirely outside (all zeros) next to a valid one
]
MEAN3, STD3 = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _norm(c: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    return (MEAN3, STD3) if c == 3 else ((0.5,) * c, (0.25,) * c)


def _oracle(x, boxes, flip, out, mean, std, g):
    """Reference output and input gradient in float64, from the same (possibly rounded) inputs."""
    xr = x.detach().double().requires_grad_()
    y = crop_flip_ref(xr, boxes.double(), flip, out, mean, std)
    (gx,) = torch.autograd.grad(y, xr, g.double())
    return y.detach(), gx


def _counters(backend: str) -> tuple[int, int]:
    if backend == "triton":
        return kernels.LAUNCHES["crop_flip_fwd"], kernels.LAUNCHES["crop_flip_bwd"]
    if backend == "cpp":
        ext = _backend.extension()
        return ext.call_count("crop_flip_fwd"), ext.call_count("crop_flip_bwd")
    return 0, 0


def _run(x, boxes, flip, out, mean, std, backend, g):
    before = _counters(backend)
    y = crop_flip(x, boxes, flip, out, mean, std, backend=backend)
    (gx,) = torch.autograd.grad(y, x, g)
    after = _counters(backend)
    if backend != "torch":  # the fast path really ran, forward and backward
        assert after[0] == before[0] + 1 and after[1] == before[1] + 1
    return y, gx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,boxes,flips,out", CASES)
def test_matches_reference_fp32(backend, normalize, shape, boxes, flips, out):
    x = torch.rand(shape, requires_grad=True)
    b = torch.tensor(boxes, dtype=torch.float32)
    f = torch.tensor(flips)
    mean, std = _norm(shape[1]) if normalize else (None, None)
    g = torch.randn(shape[0], shape[1], *out)
    y, gx = _run(x, b, f, out, mean, std, backend, g)
    yr, gxr = _oracle(x, b, f, out, mean, std, g)
    assert y.shape == (shape[0], shape[1], *out) and y.dtype == torch.float32 and y.is_contiguous()
    assert gx.shape == x.shape and gx.dtype == torch.float32
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx.double(), gxr, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_and_flip_are_exact_copies(backend):
    x = torch.rand(2, 3, 9, 7)
    b = torch.tensor([[0, 0, 7, 9]] * 2, dtype=torch.float32)
    y = crop_flip(x, b, torch.tensor([False, True]), (9, 7), backend=backend)
    torch.testing.assert_close(y[0], x[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[1], x[1].flip(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_pixel_shift_is_a_zero_padded_crop(backend):
    x = torch.rand(2, 2, 8, 6)
    pad = F.pad(x, (3, 3, 3, 3))  # zero padding 3 on each side
    b = torch.tensor([[-3, 1, 3, 9], [2, -2, 8, 6]], dtype=torch.float32)  # (dx, dy) = (-3, 1) and (2, -2)
    y = crop_flip(x, b, torch.tensor([False, True]), (8, 6), backend=backend)
    torch.testing.assert_close(y[0], pad[0, :, 4:12, 0:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[1], pad[1, :, 1:9, 5:11].flip(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_inputs(backend, layout):
    base = torch.rand(2, 6, 11, 16)
    if layout == "channels_last":
        x = base[:, :3, :9, :7].contiguous().to(memory_format=torch.channels_last)
    else:
        x = base[:, ::2, 1:10, ::2]  # (2, 3, 9, 8): strided channels, offset rows, every other column
    assert not x.is_contiguous()
    x.requires_grad_()
    b = torch.tensor([[0.3, -1.2, 6.1, 8.4], [-2.0, 1.0, 9.0, 7.5]])
    f = torch.tensor([True, False])
    g = torch.randn(2, 3, 5, 4).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous grad_out
    y, gx = _run(x, b, f, (5, 4), MEAN3, STD3, backend, g)
    yr, gxr = _oracle(x, b, f, (5, 4), MEAN3, STD3, g)
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx.double(), gxr, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_eager_error(backend, dtype):
    x = torch.rand(2, 3, 9, 7).to(dtype).requires_grad_()
    b = torch.tensor([[0.3, 1.7, 4.6, 8.2], [-1.5, -0.5, 8.0, 10.0]])
    f = torch.tensor([True, False])
    g = torch.randn(2, 3, 6, 5).to(dtype)
    y, gx = _run(x, b, f, (6, 5), MEAN3, STD3, backend, g)
    assert y.dtype == dtype and gx.dtype == dtype
    yr, gxr = _oracle(x, b, f, (6, 5), MEAN3, STD3, g)  # exact math on the rounded inputs
    xe = x.detach().requires_grad_()  # eager: the reference in the same low precision
    ye = crop_flip_ref(xe, b, f, (6, 5), MEAN3, STD3)
    (gxe,) = torch.autograd.grad(ye, xe, g)
    for fast, eager, ref in ((y, ye, yr), (gx, gxe, gxr)):
        err_fast = (fast.double() - ref).abs().max().item()
        err_eager = (eager.double() - ref).abs().max().item()
        # floor: one final rounding at the largest magnitude (both paths round an fp32 result once, and the
        # element with the largest error need not be the same one)
        floor = torch.finfo(dtype).eps * ref.abs().max().item()
        assert err_fast <= 2 * err_eager + floor, (err_fast, err_eager, floor)


@pytest.mark.parametrize("backend", BACKENDS[:2])  # Triton float64 is compared with autograd below
def test_gradcheck_float64(backend):
    x = torch.rand(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, -0.7, 3.4, 4.6], [-1.0, 0.5, 5.5, 3.0]], dtype=torch.float64)
    f = torch.tensor([True, False])
    assert torch.autograd.gradcheck(lambda t: crop_flip(t, b, f, (3, 4), (0.5, 0.1), (0.3, 2.0), backend=backend),
                                    (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda t: crop_flip_ref(t, b, f, (3, 4)), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(not _TRITON_OK, reason=_TRITON_WHY)
def test_triton_float64_matches_reference():
    x = torch.rand(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, -0.7, 3.4, 4.6], [-1.0, 0.5, 5.5, 3.0]], dtype=torch.float64)
    f = torch.tensor([True, False])
    g = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    y, gx = _run(x, b, f, (3, 4), (0.5, 0.1), (0.3, 2.0), "triton", g)
    yr, gxr = _oracle(x, b, f, (3, 4), (0.5, 0.1), (0.3, 2.0), g)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, gxr, rtol=0, atol=1e-12)


@pytest.mark.skipif(not _CPP_OK, reason=_CPP_WHY)
def test_auto_uses_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DFKD_FAST_BACKEND", raising=False)
    before = _backend.extension().call_count("crop_flip_fwd")
    crop_flip(torch.rand(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([False]), 4)
    assert _backend.extension().call_count("crop_flip_fwd") == before + 1


def test_boxes_and_flip_get_no_gradient():
    x = torch.rand(1, 1, 4, 4, requires_grad=True)
    b = torch.tensor([[0.5, 0.0, 3.5, 4.0]], requires_grad=True)
    crop_flip(x, b, torch.tensor([False]), 4, backend="torch").sum().backward()
    assert b.grad is None and x.grad is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.rand(3, 4, 4)), "4 dims"),
    (dict(x=torch.zeros(2, 3, 4, 4, dtype=torch.long)), "float32"),
    (dict(boxes=torch.zeros(2, 3)), "boxes"),
    (dict(flip=torch.zeros(3, dtype=torch.bool)), "flip"),
    (dict(flip=torch.zeros(2)), "flip"),
    (dict(mean=(0.5, 0.5)), "mean"),
    (dict(std=(0.5, 0.0, 0.5)), "std"),
    (dict(std=(0.5, float("nan"), 0.5)), "std"),
    (dict(x=torch.full((2, 3, 4, 4), float("nan"))), "NaN"),
    (dict(boxes=torch.tensor([[0.0, 0.0, 4.0, float("inf")]] * 2)), "boxes"),
    (dict(boxes=torch.tensor([[3.0, 0.0, 1.0, 4.0]] * 2)), "inverted or zero-size box"),  # x1 < x0
    (dict(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 3.0, 2.0]])), "inverted or zero-size box"),  # h=0
    (dict(out_size=0), "out_size"),
    (dict(out_size=(4, -1)), "out_size"),
    (dict(out_size=(4, 4, 4)), "out_size"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(x=torch.rand(2, 3, 4, 4), boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2),
                flip=torch.zeros(2, dtype=torch.bool),
                out_size=4, mean=None, std=None, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        crop_flip(**args)
