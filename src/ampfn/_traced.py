"""Layer 3, mechanism: a wrapped step under ``torch.compile``.

Dynamo cannot resume after a graph break inside a ``try`` block: it runs the whole frame
eagerly instead (compiling only the functions it calls). A wrapped step's wrapper needs
a ``try`` block (every part finishes, whatever happened), and the user's step inside it
breaks the graph at least at its backward. So where dynamo traces the wrapper, the
wrapper calls :func:`guard` ``(body, abandon, args, kwargs)`` instead:

- the guard is the one frame dynamo leaves alone (``torch.compiler.disable(...,
  recursive=False)``): it holds the ``try`` block and does no tensor work;
- ``body`` is the wrapper's own sequence with no ``try`` block (begin, cast the inputs,
  the step under autocast, cast the outputs, finish): dynamo compiles it as a frame of
  its own, and resumes after each graph break in it;
- while ``body`` runs, dynamo's nested graph breaks are on
  (``torch._dynamo.config.nested_graph_breaks``, from torch 2.13 on): a break deep
  inside, such as the backward's inside ``ampfn.backward`` inside the user's step,
  resumes in the frame where it happened, so the frames around it stay in the same
  graphs instead of each being cut in two;
- if ``body`` raises, the guard calls ``abandon(call, plan)`` with the active call and
  plan from before it, with dynamo off, to end the call as failed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ampfn._runtime import local
from ampfn._types import Call

# dynamo's nested graph breaks work from torch 2.13 on (torch 2.9's resume functions
# fail with an IndexError): older releases compile a wrapped step without them
_NESTED_BREAKS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)

# the guard, an eager call, and dynamo's config (None where it has no nested graph
# breaks): made once dynamo is imported (torch.compiler.disable imports it)
_MADE: list[Any] = []


def _guarded(
    body: Callable[..., Any],
    abandon: Callable[[Call | None, Any], None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    before: Call | None = getattr(local, "call", None)
    plan_before = None if before is None else before.plan
    config = _MADE[2]
    flip = config is not None and not config.nested_graph_breaks
    try:
        if flip:
            config.nested_graph_breaks = True
        return body(*args, **kwargs)
    except BaseException:
        _MADE[1](abandon, before, plan_before)
        raise
    finally:
        if flip:
            config.nested_graph_breaks = False


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _make() -> None:
    guarded = torch.compiler.disable(_guarded, recursive=False)  # type: ignore[no-untyped-call]
    eager = torch.compiler.disable(_call, recursive=True)  # type: ignore[no-untyped-call]
    config = torch._dynamo.config
    nested = (
        config if _NESTED_BREAKS and hasattr(config, "nested_graph_breaks") else None
    )
    _MADE.extend((guarded, eager, nested))


def guard() -> Callable[..., Any]:
    """The guard (see the module docstring). Made here the first time a wrapped step is
    traced if :func:`prepare` could not make it before."""
    if not _MADE:
        _make()
    return _MADE[0]  # type: ignore[no-any-return]


def prepare() -> None:
    """Make the guard now if dynamo is imported, so that tracing need not make it (which
    costs a graph break and a recompile, once). ``import ampfn`` does not import dynamo
    (seconds)."""
    if not _MADE and "torch._dynamo" in sys.modules:
        _make()
