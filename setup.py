"""Build dfkd_fast: the Python packages plus the compiled extension ``dfkd_fast._C`` (metadata: pyproject.toml).

Install against the torch you already have (pip must not build in an isolated environment, which has no
torch and would otherwise pull one):
  pip install --no-build-isolation .            # or: pip install --no-build-isolation --no-deps -e .
  python setup.py build_ext --inplace           # extension only, into the source tree

Build switches (environment):
  DFKD_FAST_SKIP_EXT=1     pure-Python build (no ``_C``; the cpp backend then reports itself unavailable)
  DFKD_FAST_FORCE_CUDA=1   compile csrc/cuda/*.cu even if torch reports no CUDA build
  DFKD_FAST_CPU_ARCH=...   -march for the C++ CPU kernels; default x86-64-v2 on x86-64 (a portable wheel) and
                           none elsewhere; ``scripts/setup.sh`` exports ``native``; empty: no -march
  MAX_JOBS=N               parallel compile jobs (ninja)

Without torch importable (e.g. pip's isolated build environment), ``build_ext``, which every wheel, editable
or in-place build runs, stops with one message saying what to do, instead of producing a package without
``_C``; ``sdist`` and the metadata commands (``egg_info``, ``dist_info``) do not need torch.

Compile flags: no ``-std`` is passed, so BuildExtension adds the one torch's headers are written for (C++20 for
torch 2.13; the old ``-std=c++17`` gave a screen of ``-Wc++20-extensions`` warnings from c10 headers); torch's
include dirs also as ``-isystem`` (no warnings from headers this project does not own); ``-g0`` after Python's
``-g`` and a stripped link (``-s``) on Linux (CPU build, torch 2.13, GCC 12: _C.so 25.9 MB -> 0.66 MB; header
warnings 8 -> 0).
"""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))

#: setup.py commands that build; they rewrite ``dfkd_fast/build_info.json`` (the record ``dfkd-fast info`` prints).
BUILD_COMMANDS = frozenset({"build", "build_ext", "bdist_wheel", "editable_wheel", "bdist", "bdist_egg", "bdist_dumb",
                            "bdist_rpm", "install", "develop"})

TORCH_MISSING = ("dfkd_fast: torch is not importable at build time ({err}), so the compiled extension "
                 "dfkd_fast._C cannot be built; install torch first and build without isolation: "
                 "`pip install --no-build-isolation .` (or set DFKD_FAST_SKIP_EXT=1 for a pure-Python build)")


def read_version() -> str:
    """``__version__`` from ``dfkd_fast/_version.py``, read as text (the package is not imported)."""
    with open(os.path.join(HERE, "dfkd_fast", "_version.py")) as f:
        m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    if m is None:
        raise RuntimeError("dfkd_fast/_version.py: no line `__version__ = \"...\"`")
    return m.group(1)


VERSION = read_version()


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_cpu_arch(machine: str | None = None) -> str:
    """``-march`` used when DFKD_FAST_CPU_ARCH is unset: ``x86-64-v2`` on x86-64 (SSE4.2/POPCNT, every x86-64
    CPU since ~2009, so a wheel runs anywhere), ``""`` (no -march: the compiler's default) on other machines."""
    machine = (machine or platform.machine()).lower()
    return "x86-64-v2" if machine in ("x86_64", "amd64") else ""


def cxx_flags(torch_include_dirs: list[str], arch: str) -> list[str]:
    """Extra C++ compile flags (they come after Python's CFLAGS, so ``-g0`` overrides its ``-g``)."""
    flags = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-g0"]
    for d in torch_include_dirs:  # a dir given as both -I and -isystem is searched as a system dir (GCC, Clang)
        flags += ["-isystem", d]
    if arch:
        flags.append(f"-march={arch}")
    return flags


def link_flags() -> list[str]:
    """Extra link flags: OpenMP, and ``-s`` (strip the symbol table) where the linker is GNU/LLVM ld."""
    return ["-fopenmp"] + (["-s"] if sys.platform.startswith("linux") else [])


def _extensions():
    """``(ext_modules, cmdclass, build_info)`` for ``setup()``.

    Raises ``SystemExit`` with :data:`TORCH_MISSING` (one line) when torch cannot be imported, unless
    ``DFKD_FAST_SKIP_EXT=1`` (pure-Python build: no extension, no error).
    """
    info = {"version": VERSION, "commit": _git_commit(), "platform": platform.platform(),
            "extension": False, "cuda_sources": False, "reason": ""}
    if os.environ.get("DFKD_FAST_SKIP_EXT", "0") == "1":
        info["reason"] = "DFKD_FAST_SKIP_EXT=1"
        return [], {}, info
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
            include_paths,
        )
    except ImportError as e:
        raise SystemExit(TORCH_MISSING.format(err=e)) from None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = bool(cuda_sources) and (
        os.environ.get("DFKD_FAST_FORCE_CUDA", "0") == "1" or (torch.version.cuda is not None and CUDA_HOME)
    )
    if cuda_sources and not want_cuda:
        warnings.warn("dfkd_fast: no CUDA toolkit / CUDA build of torch; compiling the C++ CPU kernels only",
                      stacklevel=1)
    arch = os.environ.get("DFKD_FAST_CPU_ARCH", default_cpu_arch())
    cxx = cxx_flags(include_paths(), arch)
    info["cpu_arch"] = arch or "compiler default"
    define = [("DFKD_FAST_WITH_CUDA", "1")] if want_cuda else []
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], define_macros=define, extra_link_args=link_flags())
    if want_cuda:
        ext = CUDAExtension("dfkd_fast._C", sources + cuda_sources,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]}, **common)
    else:
        ext = CppExtension("dfkd_fast._C", sources, extra_compile_args={"cxx": cxx}, **common)
    info.update(extension=True, cuda_sources=bool(want_cuda), torch=torch.__version__,
                torch_cuda=torch.version.cuda)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


def _refusing_extension(message: str):
    """``(ext_modules, cmdclass)`` used when torch is missing: the extension is still declared (so ``sdist``
    ships its sources and ``egg_info`` / ``dist_info`` work), but the ``build_ext`` command, which every wheel,
    editable or in-place build runs, stops with ``message`` instead of silently producing a package without ``_C``.
    """
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class RefuseBuildExt(build_ext):
        def run(self) -> None:
            raise SystemExit(message)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return [Extension("dfkd_fast._C", sources, language="c++")], {"build_ext": RefuseBuildExt}


def builds(argv: list[str]) -> bool:
    """Whether the setup.py command line ``argv`` (without the script name) names a command that builds."""
    return any(a in BUILD_COMMANDS for a in argv)


def packages() -> list[str]:
    """``dfkd_fast``, its subpackages and ``dfkd_fast.kernels`` (the top-level ``kernels/`` folder)."""
    subs = [os.path.relpath(d, os.path.join(HERE, "dfkd_fast")).replace(os.sep, ".")
            for d in sorted(glob.glob(os.path.join(HERE, "dfkd_fast", "**", ""), recursive=True))
            if os.path.exists(os.path.join(d, "__init__.py"))]
    return ["dfkd_fast", "dfkd_fast.kernels"] + ["dfkd_fast." + s for s in subs if s != "."]


def main() -> None:
    from setuptools import setup

    try:
        ext_modules, cmdclass, build_info = _extensions()
    except SystemExit as e:  # no torch: sdist / metadata still work; anything that compiles stops with the message
        ext_modules, cmdclass = _refusing_extension(str(e.code))
        build_info = None
    if build_info is not None and builds(sys.argv[1:]):
        with open(os.path.join(HERE, "dfkd_fast", "build_info.json"), "w") as f:
            json.dump(build_info, f, indent=2)
    setup(  # name, version (dfkd_fast/_version.py), dependencies, entry points: pyproject.toml
        packages=packages(),
        package_dir={"dfkd_fast": "dfkd_fast", "dfkd_fast.kernels": "kernels"},
        package_data={"dfkd_fast": ["build_info.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # also true when a PEP 517 backend runs this file
    main()
