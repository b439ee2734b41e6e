"""Every Triton kernel specialization the launchers can pick compiles for Hopper (sm_90) and Ampere (sm_80).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces PTX and a cubin
with Triton's bundled ``ptxas`` (see ``kernels/aot.py``). The compiler rejects things the interpreter accepts, and
``ptxas -v`` reports registers and spills, so this is the CPU-side guard for the GPU path.

Default run: every specialization (300) for sm_90 and for sm_80. ``DFKD_FAST_AOT_SUBSET=1`` compiles only a
covering subset for sm_80 (49: each dtype, tile / warp value and flag value of every kernel at least once).
Cost with an empty ``TRITON_CACHE_DIR`` on the idle 2-core machine: 67 s for the whole file (2 compile
processes; 34 s of it sm_90, 31 s sm_80); on cores shared with other jobs it took up to 213 s + 231 s. A warm
cache (resource usage memoized next to each cubin) makes it a few seconds. Compilation runs in a child
process because the test session sets ``TRITON_INTERPRET=1`` (the kernels are then interpreter objects).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dfkd_fast.kernels import HAS_TRITON

if HAS_TRITON:
    from dfkd_fast.kernels import aot
    _REASON = aot.unavailable_reason(90) or aot.unavailable_reason(80)
else:
    _REASON = "Triton is not importable"

pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"AOT compilation unavailable: {_REASON}")

ALL_SM80 = os.environ.get("DFKD_FAST_AOT_SUBSET", "0") != "1"
ROOT = Path(__file__).resolve().parents[1]


def _compile(arch: int, subset: bool, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dfkd_fast.kernels.aot", "--arch", str(arch), "--json", str(out), "--quiet",
           "--jobs", str(min(2, os.cpu_count() or 1))]
    if subset:
        cmd.append("--subset")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=840)
    if proc.returncode not in (0, 1) or not out.exists():  # 1 = some specialization failed: reported below
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sm90(tmp_path_factory) -> list[dict]:
    return _compile(90, False, tmp_path_factory.mktemp("aot") / "sm90.json")


@pytest.fixture(scope="module")
def sm80(tmp_path_factory) -> list[dict]:
    return _compile(80, not ALL_SM80, tmp_path_factory.mktemp("aot") / "sm80.json")


def _check(rows: list[dict], expected: list) -> None:
    assert [(r["kernel"], r["specialization"]) for r in rows] == [(s.kernel, s.label) for s in expected]
    errors = [f"{r['kernel']}[{r['specialization']}]: {r['error']}" for r in rows if "error" in r]
    assert not errors, "failed to compile:\n" + "\n".join(errors)
    spills = [f"{r['kernel']}[{r['specialization']}]: {r['registers']} registers, {r['spills']} B spilled"
              for r in rows if r["hot"] and r["spills"] > 0]
    assert not spills, "register spills on hot kernels:\n" + "\n".join(spills)
    assert all(0 < r["registers"] <= 255 for r in rows)
    assert all(r["shared"] <= 227 * 1024 for r in rows)  # opt-in shared memory per block on sm_90 (sm_80: 163 KB)


def test_every_specialization_compiles_for_sm90_without_spills(sm90):
    _check(sm90, aot.all_specializations())
    assert {r["arch"] for r in sm90} == {90}


def test_specializations_compile_for_sm80_without_spills(sm80):
    specs = aot.all_specializations()
    _check(sm80, specs if ALL_SM80 else aot.covering_subset(specs))
    assert all(r["shared"] <= 163 * 1024 for r in sm80)


def test_every_kernel_is_listed():
    """Each ``@triton.jit`` entry kernel of each module has specializations (helpers called from kernels don't)."""
    import importlib

    listed = {s.kernel for s in aot.all_specializations()}
    for name in aot.KERNEL_MODULES:
        mod = importlib.import_module(f"dfkd_fast.kernels.{name}")
        entry = {k for k in vars(mod) if k.startswith("_") and k.endswith("_kernel")}
        assert entry, name
        assert entry <= listed, f"{name}: kernels without AOT specializations: {sorted(entry - listed)}"


def test_covering_subset_covers_every_value():
    specs = aot.all_specializations()
    sub = aot.covering_subset(specs)
    assert len(sub) < len(specs)
    for kernel in {s.kernel for s in specs}:
        want = {t for s in specs if s.kernel == kernel for t in s.label.split()}
        got = {t for s in sub if s.kernel == kernel for t in s.label.split()}
        assert got == want, kernel


def _labels(kernel: str) -> list[dict]:
    return [s.constexprs for s in aot.all_specializations() if s.kernel == kernel]


def test_launcher_choices_are_in_the_table(monkeypatch):
    """What the launchers pick on a GPU (not interpreting) over a sweep of shapes is always a listed variant."""
    from dfkd_fast.kernels import bn_stats, crop_flip, dirichlet, info_nce, soft_ce

    for mod in (bn_stats, crop_flip, soft_ce, info_nce, dirichlet):
        monkeypatch.setattr(mod, "interpreting", lambda: False)
    tiles = {(c["BLOCK_C"], c["BLOCK_S"]) for c in _labels("_bn_stats_fwd_kernel")}
    for c in (1, 3, 16, 17, 64, 100, 512, 2048, 4096):
        for hw in (1, 2, 3, 4, 15, 16, 49, 64, 196, 256, 1024, 50176):
            for inner in (False, True):
                assert bn_stats._tiles(c, hw, inner) in tiles, (c, hw, inner)
    assert {c["BLOCK"] for c in _labels("_stat_loss_kernel")} == {bn_stats.STAT_LOSS_BLOCK}

    soft = {(c["BLOCK_K"]) for c in _labels("_soft_ce_fwd_kernel")}
    warps = {(s.constexprs["BLOCK_K"], s.num_warps) for s in aot.all_specializations()
             if s.kernel == "_kd_kl_fwd_kernel"}
    for k in (1, 10, 64, 65, 100, 256, 1000, 1024, 1025, 4096, 10000, 50000):
        block = soft_ce._block_k(k, None)
        assert block in soft and (block, soft_ce._launch_cfg(block)["num_warps"]) in warps, k

    nce = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_D"], s.constexprs["SINGLE_D"],
            s.constexprs["LOWP_DOT"], s.num_warps) for s in aot.all_specializations()
           if s.kernel == "_info_nce_fwd_kernel"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (1, 8, 16, 17, 32, 33, 64, 65, 100, 128, 256, 2704, 4096):
            bm, bn, bd, lowp, w = info_nce._config(d, dtype)
            assert (bm, bn, bd, d <= bd, lowp, w) in nce, (dtype, d)

    crop = {(c["BLOCK_H"], c["BLOCK_W"]) for c in _labels("_crop_flip_fwd_kernel")}
    for oh in (1, 7, 8, 24, 32, 224, 1000):
        for ow in (1, 7, 8, 9, 32, 224, 1000):
            assert crop_flip._blocks(oh, ow) in crop, (oh, ow)

    bm, bn, bf, _ = dirichlet.SIMILARITY_CONFIG
    sim = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_F"]) for c in _labels("_class_similarity_fwd_kernel")}
    assert sim == {(bm, bn, bf)}
