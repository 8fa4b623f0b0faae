"""Layer 3, mechanism: plans, and the one wrapper a pipeline costs.

Each ampfn transform contributes a :class:`~ampfn._types.Fragment`. When a step is
wrapped, the fragments of the transforms applied directly on top of each other are
fused into one wrapper (:func:`build`) and one :class:`Plan`, so a pipeline costs one
Python frame around the call however many transforms it has. The plan resolves, once,
what each effect calls: its :class:`~ampfn._engine.Engine` (the built-in effects as one
fixed sequence), wrapped by the users' :class:`~ampfn.Handler` objects as middleware; an
effect nobody overrides goes straight to the engine.

One call of the wrapper:

1. makes the call's :class:`~ampfn._types.Call` value (or joins the one of an enclosing
   wrapped step) and makes it this thread's active call;
2. lets the layer's parts with per-call state begin (the loss scaler refuses a call
   while it serves another: a re-entered step, another thread);
3. casts the inputs, runs the step (under ``torch.autocast`` where a transform asks for
   it), casts the outputs;
4. whatever happened, restores the active call and lets every part finish, innermost
   first: each commits its per-call state into its long-lived state, or drops it when
   the call raised. Every part finishes even if one of them raises.

Wrapped steps nest (an ampfn pipeline inside a user's own wrapper inside another): the
inner layer then activates the union of both plans, built once per pair and cached.

Where dynamo traces the wrapper, it runs the same sequence without its ``try`` block
(``traced_step``), through the eager guard of ``ampfn._traced``, which ends the call as
failed (``abandon``) if it raises. The two bodies repeat a few lines on purpose: the
eager one stays one Python frame per call.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ampfn import _traced as traced
from ampfn._engine import Engine
from ampfn._runtime import local
from ampfn._types import EFFECTS, Call, Fragment, Handler


def _chain(
    handlers: tuple[Handler, ...], effect: str, base: Callable[..., Any]
) -> Callable[..., Any]:
    """``base`` wrapped by the handlers that override ``effect``, outermost first."""
    proceed = base
    for h in reversed(handlers):
        if getattr(type(h), effect) is not getattr(Handler, effect):
            proceed = functools.partial(getattr(h, effect), proceed)
    return proceed


class Plan:
    """What each effect does while a pipeline's step runs (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_under",
        "backward",
        "clip_grad_norm_",
        "engine",
        "fragments",
        "grad",
        "plain_step",
        "step",
        "unscale_",
    )

    def __init__(self, fragments: tuple[Fragment, ...]) -> None:
        self.fragments = fragments
        self.engine = engine = Engine(fragments)
        handlers = tuple(f.handler for f in fragments if f.handler is not None)
        self.backward: Callable[..., None]
        self.grad: Callable[..., Any]
        self.step: Callable[..., Any]
        self.unscale_: Callable[..., None]
        self.clip_grad_norm_: Callable[..., torch.Tensor]
        for effect in EFFECTS:
            setattr(self, effect, _chain(handlers, effect, getattr(engine, effect)))
        # ampfn.step goes straight to optimizer.step when nothing takes part in the step
        self.plain_step = engine.plain_step and self.step == engine.step
        self._under: weakref.WeakKeyDictionary[Plan, Plan] = weakref.WeakKeyDictionary()

    def under(self, outer: Plan) -> Plan:
        """This plan nested inside ``outer``'s step: the union of both.

        Cached per outer plan, so a step called in turn from several pipelines builds
        each union once; an entry goes with its outer plan (the union holds the outer
        fragments, not the plan), so a discarded outer pipeline's state is freed. A
        fragment already in ``outer`` is not added again; if it keeps state across calls
        (loss scaling, master weights, rounding, telemetry) the step was re-entered,
        which is an error.
        """
        merged = self._under.get(outer)
        if merged is None:
            seen = {id(f) for f in outer.fragments}
            again = [f for f in self.fragments if id(f) in seen]
            stateful = [f.name for f in again if f.stateful()]
            if stateful:
                raise RuntimeError(
                    f"ampfn: the step wrapped by {', '.join(dict.fromkeys(stateful))} was "
                    "re-entered: it was called again while it runs (it calls itself, "
                    "directly or through another step), and its pipeline keeps one call's "
                    "state at a time; call the unwrapped function inside, or build a "
                    "second pipeline for the inner call"
                )
            own = tuple(f for f in self.fragments if id(f) not in seen)
            merged = self._under[outer] = Plan(outer.fragments + own)
        return merged


class Layer:
    """One fused wrapper: its fragments, the plan, and the step it calls."""

    __slots__ = ("fragments", "plan", "step", "wrapper")

    def __init__(
        self, fragments: tuple[Fragment, ...], step: Callable[..., Any]
    ) -> None:
        self.fragments = fragments
        self.plan = Plan(fragments)
        self.step = step
        self.wrapper: Callable[..., Any] | None = None


def can_fuse(outer: tuple[Fragment, ...], inner: tuple[Fragment, ...]) -> bool:
    slots = [s for f in outer + inner for s in f.around()]
    return len(slots) == len(set(slots))


def _begin(begins: tuple[Callable[[Call], None], ...], call: Call) -> None:
    """Each part's begin, in order; if one refuses, those begun already finish as failed."""
    for i, begin in enumerate(begins):
        try:
            begin(call)
        except BaseException:
            for done in reversed(begins[:i]):
                finish = getattr(done, "__self__", None)
                if finish is not None:
                    finish.finish(call, True)
            raise


def _finish(
    finishes: tuple[Callable[[Call, bool], None], ...], call: Call, failed: bool
) -> None:
    """Every part's finish, in order, even when one raises; the first error is raised
    unless the call itself failed (its own exception is the one to see)."""
    error: BaseException | None = None
    for finish in finishes:
        try:
            finish(call, failed)
        except BaseException as e:
            error = error or e
    if error is not None and not failed:
        raise error


def build(
    fragments: tuple[Fragment, ...], step: Callable[..., Any]
) -> tuple[Callable[..., Any], Layer]:
    """The wrapper that runs ``step`` under ``fragments`` (outermost first)."""
    layer = Layer(fragments, step)
    plan = layer.plan
    autocast = next((f.autocast for f in fragments if f.autocast is not None), None)
    inputs = next((f.inputs for f in fragments if f.inputs is not None), None)
    outputs = next((f.outputs for f in fragments if f.outputs is not None), None)
    # the scaler begins first (it may refuse the call), and finishes first, innermost
    # first: telemetry and the end-of-call work see a committed scaler
    begins = tuple(
        p.begin
        for key in ("scaling", "observer")
        for f in fragments
        if (p := getattr(f, key)) is not None
    )
    finishes = tuple(
        fn
        for f in reversed(fragments)
        for fn in (
            f.scaling.finish if f.scaling is not None else None,
            f.observer.finish if f.observer is not None else None,
            f.end,
        )
        if fn is not None
    )
    if autocast is not None:
        device_type, dtype, cache = autocast
        region: dict[str, Any] = {"dtype": dtype}
        if cache is not None:
            region["cache_enabled"] = cache

    def pipeline_step(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return traced.guard()(traced_step, abandon, args, kwargs)
        outer: Call | None = getattr(local, "call", None)
        if outer is None:
            call = local.call = Call(plan)
        else:
            call, outer_plan = outer, outer.plan
            call.plan = plan.under(outer_plan)
        if begins:
            try:
                _begin(begins, call)
            except BaseException:
                if outer is None:
                    local.call = None
                else:
                    call.plan = outer_plan
                raise
        failed = True
        try:
            if inputs is not None:
                args, kwargs = inputs(args, kwargs)
            if autocast is None:
                out = step(*args, **kwargs)
            else:
                # whether this region is entered in traced code (see without_autocast)
                local.traced_autocast = torch.compiler.is_dynamo_compiling()
                with torch.autocast(device_type, **region):
                    out = step(*args, **kwargs)
            if outputs is not None:
                out = outputs(out)
            failed = False
            return out
        finally:
            if outer is None:
                local.call = None
            else:
                call.plan = outer_plan
            if finishes:
                try:
                    _finish(finishes, call, failed)
                finally:
                    if outer is None:
                        # the per-call state points back at the call: drop it here, so
                        # the call is freed now, not by the cycle collector (which made
                        # every step of a scaled pipeline pay for it)
                        call.scaling = call.record = None

    def traced_step(*args: Any, **kwargs: Any) -> Any:
        """The call as dynamo traces it: pipeline_step's steps with no try block, so a
        graph break in the user's step (its backward, the optimizer's step) resumes in
        this frame's graph rather than making dynamo run the frame eagerly. If it raises,
        ``abandon`` (run by the eager guard around it) ends the call as failed."""
        outer: Call | None = getattr(local, "call", None)
        if outer is None:
            call = Call(plan)
            if begins:
                _begin(begins, call)
            local.call = call
        else:
            call, outer_plan = outer, outer.plan
            merged = plan.under(outer_plan)
            if begins:
                _begin(begins, call)
            call.plan = merged
        if inputs is not None:
            args, kwargs = inputs(args, kwargs)
        if autocast is None:
            out = step(*args, **kwargs)
        else:
            local.traced_autocast = torch.compiler.is_dynamo_compiling()
            with torch.autocast(device_type, **region):
                out = step(*args, **kwargs)
        if outputs is not None:
            out = outputs(out)
        if outer is None:
            local.call = None
        else:
            call.plan = outer_plan
        if finishes:
            _finish(finishes, call, False)
        if outer is None:
            call.scaling = call.record = None
        return out

    def abandon(before: Call | None, plan_before: Plan | None) -> None:
        """``traced_step`` raised: if its call is still active, end it as failed, as
        pipeline_step's ``finally`` does (``before``: the active call when it began)."""
        call: Call | None = getattr(local, "call", None)
        if call is None or (call is before and call.plan is plan_before):
            return  # refused before it began, or it raised while finishing
        if before is None:
            local.call = None
        else:
            call.plan = plan_before
        if finishes:
            try:
                _finish(finishes, call, True)
            finally:
                if before is None:
                    call.scaling = call.record = None

    # Each layer gets code objects of its own: dynamo keeps its compiled code per code
    # object, at most recompile_limit (8) versions, so pipelines sharing the wrapper's
    # code would stop compiling from the ninth one on, and run it eagerly.
    pipeline_step.__code__ = pipeline_step.__code__.replace()
    traced_step.__code__ = traced_step.__code__.replace()
    traced.prepare()
    layer.wrapper = pipeline_step
    return pipeline_step, layer
