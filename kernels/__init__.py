"""Triton kernels and their plain-PyTorch references (installed as ``dfkd_fast.kernels``).

Each ``<op>.py`` holds ``<op>_ref`` (pure PyTorch, fp32 accumulation: the spec, test oracle, eager
baseline and CPU fallback), private ``@triton.jit`` kernels, and host launchers ``<op>_fwd`` /
``<op>_bwd`` (checks, allocation, grid, launch; no autograd). Importing works without Triton.
Each ``<op>.py`` also lists, in ``aot_specializations()``, every kernel variant its launchers pick on a GPU
(built from the same config tables); ``kernels/aot.py`` compiles them ahead of time for sm_90 / sm_80 without
a GPU: ``python -m dfkd_fast.kernels.aot --arch 90 80``.
"""
from __future__ import annotations

import collections
import os

try:  # guarded: the package imports without Triton (HAS_TRITON=False)
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

#: Number of times each Triton kernel was launched by a host launcher in this process. Tests use it
#: to prove that the Triton path (not a fallback) ran, including under ``TRITON_INTERPRET=1``.
LAUNCHES: collections.Counter[str] = collections.Counter()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def record_launch(name: str) -> None:
    LAUNCHES[name] += 1
