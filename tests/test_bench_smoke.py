"""Smoke test of the ops benchmark harness on tiny shapes (a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from dfkd_fast import _backend

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_ops", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_ops"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_bench_ops_quick(tmp_path):
    bench = _load()
    rows = bench.main(["--quick", "--ops", "soft_ce", "kd_kl_div", "--providers", "eager", "cpp", "triton",
                       "--min-run-time", "0.005", "--out", str(tmp_path)])
    assert {r["op"] for r in rows} == {"soft_ce", "kd_kl_div"} and len(rows) == 4
    has_cpp = _backend.cpp_available("soft_ce_fwd")[0]
    for r in rows:
        assert r["ms"]["eager"] > 0
        assert "triton" in r["na"]  # CPU run: Triton is timed on CUDA only, recorded as n/a with the reason
        if has_cpp:
            assert r["ms"]["cpp"] > 0 and r["speedup_vs_eager"] > 0
        else:
            assert "cpp" in r["na"]
    data = json.loads((tmp_path / "ops_cpu_quick.json").read_text())
    assert {"device", "cpu_count", "torch", "triton", "commit", "date", "command"} <= set(data["meta"])
    table = (tmp_path / "ops_cpu_quick.md").read_text()
    assert "| soft_ce |" in table and "x eager" in table


def test_bn_shape_lists():
    bench = _load()
    r34 = bench.resnet34_bn_shapes(256)
    wrn = bench.wrn_bn_shapes(256)
    assert len(r34) == 36 and r34[0] == (256, 64, 32, 32) and r34[-1] == (256, 512, 4, 4)
    assert len(wrn) == 37 and wrn[0] == (256, 16, 32, 32) and wrn[-1] == (256, 128, 8, 8)
    assert sum(s[1] for s in wrn) > 0
