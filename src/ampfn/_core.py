"""The vocabulary: transforms, ``compose``, the effect stack and the effects.

A *step* is any callable. A *transform* maps a step to a new step. Inside a wrapped
step the user calls the effects (:func:`backward`, :func:`step`, :func:`unscale_`,
:func:`clip_grad_norm_`); each transform, while its step runs, pushes a
:class:`Handler` on a ``contextvars`` stack, and an effect runs the handlers from the
outermost transform to the innermost, like middleware, ending in plain PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, ParamSpec, Protocol, TypeVar, Union, cast

import torch

P = ParamSpec("P")
R = TypeVar("R")

Params = Union[torch.Tensor, Iterable[torch.Tensor]]  # noqa: UP007 (a runtime alias)


class Stateful(Protocol):
    """What a stateful transform exposes for checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


class Handler:
    """One transform's effect handlers; every method passes through by default.

    ``proceed`` runs the rest of the chain (the inner transforms, then PyTorch).
    """

    __slots__ = ()

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        proceed(loss, kwargs)

    def step(self, proceed: Callable[..., bool], optimizer: Any) -> bool:
        return proceed(optimizer)

    def unscale_(self, proceed: Callable[..., None], optimizer: Any) -> None:
        proceed(optimizer)

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Any,
        norm_type: float,
    ) -> torch.Tensor:
        return proceed(parameters, max_norm, optimizer, norm_type)


HANDLERS: ContextVar[tuple[Handler, ...]] = ContextVar("ampfn.handlers", default=())


def _base_backward(loss: torch.Tensor, kwargs: dict[str, Any]) -> None:
    loss.backward(**kwargs)  # type: ignore[no-untyped-call]


def _base_step(optimizer: Any) -> bool:
    optimizer.step()
    return True


def _base_unscale(optimizer: Any) -> None:
    return None


def _base_clip(
    parameters: Params, max_norm: float, optimizer: Any, norm_type: float
) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)


def _dispatch(
    name: str, base: Callable[..., Any], handlers: tuple[Handler, ...], *args: Any
) -> Any:
    """Run effect ``name`` through ``handlers``, outermost first, ending in ``base``."""
    proceed = base
    for handler in reversed(handlers[1:]):
        proceed = functools.partial(getattr(handler, name), proceed)
    return getattr(handlers[0], name)(proceed, *args)


def backward(loss: torch.Tensor, **kwargs: Any) -> None:
    """Backpropagate ``loss`` through the active transforms.

    Outside any transform this is exactly ``loss.backward(**kwargs)``. Under
    ``with_grad_scaling`` the scaled loss is backpropagated; under ``with_autocast`` the
    backward pass runs with autocast off.

    Args:
        loss: the scalar loss tensor.
        **kwargs: passed to ``Tensor.backward`` (``retain_graph``, ``inputs``, ...).

    Raises:
        TypeError: ``loss`` is not a tensor.

    Example:
        >>> import torch, ampfn
        >>> w = torch.ones(2, requires_grad=True)
        >>> ampfn.backward((w * 3).sum())
        >>> w.grad
        tensor([3., 3.])
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"ampfn.backward(loss): expected a torch.Tensor, got {type(loss).__name__}"
        )
    handlers = HANDLERS.get()
    if not handlers:
        loss.backward(**kwargs)  # type: ignore[no-untyped-call]
        return
    _dispatch("backward", _base_backward, handlers, loss, kwargs)


def step(optimizer: Any) -> bool:
    """Step ``optimizer`` through the active transforms.

    Outside any transform this is exactly ``optimizer.step(); True``.

    Returns:
        True if the optimizer stepped, False if a transform skipped the step (for example
        ``with_grad_scaling`` on inf/NaN gradients).

    Example:
        >>> import torch, ampfn
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> ampfn.backward(w.sum())
        >>> ampfn.step(opt)
        True
        >>> w.data
        tensor([0.5000])
    """
    handlers = HANDLERS.get()
    if not handlers:
        optimizer.step()
        return True
    return cast(bool, _dispatch("step", _base_step, handlers, optimizer))


def unscale_(optimizer: Any) -> None:
    """Unscale ``optimizer``'s gradients in place (a no-op without loss scaling).

    Under ``with_grad_scaling`` this unscales once per optimizer per update: a second
    call before the optimizer steps does nothing. Use it before reading or modifying
    gradients by hand.

    Example:
        >>> import torch, ampfn
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> ampfn.unscale_(opt)  # no transform active: nothing to do
    """
    handlers = HANDLERS.get()
    if handlers:
        _dispatch("unscale_", _base_unscale, handlers, optimizer)


def clip_grad_norm_(
    parameters: Params, max_norm: float, optimizer: Any, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip gradients by their total norm, unscaling them first under loss scaling.

    Outside any transform this is ``torch.nn.utils.clip_grad_norm_``. Under
    ``with_grad_scaling`` the optimizer's gradients are unscaled first (the classic AMP
    pitfall), so ``max_norm`` applies to the true gradients.

    Args:
        parameters: the tensors whose gradients are clipped.
        max_norm: the largest allowed total norm.
        optimizer: the optimizer that owns ``parameters`` (needed to unscale them).
        norm_type: the p of the p-norm.

    Returns:
        The total norm of the true, unscaled gradients before clipping.

    Example:
        >>> import torch, ampfn
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> ampfn.backward((w * 2).sum())
        >>> ampfn.clip_grad_norm_([w], 1.0, opt)
        tensor(4.)
    """
    handlers = HANDLERS.get()
    if not handlers:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
    return cast(
        torch.Tensor,
        _dispatch(
            "clip_grad_norm_",
            _base_clip,
            handlers,
            parameters,
            max_norm,
            optimizer,
            norm_type,
        ),
    )


def handler_wrapper(
    handler: Handler,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A wrapper that installs one fixed ``handler`` while the step runs."""

    def wrap(step: Callable[..., Any]) -> Callable[..., Any]:
        def handled_step(*args: Any, **kwargs: Any) -> Any:
            token = HANDLERS.set((*HANDLERS.get(), handler))
            try:
                return step(*args, **kwargs)
            finally:
                HANDLERS.reset(token)

        return handled_step

    return wrap


# --------------------------------------------------------------------------- transforms

# Tags that may appear once per pipeline, and pairs of tags that exclude each other.
_EXCLUSIVE = {
    "loss_scaling": "two loss-scaling transforms in one pipeline ({names}); keep exactly one",
}
_INCOMPATIBLE = {
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
    """

    __slots__ = ("_wrap", "name", "state", "tags")

    def __init__(
        self,
        name: str,
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
        *,
        tags: Iterable[str] = (),
        state: Stateful | None = None,
    ) -> None:
        self.name = name
        self._wrap = wrap
        self.tags: Tags = tuple((t, name) for t in tags)
        self.state = state

    def __call__(self, step: Callable[P, R]) -> Callable[P, R]:
        if not callable(step):
            raise TypeError(
                f"{self.name}(step): expected a callable step, got {type(step).__name__}"
            )
        inner_tags: Tags = getattr(step, "__ampfn_tags__", ())
        check_tags(self.tags + inner_tags)
        wrapped = functools.update_wrapper(self._wrap(step), step)
        wrapped.__ampfn_tags__ = self.tags + inner_tags  # type: ignore[attr-defined]
        inner_states: States = getattr(step, "__ampfn_states__", ())
        own: States = ((self.name, self.state),) if self.state is not None else ()
        wrapped.__ampfn_states__ = own + inner_states  # type: ignore[attr-defined]
        return cast(Callable[P, R], wrapped)

    def __repr__(self) -> str:
        return f"<ampfn transform {self.name}>"


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
        ValueError: the pipeline combines transforms that exclude each other.

    Example:
        >>> import torch, ampfn
        >>> pipeline = ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu"))
        >>> train_step = pipeline(lambda batch: batch)
    """
    flat: list[Callable[..., Any]] = []
    for i, t in enumerate(transforms):
        if not callable(t):
            raise TypeError(
                f"compose(*transforms): transform at position {i} is not callable: {t!r}"
            )
        flat.extend(t.transforms if isinstance(t, Pipeline) else (t,))
    check_tags(tuple(tag for t in flat if isinstance(t, Transform) for tag in t.tags))
    return Pipeline(tuple(flat))


# --------------------------------------------------------------------------- state


def _states(wrapped_step: Callable[..., Any], api: str) -> States:
    if not callable(wrapped_step):
        raise TypeError(
            f"{api}: expected a step wrapped by ampfn transforms, got {type(wrapped_step).__name__}"
        )
    return cast(States, getattr(wrapped_step, "__ampfn_states__", ()))


def state_dict(wrapped_step: Callable[..., Any]) -> dict[str, Any]:
    """The combined state of every stateful transform in ``wrapped_step``'s pipeline.

    Returns:
        ``{"transforms": [{"name": ..., "state": ...}, ...]}``, outermost transform
        first; an empty list for a pipeline with no stateful transform.

    Example:
        >>> import ampfn
        >>> f = ampfn.with_grad_scaling()(lambda batch: batch)
        >>> [t["name"] for t in ampfn.state_dict(f)["transforms"]]
        ['with_grad_scaling']
    """
    states = _states(wrapped_step, "ampfn.state_dict(wrapped_step)")
    return {
        "transforms": [{"name": name, "state": s.state_dict()} for name, s in states]
    }


def load_state_dict(wrapped_step: Callable[..., Any], state: dict[str, Any]) -> None:
    """Restore what :func:`state_dict` saved into a pipeline built the same way.

    Raises:
        ValueError: ``state`` was saved from a pipeline with other stateful transforms.
        TypeError: ``state`` is not what :func:`state_dict` returns.

    Example:
        >>> import ampfn
        >>> saved = ampfn.state_dict(ampfn.with_grad_scaling()(lambda batch: batch))
        >>> resumed = ampfn.with_grad_scaling()(lambda batch: batch)
        >>> ampfn.load_state_dict(resumed, saved)
    """
    api = "ampfn.load_state_dict(wrapped_step, state)"
    states = _states(wrapped_step, api)
    if not isinstance(state, dict) or not isinstance(state.get("transforms"), list):
        raise TypeError(
            f"{api}: expected a dict returned by ampfn.state_dict, got {type(state).__name__}"
        )
    saved = [entry["name"] for entry in state["transforms"]]
    expected = [name for name, _ in states]
    if saved != expected:
        raise ValueError(
            f"{api}: the state was saved from a pipeline with {saved}, this pipeline has {expected}"
        )
    for (_, stateful), entry in zip(states, state["transforms"], strict=True):
        stateful.load_state_dict(entry["state"])
