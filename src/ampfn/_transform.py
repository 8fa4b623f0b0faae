"""Layer 3, mechanism: transforms, pipelines and ``compose``.

A *step* is any callable. A *transform* maps a step to a new step; the ``with_*``
factories build :class:`Transform` objects, which record on the wrapped step the
pipeline's tags (for conflict checks), its fragments (for ``ampfn.loss_scale``) and its
stateful parts (for checkpoints). ampfn's own transforms fuse with each other into one
wrapper (``ampfn._plan.build``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

import torch

from ampfn._plan import Layer, build, can_fuse
from ampfn._types import Fragment, Handler, Stateful

P = ParamSpec("P")
R = TypeVar("R")


class Parts:
    """The combined state of a transform made of several stateful parts, by name."""

    __slots__ = ("parts",)

    def __init__(self, **parts: Stateful) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def check_state(self, state: object, /) -> None:
        if not isinstance(state, dict) or set(state) != set(self.parts):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"expected the parts {sorted(self.parts)}, got {got} (saved from another "
                "level or configuration?)"
            )
        for name, part in self.parts.items():
            part.check_state(state[name])

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


# Tags that may appear once per pipeline, and pairs of tags that exclude each other.
_EXCLUSIVE = {
    "loss_scaling": "two loss-scaling transforms in one pipeline ({names}); keep exactly one",
    "precision": (
        "two precision policies in one pipeline ({names}); each decides the model's and the "
        "forward's dtypes, so keep exactly one"
    ),
}
_INCOMPATIBLE = {
    frozenset({"fp16_grads", "fp32_grads_only"}): (
        "{names}: fp16 weights without fp32 masters give fp16 gradients, which torch.amp.GradScaler "
        "refuses to unscale; use with_policy('16-true', model, optimizer, master_weights=True), "
        "or with_apex('O2', model, optimizer) for fp16 weights with masters and loss scaling"
    ),
    frozenset({"autocast", "forward_dtype"}): (
        "{names}: the precision transform decides the forward's dtype itself, and "
        "with_autocast would override it; drop with_autocast, or use a mixed policy "
        "(with_policy('bf16-mixed') is with_autocast('bf16'))"
    ),
    frozenset({"loss_scaling", "xla_bf16"}): (
        "with_xla_bf16 composed with a loss-scaling transform ({names}): bfloat16 has "
        "float32's range and needs no loss scaling; remove the scaling transform"
    ),
}

Tags = tuple[tuple[str, str], ...]  # (tag, transform name)
States = tuple[tuple[str, Stateful], ...]  # (transform name, stateful object)


def compute_tag(dtype: torch.dtype) -> str:
    """The tag recording the lowest precision a transform computes in."""
    return f"compute:{dtype}".replace("torch.", "")


BOUND = "bound_to_a_model"  # built on a user's model: serves that one only


def precision_tags(dtype: torch.dtype) -> tuple[str, ...]:
    """Tags of a precision transform computing in ``dtype``: "forward_dtype" when it
    decides the forward's dtype (anything but float32), which autocast would override."""
    forward = ("forward_dtype",) if dtype != torch.float32 else ()
    return ("precision", compute_tag(dtype), *forward)


def compute_dtype(wrapped_step: Callable[..., Any]) -> torch.dtype:
    """The lowest-precision dtype the pipeline around ``wrapped_step`` computes in
    (float32 for a plain step): the one with the largest machine epsilon."""
    dtypes = [torch.float32]
    for tag, _ in getattr(wrapped_step, "__ampfn_tags__", ()):
        if tag.startswith("compute:"):
            dtypes.append(getattr(torch, tag.removeprefix("compute:")))
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def check_tags(tags: Tags) -> None:
    """Raise ``ValueError`` if a pipeline's tags conflict."""
    seen: dict[str, list[str]] = {}
    for tag, name in tags:
        seen.setdefault(tag, []).append(name)
    for tag, message in _EXCLUSIVE.items():
        if len(seen.get(tag, ())) > 1:
            raise ValueError("compose: " + message.format(names=", ".join(seen[tag])))
    for pair, message in _INCOMPATIBLE.items():
        if all(t in seen for t in pair):
            names = ", ".join(n for t in sorted(pair) for n in seen[t])
            raise ValueError("compose: " + message.format(names=names))


class Transform:
    """A named step transform built by one of the ``with_*`` factories.

    Calling it on a step returns a new step (the original is never modified) that keeps
    the original's ``__name__``, ``__doc__`` and ``__wrapped__``, and records the
    pipeline's tags (for conflict checks) and stateful parts (for :func:`state_dict`).

    ampfn's own transforms carry a fragment (see ``ampfn._plan``): applied directly on
    top of another ampfn transform they fuse with it into one wrapper. A transform built
    from your own ``wrap(step) -> step`` function, or from a :class:`~ampfn.Handler`,
    keeps working the same way as its own layer.
    """

    __slots__ = ("_wrap", "fragment", "name", "state", "tags", "undo")

    def __init__(
        self,
        name: str,
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        *,
        tags: Iterable[str] = (),
        state: Stateful | None = None,
        fragment: Fragment | None = None,
        handler: Handler | None = None,
        undo: Callable[[], None] | None = None,
    ) -> None:
        if handler is not None:
            fragment = Fragment(name, handler=handler)
        if (wrap is None) == (fragment is None):
            raise TypeError(
                f"Transform({name!r}): give exactly one of wrap, fragment or handler"
            )
        self.name = name
        self._wrap = wrap
        self.fragment = fragment
        self.tags: Tags = tuple((t, name) for t in tags)
        self.state = state
        # what the factory did to models and optimizers, taken back if the first
        # pipeline it joins is refused (refuse_on_conflict); released once accepted
        self.undo = undo

    def __call__(self, step: Callable[P, R]) -> Callable[P, R]:
        if getattr(step, "__ampfn_factory__", False):
            raise TypeError(
                f"{self.name}(step): got the transform factory {factory_call(step)} as the step"
            )
        if not callable(step):
            raise TypeError(
                f"{self.name}(step): expected a callable step, got {type(step).__name__}"
            )
        kind = _lazy_kind(step)
        if kind is not None:
            raise TypeError(
                f"{self.name}(step): the step is {kind}, whose body runs only when it is "
                "iterated or awaited, after the wrapper has returned: no autocast, no loss "
                "scaling; make the step a plain function (call it inside your loop or "
                "coroutine)"
            )
        if self.undo is _UNDONE:
            raise ValueError(
                f"{self.name}: this transform was part of a pipeline that was refused, and "
                "what it did to the model and optimizer was taken back; call "
                f"{self.name}(...) again with the model and optimizer"
            )
        inner_tags: Tags = getattr(step, "__ampfn_tags__", ())
        refuse_on_conflict((self,), self.tags + inner_tags)
        layer: Layer | None = None
        if self.fragment is not None:
            inner: Layer | None = getattr(step, "__ampfn_layer__", None)
            own = (self.fragment,)
            if (
                inner is not None
                and inner.wrapper is step
                and can_fuse(own, inner.fragments)
            ):
                wrapped, layer = build(own + inner.fragments, inner.step)
            else:
                wrapped, layer = build(own, step)
        else:
            assert self._wrap is not None
            wrapped = self._wrap(step)
        wrapped = functools.update_wrapper(wrapped, step)
        wrapped.__ampfn_layer__ = layer  # type: ignore[attr-defined]
        wrapped.__ampfn_tags__ = self.tags + inner_tags  # type: ignore[attr-defined]
        inner_states: States = getattr(step, "__ampfn_states__", ())
        own_state: States = ((self.name, self.state),) if self.state is not None else ()
        wrapped.__ampfn_states__ = own_state + inner_states  # type: ignore[attr-defined]
        inner_parts: tuple[Fragment, ...] = getattr(step, "__ampfn_parts__", ())
        own_parts = (self.fragment,) if self.fragment is not None else ()
        wrapped.__ampfn_parts__ = own_parts + inner_parts  # type: ignore[attr-defined]
        self.undo = None  # accepted: nothing to take back, release the snapshot
        return cast(Callable[P, R], wrapped)

    def __repr__(self) -> str:
        return f"<ampfn transform {self.name}>"


def _UNDONE() -> None:  # the undo of a transform already taken back
    pass


def refuse_on_conflict(transforms: Iterable[object], tags: Tags) -> None:
    """``check_tags``; if the pipeline is refused, first take back what the factories of
    ``transforms`` that joined no pipeline yet did to models and optimizers (casts,
    masters), so that retrying as the message advises starts from the user's own
    fp32 model."""
    try:
        check_tags(tags)
    except ValueError:
        for t in transforms:
            if (
                isinstance(t, Transform)
                and t.undo is not None
                and t.undo is not _UNDONE
            ):
                t.undo()
                t.undo = _UNDONE
        raise


def _lazy_kind(step: Callable[..., Any]) -> str | None:
    """What a step is whose body runs after the call returns, or None."""
    if inspect.isasyncgenfunction(step):
        return "an async generator function"
    if inspect.iscoroutinefunction(step):
        return "a coroutine function (async def)"
    if inspect.isgeneratorfunction(step):
        return "a generator function"
    return None


def factory_call(fn: Callable[..., Any]) -> str:
    """How to call a factory: ``with_autocast(dtype)``, ``with_grad_scaling()``."""
    target = inspect.unwrap(fn)
    required = [
        p.name
        for p in inspect.signature(target).parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return f"{fn.__name__}({', '.join(required)})"


def _is_function(obj: object) -> bool:
    return (
        inspect.isfunction(obj)
        or inspect.ismethod(obj)
        or isinstance(obj, functools.partial)
    )


def factory(
    *, takes_functions: bool = False
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a ``with_*`` factory, so that using it without calling it is a clear error.

    ``@ampfn.with_grad_scaling`` on a step, or ``compose(ampfn.with_autocast)``, would
    otherwise fail later with an unrelated message. A factory whose first argument may be
    a function (a telemetry sink) sets ``takes_functions`` and catches the misuse itself
    (see ``ampfn._telemetry.TelemetryTransform``); compose still catches it.
    """

    def mark(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def make(*args: P.args, **kwargs: P.kwargs) -> R:
            if (
                not takes_functions
                and len(args) == 1
                and not kwargs
                and _is_function(args[0])
            ):
                raise TypeError(
                    f"ampfn.{fn.__name__} is a transform factory, not a transform: call it: "
                    f"@ampfn.{factory_call(fn)} (got the function {getattr(args[0], '__name__', args[0])!r})"
                )
            return fn(*args, **kwargs)

        make.__ampfn_factory__ = True  # type: ignore[attr-defined]
        return make

    return mark


class Pipeline:
    """The result of :func:`compose`: applies its transforms in decorator order."""

    __slots__ = ("transforms",)

    def __init__(self, transforms: tuple[Callable[..., Any], ...]) -> None:
        self.transforms = transforms

    def __call__(self, step: Callable[P, R]) -> Callable[P, R]:
        for transform in reversed(self.transforms):
            step = transform(step)
        return step

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self.transforms))})"


def compose(
    *transforms: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Pipeline:
    """Compose transforms in decorator order: ``compose(a, b, c)(f) == a(b(c(f)))``.

    ``compose()`` is the identity (it returns the step itself) and composition is
    associative, so a stack of decorators and a ``compose`` of the same transforms build
    the same pipeline. Any ``Callable[[Step], Step]`` may take part; ampfn's own
    transforms are also checked for conflicts here (two loss scalers, loss scaling with
    XLA bf16). Your own transforms should keep the step's attributes
    (``functools.wraps``): that is how :func:`state_dict` and the conflict checks see
    the transforms inside them.

    Raises:
        TypeError: a transform is not callable (the message names its position).
        ValueError: the pipeline combines transforms that exclude each other; what the
            factories of its transforms did to models and optimizers (``with_policy``'s
            and ``with_apex``'s casts and masters) is taken back first.

    Example:
        >>> import torch, ampfn
        >>> pipeline = ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu"))
        >>> train_step = pipeline(lambda batch: batch)
    """
    flat: list[Callable[..., Any]] = []
    for i, t in enumerate(transforms):
        if getattr(t, "__ampfn_factory__", False):
            raise TypeError(
                f"compose(*transforms): the transform at position {i} is the factory "
                f"{t.__name__}, not a transform: call it: {factory_call(t)}"
            )
        if not callable(t):
            raise TypeError(
                f"compose(*transforms): transform at position {i} is not callable: {t!r}"
            )
        flat.extend(t.transforms if isinstance(t, Pipeline) else (t,))
    refuse_on_conflict(
        flat, tuple(tag for t in flat if isinstance(t, Transform) for tag in t.tags)
    )
    return Pipeline(tuple(flat))


@factory()
def with_handler(handler: Handler, *, name: str | None = None) -> Transform:
    """Install your own :class:`~ampfn.Handler` while the wrapped step runs.

    Args:
        handler: the handler.
        name: the transform's name (in conflict messages and ``ampfn.state_dict``);
            ``with_handler(<class name>)`` by default.

    Returns:
        A transform; the handler is stateful in checkpoints when it has ``state_dict``
        and ``load_state_dict``.

    Raises:
        TypeError: ``handler`` is not an ``ampfn.Handler``.

    Example:
        >>> import torch, ampfn
        >>> class Log(ampfn.Handler):
        ...     def backward(self, proceed, loss, kwargs):
        ...         print("backward of", loss.item())
        ...         proceed(loss, kwargs)
        >>> w = torch.ones(1, requires_grad=True)
        >>> ampfn.with_handler(Log())(lambda: ampfn.backward(w.sum() * 2))()
        backward of 2.0
    """
    if not isinstance(handler, Handler):
        raise TypeError(
            f"with_handler(handler): expected an ampfn.Handler, got {type(handler).__name__}"
        )
    stateful = callable(getattr(handler, "state_dict", None)) and callable(
        getattr(handler, "load_state_dict", None)
    )
    return Transform(
        name or f"with_handler({type(handler).__name__})",
        handler=handler,
        state=cast(Stateful, handler) if stateful else None,
    )
