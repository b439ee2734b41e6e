#!/usr/bin/env bash
# Set up dfkd_fast on a fresh machine (CPU or CUDA): the local torch 2.13.0, runtime + test deps, and the
# package with its compiled extension built against that torch (no build isolation: nothing replaces torch).
# The extension is built for this machine (-march=native); DFKD_FAST_CPU_ARCH overrides it (empty: no -march;
# a plain `pip install --no-build-isolation .` defaults to the portable x86-64-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DFKD_FAST_CPU_ARCH=${DFKD_FAST_CPU_ARCH-native}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q "setuptools>=77" wheel ninja
$PY -m pip install -q triton numpy tqdm matplotlib pillow safetensors mlxtend scikit-learn scikit-image pyyaml \
    pytest pytest-timeout pytest-benchmark
# Editable install of the Python packages only; the extension is built just below, once, in place.
DFKD_FAST_SKIP_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
# Build the C++ extension in place with this interpreter (deterministic: never inside a pip build environment).
if [ "${DFKD_FAST_SKIP_EXT:-0}" != "1" ]; then
    MAX_JOBS=${MAX_JOBS:-2} $PY setup.py -q build_ext --inplace
    $PY -c "import torch, dfkd_fast._C" || { echo "setup: the compiled extension did not build or load" >&2; exit 1; }
fi
$PY -c "import torch, dfkd_fast; from dfkd_fast import _backend as b; print('dfkd_fast ready: torch', torch.__version__, '| cpp extension:', 'built' if b.extension() is not None else b.extension_error())"
