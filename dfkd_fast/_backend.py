"""Backend resolution for every op: ``"auto" | "triton" | "cpp" | "torch"``.

``auto``: Triton on CUDA tensors (except the ops in ``CUDA_AUTO_TORCH``, which measured slower than eager
PyTorch on an H200), the compiled extension (``dfkd_fast._C``) on CPU tensors when it is built and implements
the op, else the torch reference. ``DFKD_FAST_BACKEND`` overrides ``auto`` (it is
then treated as if that backend had been named). A backend asked for by name that cannot run raises
``RuntimeError`` with the reason; ``auto`` falls back silently.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from dfkd_fast import kernels

BACKENDS = ("auto", "triton", "cpp", "torch")

#: Ops whose Triton kernel measured slower than the eager torch path on a real GPU, so ``auto`` on CUDA runs the
#: torch path; ``backend="triton"`` still runs the kernel. Evidence: benchmarks/results/ops_cuda.md (H200,
#: torch 2.11 + Triton 3.6, 2026-11-29): info_nce at M=4352, D=256, fp32, forward + backward took 29.0 ms with
#: Triton against 0.77 ms eager (the backward kernels recompute the logits once per 32-column D chunk).
CUDA_AUTO_TORCH: dict[str, str] = {
    "info_nce": "Triton 29.0 ms vs eager 0.77 ms (H200, M=4352 D=256 fp32, fwd+bwd; ops_cuda.md)",
}

_C: ModuleType | None = None
_C_ERROR: str | None = None
_C_TRIED = False


def extension() -> ModuleType | None:
    """The compiled extension, loaded once; ``None`` (with the reason kept) when unavailable."""
    global _C, _C_ERROR, _C_TRIED
    if not _C_TRIED:
        _C_TRIED = True
        try:
            _C = importlib.import_module("dfkd_fast._C")
        except ImportError as e:
            _C_ERROR = (f"the compiled extension dfkd_fast._C is not built ({e}); build it against this torch from "
                        "the source checkout with `pip install --no-build-isolation --no-deps -e .` or "
                        "`python setup.py build_ext --inplace` (DFKD_FAST_SKIP_EXT unset)")
            warnings.warn(f"dfkd_fast: {_C_ERROR}; the cpp backend is unavailable", stacklevel=2)
    return _C


def extension_error() -> str | None:
    extension()
    return _C_ERROR


@torch.compiler.assume_constant_result  # torch.compile: evaluated once at trace time (it imports the extension)
def cpp_available(fn_name: str | None = None) -> tuple[bool, str]:
    """Whether the cpp backend can run ``fn_name`` (a function of ``dfkd_fast._C``), and why not."""
    ext = extension()
    if ext is None:
        return False, _C_ERROR or "extension not built"
    if fn_name is not None and not hasattr(ext, fn_name):
        return False, f"dfkd_fast._C has no '{fn_name}' (the cpp backend does not implement this op)"
    return True, ""


def triton_available(device: torch.device) -> tuple[bool, str]:
    if not kernels.HAS_TRITON:
        return False, f"Triton is not importable ({kernels.TRITON_IMPORT_ERROR}); pip install triton"
    if device.type == "cuda" or kernels.interpreting():
        return True, ""
    return False, (f"Triton needs CUDA tensors (got device '{device}'); set TRITON_INTERPRET=1 before "
                   "importing triton to run kernels on CPU in the interpreter, or use backend='cpp'/'torch'")


def resolve(op: str, backend: str, device: torch.device, *, triton: bool = True, cpp: str | None = None) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    Args:
        op: op name, for messages.
        backend: requested backend (``"auto"`` consults ``DFKD_FAST_BACKEND``).
        device: device of the op's inputs.
        triton: whether the op has a Triton implementation.
        cpp: name of the op's function in ``dfkd_fast._C`` (``None``: no cpp implementation).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("DFKD_FAST_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"DFKD_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device.type == "cuda" and triton and op not in CUDA_AUTO_TORCH and triton_available(device)[0]:
            return "triton"
        if device.type == "cpu" and cpp is not None and cpp_available(cpp)[0]:
            return "cpp"
        return "torch"
    if backend == "triton":
        if not triton:
            raise RuntimeError(f"{op}: no Triton implementation; use backend='torch' or 'auto'")
        ok, why = triton_available(device)
        if not ok:
            raise RuntimeError(f"{op}: backend='triton' unavailable: {why}")
    elif backend == "cpp":
        if cpp is None:
            raise RuntimeError(f"{op}: no cpp implementation; use backend='torch' or 'auto'")
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend='cpp' runs on CPU tensors only (got device '{device}')")
        ok, why = cpp_available(cpp)
        if not ok:
            raise RuntimeError(f"{op}: backend='cpp' unavailable: {why}")
    return backend
