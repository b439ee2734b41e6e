"""Environment report: versions, build metadata, extension status and the backend of every op.

``python -m dfkd_fast.info`` and ``dfkd-fast info`` print it; :func:`collect_info` returns it as a dict.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import torch

import dfkd_fast
from dfkd_fast import _backend, kernels, ops

__all__ = ["collect_info", "format_info", "main"]


def _op_backends(op: str) -> dict[str, Any]:
    has_triton, cpp_fn = ops.OP_BACKENDS[op]
    cpp_ok = cpp_fn is not None and _backend.cpp_available(cpp_fn)[0]
    auto_cpu = _backend.resolve(op, "auto", torch.device("cpu"), triton=has_triton, cpp=cpp_fn)
    auto_cuda = "triton" if has_triton and kernels.HAS_TRITON else "torch"
    return {"torch": True, "triton": bool(has_triton and kernels.HAS_TRITON), "cpp": bool(cpp_ok),
            "auto_cpu": auto_cpu, "auto_cuda": auto_cuda if torch.cuda.is_available() else "n/a (no CUDA)"}


def _methods() -> list[str]:
    import dfkd_fast.synthesis as synthesis

    return synthesis.list_methods()


def collect_info() -> dict[str, Any]:
    """Versions, ``build_info.json``, extension status, synthesis methods and per-op backends."""
    path = os.path.join(os.path.dirname(dfkd_fast.__file__), "build_info.json")
    build: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path) as f:
            build = json.load(f)
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = f"absent ({kernels.TRITON_IMPORT_ERROR})"
    ext = _backend.extension()
    cuda = torch.cuda.is_available()
    return {
        "versions": {"dfkd_fast": dfkd_fast.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "triton": triton_v, "torch_cuda": torch.version.cuda},
        "device": {"cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                   "cpu_threads": torch.get_num_threads(), "triton_interpret": kernels.interpreting()},
        "extension": {"loaded": ext is not None, "error": _backend.extension_error(),
                      "functions": sorted(n for n in dir(ext) if not n.startswith("_")) if ext is not None else []},
        "env": {"DFKD_FAST_BACKEND": os.environ.get("DFKD_FAST_BACKEND", "auto")},
        "build_info": build,
        "methods": _methods(),
        "ops": {op: _op_backends(op) for op in ops.__all__},
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable report of :func:`collect_info`."""
    lines = ["dfkd_fast " + info["versions"]["dfkd_fast"]]
    lines += [f"  {k}: {v}" for k, v in info["versions"].items() if k != "dfkd_fast"]
    lines.append("device: " + ", ".join(f"{k}={v}" for k, v in info["device"].items()))
    ext = info["extension"]
    lines.append(f"extension dfkd_fast._C: {'loaded' if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}")
    if ext["functions"]:
        lines.append("  functions: " + ", ".join(ext["functions"]))
    lines.append("build_info.json: " + (json.dumps(info["build_info"]) if info["build_info"] else "missing"))
    lines.append("DFKD_FAST_BACKEND: " + info["env"]["DFKD_FAST_BACKEND"])
    lines.append("synthesis methods: " + (", ".join(info["methods"]) or "none registered"))
    lines.append(f"{'op':28s} {'torch':6s} {'triton':7s} {'cpp':5s} {'auto(cpu)':10s} auto(cuda)")
    for op, b in info["ops"].items():
        lines.append(f"{op:28s} {'yes' if b['torch'] else 'no':6s} {'yes' if b['triton'] else 'no':7s} "
                     f"{'yes' if b['cpp'] else 'no':5s} {b['auto_cpu']:10s} {b['auto_cuda']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for machine-readable output)."""
    argv = sys.argv[1:] if argv is None else argv
    info = collect_info()
    print(json.dumps(info, indent=2, default=str) if "--json" in argv else format_info(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
