"""Checkpoints of a whole pipeline: ``state_dict`` and ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from ampfn._core import States


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
