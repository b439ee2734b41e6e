"""Synthesis methods under one interface (``Synthesizer.synthesize(targets=None) -> SynthesisResult``)."""
from dfkd_fast.synthesis.base import (  # noqa: F401
    BN_FREE_METHODS,
    OPTION_ALIASES,
    REGISTRY,
    SynthesisConfig,
    SynthesisResult,
    Synthesizer,
    build_synthesizer,
    list_methods,
    register,
    resolve_config,
)
from dfkd_fast.synthesis.cmi import CMI  # noqa: E402,F401
from dfkd_fast.synthesis.dafl import DAFL  # noqa: E402,F401

# ---- method imports (one line per method module) ----
from dfkd_fast.synthesis.data_impressions import ClassImpressions, DataImpressions  # noqa: E402,F401
from dfkd_fast.synthesis.deep_inversion import DeepInversion  # noqa: E402,F401
from dfkd_fast.synthesis.dfq import DFQ  # noqa: E402,F401
from dfkd_fast.synthesis.fast_meta import FastMeta  # noqa: E402,F401
from dfkd_fast.synthesis.impression_space import ImpressionSpace  # noqa: E402,F401
from dfkd_fast.synthesis.zskt import ZSKT  # noqa: E402,F401
