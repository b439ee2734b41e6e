"""One graph per pixel-method step: ``torch.compile(fullgraph=True)`` of the full optimization step.

The step is :meth:`PixelSynthesizer._step`: jitter/crop view -> teacher forward -> loss -> gradient to the
pixels (``torch.autograd.grad`` traced by dynamo's ``trace_autograd_ops``); the Adam step stays outside.
Teacher: LeNet-5-BN, 1x32x32, batch 4. Backend ``aot_eager`` (fast to compile) for the graph-break count and
the gradient check; one inductor run through ``compile="default"`` for a whole short batch. A CPU bf16 run
checks the ``precision=`` option against fp32.
"""
from __future__ import annotations

import pytest
import torch

from dfkd_fast.models import build_model
from dfkd_fast.synthesis import DeepInversion, build_synthesizer
from dfkd_fast.synthesis.pixel_base import PixelSynthesizer

K = 10
IMG = (1, 32, 32)
N = 4
#: fp32 tolerance of a compiled step against eager: the same ops, possibly fused / reordered reductions.
RTOL, ATOL = 1e-4, 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only add contention


def _lenet_bn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model("lenet5_bn", num_classes=K, in_channels=1, image_size=32)
    for m in net.modules():  # "trained" running statistics, not the identity defaults
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _backend_or_skip(backend: str) -> None:
    if backend == "cpp":
        from dfkd_fast import _backend

        if _backend.extension() is None:
            pytest.skip("the C++ extension dfkd_fast._C is not built")


METHODS = {
    "deep_inversion": {},
    "deep_inversion+adi": {"student": True},
    "data_impressions": {},
    "class_impressions": {},
    "impression_space": {"reference_images": True},
}


def _synth(case: str, backend: str, **extra) -> PixelSynthesizer:
    kw = dict(METHODS[case])
    if kw.pop("student", False):
        kw["student"] = _lenet_bn(seed=5)
    if kw.pop("reference_images", False):
        kw["reference_images"] = torch.rand(4, *IMG, generator=torch.Generator().manual_seed(1))
    return build_synthesizer(case.split("+")[0], _lenet_bn(), K, IMG, batch_size=N, iterations=1, backend=backend,
                             **kw, **extra)


def _step_inputs(syn: PixelSynthesizer) -> tuple:
    x = torch.rand(N, *IMG, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    if syn.name == "impression_space":
        targets = (syn.code, None, 0.0)
    elif syn.name == "deep_inversion":
        targets = syn.default_targets(N)
    else:
        targets = syn._make_targets(None)
    return (x, targets, *syn.sample_view(x))


def _where(reason) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    loc = f" @ {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame is not None else ""
    return str(reason.reason).splitlines()[0][:160] + loc


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", list(METHODS))
def test_pixel_step_is_one_graph_with_eager_gradients(case: str, backend: str) -> None:
    """0 graph breaks (``torch._dynamo.explain``) and fullgraph ``aot_eager`` gradients equal to eager."""
    _backend_or_skip(backend)
    syn = _synth(case, backend)
    args = _step_inputs(syn)
    with syn.batch_context(), torch._dynamo.config.patch(trace_autograd_ops=True):
        loss_e, grad_e = syn._step(*args)  # eager first (also loads the extension outside the trace)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(syn._step)(*args)
        assert explained.graph_break_count == 0, [_where(r) for r in explained.break_reasons]
        assert explained.graph_count == 1
        torch._dynamo.reset()
        loss_c, grad_c = torch.compile(syn._step, fullgraph=True, backend="aot_eager")(*args)
    assert float(grad_e.abs().max()) > 0  # a real gradient reached the pixels
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_c, grad_e, rtol=RTOL, atol=ATOL)


def test_deep_inversion_compiled_batch_matches_eager() -> None:
    """``compile="default"`` (inductor, fullgraph) gives eager's loss curve and images over a short batch.

    Tolerance: inductor fuses and reorders fp32 reductions; 3 Adam steps at lr 0.1 amplify a 1e-6 relative
    difference to at most ~1e-4 on the loss and ~1e-3 on pixels.
    """
    teacher = _lenet_bn()
    kw = dict(batch_size=N, iterations=3, seed=4, backend="torch")
    eager = build_synthesizer("deep_inversion", teacher, K, IMG, **kw).synthesize()
    torch._dynamo.reset()
    compiled = build_synthesizer("deep_inversion", teacher, K, IMG, compile="default", **kw).synthesize()
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.images, eager.images, rtol=0, atol=1e-3)


def test_deep_inversion_bf16_follows_fp32_loss_curve() -> None:
    """``precision="bf16"`` (autocast of the teacher forward; BN statistics and losses in fp32) on CPU.

    Tolerance: 1e-2 relative per step (bf16 keeps 8 mantissa bits, eps 7.8e-3; the BN-statistic terms average
    the rounding over N*H*W elements, so the measured gap is ~1e-4 over 8 steps on LeNet-5-BN).
    """
    teacher = _lenet_bn()
    kw = dict(batch_size=8, iterations=8, seed=1)
    fp32 = torch.tensor(build_synthesizer("deep_inversion", teacher, K, IMG, **kw).synthesize().losses)
    bf16 = torch.tensor(build_synthesizer("deep_inversion", teacher, K, IMG, precision="bf16",
                                          **kw).synthesize().losses)
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
    torch.testing.assert_close(bf16, fp32, rtol=1e-2, atol=0)
    assert bf16[-1] < bf16[0]  # and it still optimizes


def test_many_synthesizers_in_one_process_each_compile_their_own_step(monkeypatch) -> None:
    """Dynamo caches per code object with a recompile limit: every synthesizer compiles the same ``_step``
    method guarded on its own modules, so without a private code copy per synthesizer the next synthesizer of a
    process fails (``fullgraph=True``) once the limit is reached (here 1, by default 8)."""
    real = torch.compile

    def compile_aot_eager(fn, **kw):  # keep the CPU test fast: same tracing, no inductor codegen
        return real(fn, backend="aot_eager", fullgraph=kw.get("fullgraph", False), dynamic=False)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    teacher = build_model("lenet5_bn", num_classes=10, in_channels=1, image_size=32).eval()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 1}):
        for seed in range(3):
            syn = DeepInversion(teacher, 10, (1, 32, 32), batch_size=2, iterations=2, compile="default", seed=seed)
            assert len(syn.synthesize().losses) == 2
