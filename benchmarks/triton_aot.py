"""Resource usage of every Triton kernel specialization, compiled ahead of time for Hopper and Ampere.

No GPU needed: each specialization the launchers can pick (``aot_specializations()`` in each ``kernels/<op>.py``)
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and Triton's bundled
``ptxas``; registers, spill bytes and stack come from ``ptxas -v`` on the exact PTX, shared memory from Triton's
metadata (see ``kernels/aot.py``).

Usage::

    python benchmarks/triton_aot.py                 # sm_90 and sm_80, all specializations
    python benchmarks/triton_aot.py --arch 90       # one architecture
    python benchmarks/triton_aot.py --cold          # into an empty Triton cache: honest compile times

Writes ``benchmarks/results/triton_aot_sm90.md`` / ``.json`` (with an sm_80 column when compiled).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("benchmarks/triton_aot.py: unset TRITON_INTERPRET (interpreter kernels cannot be compiled)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bc  # noqa: E402
from dfkd_fast.kernels import aot  # noqa: E402


def _ptxas_version(arch: int) -> str:
    path = aot.ptxas_path(arch)
    if path is None:
        return "missing"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--cold", action="store_true", help="compile into an empty Triton cache (honest compile times)")
    args = p.parse_args()
    if args.cold:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_aot_cache_")
    reason = aot.unavailable_reason(max(args.arch))
    if reason:
        print(f"cannot compile ahead of time: {reason}", file=sys.stderr)
        return 2
    specs = aot.all_specializations()
    by_arch: dict[int, dict[str, dict]] = {}
    wall = {}
    for arch in args.arch:
        t0 = time.perf_counter()
        rows = aot.compile_all(specs, arch)
        wall[arch] = time.perf_counter() - t0
        by_arch[arch] = {s.key: aot.result_record(s, r, e) for s, r, e in rows}
        print(f"sm_{arch}: {len(specs)} specializations in {wall[arch]:.1f} s", file=sys.stderr)

    meta = bc.metadata(torch.device("cpu"), sys.argv)
    meta["device"] = "none (ahead-of-time compilation on the CPU host)"
    meta.update({f"ptxas_sm{a}": _ptxas_version(a) for a in args.arch})
    meta["specializations"] = len(specs)
    meta.update({f"compile_wall_s_sm{a}": round(w, 1) for a, w in wall.items()})
    meta["triton_cache"] = "cold (empty TRITON_CACHE_DIR)" if args.cold else "warm or cold (not --cold)"

    archs = list(args.arch)
    out_rows = []
    for s in specs:
        row = {"kernel": s.kernel, "specialization": s.label, "num_warps": s.num_warps, "hot": s.hot}
        for a in archs:
            r = by_arch[a][s.key]
            row[f"sm{a}"] = {k: r[k] for k in ("registers", "spills", "spill_stores", "spill_loads", "stack",
                                                 "shared", "error") if k in r}
        out_rows.append(row)

    def cell(r: dict, key: str) -> str:
        return "ERROR" if "error" in r else str(r[key])

    # summary per kernel: count, max registers, total spills, max shared, per arch
    summary = defaultdict(lambda: defaultdict(list))
    for row in out_rows:
        for a in archs:
            summary[row["kernel"]][a].append(row[f"sm{a}"])
    lines = ["What is compiled: each specialization listed by `aot_specializations()` in `kernels/<op>.py` (the "
             "dtypes, tiles, warp counts and constexpr flags the launchers pick on a GPU, from the same config "
             "tables), integer arguments as generic `i32`, pointers 16-byte aligned (what the JIT infers for "
             "PyTorch allocations). Registers / spills / stack: `ptxas -v` (Triton's flags) on the PTX Triton "
             "emitted; shared memory: Triton's metadata. `hot`: on the per-step path of a synthesis run.", "",
             "## Summary per kernel", "",
             "| kernel | hot | variants | " + " | ".join(f"sm_{a} max regs | sm_{a} spilled B | sm_{a} max smem B"
                                                       for a in archs) + " |",
             "|---|---|---:|" + "---:|---:|---:|" * len(archs)]
    hot = {r["kernel"]: r["hot"] for r in out_rows}
    for kernel, per in summary.items():
        cells = []
        for a in archs:
            ok = [r for r in per[a] if "error" not in r]
            errs = len(per[a]) - len(ok)
            cells += [str(max((r["registers"] for r in ok), default=0)) + (f" ({errs} ERRORS)" if errs else ""),
                      str(sum(r["spills"] for r in ok)), str(max((r["shared"] for r in ok), default=0))]
        lines.append(f"| `{kernel}` | {'yes' if hot[kernel] else 'no'} | {len(per[archs[0]])} | "
                     + " | ".join(cells) + " |")
    errors = sum("error" in row[f"sm{a}"] for row in out_rows for a in archs)
    spills = sum(row[f"sm{a}"].get("spills", 0) > 0 for row in out_rows for a in archs)
    lines += ["", f"Failed compilations: {errors}. Specializations that spill registers: {spills}.", "",
              "## Every specialization", "",
              "Registers per thread, spilled bytes (stores + loads) and shared memory per block (bytes).", "",
              "| kernel | specialization | " + " | ".join(f"sm_{a} regs | sm_{a} spills | sm_{a} smem"
                                                         for a in archs) + " |",
              "|---|---|" + "---:|---:|---:|" * len(archs)]
    for row in out_rows:
        cells = []
        for a in archs:
            r = row[f"sm{a}"]
            cells += [cell(r, "registers"), cell(r, "spills"), cell(r, "shared")]
        lines.append(f"| `{row['kernel']}` | {row['specialization']} | " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "## Errors", ""]
        for row in out_rows:
            for a in archs:
                if "error" in row[f"sm{a}"]:
                    lines += [f"- sm_{a} `{row['kernel']}[{row['specialization']}]`: "
                              f"{row[f'sm{a}']['error'].splitlines()[0][:300]}"]
    md, js = bc.save(out_rows, meta, args.out, "triton_aot_sm90", "\n".join(lines))
    print(f"wrote {md} and {js}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
