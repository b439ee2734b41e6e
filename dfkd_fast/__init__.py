"""dfkd_fast: fast data-free knowledge distillation.

Layers (each imports only those below it): kernels (Triton + references, ``dfkd_fast.kernels``) and the
compiled extension (``dfkd_fast._C``) -> ``ops`` -> building blocks (``hooks``, augmentation, memory bank,
models) -> ``synthesis`` -> ``tasks`` -> ``cli``.
"""
__version__ = "0.1.0"

from dfkd_fast import ops  # noqa: E402,F401
from dfkd_fast._checks import set_checks  # noqa: E402,F401
from dfkd_fast.transfer_set import TransferSet  # noqa: E402,F401
