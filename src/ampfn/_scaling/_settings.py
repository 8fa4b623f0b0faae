"""Layer 4, loss scaling: the settings a dynamic loss scale can work with, checked eagerly.

A scale must be finite and positive; it grows by a factor above 1, backs off by a factor
in (0, 1), after an integer interval of at least 1 clean update. The same rules check a
user's ``GradScaler`` when ``with_grad_scaling`` is built, ``with_apex``'s settings, and
every saved state ``ampfn.load_state_dict`` is given, before anything is loaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def check_scale(value: object, api: str, name: str, *, zero: bool = False) -> float:
    """A finite number, positive (or >= 0 with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{api}: {name} must be a number, got {type(value).__name__} {value!r}"
        )
    ok = math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        kind = "a finite number >= 0" if zero else "a finite positive number"
        raise ValueError(f"{api}: {name} must be {kind}, got {value!r}")
    return float(value)


def check_law(
    api: str, growth_factor: object, backoff_factor: object, interval: object
) -> None:
    if isinstance(growth_factor, bool) or not isinstance(growth_factor, (int, float)):
        raise TypeError(f"{api}: growth_factor must be a number, got {growth_factor!r}")
    if not (math.isfinite(growth_factor) and growth_factor > 1):
        raise ValueError(
            f"{api}: growth_factor must be a finite number above 1 (the scale grows by it), "
            f"got {growth_factor!r}"
        )
    if isinstance(backoff_factor, bool) or not isinstance(backoff_factor, (int, float)):
        raise TypeError(
            f"{api}: backoff_factor must be a number, got {backoff_factor!r}"
        )
    if not 0 < backoff_factor < 1:
        raise ValueError(
            f"{api}: backoff_factor must be in (0, 1) (the scale shrinks by it on overflow), "
            f"got {backoff_factor!r}"
        )
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(
            f"{api}: growth_interval must be an int >= 1 (clean updates before the scale "
            f"grows), got {interval!r}"
        )


def check_grad_scaler(scaler: Any, api: str) -> None:
    """A ``torch.amp.GradScaler``'s settings, as its constructor does not check them."""
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return
    scale = scaler._scale
    init = float(scaler._init_scale) if scale is None else float(scale.item())
    check_scale(init, api, "the scaler's scale (init_scale)")
    check_law(
        api, scaler._growth_factor, scaler._backoff_factor, scaler._growth_interval
    )


def check_scaler_state(state: object) -> None:
    """A ``GradScaler.state_dict()`` (``{}`` for a disabled scaler)."""
    if not isinstance(state, dict):
        raise TypeError(
            "expected a GradScaler state (GradScaler.state_dict(), under 'scaler'), got "
            f"{type(state).__name__}: was the state saved from a pipeline with another "
            "loss scaler (another level, or another num_losses)?"
        )
    if not state:
        return
    keys = {
        "scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "_growth_tracker",
    }
    missing = sorted(keys - set(state))
    if missing:
        raise ValueError(f"the GradScaler state lacks {', '.join(missing)}")
    check_scale(state["scale"], "GradScaler state", "scale")
    check_law(
        "GradScaler state",
        state["growth_factor"],
        state["backoff_factor"],
        state["growth_interval"],
    )
    tracker = state["_growth_tracker"]
    if isinstance(tracker, bool) or not isinstance(tracker, int) or tracker < 0:
        raise ValueError(
            f"the GradScaler state's _growth_tracker must be an int >= 0, got {tracker!r}"
        )
