"""One fused op, two front doors: a ``torch.library.custom_op`` for graph capture, an autograd.Function for eager.

The custom op (namespace ``dfkd_fast``, a fake implementation, ``register_autograd``) is what
``torch.compile`` traces and what ``torch.library.opcheck`` checks. In eager mode the same implementation and
the same backward run through an equivalent ``torch.autograd.Function``: the Python-level ``torch.library``
dispatch costs about 40 us per call on CPU, which is the size of a small fused kernel. Both doors run the same
code: ``impl`` for the forward, ``setup_context`` to save what the backward needs, and ``backward``, which reads
``ctx.eager`` to call either the raw backward implementation (eager) or the backward custom op (traced).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["fused_op"]


def fused_op(op: Any, impl: Callable[..., Any], setup_context: Callable[..., None],
             backward: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Register ``backward`` on the custom op ``op`` and return ``call(*args)`` that dispatches per mode.

    Args:
        op: the ``torch.library.custom_op`` object (with its fake implementation registered).
        impl: the undecorated implementation of ``op`` (same signature).
        setup_context: ``(ctx, inputs, output) -> None``, as for ``register_autograd``.
        backward: ``(ctx, *grads) -> grads per input``; ``ctx.eager`` tells which door was used.
        name: name of the eager autograd.Function class (shows in ``grad_fn``).
    """

    def traced_setup(ctx, inputs, output) -> None:
        ctx.eager = False
        setup_context(ctx, inputs, output)

    op.register_autograd(backward, setup_context=traced_setup)

    def forward(ctx, *args):
        out = impl(*args)
        ctx.eager = True
        setup_context(ctx, args, out)
        return out

    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                      "backward": staticmethod(backward)})

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*args)
        return function.apply(*args)

    call.op = op  # type: ignore[attr-defined]
    call.function = function  # type: ignore[attr-defined]
    return call
