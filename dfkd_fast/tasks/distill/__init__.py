"""Knowledge distillation of a student from a teacher on synthesized data (offline and online).

- :mod:`~dfkd_fast.tasks.distill.offline`: :func:`distill`, KD on a fixed transfer set (Data Impressions,
  DeepInversion, any written transfer set).
- :mod:`~dfkd_fast.tasks.distill.online`: :func:`distill_online` and :class:`ImagePool`, synthesis rounds and
  KD steps interleaved as in the papers (CMI, FastDFKD, DAFL, ZSKT, DFQ; SPEC §7).
- :mod:`~dfkd_fast.tasks.distill.common`: what both share (:class:`DistillResult`, :func:`make_optimizer`,
  :func:`evaluate_accuracy`, :func:`as_image_tensor`, augmentation, checkpoints, curves).
"""
from dfkd_fast.tasks.distill.common import (
    CKPT_NAME,
    DistillResult,
    as_image_tensor,
    evaluate_accuracy,
    make_optimizer,
)
from dfkd_fast.tasks.distill.offline import distill
from dfkd_fast.tasks.distill.online import ImagePool, distill_online

__all__ = ["DistillResult", "distill", "distill_online", "evaluate_accuracy", "as_image_tensor", "make_optimizer",
           "ImagePool", "CKPT_NAME"]
