"""The effects, and the handlers that give them meaning.

Inside a wrapped step the user calls the effects (:func:`backward`, :func:`grad`,
:func:`step`, :func:`unscale_`, :func:`clip_grad_norm_`). While a pipeline's step runs,
its :class:`~ampfn._plan.Plan` is the thread's active plan, and each effect calls the
callable the plan resolved for it when the pipeline was built. With no plan active an
effect is exactly the plain PyTorch call.

The active plan lives on a plain ``threading.local`` instance: threads stay apart, and
dynamo traces the attribute read (it does not trace a ``threading.local`` subclass).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch

if TYPE_CHECKING:
    from ampfn._plan import Plan

Params = Union[torch.Tensor, Iterable[torch.Tensor]]  # noqa: UP007 (a runtime alias)

# The active plan of this thread, as `local.plan` (absent when none is active).
local = threading.local()


def active() -> Plan | None:
    """The plan of the pipeline whose step runs on this thread, or None."""
    return getattr(local, "plan", None)


class Handler:
    """Your own effect handler: subclass it and override the effects you need.

    A handler method receives ``proceed``, the rest of the chain, and the effect's
    arguments; it may act before and after calling ``proceed``, change the arguments,
    or not call it at all. Handlers run from the outermost transform to the innermost,
    like middleware, and around ampfn's own work: the last ``proceed`` runs the
    pipeline's built-in effects (autocast off, loss scaling, master weights, ...) as one
    fixed sequence. So a handler sees the loss before it is scaled and the result of a
    step after a skip. Methods it does not override cost nothing. A handler's own code
    runs in the step's context (under the forward's autocast, if any); only what it
    proceeds to runs with autocast off.

    Install one with :func:`ampfn.with_handler`.

    Example:
        >>> import torch, ampfn
        >>> class CountSteps(ampfn.Handler):
        ...     def __init__(self):
        ...         self.steps = 0
        ...     def step(self, proceed, optimizer, args, kwargs):
        ...         stepped = proceed(optimizer, args, kwargs)
        ...         self.steps += bool(stepped)
        ...         return stepped
        >>> counter = CountSteps()
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> @ampfn.with_handler(counter)
        ... def train_step(x):
        ...     ampfn.backward((w * x).sum())
        ...     return ampfn.step(opt)
        >>> train_step(torch.ones(1)), counter.steps
        (True, 1)
    """

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        proceed(loss, kwargs)

    def grad(
        self,
        proceed: Callable[..., tuple[torch.Tensor, ...]],
        outputs: Any,
        inputs: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, ...]:
        return proceed(outputs, inputs, kwargs)

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return proceed(optimizer, args, kwargs)

    def unscale_(self, proceed: Callable[..., None], optimizer: Any) -> None:
        proceed(optimizer)

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        return proceed(parameters, max_norm, optimizer, kwargs)


EFFECTS = ("backward", "grad", "step", "unscale_", "clip_grad_norm_")


# --------------------------------------------------------------------------- validation


def is_optimizer(obj: object) -> bool:
    """A ``torch.optim.Optimizer``, or an optimizer-like wrapper (such as Apex's LARC):
    an object with ``param_groups``, ``state`` and a callable ``step``."""
    return isinstance(obj, torch.optim.Optimizer) or (
        hasattr(obj, "param_groups")
        and hasattr(obj, "state")
        and callable(getattr(obj, "step", None))
    )


def check_optimizer(obj: object, api: str) -> None:
    if not is_optimizer(obj):
        raise TypeError(
            f"{api}: expected a torch.optim.Optimizer (or an object with param_groups, state "
            f"and step), got {type(obj).__name__} {obj!r}"[:300]
        )


def _check_loss(loss: object) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"ampfn.backward(loss): expected a torch.Tensor, got {type(loss).__name__}"
        )


def check_loss_id(loss_id: object, api: str = "ampfn.backward(loss, loss_id)") -> int:
    if isinstance(loss_id, bool) or not isinstance(loss_id, int) or loss_id < 0:
        raise ValueError(f"{api}: loss_id must be an int >= 0, got {loss_id!r}")
    return loss_id


# --------------------------------------------------------------------------- the effects


def backward(loss: torch.Tensor, **kwargs: Any) -> None:
    """Backpropagate ``loss`` through the active transforms.

    Outside any transform this is exactly ``loss.backward(**kwargs)``. Under
    ``with_grad_scaling`` the scaled loss is backpropagated; under ``with_autocast`` the
    backward pass runs with autocast off.

    Args:
        loss: the scalar loss tensor.
        **kwargs: passed to ``Tensor.backward`` (``retain_graph``, ``inputs``, ...), except
            ``loss_id``: which loss this is, for ``with_apex(..., num_losses=N)`` (each loss
            has its own scaler there; elsewhere it is checked and has no effect).

    Raises:
        TypeError: ``loss`` is not a tensor.

    Example:
        >>> import torch, ampfn
        >>> w = torch.ones(2, requires_grad=True)
        >>> ampfn.backward((w * 3).sum())
        >>> w.grad
        tensor([3., 3.])
    """
    plan = getattr(local, "plan", None)
    if plan is None:
        _check_loss(loss)
        if kwargs and "loss_id" in kwargs:
            check_loss_id(kwargs.pop("loss_id"))
        loss.backward(**kwargs)  # type: ignore[no-untyped-call]
        return
    plan.backward(loss, kwargs)


def grad(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` through the active transforms: true gradients under scaling.

    Outside any transform this is exactly ``torch.autograd.grad(outputs, inputs,
    **kwargs)``. Under loss scaling it differentiates the scaled outputs, so small
    gradients survive fp16, and returns the gradients unscaled (non-finite ones stay
    non-finite, so the step still skips); under autocast it runs with autocast off. This
    is what gradient penalties need (PyTorch's AMP gradient-penalty recipe).

    Args:
        outputs, inputs: as for ``torch.autograd.grad``.
        **kwargs: passed to ``torch.autograd.grad`` (``create_graph``, ...), except
            ``loss_id`` (see :func:`backward`).

    Returns:
        The gradients of ``outputs`` with respect to ``inputs``, one per input.

    Example:
        >>> import torch, ampfn
        >>> w = torch.ones(2, requires_grad=True)
        >>> ampfn.grad((w * w).sum(), w)
        (tensor([2., 2.]),)
    """
    plan = getattr(local, "plan", None)
    if plan is None:
        if kwargs and "loss_id" in kwargs:
            check_loss_id(kwargs.pop("loss_id"), "ampfn.grad(outputs, inputs, loss_id)")
        return torch.autograd.grad(outputs, inputs, **kwargs)
    return plan.grad(outputs, inputs, kwargs)  # type: ignore[no-any-return]


def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """Step ``optimizer`` through the active transforms.

    Outside any transform this is exactly ``optimizer.step(*args, **kwargs); True``.
    Arguments are passed on to ``optimizer.step`` (through ``scaler.step`` under
    ``with_grad_scaling``), except that every loss-scaling transform (``with_grad_scaling``
    in both modes, ``with_apex``) refuses a closure, positional or keyword, before anything
    changes: the closure would recompute a loss that is not scaled (GradScaler does not
    support closures; Apex neither).

    Returns:
        True if the optimizer stepped, False if a transform skipped the step (for example
        ``with_grad_scaling`` on inf/NaN gradients). In sync-free scaling
        (``with_grad_scaling(sync=False)``) a 0-dim bool tensor on the gradients' device.

    Raises:
        TypeError: ``optimizer`` is not an optimizer.
        RuntimeError: a closure under loss scaling.

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
    if not isinstance(optimizer, torch.optim.Optimizer):
        check_optimizer(optimizer, "ampfn.step(optimizer)")
    plan = getattr(local, "plan", None)
    if plan is None or plan.plain_step:
        optimizer.step(*args, **kwargs)
        return True
    return plan.step(optimizer, args, kwargs)


def unscale_(optimizer: Any) -> None:
    """Unscale ``optimizer``'s gradients in place (a no-op without loss scaling).

    Under ``with_grad_scaling`` this unscales once per optimizer per update: a second
    call before the optimizer steps does nothing. Use it before reading or modifying
    gradients by hand.

    Raises:
        TypeError: ``optimizer`` is not an optimizer.

    Example:
        >>> import torch, ampfn
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> ampfn.unscale_(opt)  # no transform active: nothing to do
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        check_optimizer(optimizer, "ampfn.unscale_(optimizer)")
    plan = getattr(local, "plan", None)
    if plan is not None:
        plan.unscale_(optimizer)


def clip_grad_norm_(
    parameters: Params,
    max_norm: float,
    optimizer: Any,
    norm_type: float = 2.0,
    **kwargs: Any,
) -> torch.Tensor:
    """Clip gradients by their total norm, unscaling them first under loss scaling.

    Outside any transform this is ``torch.nn.utils.clip_grad_norm_``. Under
    ``with_grad_scaling`` the optimizer's gradients are unscaled first (the classic AMP
    pitfall), so ``max_norm`` applies to the true gradients; with fp32 master weights
    (``with_apex`` O2) the masters' gradients are clipped.

    Args:
        parameters: the tensors whose gradients are clipped.
        max_norm: the largest allowed total norm.
        optimizer: the optimizer that owns ``parameters`` (needed to unscale them).
        norm_type: the p of the p-norm.
        **kwargs: passed to ``torch.nn.utils.clip_grad_norm_`` (``error_if_nonfinite``,
            ``foreach``).

    Returns:
        The total norm of the true, unscaled gradients before clipping.

    Raises:
        TypeError: ``optimizer`` is not an optimizer.

    Example:
        >>> import torch, ampfn
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> ampfn.backward((w * 2).sum())
        >>> ampfn.clip_grad_norm_([w], 1.0, opt)
        tensor(4.)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        check_optimizer(
            optimizer, "ampfn.clip_grad_norm_(parameters, max_norm, optimizer)"
        )
    if norm_type != 2.0:
        kwargs["norm_type"] = norm_type
    plan = getattr(local, "plan", None)
    if plan is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, **kwargs)
    return plan.clip_grad_norm_(parameters, max_norm, optimizer, kwargs)  # type: ignore[no-any-return]
