"""Layer 1, vocabulary: the argument checks every layer shares.

Each raises with the API's signature first and what was expected (STYLE.md): a
``TypeError`` for a bad type, a ``ValueError`` for a bad value.
"""

from __future__ import annotations

from typing import Any

import torch


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


def check_loss_id(
    loss_id: object,
    api: str = "ampfn.backward(loss, loss_id)",
    losses: tuple[str, int] | None = None,
) -> int:
    """An int >= 0; below ``losses``' count, where given (the loss scaler's name and its
    number of losses)."""
    if isinstance(loss_id, bool) or not isinstance(loss_id, int) or loss_id < 0:
        raise ValueError(f"{api}: loss_id must be an int >= 0, got {loss_id!r}")
    if losses is not None and loss_id >= losses[1]:
        name, n = losses
        raise ValueError(
            f"{api}: loss_id is {loss_id}, but {name} has num_losses={n} (loss ids 0 to "
            f"{n - 1}); for a loss scale per loss, build "
            f"with_apex(level, model, optimizer, num_losses={loss_id + 1})"
        )
    return loss_id


def check_bool(value: object, api: str, name: str, *, none: bool = False) -> None:
    if not isinstance(value, bool) and not (none and value is None):
        kind = "a bool or None" if none else "a bool"
        raise TypeError(f"{api}: {name} must be {kind}, got {type(value).__name__}")


def check_module(value: object, api: str, name: str = "model") -> None:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(
            f"{api}: {name} must be an nn.Module, got {type(value).__name__}"
        )


def check_wrapped_step(obj: object, api: str) -> None:
    """A step wrapped by ampfn transforms (any callable; a plain one has no state), not
    the model or the optimizer the pipeline was built on."""
    if isinstance(obj, torch.nn.Module) or is_optimizer(obj):
        kind = "model" if isinstance(obj, torch.nn.Module) else "optimizer"
        raise TypeError(
            f"{api}: expected the wrapped step (what the transforms returned: "
            f"train_step = transform(step)), got the {kind} {type(obj).__name__}; pass the "
            "wrapped step, which holds the pipeline's state"
        )
    if not callable(obj):
        raise TypeError(
            f"{api}: expected a step wrapped by ampfn transforms, got {type(obj).__name__}"
        )


def optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    """Every parameter an optimizer holds, in its param_groups' order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def grads_of(optimizer: Any) -> list[torch.Tensor]:
    """The gradients of an optimizer's parameters that have one."""
    return [
        p.grad
        for g in optimizer.param_groups
        for p in g["params"]
        if p.grad is not None
    ]
