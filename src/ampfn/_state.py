"""Checkpoints of a whole pipeline: ``state_dict`` and ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from ampfn._core import States
from ampfn._effects import check_loss_id


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


def loss_scale(wrapped_step: Callable[..., Any], loss_id: int = 0) -> float | None:
    """The current loss scale of the scaler in ``wrapped_step``'s pipeline.

    Whichever transform owns it (``with_grad_scaling``, ``with_apex``), wherever it sits
    in the pipeline: what the next backward will multiply the loss by.

    Args:
        wrapped_step: a step wrapped by ampfn transforms.
        loss_id: which loss, for ``with_apex(..., num_losses=N)``.

    Returns:
        The scale, or None when the pipeline has no loss scaler (1.0 at Apex O0 and O3,
        whose scale is static 1.0).

    Example:
        >>> import torch, ampfn
        >>> step = ampfn.with_grad_scaling(torch.amp.GradScaler("cpu", init_scale=1024.0))(lambda b: b)
        >>> ampfn.loss_scale(step)
        1024.0
        >>> ampfn.loss_scale(ampfn.with_autocast("bf16", "cpu")(lambda b: b)) is None
        True
    """
    api = "ampfn.loss_scale(wrapped_step, loss_id)"
    if not callable(wrapped_step):
        raise TypeError(
            f"{api}: expected a step wrapped by ampfn transforms, got {type(wrapped_step).__name__}"
        )
    check_loss_id(loss_id, api)
    parts = getattr(wrapped_step, "__ampfn_parts__", ())
    scaling = next((f.scaling for f in parts if f.scaling is not None), None)
    if scaling is not None:
        return float(scaling.loss_scale(loss_id))
    return 1.0 if any(f.unit_scale for f in parts) else None
