"""Layer 3, mechanism: checkpoints of a whole pipeline, ``state_dict`` and ``load_state_dict``.

A load is all or nothing: every stateful part checks its saved state first
(``Stateful.check_state``), and only then does any part load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from ampfn._args import check_wrapped_step
from ampfn._transform import States

_API = "ampfn.load_state_dict(wrapped_step, state)"


def _states(wrapped_step: Callable[..., Any], api: str) -> States:
    check_wrapped_step(wrapped_step, api)
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

    The whole state is checked first (its shape, each transform's entries, the values a
    loss scaler can use); nothing is loaded unless all of it can be.

    Raises:
        TypeError: ``state`` is not what :func:`state_dict` returns.
        ValueError: ``state`` was saved from a pipeline with other stateful transforms,
            or holds values this pipeline cannot take (the message says which).

    Example:
        >>> import ampfn
        >>> saved = ampfn.state_dict(ampfn.with_grad_scaling()(lambda batch: batch))
        >>> resumed = ampfn.with_grad_scaling()(lambda batch: batch)
        >>> ampfn.load_state_dict(resumed, saved)
    """
    states = _states(wrapped_step, _API)
    entries = state.get("transforms") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and "state" in e
        for e in entries
    ):
        raise TypeError(
            f"{_API}: expected the dict ampfn.state_dict returns "
            "({'transforms': [{'name': ..., 'state': ...}, ...]}), got "
            f"{type(state).__name__} {state!r}"[:300]
        )
    saved = [entry["name"] for entry in entries]
    expected = [name for name, _ in states]
    if saved != expected:
        raise ValueError(
            f"{_API}: the state was saved from a pipeline with {saved}, this pipeline has {expected}"
        )
    for (name, stateful), entry in zip(states, entries, strict=True):
        check = getattr(stateful, "check_state", None)  # a user's handler may have none
        if check is None:
            continue
        try:
            check(entry["state"])
        except (TypeError, ValueError) as e:
            raise type(e)(f"{_API}: {name}: {e}") from None
    for (_, stateful), entry in zip(states, entries, strict=True):
        stateful.load_state_dict(entry["state"])
