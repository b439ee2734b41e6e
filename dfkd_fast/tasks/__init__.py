"""Downstream uses of a transfer set (SPEC §2): distillation first; robustness, UAP, UDA ... alongside."""
# ---- tasks engineer: robustness, UAP, source-free UDA, class-incremental, Impression Space ----
# ``dfkd_fast.tasks.distill`` stays the package (it is callable: calling it runs the offline KD function,
# so ``from dfkd_fast.tasks import distill; distill(student, teacher, data)`` keeps working); the function
# itself is ``dfkd_fast.tasks.distill.distill`` = ``dfkd_fast.tasks.distill_offline``.
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): ``import dfkd_fast.tasks.commands`` (the CLI's task configs) stays light.
_LAZY = {
    "DistillResult": "dfkd_fast.tasks.distill", "distill_offline": "dfkd_fast.tasks.distill",
    "distill_online": "dfkd_fast.tasks.distill", "evaluate_accuracy": "dfkd_fast.tasks.distill",
    "ClassIncrementalResult": "dfkd_fast.tasks.class_incremental",
    "class_incremental": "dfkd_fast.tasks.class_incremental",
    "distill_on_selection": "dfkd_fast.tasks.impression", "impression_select": "dfkd_fast.tasks.impression",
    "impression_translate": "dfkd_fast.tasks.impression", "one_shot": "dfkd_fast.tasks.impression",
    "RobustnessResult": "dfkd_fast.tasks.robustness", "adversarial_train": "dfkd_fast.tasks.robustness",
    "attack": "dfkd_fast.tasks.robustness", "robustness": "dfkd_fast.tasks.robustness",
    "RobustDistillResult": "dfkd_fast.tasks.robustness", "robust_distill": "dfkd_fast.tasks.robustness",
    "UDAResult": "dfkd_fast.tasks.source_free_uda", "source_free_uda": "dfkd_fast.tasks.source_free_uda",
    "UAPResult": "dfkd_fast.tasks.uap", "uap": "dfkd_fast.tasks.uap",
}


def __getattr__(name: str) -> Any:
    if name == "distill":  # the package (callable), not the function
        return importlib.import_module("dfkd_fast.tasks.distill")
    if name not in _LAZY:
        raise AttributeError(f"module 'dfkd_fast.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["DistillResult", "distill", "distill_offline", "distill_online", "evaluate_accuracy",
           "ClassIncrementalResult", "class_incremental", "distill_on_selection", "impression_select",
           "impression_translate", "one_shot", "RobustnessResult", "adversarial_train", "attack", "robustness",
           "RobustDistillResult", "robust_distill",
           "UDAResult", "source_free_uda", "UAPResult", "uap"]
