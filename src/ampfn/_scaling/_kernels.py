"""Layer 4, loss scaling: the kernels, GradScaler's own, driven without reading back.

``torch._amp_foreach_non_finite_check_and_unscale_`` unscales and checks gradients on
their device (:func:`unscale_grads`); a non-fused optimizer skips on the device by a
masked update (:func:`masked_step`), a fused one takes ``found_inf`` (:func:`fused_step`).
"""

from __future__ import annotations

from typing import Any

import torch

from ampfn._types import Grads


def stack_found(
    per_device: list[list[torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """One found_inf per optimizer (summed over its devices), stacked on ``device``."""
    zero = torch.zeros((), device=device)
    return torch.stack([sum((t.to(device) for t in ts), zero) for ts in per_device])


def times(grads: Grads, factor: Any) -> Grads:
    """Each gradient times ``factor``; a None (``allow_unused``) stays None."""
    return tuple(g if g is None else g * factor for g in grads)


def unscale_grads(
    grads: list[torch.Tensor], inv_scale: torch.Tensor, found: torch.Tensor
) -> None:
    """Multiply ``grads`` by ``inv_scale`` in place, setting ``found`` to 1 where any is
    inf or NaN, grouped by device and dtype as GradScaler does.

    A sparse gradient is unscaled in its own values, coalesced or not. (GradScaler
    coalesces an fp16 one first and puts the result in ``param.grad``; here only the
    gradient is at hand, and unscaling a coalesced copy would leave the gradient itself
    scaled. Unscaled before they are summed, duplicate entries cannot overflow by the
    scale either.)"""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g.is_sparse:
            g = g._values()
        key = (g.device, g.dtype)
        if key not in groups:
            groups[key] = []
        groups[key].append(g)
    for (device, _), group in groups.items():
        if device == found.device:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
        else:
            here = torch.zeros_like(found, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, here, inv_scale.to(device)
            )
            found.add_(here.to(found.device))


def _params_with_grads(optimizer: Any) -> list[torch.Tensor]:
    return [
        p for g in optimizer.param_groups for p in g["params"] if p.grad is not None
    ]


def masked_step(
    optimizer: Any, found: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Step ``optimizer``, then put back its parameters and state where ``found`` is set.

    Costs one copy of the parameters that have gradients and of their optimizer state.
    An optimizer whose state this step creates (its first step), or that keeps numbers
    rather than tensors in its state, is decided on the host instead: one read.
    """
    params = _params_with_grads(optimizer)
    state = optimizer.state
    before = {p: dict(state[p]) if p in state else None for p in params}
    if any(
        s is None or any(not isinstance(v, torch.Tensor) for v in s.values())
        for s in before.values()
    ):
        if not bool(found):
            optimizer.step(*args, **kwargs)
        return
    old_params = [p.detach().clone() for p in params]
    old_state = [
        (p, {k: v.clone() for k, v in s.items()})
        for p, s in before.items()
        if s is not None
    ]
    optimizer.step(*args, **kwargs)
    bad: dict[torch.device, torch.Tensor] = {found.device: found > 0}
    with torch.no_grad():
        for p, old in zip(params, old_params, strict=True):
            mask = bad.get(p.device)
            if mask is None:
                mask = bad[p.device] = (found > 0).to(p.device)
            torch.where(mask, old, p, out=p)
        for p, saved in old_state:
            for key, old in saved.items():
                now = state[p][key]
                mask = bad.get(now.device)
                if (
                    mask is None
                ):  # a state tensor kept on the host (non-capturable Adam's step)
                    mask = bad[now.device] = (found > 0).to(now.device)
                torch.where(mask, old, now, out=now)


def _attach_found_inf(optimizer: Any, device: torch.device) -> None:
    optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=device)


_ATTACH: list[Any] = []


def fused_step(
    optimizer: Any, found: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Step a fused optimizer with ``found`` as its ``found_inf`` (GradScaler's protocol;
    the gradients are already unscaled, so no ``grad_scale``). The ``found_inf`` tensor
    stays attached and is updated in place: dynamo drops attribute assignments on
    optimizers in compiled code, so it is attached once, outside the trace."""
    holder = getattr(optimizer, "found_inf", None)
    if not isinstance(holder, torch.Tensor):
        if not _ATTACH:
            _ATTACH.append(torch.compiler.disable(_attach_found_inf))  # type: ignore[no-untyped-call]
        _ATTACH[0](optimizer, found.device)
        holder = optimizer.found_inf
    holder.copy_(found)
    try:
        optimizer.step(*args, **kwargs)
    finally:
        holder.zero_()
