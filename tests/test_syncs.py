"""Host syncs per optimization step and per batch, for every synthesis method (SPEC §6: 0 per step, <= 2 per batch).

:class:`dfkd_fast.profiling.SyncCounter` counts the ops that force a device->host sync on CUDA (``.item()``,
``bool(t)``, ``.tolist()``, ``nonzero``, data-dependent shapes, ...) while one batch runs on CPU -- the count is a
property of the ops, not of the device. A batch of I steps costs ``a + b * I`` syncs; :func:`measure` runs one batch
at two iteration counts (after warm-up batches, so CMI's memory bank is non-empty and the contrastive term runs
every step) and solves for the per-step ``b`` and the per-batch ``a``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dfkd_fast import _backend
from dfkd_fast.models import build_model
from dfkd_fast.profiling import SyncCounter
from dfkd_fast.synthesis import Synthesizer, build_synthesizer

K = 10
IMG = (1, 32, 32)
BATCH = 8
TINY_G = {"nz": 16, "ngf": 8}  # small generators: the sync count does not depend on the width


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only add contention


@dataclass
class SyncProfile:
    """Syncs of one batch: ``per_batch + per_step * iterations`` (``where``: "op @ file:line" of each sync)."""

    per_step: float
    per_batch: float
    counts: dict[int, int]
    where: dict[int, list[str]]

    def report(self) -> str:
        hi = max(self.counts)
        return (f"per step {self.per_step:g}, per batch {self.per_batch:g} (syncs at {self.counts}); "
                f"sites at {hi} iterations: {sorted(set(self.where[hi]))}")


def measure(make: Callable[[int], Synthesizer], iterations: tuple[int, int] = (2, 4), warmup: int = 1) -> SyncProfile:
    """Syncs of one batch of ``make(i)`` for each i in ``iterations`` (after ``warmup`` batches), split into a
    per-step and a per-batch part."""
    counts: dict[int, int] = {}
    where: dict[int, list[str]] = {}
    for it in iterations:
        synth = make(it)
        for _ in range(warmup):
            synth.synthesize()
        with SyncCounter() as sc:
            synth.synthesize()
        counts[it], where[it] = sc.syncs, list(sc.where)
    lo, hi = iterations
    per_step = (counts[hi] - counts[lo]) / (hi - lo)
    return SyncProfile(per_step, counts[lo] - per_step * lo, counts, where)


def bn_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5_bn", num_classes=K, in_channels=1, image_size=32).eval()


def small_student(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet5_half", num_classes=K, in_channels=1, image_size=32)


_CPP_OK, _CPP_WHY = _backend.cpp_available("crop_flip_fwd")
#: "torch": the reference ops; "cpp": backend="auto" on CPU, i.e. the compiled extension for every op it has
#: (info_nce has no cpp kernel, so naming "cpp" for a whole synthesis would refuse to run)
BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("auto", id="cpp", marks=pytest.mark.skipif(not _CPP_OK, reason=f"extension: {_CPP_WHY}"))]


# ---------------------------------------------------------------- generator methods
#: method -> (extra hyper-parameters, needs a student, warm-up batches before counting)
GENERATOR_CASES: dict[str, tuple[dict, bool, int]] = {
    "dafl": ({}, False, 1),
    "zskt": ({}, True, 1),
    "dfq": ({}, True, 1),
    "cmi": ({"bank_size": 64, "n_neg": 16, "head_dim": 8}, True, 1),
    "cmi_full_bank": ({"bank_size": 16, "n_neg": 8, "head_dim": 8}, True, 3),  # bank full, ring wraps
    "fast_meta": ({"warmup": 0}, True, 1),  # adversarial term on from the first batch
}


def _generator_factory(case: str, backend: str) -> Callable[[int], Synthesizer]:
    hp, with_student, _ = GENERATOR_CASES[case]
    method = "cmi" if case.startswith("cmi") else case
    teacher = bn_teacher()
    student = small_student() if with_student else None

    def make(iterations: int) -> Synthesizer:
        return build_synthesizer(method, teacher, K, IMG, batch_size=BATCH, backend=backend, student=student,
                                 iterations=iterations, **TINY_G, **hp)

    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GENERATOR_CASES))
def test_generator_methods_sync_free_per_step(case, backend):
    prof = measure(_generator_factory(case, backend), warmup=GENERATOR_CASES[case][2])
    assert prof.per_step == 0, prof.report()
    assert prof.per_batch <= 2, prof.report()


def test_measure_sees_a_per_step_sync():
    """The helper itself: a method that reads its loss every step is caught (the assertions can fail)."""
    teacher = bn_teacher()

    def make(iterations: int) -> Synthesizer:
        synth = build_synthesizer("dafl", teacher, K, IMG, batch_size=BATCH, backend="torch", iterations=iterations,
                                  **TINY_G)
        inner = synth._generator_loss

        def reading_loss(x):
            loss, logits = inner(x)
            float(loss.detach())  # a host read per step
            return loss, logits

        synth._generator_loss = reading_loss
        return synth

    prof = measure(make)
    assert prof.per_step == 1, prof.report()
    assert sum(w.startswith("Tensor.__float__") for w in prof.where[4]) == 4, prof.report()


# ---------------------------------------------------------------- pixel methods
#: case -> (method, extra arguments); "+adi": DeepInversion with a student (the JS competition term)
PIXEL_CASES: dict[str, tuple[str, dict]] = {
    "data_impressions": ("data_impressions", {}),
    "class_impressions": ("class_impressions", {}),
    "deep_inversion": ("deep_inversion", {}),
    "deep_inversion+adi": ("deep_inversion", {"student": True}),
    "impression_space": ("impression_space", {"reference_images": True}),
}


def _pixel_factory(case: str, backend: str) -> Callable[[int], Synthesizer]:
    method, extra = PIXEL_CASES[case]
    teacher = bn_teacher()
    kw = {}
    if extra.get("student"):
        kw["student"] = small_student()
    if extra.get("reference_images"):
        kw["reference_images"] = torch.rand(4, *IMG, generator=torch.Generator().manual_seed(1))

    def make(iterations: int) -> Synthesizer:
        return build_synthesizer(method, teacher, K, IMG, batch_size=BATCH, backend=backend, iterations=iterations,
                                 **kw)

    return make


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PIXEL_CASES))
def test_pixel_methods_sync_free_per_step(case, backend):
    prof = measure(_pixel_factory(case, backend))
    assert prof.per_step == 0, prof.report()
    assert prof.per_batch <= 2, prof.report()
