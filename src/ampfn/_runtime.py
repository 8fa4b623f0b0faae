"""Layer 2, runtime: the active call of this thread, and autocast off for a region.

The active :class:`~ampfn._types.Call` lives on a plain ``threading.local`` instance as
``local.call``: threads stay apart, and dynamo traces the attribute read (it does not
trace a ``threading.local`` subclass). :func:`without_autocast` is the one place that
turns autocast off for a region of a wrapped step (backward, grad, clipping, the
optimizer step), as hand-written torch.amp code leaves the autocast region for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ampfn._types import Call

T = TypeVar("T")

# This thread's active call, as `local.call` (absent or None when no wrapped step runs),
# and `local.traced_autocast`: whether the active autocast region was entered in traced
# code (see without_autocast).
local = threading.local()

# dynamo traces a flip of the autocast flag from torch 2.13 on (older releases break the
# graph there, so traced code nests torch.autocast(enabled=False) on them)
_FLIP_TRACES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)


def current_call() -> Call | None:
    """The call of the wrapped step running on this thread, or None."""
    return getattr(local, "call", None)


def default_device_type() -> str:
    """ "cuda" when CUDA is available, else "cpu": the default of every transform."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _nest() -> bool:
    """Whether to turn autocast off with the context manager rather than the flag."""
    if getattr(local, "traced_autocast", True):
        return True
    return not _FLIP_TRACES and torch.compiler.is_dynamo_compiling()


def without_autocast(
    off: tuple[str, ...], fn: Callable[..., T], *args: Any, nest: bool = False
) -> T:
    """``fn(*args)`` with autocast off on the device types ``off``.

    Where a wrapped step's wrapper entered its autocast region in eager code, this flips
    the thread-local flag, which is what a nested ``torch.autocast(enabled=False)`` does
    without its construction cost, and which dynamo traces without extra graphs. Where
    the region itself is being traced, dynamo cannot follow a flip of the flag, and this
    nests the context manager instead; so does ``nest=True``, for code that may run
    outside any wrapped step (fp32 islands), where the region is not ampfn's.
    """
    if not off:
        return fn(*args)
    if len(off) == 1 and not nest and not _nest():
        dev = off[0]
        was = torch.is_autocast_enabled(dev)
        torch.set_autocast_enabled(dev, False)
        try:
            return fn(*args)
        finally:
            torch.set_autocast_enabled(dev, was)
    with torch.autocast(off[0], enabled=False):
        return without_autocast(off[1:], fn, *args, nest=nest) if off[1:] else fn(*args)
