"""dfkd_fast: fast data-free knowledge distillation.

Layers (each imports only those below it): kernels (Triton + references, ``dfkd_fast.kernels``) and the
compiled extension (``dfkd_fast._C``) -> ``ops`` -> building blocks (``hooks``, augmentation, memory bank,
models) -> ``synthesis`` -> ``tasks`` -> ``cli``.
"""
from __future__ import annotations

import importlib
from typing import Any

from dfkd_fast._version import __version__  # noqa: F401  (the one place the version is written)

# Imported on first use (PEP 562), so ``import dfkd_fast`` (and the CLI's start-up, before it installs its Ctrl-C
# handler) does not pull torch in: ``dfkd_fast.ops``, ``dfkd_fast.set_checks``, ``dfkd_fast.TransferSet``.
_LAZY = {"ops": ("dfkd_fast.ops", None), "set_checks": ("dfkd_fast._checks", "set_checks"),
         "TransferSet": ("dfkd_fast.transfer_set", "TransferSet")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dfkd_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)
