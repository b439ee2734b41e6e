"""Shared helpers of the benchmarks: timing (CPU / GPU), run metadata, markdown + JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: Rough HBM peaks (GB/s) used for "% of peak" on GPUs; CPU rows leave the column empty.
GPU_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float) -> tuple[float, float]:
    """Median and inter-quartile range of one call of ``fn``, in milliseconds.

    CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; CUDA: ``triton.testing.do_bench`` (quantiles).
    """
    if device.type == "cuda":
        import triton.testing

        q25, q50, q75 = triton.testing.do_bench(fn, quantiles=[0.25, 0.5, 0.75], rep=max(1, int(min_run_time * 1e3)))
        return float(q50), float(q75 - q25)
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def gpu_peak_gbs(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_GBS.items() if k in name), None)


def git_commit() -> str:
    try:
        out = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL)
        dirty = subprocess.run(["git", "diff", "--quiet"], cwd=ROOT, stderr=subprocess.DEVNULL).returncode != 0
        return out.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: torch.device, argv: list[str]) -> dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *argv]),
    }


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def save(rows: list[dict], meta: dict, out_dir: Path, stem: str, table: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    js = out_dir / f"{stem}.json"
    head = "\n".join(f"- {k}: `{v}`" for k, v in meta.items())
    md.write_text(f"# {stem}\n\n{head}\n\n{table}\n")
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return md, js
