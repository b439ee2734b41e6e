"""Proof that a backend-parity test ran the backend it names, not a silent fallback to the torch reference.

Counters: ``dfkd_fast.kernels.LAUNCHES`` (every Triton host launcher records its launches, also under
``TRITON_INTERPRET=1``) and ``dfkd_fast._C.call_count`` (every C++ entry point bumps a named counter).
A parity test whose fused path resolved to torch would compare torch with torch and pass; with
:func:`ran` (or the per-file autouse fixture built on :func:`check_param_backend`) it fails instead.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

from dfkd_fast import _backend, kernels

FUSED = ("triton", "cpp")


def calls(backend: str, names: Sequence[str]) -> int:
    """Total launches (triton) / calls (cpp) of the named kernels so far; 0 for other backends."""
    if backend == "triton":
        return sum(kernels.LAUNCHES[n] for n in names)
    if backend == "cpp":
        ext = _backend.extension()
        return 0 if ext is None else sum(int(ext.call_count(n)) for n in names)
    return 0


@contextlib.contextmanager
def ran(backend: str, names: Sequence[str], at_least: int = 1) -> Iterator[None]:
    """Assert that the block launched the named kernels of ``backend`` at least ``at_least`` times in total
    (no-op for ``torch`` / ``auto``)."""
    before = calls(backend, names)
    yield
    if backend in FUSED:
        got = calls(backend, names) - before
        assert got >= at_least, (f"backend={backend!r} ran {got} of the kernels {tuple(names)} (expected >= "
                                 f"{at_least}): the op silently resolved to another backend")


def check_param_backend(request, names: Mapping[str, Sequence[str]], exempt: Sequence[str] = ()) -> Iterator[None]:
    """Body of an autouse fixture: a test parametrized with ``backend`` in ``names`` must launch one of
    ``names[backend]`` (the op's forward kernels). ``exempt``: test functions that only check input errors."""
    spec = getattr(request.node, "callspec", None)
    backend = spec.params.get("backend") if spec is not None else None
    if backend not in names or getattr(request.node, "originalname", request.node.name) in exempt:
        yield
        return
    with ran(backend, names[backend]):
        yield
