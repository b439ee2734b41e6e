"""Drop-in layers for code written against other DFKD code bases.

- :mod:`dfkd_fast.compat.datafree`: the names and conventions of the authors' ``datafree`` package (CMI /
  DataFree, Fast-Datafree and their forks) -- hooks, criterions, ``Normalizer`` and ``BaseSynthesis``-style
  synthesizers -- backed by dfkd_fast's fused ops, hooks and synthesizers. Switch with one import line::

      from dfkd_fast.compat import datafree
"""
from dfkd_fast.compat import datafree  # noqa: F401

__all__ = ["datafree"]
