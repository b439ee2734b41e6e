"""Smoke tests of the package layout: kernels install as dfkd_fast.kernels, not as a top-level name."""
import importlib

import pytest


def test_kernels_is_a_subpackage():
    k = importlib.import_module("dfkd_fast.kernels")
    assert k.__name__ == "dfkd_fast.kernels"
    assert hasattr(k, "HAS_TRITON") and hasattr(k, "LAUNCHES")


def test_no_top_level_kernels_from_us(tmp_path):
    """Outside the source tree, 'kernels' must not resolve to our folder (it would clash on PyPI)."""
    import subprocess
    import sys

    code = ("import importlib.util as u; s = u.find_spec('kernels'); "
            "print('none' if s is None else s.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    from pathlib import Path

    ours = str(Path(__file__).resolve().parents[1] / "kernels")
    assert origin == "none" or not origin.startswith(ours), origin


def test_backend_resolution_errors():
    import torch

    from dfkd_fast._backend import resolve

    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("op", "cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no cpp implementation"):
        resolve("op", "cpp", torch.device("cpu"), cpp=None)
    assert resolve("op", "torch", torch.device("cpu")) == "torch"


def test_every_public_op_declares_its_backends():
    from dfkd_fast import ops

    assert set(ops.OP_BACKENDS) == set(ops.__all__)
    for name, (_, cpp_fn) in ops.OP_BACKENDS.items():
        if cpp_fn is not None:
            from dfkd_fast._backend import extension

            ext = extension()
            assert ext is None or hasattr(ext, cpp_fn), f"{name}: dfkd_fast._C lacks {cpp_fn}"


def test_auto_on_cuda_follows_measured_gpu_results(monkeypatch):
    """``auto`` on CUDA runs Triton except for the ops measured slower than eager on a real GPU (CUDA_AUTO_TORCH);
    naming the backend still runs the kernel. No GPU needed: resolution looks at the device type only."""
    import torch

    from dfkd_fast import _backend, kernels

    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.delenv("DFKD_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert "info_nce" in _backend.CUDA_AUTO_TORCH
    assert _backend.resolve("info_nce", "auto", cuda, triton=True) == "torch"
    assert _backend.resolve("info_nce", "triton", cuda, triton=True) == "triton"
    assert _backend.resolve("bn_stat_loss", "auto", cuda, triton=True) == "triton"
