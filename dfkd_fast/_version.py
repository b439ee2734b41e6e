"""The package version: the one place it is written.

``setup.py`` reads ``__version__`` from this file's text (so a build needs neither torch nor the package
importable), ``pyproject.toml`` takes it as ``version = {attr = "dfkd_fast._version.__version__"}`` and
``dfkd_fast.__version__`` re-exports it. Nothing here imports torch at module level.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__version__ = "0.1.0"


def version_string(prog: str = "dfkd-fast") -> str:
    """``"<prog> <version> (torch <torch version>, extension built|not built)"``.

    "built" means ``dfkd_fast._C`` imports in this interpreter; the check does not go through
    ``dfkd_fast._backend`` so it neither warns nor caches the result.
    """
    import torch

    try:
        importlib.import_module("dfkd_fast._C")
        ext = "built"
    except ImportError:
        ext = "not built"
    return f"{prog} {__version__} (torch {torch.__version__}, extension {ext})"


class VersionAction(argparse.Action):
    """``--version``: print :func:`version_string` and exit 0 (torch and the extension load only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, default: str = argparse.SUPPRESS,
                 help: str = "print the version, the torch version and whether the compiled extension is built, "
                             "then exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        sys.stdout.write(version_string(parser.prog) + "\n")  # stdout, like argparse's own "version" action
        parser.exit()
