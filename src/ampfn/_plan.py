"""Plans: a pipeline's transforms resolved, once, into what each effect and each call does.

Each ampfn transform contributes a :class:`Fragment`: what it does around the call
(autocast, input and output casts, work at the end of the call) and which built-in
effects it takes part in (autocast off, loss scaling, master weights, ...). When a step
is wrapped, the fragments of the transforms applied directly on top of each other are
fused into one wrapper and one :class:`Plan`, so a pipeline costs one Python frame around
the call however many transforms it has. The plan's :class:`Engine` runs the built-in
effects as one fixed sequence, in an order that does not depend on how the transforms
were composed (scale, backward, move gradients to the masters; unscale, step, copy the
masters back, run post-step work). Users' :class:`~ampfn.Handler` objects wrap that
sequence as middleware; a chain of them is built once per plan, and an effect nobody
overrides goes straight to the engine.

Wrapped steps nest (an ampfn pipeline inside a user's own wrapper inside another): the
inner layer then activates the union of both plans, built once per pair and cached.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ampfn._effects import (
    EFFECTS,
    Handler,
    _check_loss,
    check_loss_id,
    local,
)


@dataclasses.dataclass(frozen=True)
class Fragment:
    """One transform's part of a pipeline (every field optional)."""

    name: str
    # around the call
    autocast: tuple[str, torch.dtype, dict[str, Any]] | None = None
    inputs: (
        Callable[
            [tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]
        ]
        | None
    ) = None
    outputs: Callable[[Any], Any] | None = None
    end: Callable[[bool], None] | None = (
        None  # called with `failed` at the end of each call
    )
    # the built-in effects
    autocast_off: str | None = (
        None  # backward, grad, clipping and step run with autocast off here
    )
    scaling: Any = None  # loss scaling (ampfn._scaling)
    masters: Any = None  # fp32 master weights (ampfn._masters)
    rounding: Any = (
        None  # stochastic rounding of the optimizer's update (ampfn._rounding)
    )
    step_via: Callable[..., None] | None = (
        None  # replaces optimizer.step(*args, **kwargs)
    )
    after_step: Callable[[Any], None] | None = (
        None  # after each step that may have changed weights
    )
    observer: Any = None  # telemetry (ampfn._telemetry)
    unit_scale: bool = (
        False  # owns loss scaling with a static scale of 1.0 (Apex O0, O3)
    )
    handler: Handler | None = None  # a user's handler

    def around(self) -> tuple[str, ...]:
        """The around-the-call slots this fragment fills (two fragments filling the same
        slot go in separate wrappers)."""
        return tuple(
            s for s in ("autocast", "inputs", "outputs") if getattr(self, s) is not None
        )


def _single(fragments: tuple[Fragment, ...], field: str, what: str) -> Any:
    found = [
        (f.name, getattr(f, field)) for f in fragments if getattr(f, field) is not None
    ]
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise ValueError(
            f"ampfn: two {what} are active in one step ({names}); keep exactly one"
        )
    return found[0][1] if found else None


# dynamo traces a flip of the autocast flag from torch 2.13 on (older releases break the
# graph there, so traced code nests torch.autocast(enabled=False) on them)
_FLIP_TRACES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)


def _nest_autocast() -> bool:
    """Whether to turn autocast off with the context manager rather than the flag."""
    if getattr(local, "traced_autocast", True):
        return True
    return not _FLIP_TRACES and torch.compiler.is_dynamo_compiling()


def autocast_off(off: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with autocast off on the device types ``off``.

    Where a transform's wrapper entered autocast in eager code (``local.traced_autocast``
    is False), this flips the thread-local flag, which is what a nested
    ``torch.autocast(enabled=False)`` does without its construction cost, and which
    dynamo traces without extra graphs. Where the autocast region is itself being traced,
    dynamo cannot follow a flip of the flag, and this nests the context manager instead.
    """
    if not off:
        return fn(*args)
    dev, rest = off[0], off[1:]
    if _nest_autocast():
        with torch.autocast(dev, enabled=False):
            return autocast_off(rest, fn, *args) if rest else fn(*args)
    was = torch.is_autocast_enabled(dev)
    torch.set_autocast_enabled(dev, False)
    try:
        return autocast_off(rest, fn, *args) if rest else fn(*args)
    finally:
        torch.set_autocast_enabled(dev, was)


class Engine:
    """The built-in effects of one plan, as one fixed sequence of calls."""

    __slots__ = (
        "_bare",
        "after_step",
        "masters",
        "observers",
        "off",
        "plain_step",
        "rounding",
        "scaling",
        "step_via",
        "unit_scale",
    )

    def __init__(self, fragments: tuple[Fragment, ...], *, bare: bool = False) -> None:
        self.off: tuple[str, ...] = (
            ()
            if bare
            else tuple(
                dict.fromkeys(f.autocast_off for f in fragments if f.autocast_off)
            )
        )
        self.scaling = _single(fragments, "scaling", "loss-scaling transforms")
        self.masters = tuple(f.masters for f in fragments if f.masters is not None)
        self.rounding = _single(fragments, "rounding", "stochastic-rounding transforms")
        if self.rounding is not None and self.masters:
            raise ValueError(
                "ampfn: master weights and stochastic rounding are both active in one step; keep one"
            )
        self.step_via = _single(
            fragments, "step_via", "transforms that replace optimizer.step"
        )
        self.after_step = tuple(
            f.after_step for f in fragments if f.after_step is not None
        )
        self.observers = tuple(f.observer for f in fragments if f.observer is not None)
        self.unit_scale = any(f.unit_scale for f in fragments)
        # the same engine without autocast off, for callers that turned it off already
        self._bare: Engine = Engine(fragments, bare=True) if self.off else self
        self.plain_step = not (
            self.masters
            or self.rounding
            or self.step_via
            or self.after_step
            or self.observers
        )

    # --- backward and grad -------------------------------------------------------------

    def backward(self, loss: torch.Tensor, kwargs: dict[str, Any]) -> None:
        loss_id = (
            check_loss_id(kwargs.pop("loss_id"))
            if kwargs and "loss_id" in kwargs
            else 0
        )
        if not isinstance(loss, torch.Tensor):
            _check_loss(loss)
        off = self.off
        if off:
            # _nest_autocast(), inline: this runs every step
            if (
                len(off) > 1
                or getattr(local, "traced_autocast", True)
                or (not _FLIP_TRACES and torch.compiler.is_dynamo_compiling())
            ):
                # several device types, or a traced autocast region: see autocast_off
                kwargs["loss_id"] = loss_id
                autocast_off(off, self._bare.backward, loss, kwargs)
                return
            # one device type, autocast entered in eager code: flip the flag (autocast_off)
            dev = off[0]
            was = torch.is_autocast_enabled(dev)
            torch.set_autocast_enabled(dev, False)
        try:
            for o in self.observers:
                o.before_backward(self, loss_id)
            sc = self.scaling
            if sc is None:
                loss.backward(**kwargs)  # type: ignore[no-untyped-call]
            else:
                if sc.unscaled or sc.stale:
                    sc.restart_or_refuse()
                sc.seen_backward = True
                # GradScaler.scale, called as hand-written code calls it
                scaled = sc.scaler.scale(loss) if sc.direct else sc.scale(loss, loss_id)
                scaled.backward(**kwargs)
            for m in self.masters:
                m.collect()
            if sc is not None and sc.per_backward:
                sc.after_backward(loss_id)
        finally:
            if off:
                torch.set_autocast_enabled(dev, was)

    def loss_scale(self, loss_id: int = 0) -> float | None:
        """The scale the next backward of loss ``loss_id`` uses (None: no loss scaling)."""
        if self.scaling is not None:
            return float(self.scaling.loss_scale(loss_id))
        return 1.0 if self.unit_scale else None

    def grad(
        self, outputs: Any, inputs: Any, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        api = "ampfn.grad(outputs, inputs, loss_id)"
        loss_id = (
            check_loss_id(kwargs.pop("loss_id"), api) if "loss_id" in kwargs else 0
        )
        sc = self.scaling
        if sc is None:
            return autocast_off(self.off, _autograd_grad, outputs, inputs, kwargs)  # type: ignore[no-any-return]
        return autocast_off(self.off, sc.grad, outputs, inputs, loss_id, kwargs)  # type: ignore[no-any-return]

    # --- step, unscale_, clip_grad_norm_ ------------------------------------------------

    def step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        sc = self.scaling
        if self.plain_step:
            if sc is None:
                optimizer.step(*args, **kwargs)
                return True
            return sc.step(optimizer, args, kwargs)
        rounding = self.rounding
        if rounding is not None:
            rounding.before_step(optimizer)
        try:
            if sc is not None:
                stepped = sc.step(optimizer, args, kwargs)
            elif self.step_via is not None:
                self.step_via(optimizer, *args, **kwargs)
                stepped = True
            else:
                optimizer.step(*args, **kwargs)
                stepped = True
        finally:
            if rounding is not None:
                rounding.after_step(optimizer)
        for m in self.masters:
            m.after_step(optimizer, stepped)
        for f in self.after_step:
            f(optimizer)
        for o in self.observers:
            o.on_step(self, optimizer, stepped)
        return stepped

    def step_off(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """:meth:`step` with autocast off, where hand-written code steps (an optimizer's own
        matmuls, as in Muon or Shampoo, are not autocast)."""
        off = self.off
        if (
            len(off) > 1
            or getattr(local, "traced_autocast", True)
            or (not _FLIP_TRACES and torch.compiler.is_dynamo_compiling())
        ):
            stepped = autocast_off(off, self._bare.step, optimizer, args, kwargs)
        else:
            dev = off[0]
            was = torch.is_autocast_enabled(dev)
            torch.set_autocast_enabled(dev, False)
            try:
                if not self.plain_step:
                    stepped = self.step(optimizer, args, kwargs)
                elif self.scaling is None:
                    optimizer.step(*args, **kwargs)
                    stepped = True
                else:
                    stepped = self.scaling.step(optimizer, args, kwargs)
            finally:
                torch.set_autocast_enabled(dev, was)
        if _FLIP_TRACES or not torch.compiler.is_dynamo_compiling():
            # The region's cached half copies of the weights are stale now: hand-written
            # code steps after leaving the region, which drops them. (Dynamo traces this
            # call from torch 2.13 on; older releases break the graph on it.)
            torch.clear_autocast_cache()
        return stepped

    def unscale_(self, optimizer: Any) -> None:
        if self.scaling is not None:
            self.scaling.unscale(optimizer)

    def clip_grad_norm_(
        self, parameters: Any, max_norm: float, optimizer: Any, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if self.scaling is not None:
            self.scaling.unscale(optimizer)
        for m in self.masters:
            parameters = m.clip_params(parameters)
        off = self.off
        if not off or len(off) > 1 or _nest_autocast():
            norm = autocast_off(off, _clip, parameters, max_norm, kwargs)
        else:
            dev = off[0]
            was = torch.is_autocast_enabled(dev)
            torch.set_autocast_enabled(dev, False)
            try:
                norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, **kwargs)
            finally:
                torch.set_autocast_enabled(dev, was)
        for o in self.observers:
            o.on_clip(norm)
        return norm  # type: ignore[no-any-return]


def _autograd_grad(
    outputs: Any, inputs: Any, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.autograd.grad(outputs, inputs, **kwargs))


def _clip(parameters: Any, max_norm: float, kwargs: dict[str, Any]) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, **kwargs)


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
        for effect in EFFECTS:
            base = getattr(
                engine, "step_off" if effect == "step" and engine.off else effect
            )
            setattr(self, effect, _chain(handlers, effect, base))
        self.step: Callable[..., Any]
        # ampfn.step goes straight to optimizer.step, or to the scaler's step, when
        # nothing else takes part in the step and autocast is not on
        direct = self.step == engine.step and engine.plain_step
        self.plain_step = direct and engine.scaling is None
        if direct and engine.scaling is not None:
            self.step = engine.scaling.step
        self._under: weakref.WeakKeyDictionary[Plan, Plan] = weakref.WeakKeyDictionary()

    def under(self, outer: Plan) -> Plan:
        """This plan nested inside ``outer``'s step: the union of both.

        Cached per outer plan, so a step called in turn from several pipelines builds
        each union once; an entry goes with its outer plan (the union holds the outer
        fragments, not the plan), so a discarded outer pipeline's state is freed.
        """
        merged = self._under.get(outer)
        if merged is None:
            merged = self._under[outer] = Plan(outer.fragments + self.fragments)
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


def build(
    fragments: tuple[Fragment, ...], step: Callable[..., Any]
) -> tuple[Callable[..., Any], Layer]:
    """The wrapper that runs ``step`` under ``fragments`` (outermost first)."""
    layer = Layer(fragments, step)
    plan = layer.plan
    autocast = next((f.autocast for f in fragments if f.autocast is not None), None)
    inputs = next((f.inputs for f in fragments if f.inputs is not None), None)
    outputs = next((f.outputs for f in fragments if f.outputs is not None), None)
    ends = tuple(
        f.end for f in reversed(fragments) if f.end is not None
    )  # innermost first
    # without autocast these are never read (pipeline_step checks autocast first)
    dev, dtype, ac_kwargs = autocast or ("", torch.float32, {})
    cache = ac_kwargs.get("cache_enabled")

    def pipeline_step(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(local, "plan", None)
        local.plan = plan if outer is None else plan.under(outer)
        failed = True
        try:
            if inputs is not None:
                args, kwargs = inputs(args, kwargs)
            if autocast is None:
                out = step(*args, **kwargs)
            else:
                # whether this autocast region is entered in eager code (see autocast_off)
                traced = local.traced_autocast = torch.compiler.is_dynamo_compiling()
                if traced or torch._C._is_torch_function_mode_enabled():
                    with torch.autocast(dev, dtype=dtype, **ac_kwargs):
                        out = step(*args, **kwargs)
                else:
                    # torch.autocast's __enter__ and __exit__ in eager code, inline: its
                    # per-use checks ran once, when the transform was made
                    was_cache = torch.is_autocast_cache_enabled()
                    was = torch.is_autocast_enabled(dev)
                    was_dtype = torch.get_autocast_dtype(dev)
                    torch.set_autocast_enabled(dev, True)
                    torch.set_autocast_dtype(dev, dtype)
                    torch.autocast_increment_nesting()
                    torch.set_autocast_cache_enabled(
                        was_cache if cache is None else cache
                    )
                    try:
                        out = step(*args, **kwargs)
                    finally:
                        if torch.autocast_decrement_nesting() == 0:
                            torch.clear_autocast_cache()
                        torch.set_autocast_enabled(dev, was)
                        torch.set_autocast_dtype(dev, was_dtype)
                        torch.set_autocast_cache_enabled(was_cache)
            if outputs is not None:
                out = outputs(out)
            failed = False
            return out
        finally:
            local.plan = outer
            for end in ends:
                end(failed)

    layer.wrapper = pipeline_step
    return pipeline_step, layer
