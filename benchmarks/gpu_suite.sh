#!/usr/bin/env bash
# GPU suite in one command (issue 9, item 6). On a CUDA machine, from the repository root:
#
#     bash benchmarks/gpu_suite.sh            # tests + op benchmark + synthesis benchmark, < 8 minutes on H100/H200
#     bash benchmarks/gpu_suite.sh --quick    # smoke run: tests + both benchmarks with --quick
#
# 1. the `gpu`-marked tests (tests/test_gpu.py: every Triton kernel against its reference at the SPEC §6 sizes,
#    fp32 and bf16, values and gradients; a CMI step under torch.compile(mode="reduce-overhead"));
# 2. python benchmarks/bench_ops.py (all ops, full shapes, fp32: eager / torch.compile / triton);
# 3. python benchmarks/bench_synthesis.py on WRN-40-2 at batch 256, the SPEC §6 end-to-end case (all methods and
#    providers; the torch.compile provider costs ~30-60 s of compilation per case, so the full teacher x batch grid
#    does not fit the budget: run it by hand without --teachers / --batch-sizes).
#
# Each phase gets a share of a hard wall-clock budget (GPU_SUITE_BUDGET_S, default 470 s), so the suite ends in
# under 8 minutes even if a phase hangs; a phase that runs out of time is reported as "timeout", not hidden.
# Results: benchmarks/results/gpu_suite.md / .json (device, driver, versions, commit, command, date, per-phase
# status, the pytest summary), benchmarks/results/gpu_tests.log (full pytest output), and the benchmarks' own
# ops_cuda.{md,json} and synthesis_cuda.{md,json}. Exit status: 0 when every phase passed, 1 otherwise,
# 2 when there is no CUDA device.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS="benchmarks/results"
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --quick or nothing)" >&2; exit 2 ;;
  esac
done

if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    built = torch.version.cuda or "no CUDA (CPU-only build)"
    sys.stderr.write(f"gpu_suite.sh: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                     f"built with {built}). Run this suite on a machine with an NVIDIA GPU.\n")
    sys.exit(2)
EOF
then
  exit 2
fi

# The benchmarks run as scripts (sys.path[0] = benchmarks/): give them the same dfkd_fast that pytest imports from
# the repository root, and stop at once, with the fix, when it is not importable (measured on a lent H200:
# without this both benchmarks failed with "No module named 'dfkd_fast'" after the tests had passed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import dfkd_fast.kernels, dfkd_fast.ops" 2>/dev/null; then
  echo "gpu_suite.sh: dfkd_fast is not importable from $PWD: install it first" \
       "(pip install --no-build-isolation --no-deps -e .; DFKD_FAST_SKIP_EXT=1 skips the C++ extension)," \
       "or, without pip, link the kernels package in place: ln -sfn ../kernels dfkd_fast/kernels" >&2
  exit 2
fi

mkdir -p "$RESULTS"
START=$(date +%s)
BUDGET="${GPU_SUITE_BUDGET_S:-470}"
export DFKD_FAST_GPU_TESTS=1
unset TRITON_INTERPRET
STATUS_FILE="$(mktemp)"
trap 'rm -f "$STATUS_FILE"' EXIT

# run_phase NAME CAP_S CMD...: run with a timeout of min(CAP_S, what is left of the budget); record status.
run_phase() {
  local name="$1" cap="$2"
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    echo "== $name: skipped (suite budget spent)"
    printf '%s\tskipped\t0\t%s\n' "$name" "$*" >> "$STATUS_FILE"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$*" >> "$STATUS_FILE"
  echo "== $name: $status in $(( $(date +%s) - t0 )) s"
}

if (( QUICK )); then
  OPS_ARGS=(--quick)
  SYN_ARGS=(--quick)
else
  OPS_ARGS=()
  SYN_ARGS=(--teachers wrn40_2 --batch-sizes 256)
fi

run_phase "gpu tests" 150 bash -c \
  "set -o pipefail; $PY -m pytest -q -m gpu tests -p no:cacheprovider -rs 2>&1 | tee $RESULTS/gpu_tests.log"
run_phase "bench_ops" 200 "$PY" benchmarks/bench_ops.py ${OPS_ARGS[@]+"${OPS_ARGS[@]}"}
if [[ -f benchmarks/bench_synthesis.py ]]; then
  run_phase "bench_synthesis" 240 "$PY" benchmarks/bench_synthesis.py ${SYN_ARGS[@]+"${SYN_ARGS[@]}"}
else
  printf '%s\t%s\t0\t%s\n' "bench_synthesis" "missing (benchmarks/bench_synthesis.py not found)" "-" >> "$STATUS_FILE"
fi

"$PY" - "$STATUS_FILE" "$RESULTS" "$START" "$*" <<'EOF'
import datetime, json, os, platform, shlex, subprocess, sys, time
import torch

status_file, results, start, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
phases = []
with open(status_file) as f:
    for line in f:
        name, status, seconds, cmd = line.rstrip("\n").split("\t", 3)
        phases.append({"phase": name, "status": status, "seconds": int(seconds), "command": cmd})


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
summary = ""
log = os.path.join(results, "gpu_tests.log")
if os.path.exists(log):
    tail = [ln for ln in open(log).read().splitlines() if ln.strip()]
    summary = tail[-1] if tail else ""
props = torch.cuda.get_device_properties(0)
meta = {
    "device": torch.cuda.get_device_name(0),
    "capability": f"sm_{props.major}{props.minor}",
    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
    "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "triton": triton_version,
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "commit": run(["git", "rev-parse", "HEAD"]) + ("+dirty" if run(["git", "status", "--porcelain"]) else ""),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "bash benchmarks/gpu_suite.sh" + (f" {args}" if args else ""),
    "total_s": int(time.time()) - start,
    "pytest_summary": summary,
}
with open(os.path.join(results, "gpu_suite.json"), "w") as f:
    json.dump({"meta": meta, "phases": phases}, f, indent=2)
lines = ["# gpu_suite", ""] + [f"- {k}: `{v}`" for k, v in meta.items()] + [
    "", "| phase | status | seconds | command |", "|---|---|---:|---|"]
lines += [f"| {p['phase']} | {p['status']} | {p['seconds']} | `{p['command']}` |" for p in phases]
lines += ["", "Outputs: `gpu_tests.log`, `ops_cuda*.md/json`, `synthesis_cuda*.md/json` in this folder."]
with open(os.path.join(results, "gpu_suite.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if phases and all(p["status"] == "passed" for p in phases) else 1)
EOF
