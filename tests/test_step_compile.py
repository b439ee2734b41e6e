"""One optimization step = one graph: ``torch.compile(fullgraph=True)`` of a synthesis step, and ``precision=``.

A step function (``_step`` of each method) computes the loss and ``torch.autograd.grad`` to the trained tensors
(generator parameters, latent z, CMI's head); the optimizer step stays outside. Everything random is drawn before
the step, so the graph is pure. Teacher: LeNet-5-BN (3 BN layers), 1x32x32, batch 8; small generators.

CPU compile uses the ``aot_eager`` backend (the full Dynamo + AOTAutograd trace, forward and backward, without
Inductor's C++ code generation, which takes minutes on 2 cores); the Inductor run of a whole batch is opt-in
(``DFKD_FAST_INDUCTOR_TESTS=1``, about 150 s for FastMeta on 2 shared cores), and on a GPU the ``gpu`` test runs
``compile="reduce-overhead"`` (CUDA graphs).
"""
from __future__ import annotations

import os

import pytest
import torch
from test_syncs import BATCH, IMG, TINY_G, K, bn_teacher, small_student

from dfkd_fast.synthesis import build_synthesizer
from dfkd_fast.synthesis.cmi import draw_global_view

HP = {"cmi": {"bank_size": 64, "n_neg": 16, "head_dim": 8}, "fast_meta": {"warmup": 0}, "dafl": {}, "zskt": {},
      "dfq": {}}
#: aot_eager runs the same aten kernels as eager, but AOTAutograd may reorder / decompose the backward
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only add contention


def _synth(method: str, **kw):
    args = {"batch_size": BATCH, "backend": "torch", "student": small_student(), "iterations": 2, **TINY_G,
            **HP[method], **kw}
    return build_synthesizer(method, bn_teacher(), K, IMG, **args)


def _step_args(synth, method: str) -> tuple:
    """The inputs of one step, drawn as ``_synthesize`` draws them (after a warm-up batch: CMI's bank non-empty)."""
    if method in ("dafl", "zskt", "dfq"):  # persistent generator: a fresh latent batch is the only input
        return (synth.randn(BATCH, synth.config.nz),)
    z = synth.randn(BATCH, synth.config.nz).requires_grad_()
    targets = synth.default_targets()
    if method == "cmi":
        return (z, targets, *synth.draw_step(), True)
    with torch.no_grad():  # theta' <- theta, as at the start of a FastMeta batch
        torch._foreach_copy_(synth._fast_tensors, synth._meta_tensors)
    return (z, targets, *draw_global_view(BATCH, IMG[1:], synth.generator, synth.config.padding, synth.device), True)


@pytest.mark.parametrize("method", ["cmi", "fast_meta", "dafl", "zskt", "dfq"])
def test_full_step_is_one_graph_with_eager_gradients(method):
    synth = _synth(method)
    synth.synthesize()
    args = _step_args(synth, method)
    with synth.batch():
        loss_e, x_e, *_, grads_e = synth._step(*args)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            explained = torch._dynamo.explain(synth._step)(*args)
            reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
            assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
            torch._dynamo.reset()
            compiled = torch.compile(synth._step, fullgraph=True, backend="aot_eager")
            loss_c, x_c, *_, grads_c = compiled(*args)
    torch.testing.assert_close(loss_c, loss_e, **GRAD_TOL)
    torch.testing.assert_close(x_c, x_e, **GRAD_TOL)
    assert len(grads_c) == len(grads_e) > 2  # generator parameters (+ z, + CMI's head)
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e, strict=True)):
        assert (gc is None) == (ge is None), i
        if ge is not None:
            torch.testing.assert_close(gc, ge, **GRAD_TOL, msg=lambda m, i=i: f"gradient {i}: {m}")
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads_c)


@pytest.mark.skipif(os.environ.get("DFKD_FAST_INDUCTOR_TESTS", "0") != "1",
                    reason="Inductor on CPU takes minutes on 2 cores; set DFKD_FAST_INDUCTOR_TESTS=1")
def test_compile_default_batch_matches_eager_loss_curve():
    """``compile="default"`` (Inductor) for a whole FastMeta batch: the same loss curve as eager."""
    torch._dynamo.reset()
    eager = _synth("fast_meta", iterations=3)
    compiled = _synth("fast_meta", iterations=3, compile="default")
    for _ in range(2):
        a, b = compiled.synthesize(), eager.synthesize()
        # Inductor fuses and reorders fp32 reductions: rounding differences only
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cmi_reduce_overhead_batch_matches_eager_on_gpu():
    """CMI on CUDA with the per-step function under ``compile="reduce-overhead"`` (CUDA graphs): the eager loss
    curve. Batches run eagerly until the bank holds n_neg = 16 entries (two batches of 8); the third compiles."""
    dev = torch.device("cuda")
    torch._dynamo.reset()

    def make(compile_mode: str):
        return build_synthesizer("cmi", bn_teacher().to(dev), K, IMG, batch_size=BATCH, backend="auto",
                                 student=small_student().to(dev), iterations=4, compile=compile_mode, **TINY_G,
                                 **HP["cmi"])

    eager, compiled = make("off"), make("reduce-overhead")
    for _ in range(3):
        a, b = compiled.synthesize(), eager.synthesize()
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["cmi", "fast_meta"])
def test_bf16_autocast_stays_close_to_fp32(method):
    """``precision="bf16"``: teacher and generator forward under bf16 autocast, BN statistics and losses fp32.

    Tolerance: every loss of 3 batches x 4 steps within 1% of the fp32 run (measured: 7e-5 FastMeta, 4e-4 CMI
    relative; bf16 has an 8-bit mantissa, 0.4% per rounding).
    """
    curves, dtypes = {}, {}
    for prec in ("fp32", "bf16"):
        synth = _synth(method, iterations=4, precision=prec)
        seen = []
        conv = next(m for m in synth.teacher.modules() if isinstance(m, torch.nn.Conv2d))
        handle = conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        try:
            curves[prec] = torch.tensor([v for _ in range(3) for v in synth.synthesize().losses])
        finally:
            handle.remove()
        dtypes[prec] = set(seen)
        with synth.probe.capturing(), synth.autocast(), torch.no_grad():  # a forward as a step makes it
            synth.teacher(torch.rand(4, *synth.image_size))
        assert all(m.dtype == torch.float32 and v.dtype == torch.float32 for m, v in synth.probe.layer_stats())
    # autocast covered the teacher in the steps (the returned teacher_logits are computed in fp32)
    assert dtypes["fp32"] == {torch.float32} and torch.bfloat16 in dtypes["bf16"]
    assert not torch.equal(curves["fp32"], curves["bf16"])
    torch.testing.assert_close(curves["bf16"], curves["fp32"], rtol=1e-2, atol=0)


def test_reduce_overhead_step_returns_copies():
    """Under CUDA graphs a replay overwrites the graph's outputs: the wrapped step hands out copies (checked here
    with the eager step standing in for the compiled one, so it runs without Inductor)."""
    synth = _synth("dfq", compile="reduce-overhead")
    synth.compile_step = lambda fn: fn  # the eager step in place of the CUDA-graph one
    step = synth.step_function()
    z = synth.randn(BATCH, synth.config.nz)
    with synth.batch():
        loss, x, logits, grads = step(z)
        loss_ref, x_ref, logits_ref, grads_ref = synth._step(z)
    assert x.data_ptr() != x_ref.data_ptr()
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert len(grads) == len(grads_ref)
    res = synth.synthesize()
    assert len(res.losses) == 2 and res.images.shape == (BATCH, *IMG)


def test_cmi_compiles_only_once_the_bank_shape_is_steady():
    """While the bank holds fewer than n_neg entries the negatives change shape every batch; those batches run the
    eager step (no recompilation per size), later ones the compiled step."""
    synth = _synth("cmi", compile="default")  # n_neg 16, batch 8
    calls = []

    def fake_compile(fn):
        def step(*args):
            calls.append(synth.batches_done)
            return fn(*args)
        return step

    synth.compile_step = fake_compile
    for _ in range(4):
        synth.synthesize()
    assert calls == [2, 2, 3, 3]  # 2 steps per batch, from the batch that sees 16 bank entries
