"""Layer 4, loss scaling: the one place that answers "what is the loss scale".

:func:`scale_of` answers it for a plan's scaler (telemetry asks it at each recorded
backward); :func:`loss_scale` for a wrapped step (``ampfn.loss_scale``), whichever
transform owns the scaler and wherever it sits in the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ampfn._args import check_loss_id, check_wrapped_step
from ampfn._types import Fragment, Scaler


def scale_of(
    scaler: Scaler[Any] | None, unit_scale: bool, loss_id: int = 0
) -> float | None:
    """The scale the next backward of loss ``loss_id`` uses: the scaler's; 1.0 where a
    transform owns loss scaling with a static scale of 1 (Apex O0, O3); else None."""
    if scaler is not None:
        return float(scaler.loss_scale(loss_id))
    return 1.0 if unit_scale else None


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
    check_wrapped_step(wrapped_step, api)
    check_loss_id(loss_id, api)
    parts: tuple[Fragment, ...] = getattr(wrapped_step, "__ampfn_parts__", ())
    scaler = next((f.scaling for f in parts if f.scaling is not None), None)
    return scale_of(scaler, any(f.unit_scale for f in parts), loss_id)


def find_scaler_state(state: Any) -> dict[str, Any] | None:
    """The first GradScaler state (a dict with "scale" and "_growth_tracker") nested in
    ``state``, such as ``ampfn.state_dict(step)``; None when the pipeline has none."""
    if isinstance(state, dict):
        if "scale" in state and "_growth_tracker" in state:
            return state
        state = list(state.values())
    if isinstance(state, list):
        for item in state:
            found = find_scaler_state(item)
            if found is not None:
                return found
    return None
