"""Smoke test of the ops benchmark harness on tiny shapes (a few seconds)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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


SYNTH_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_synthesis.py"


def test_bench_synthesis_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_synthesis", SYNTH_BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_synthesis"] = bench  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    # one method at a small batch, every provider (compile="default" costs most of the time)
    rows = bench.main(["--quick", "--methods", "deep_inversion", "--batch-sizes", "16", "--steps", "1", "6",
                       "--repeats", "3", "--out", str(tmp_path)])
    assert [(r["method"], r["teacher"], r["batch"]) for r in rows] == [("deep_inversion", "lenet5_bn", 16)]
    data = json.loads((tmp_path / "synthesis_cpu_quick.json").read_text())
    assert {"device", "cpu_count", "torch", "triton", "commit", "date", "command", "method"} <= set(data["meta"])
    for r in data["rows"]:
        for p in ("reference", "torch", "auto", "floor"):  # these always run; compile may be n/a (with a reason)
            assert r["s_per_step"][p] > 0, (r["method"], p, r["na"])
            assert r["aten_ops_per_step"][p] > 0 and r["syncs_per_step"][p] >= 0
        assert r["s_per_step"].get("compile", 0) > 0 or r["na"]["compile"]  # compile is timed, not counted
        assert r["syncs_per_step"]["reference"] >= 1  # loss.item() per step in the reference design
        assert r["syncs_per_step"]["floor"] == 0
        assert r["speedup_vs_reference"]["reference"] == 1.0 and r["x_floor"]["floor"] == 1.0
    table = (tmp_path / "synthesis_cpu_quick.md").read_text()
    assert "| deep_inversion | lenet5_bn | 16 |" in table and "x ref" in table


QM_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_matrix.py"


def test_quality_matrix_quick(tmp_path):
    """--quick 2x2 matrix (offline data_impressions + online dfq on LeNet-5 / LeNet-5-BN, digits): every output is
    written, dfq is skipped on the BN-free teacher, ratios are measured accuracies over measured KD-on-real, and
    --resume recomputes nothing."""
    spec = importlib.util.spec_from_file_location("quality_matrix", QM_BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["quality_matrix"] = bench
    spec.loader.exec_module(bench)
    sets = tmp_path / "sets"
    args = ["--quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--save-sets", str(sets)]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "quality_matrix_quick.json").read_text())
    cells = data["cells"]
    assert set(cells) == {"data_impressions|lenet5|digits|resnet8_half", "dfq|lenet5|digits|resnet8_half",
                          "data_impressions|lenet5_bn|digits|small_cnn", "dfq|lenet5_bn|digits|small_cnn"}
    skipped = cells["dfq|lenet5|digits|resnet8_half"]
    assert skipped["status"] == "skipped" and "BatchNorm" in skipped["reason"]
    done = [c for c in cells.values() if c["status"] == "done"]
    assert len(done) == 3 and {c["mode"] for c in done} == {"offline", "online"}
    for c in done:
        ref = data["references"][f"{c['teacher']}|{c['dataset']}|{c['student']}"]["acc"]
        assert ref > 0.3  # a trained KD-on-real student, far above chance (0.1) on the 359 digits test images
        assert c["kd_real"] == ref and 0.0 <= c["acc"] <= 1.0
        assert abs(c["ratio"] - c["acc"] / ref) < 1e-12 and c["synth_s"] > 0 and c["images"] == 64
        assert abs(c["acc"] * 359 - round(c["acc"] * 359)) < 1e-6  # a count of the 359 test images
    worst = data["summary"]["worst"]
    assert worst["dfq"]["ratio"] == cells["dfq|lenet5_bn|digits|small_cnn"]["ratio"]
    assert worst["data_impressions"]["ratio"] == min(c["ratio"] for c in done if c["method"] == "data_impressions")
    assert isinstance(data["summary"]["every_method_worst_ge_085"], bool)
    if "health_spearman" in data["summary"]:  # dfkd_fast.health installed: rank correlation over the done cells
        from scipy.stats import spearmanr

        rho = spearmanr([c["health"] for c in done], [c["acc"] for c in done]).statistic
        got = data["summary"]["health_spearman"]
        assert (got != got and rho != rho) or abs(got - rho) < 1e-9  # nan only when a side is constant
    md = (tmp_path / "quality_matrix_quick.md").read_text()
    assert "| data_impressions | offline | lenet5 | digits | resnet8_half |" in md and "## Targets" in md
    assert (tmp_path / "quality_matrix_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main([*args, "--resume"]) == 0  # every cell finished: nothing is recomputed
    again = json.loads((tmp_path / "quality_matrix_quick.json").read_text())["cells"]
    assert all(again[k].get("cell_s") == c.get("cell_s") for k, c in cells.items())
    # the saved sets: --set-kd distills a fresh student on the online cell's final set, --rescore recomputes health
    assert sorted(f.name for f in sets.iterdir()) == sorted(k.replace("|", "-") + ".pt" for k in cells
                                                            if cells[k]["status"] == "done")
    before = json.loads((tmp_path / "quality_matrix_quick.json").read_text())
    assert bench.main([*args, "--set-kd", "--rescore"]) == 0
    kd = json.loads((tmp_path / "quality_matrix_quick.json").read_text())
    online = kd["cells"]["dfq|lenet5_bn|digits|small_cnn"]
    assert 0.0 <= online["set_kd_acc"] <= 1.0 and "set_kd_acc" not in kd["cells"]["data_impressions|lenet5|digits"
                                                                                  "|resnet8_half"]
    assert kd["total_s"] == pytest.approx(before["total_s"], abs=0.5) and "health_rescored" in kd
    assert "offline on final set" in (tmp_path / "quality_matrix_quick.md").read_text()
    # --merge: two runs with the same sizes -> one table over the union of their cells
    part = tmp_path / "part"
    part.mkdir()
    one = dict(kd, cells={k: c for k, c in kd["cells"].items() if "lenet5_bn" in k})
    (part / "a.json").write_text(json.dumps(one))
    rest = dict(kd, cells={k: c for k, c in kd["cells"].items() if "lenet5_bn" not in k})
    (part / "b.json").write_text(json.dumps(rest))
    assert bench.main(["--quick", "--out", str(part), "--merge", str(part / "a.json"), str(part / "b.json")]) == 0
    merged = json.loads((part / "quality_matrix_quick.json").read_text())
    assert merged["cells"] == kd["cells"] and merged["summary"]["worst"] == kd["summary"]["worst"]
