"""Build and install dfkd_fast.

Build switches (environment):
  DFKD_FAST_SKIP_EXT=1     do not build the compiled extension (pure Python + Triton install)
  DFKD_FAST_FORCE_CUDA=1   compile csrc/cuda/*.cu even if torch reports no CUDA build
  DFKD_FAST_CPU_ARCH=...   -march for the C++ CPU kernels (default: native, since the extension is built on
                           the machine that runs it; use e.g. x86-64-v2 for a portable build)
  MAX_JOBS=N               parallel compile jobs (ninja)

Install without build isolation so pip never pulls another torch:
  pip install --no-build-isolation -e .
"""
from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _extensions():
    info = {"version": VERSION, "commit": _git_commit(), "platform": platform.platform(),
            "extension": False, "cuda_sources": False, "reason": ""}
    if os.environ.get("DFKD_FAST_SKIP_EXT", "0") == "1":
        info["reason"] = "DFKD_FAST_SKIP_EXT=1"
        return [], {}, info
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # torch is a build requirement; install it first (see README)
        warnings.warn(f"dfkd_fast: torch not importable at build time ({e}); building without the extension",
                      stacklevel=1)
        info["reason"] = f"torch not importable at build time: {e}"
        return [], {}, info
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = bool(cuda_sources) and (
        os.environ.get("DFKD_FAST_FORCE_CUDA", "0") == "1" or (torch.version.cuda is not None and CUDA_HOME)
    )
    if cuda_sources and not want_cuda:
        warnings.warn("dfkd_fast: no CUDA toolkit / CUDA build of torch; compiling the C++ CPU kernels only",
                      stacklevel=1)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
    arch = os.environ.get("DFKD_FAST_CPU_ARCH", "native")
    if arch:
        cxx.append(f"-march={arch}")
    info["cpu_arch"] = arch
    define = [("DFKD_FAST_WITH_CUDA", "1")] if want_cuda else []
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], define_macros=define, extra_link_args=["-fopenmp"])
    if want_cuda:
        ext = CUDAExtension("dfkd_fast._C", sources + cuda_sources,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
                            **common)
    else:
        ext = CppExtension("dfkd_fast._C", sources, extra_compile_args={"cxx": cxx}, **common)
    info.update(extension=True, cuda_sources=bool(want_cuda), torch=torch.__version__,
                torch_cuda=torch.version.cuda)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


ext_modules, cmdclass, build_info = _extensions()
with open(os.path.join(HERE, "dfkd_fast", "build_info.json"), "w") as f:
    json.dump(build_info, f, indent=2)

setup(
    name="dfkd_fast",
    version=VERSION,
    description="Fast data-free knowledge distillation: fused Triton / C++ hot paths, every synthesis method, tasks",
    packages=["dfkd_fast", "dfkd_fast.kernels"] + [
        "dfkd_fast." + os.path.relpath(d, "dfkd_fast").replace(os.sep, ".")
        for d in sorted(glob.glob("dfkd_fast/**/", recursive=True))
        if os.path.relpath(d, "dfkd_fast") != "." and os.path.exists(os.path.join(d, "__init__.py"))
    ],
    package_dir={"dfkd_fast": "dfkd_fast", "dfkd_fast.kernels": "kernels"},
    package_data={"dfkd_fast": ["build_info.json"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned beyond a floor: an installed torch==2.13.0 satisfies it and nothing
    # is replaced. Install with --no-build-isolation.
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy", "tqdm", "matplotlib",
                      "pillow", "safetensors"],
    extras_require={
        "data": ["mlxtend", "scikit-learn", "scikit-image"],
        "test": ["pytest", "pytest-timeout", "pytest-benchmark", "mlxtend", "scikit-learn", "scikit-image"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["dfkd-fast=dfkd_fast.cli:main"]},
)
