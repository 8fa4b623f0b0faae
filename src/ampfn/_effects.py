"""Layer 3, mechanism: the effects a step calls instead of torch.

Inside a wrapped step the user calls :func:`backward`, :func:`grad`, :func:`step`,
:func:`unscale_` and :func:`clip_grad_norm_`. While a pipeline's step runs, the call's
plan (``local.call.plan``) is this thread's active plan, and each effect calls what that
plan resolved for it when the pipeline was built (``ampfn._plan``). With no call active
an effect is exactly the plain PyTorch call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ampfn._args import check_loss_id, check_optimizer
from ampfn._engine import check_loss
from ampfn._guard import torch_clip_grad_norm_
from ampfn._runtime import local
from ampfn._types import Optimizer, Params


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
        TypeError: ``loss`` is not a floating tensor, or an unknown keyword.
        RuntimeError: ``loss`` needs no gradient (detached, computed under
            ``torch.no_grad()``), or has more than one element and no ``gradient=``;
            checked before anything runs, with the fix in the message.

    Example:
        >>> import torch, ampfn
        >>> w = torch.ones(2, requires_grad=True)
        >>> ampfn.backward((w * 3).sum())
        >>> w.grad
        tensor([3., 3.])
    """
    call = getattr(local, "call", None)
    if call is None:
        if kwargs and "loss_id" in kwargs:
            check_loss_id(kwargs.pop("loss_id"))
        check_loss(loss, kwargs)
        loss.backward(**kwargs)  # type: ignore[no-untyped-call]
        return
    call.plan.backward(loss, kwargs)


def grad(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, ...]:  # as torch.autograd.grad's (None for an unused input)
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
    call = getattr(local, "call", None)
    if call is None:
        if kwargs and "loss_id" in kwargs:
            check_loss_id(kwargs.pop("loss_id"), "ampfn.grad(outputs, inputs, loss_id)")
        return torch.autograd.grad(outputs, inputs, **kwargs)
    return call.plan.grad(outputs, inputs, kwargs)  # type: ignore[no-any-return]


def step(
    optimizer: Optimizer, *args: Any, **kwargs: Any
) -> Any:  # bool, or a bool tensor
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
    call = getattr(local, "call", None)
    if call is None or call.plan.plain_step:
        optimizer.step(*args, **kwargs)
        return True
    return call.plan.step(optimizer, args, kwargs)


def unscale_(optimizer: Optimizer) -> None:
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
    call = getattr(local, "call", None)
    if call is not None:
        call.plan.unscale_(optimizer)


def clip_grad_norm_(
    parameters: Params,
    max_norm: float,
    optimizer: Optimizer,
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
    call = getattr(local, "call", None)
    if call is None:
        return torch_clip_grad_norm_(parameters, max_norm, **kwargs)
    norm: torch.Tensor = call.plan.clip_grad_norm_(
        parameters, max_norm, optimizer, kwargs
    )
    return norm
