"""The effects and their handler stack.

Inside a wrapped step the user calls the effects (:func:`backward`, :func:`step`,
:func:`unscale_`, :func:`clip_grad_norm_`); each transform, while its step runs, pushes
a :class:`Handler` on a ``contextvars`` stack, and an effect runs the handlers from the
outermost transform to the innermost, like middleware, ending in plain PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, Union, cast

import torch

Params = Union[torch.Tensor, Iterable[torch.Tensor]]  # noqa: UP007 (a runtime alias)


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
