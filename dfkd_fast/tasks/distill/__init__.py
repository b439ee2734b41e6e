"""Knowledge distillation of a student from a teacher on synthesized data (offline and online).

Names: ``dfkd_fast.tasks.distill`` is this package (``import dfkd_fast.tasks.distill`` gives the module);
the offline KD function is ``dfkd_fast.tasks.distill.distill``, also exported as
``dfkd_fast.tasks.distill_offline``. For code written against the old layout, where
``from dfkd_fast.tasks import distill`` gave the function, the package itself is callable:
``distill(student, teacher, data, ...)`` forwards to :func:`~dfkd_fast.tasks.distill.offline.distill`.

- :mod:`~dfkd_fast.tasks.distill.offline`: :func:`distill`, KD on a fixed transfer set (Data Impressions,
  DeepInversion, any written transfer set).
- :mod:`~dfkd_fast.tasks.distill.online`: :func:`distill_online` and :class:`ImagePool`, synthesis rounds and
  KD steps interleaved as in the papers (CMI, FastDFKD, DAFL, ZSKT, DFQ; SPEC §7).
- :mod:`~dfkd_fast.tasks.distill.common`: what both share (:class:`DistillResult`, :func:`make_optimizer`,
  :func:`evaluate_accuracy`, :func:`as_image_tensor`, augmentation, checkpoints, curves).
"""
import inspect
import sys
import types
from typing import Any

from dfkd_fast.tasks.distill.common import (
    CKPT_NAME,
    DistillResult,
    as_image_tensor,
    evaluate_accuracy,
    make_optimizer,
)
from dfkd_fast.tasks.distill.offline import distill
from dfkd_fast.tasks.distill.online import ImagePool, distill_online

__all__ = ["DistillResult", "distill", "distill_offline", "distill_online", "evaluate_accuracy", "as_image_tensor",
           "make_optimizer", "ImagePool", "CKPT_NAME"]

#: the offline KD function under a name that cannot be confused with this package
distill_offline = distill


class _CallableModule(types.ModuleType):
    """This package's module type: calling the package calls the offline :func:`distill`."""

    def __call__(self, *args: Any, **kwargs: Any) -> DistillResult:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(distill)
