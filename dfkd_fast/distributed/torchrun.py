"""Our CLI flags against ``torchrun``'s own parser: torchrun accepts abbreviations, so no ``dfkd-fast`` flag
may be a prefix of one of its options (checked in the tests with :func:`torchrun_clashes`)."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

__all__ = ["torchrun_option_strings", "torchrun_clashes"]


def torchrun_option_strings() -> list[str]:
    """Every option string of torchrun's own parser (``torch.distributed.run.get_args_parser``)."""
    from torch.distributed.run import get_args_parser

    return sorted({s for a in get_args_parser()._actions for s in a.option_strings})  # noqa: SLF001


def torchrun_clashes(flags: Iterable[str]) -> list[tuple[str, str]]:
    """(flag, torchrun option) pairs where torchrun's abbreviation matching could take one of our flags.

    A flag clashes when it equals or is a prefix of a torchrun option (``--num`` of ``--numa-binding``), or
    when torchrun's parser, given ``-m dfkd_fast synthesize <flag> 1``, does not pass it through untouched.
    """
    from torch.distributed.run import get_args_parser

    flags = list(flags)
    options = torchrun_option_strings()
    out = [(f, o) for f in flags for o in options if o.startswith(f)]
    parser = get_args_parser()
    for f in flags:
        argv = ["--nproc-per-node", "2", "-m", "dfkd_fast", "synthesize", f, "1"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(argv)
        except SystemExit:  # argparse reports e.g. an ambiguous abbreviation by exiting
            out.append((f, "torchrun error: " + " ".join(err.getvalue().strip().splitlines()[-1:])))
            continue
        if ns.training_script_args != argv[-3:] or str(ns.nproc_per_node) != "2":
            out.append((f, "taken by torchrun"))
    return sorted(set(out))
