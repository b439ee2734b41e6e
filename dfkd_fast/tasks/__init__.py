"""Downstream uses of a transfer set (SPEC §2): distillation first; robustness, UAP, UDA ... alongside."""
# ---- tasks engineer: robustness, UAP, source-free UDA, class-incremental, Impression Space ----
from dfkd_fast.tasks.class_incremental import ClassIncrementalResult, class_incremental  # noqa: E402
from dfkd_fast.tasks.distill import DistillResult, distill, distill_online, evaluate_accuracy
from dfkd_fast.tasks.impression import (  # noqa: E402
    distill_on_selection,
    impression_select,
    impression_translate,
    one_shot,
)
from dfkd_fast.tasks.robustness import RobustnessResult, adversarial_train, attack, robustness  # noqa: E402
from dfkd_fast.tasks.source_free_uda import UDAResult, source_free_uda  # noqa: E402
from dfkd_fast.tasks.uap import UAPResult, uap  # noqa: E402

__all__ = ["DistillResult", "distill", "distill_online", "evaluate_accuracy",
           "ClassIncrementalResult", "class_incremental", "distill_on_selection", "impression_select",
           "impression_translate", "one_shot", "RobustnessResult", "adversarial_train", "attack", "robustness",
           "UDAResult", "source_free_uda", "UAPResult", "uap"]
