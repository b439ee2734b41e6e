#!/usr/bin/env bash
# Packaging check (CI runs it after the tests; also by hand): what a user who installs from the sdist gets.
#   1. an sdist of this checkout, which must carry the headers, LICENSE, README and CMakeLists.txt;
#   2. a fresh venv that reuses the installed torch (--system-site-packages; nothing is downloaded);
#   3. a wheel built from the sdist in that venv (pip wheel --no-build-isolation --no-deps --no-index);
#   4. the wheel installed there and dfkd_fast._C imported from it, outside the source tree.
# Needs torch, setuptools>=77, wheel (and ninja for a parallel build) in the interpreter $PYTHON (default python3).
# MAX_JOBS (default 2) sets the compile jobs. Leaves nothing behind but the temporary folder it removes.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dfkd_fast_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 MAX_JOBS=${MAX_JOBS:-2}
say() { echo "check_wheel: $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

# 1. sdist (no compiling; the egg-info goes to $WORK, not into the checkout)
$PY setup.py -q egg_info --egg-base "$WORK" sdist --dist-dir "$WORK/dist" >"$WORK/sdist.log" 2>&1 ||
    { cat "$WORK/sdist.log" >&2; fail "python setup.py sdist"; }
SDIST=$(ls "$WORK"/dist/dfkd_fast-*.tar.gz)
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$WORK/sdist.txt"
for f in LICENSE README.md CMakeLists.txt pyproject.toml setup.py MANIFEST.in dfkd_fast/_version.py \
         $(cd "$SRC" && ls csrc/*.h csrc/*.cpp) $(cd "$SRC" && ls csrc/cuda/*.cu csrc/cuda/*.cuh 2>/dev/null || true); do
    grep -qx "$f" "$WORK/sdist.txt" || fail "the sdist $(basename "$SDIST") lacks $f (add it to MANIFEST.in)"
done
say "sdist $(basename "$SDIST"): $(wc -l <"$WORK/sdist.txt") files, headers/LICENSE/README/CMakeLists.txt present"

# 2. fresh venv reusing this interpreter's packages (torch, setuptools, wheel, pip); no pip of its own, so the
#    venv's bundled (older) setuptools cannot shadow the one that reads pyproject.toml
$PY -m venv --system-site-packages --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"

# 3. wheel from the sdist, compiled against the reused torch
start=$SECONDS
(cd "$WORK" && $VPY -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$WORK/wheels" "$SDIST") \
    >"$WORK/wheel.log" 2>&1 || { tail -n 40 "$WORK/wheel.log" >&2; fail "pip wheel from the sdist"; }
WHEEL=$(ls "$WORK"/wheels/dfkd_fast-*.whl)
case "$(basename "$WHEEL")" in *-none-any.whl) fail "$(basename "$WHEEL") is a pure-Python wheel (no _C)";; esac
say "wheel $(basename "$WHEEL") built in $((SECONDS - start)) s"

# 4. install into the venv; import from it with the checkout off sys.path
$VPY -m pip install -q --no-deps --no-index "$WHEEL" >"$WORK/install.log" 2>&1 ||
    { cat "$WORK/install.log" >&2; fail "pip install of the wheel"; }
(cd "$WORK" && $VPY - "$WORK/venv" "$SRC" <<'EOF'
import json, os, sys
venv, src = (os.path.realpath(p) for p in sys.argv[1:3])
import dfkd_fast
import torch  # noqa: F401  (the extension links against torch's libraries: load them first, as _backend does)
import dfkd_fast._C as C
for mod in (dfkd_fast, C):
    path = os.path.realpath(mod.__file__)
    assert path.startswith(venv + os.sep), f"{mod.__name__} imported from {path}, not from the venv {venv}"
    assert not path.startswith(src + os.sep), f"{mod.__name__} imported from the checkout {path}"
info = json.load(open(os.path.join(os.path.dirname(dfkd_fast.__file__), "build_info.json")))
assert info["extension"] is True, f"build_info.json of the wheel: {info}"
size = os.path.getsize(C.__file__)
print(f"check_wheel: dfkd_fast {dfkd_fast.__version__}: _C imported from the venv ({size / 1e6:.1f} MB, "
      f"-march {info.get('cpu_arch')}, torch {info.get('torch')})")
EOF
) || fail "importing dfkd_fast._C from the installed wheel"
out=$(cd "$WORK" && "$WORK/venv/bin/dfkd-fast" --version) || fail "dfkd-fast --version"
case "$out" in *"extension built"*) say "$out";; *) fail "dfkd-fast --version says: $out";; esac
say OK
