"""Test configuration: Triton runs in its CPU interpreter unless a GPU test run asks otherwise.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so it is set here, at collection start.
GPU runs (on a lent device, never in CI): ``DFKD_FAST_GPU_TESTS=1 pytest -m gpu tests``.
"""
from __future__ import annotations

import os

if os.environ.get("DFKD_FAST_GPU_TESTS", "0") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with DFKD_FAST_GPU_TESTS=1)")
    config.addinivalue_line("markers", "slow: longer CPU test (still part of CI)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DFKD_FAST_GPU_TESTS", "0") == "1" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU test: needs CUDA and DFKD_FAST_GPU_TESTS=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-shape tests (threads only add contention on a 2-core runner)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_env(monkeypatch):
    """CLI / subprocess tests: ``tests/`` importable (``cli_models:...`` factories), no progress bars, one thread."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def data():
    """scikit-learn digits at 8x8: (x_train, y_train, x_test, y_test), x in [0, 1] (N, 1, 8, 8)."""
    from dfkd_fast.datasets import digits

    x, y = digits("train", image_size=8)
    xt, yt = digits("test", image_size=8)
    return x, y, xt, yt
