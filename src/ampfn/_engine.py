"""Layer 3, mechanism: the engine, the built-in effects of one plan as one fixed sequence.

Whatever order the transforms were composed in, the engine runs:

- ``backward``: check the loss; autocast off; the observer sees the scale about to be
  used; the scaler scales the loss; backward; gradients move to the fp32 masters; the
  scaler's per-backward work (Apex's scaler unscales here).
- ``step``: autocast off; the masters and stochastic rounding prepare the optimizer;
  the scaler unscales and steps (skipping on inf/NaN), or ``step_via`` steps, or the
  optimizer itself; rounding, masters copied back, post-step work; the observer sees the
  result.
- ``unscale_`` and ``clip_grad_norm_``: the scaler unscales first, then the masters'
  gradients are clipped with torch's own function.

Every call's bookkeeping goes into the active :class:`~ampfn._types.Call` (the scaler's
into its ``scaling`` state), never into a long-lived object: see ``ampfn._plan``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ampfn._args import check_loss_id
from ampfn._guard import install, torch_clip_grad_norm_
from ampfn._runtime import local, without_autocast
from ampfn._types import (
    Call,
    Fragment,
    Grads,
    Kwargs,
    Masters,
    Observer,
    Optimizer,
    Params,
    Rounding,
    Scaler,
    Stepped,
)

_BACKWARD_KWARGS = frozenset({"gradient", "retain_graph", "create_graph", "inputs"})


def _single(fragments: tuple[Fragment, ...], field: str, what: str) -> Any:
    found = [
        (f.name, getattr(f, field)) for f in fragments if getattr(f, field) is not None
    ]
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise ValueError(
            f"ampfn: two {what} are active in one step ({names}); keep exactly one"
        )
    return found[0][1] if found else None


def check_loss(loss: object, kwargs: Kwargs) -> None:
    """What torch would fail on in ``loss.backward(**kwargs)``, said by ``ampfn.backward``,
    before anything changes."""
    api = "ampfn.backward(loss, **kwargs)"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{api}: expected the loss as a torch.Tensor, got {type(loss).__name__}"
        )
    unknown = [k for k in kwargs if k not in _BACKWARD_KWARGS]
    if unknown:
        raise TypeError(
            f"{api}: unknown keyword {', '.join(map(repr, unknown))}; Tensor.backward takes "
            "gradient, retain_graph, create_graph and inputs, and ampfn.backward loss_id"
        )
    if not (loss.is_floating_point() or loss.is_complex()):
        raise TypeError(
            f"{api}: the loss is {loss.dtype}, and only floating tensors have gradients; "
            "compute it from the model's floating output (for example with "
            "torch.nn.functional.cross_entropy), or cast it with loss.float()"
        )
    if not loss.requires_grad:
        raise RuntimeError(
            f"{api}: the loss does not require grad: it was detached, computed under "
            "torch.no_grad() or torch.inference_mode(), or from tensors that need no "
            "gradient; compute it from the model's output with gradients enabled"
        )
    if loss.numel() != 1 and "gradient" not in kwargs:
        raise RuntimeError(
            f"{api}: the loss has {loss.numel()} elements (shape {tuple(loss.shape)}), and "
            "backward needs a scalar; reduce it (loss.mean() or loss.sum()), or pass "
            "gradient= as Tensor.backward takes it"
        )


def check_max_norm(max_norm: object) -> float:
    api = "ampfn.clip_grad_norm_(parameters, max_norm, optimizer)"
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(
            f"{api}: max_norm must be a number, got {type(max_norm).__name__}"
        )
    if math.isnan(max_norm) or max_norm < 0:
        raise ValueError(
            f"{api}: max_norm must be a number >= 0 (the largest total norm to allow), "
            f"got {max_norm!r}"
        )
    return float(max_norm)


class Engine:
    """The built-in effects of one plan (see the module docstring)."""

    __slots__ = (
        "after_step",
        "losses",
        "masters",
        "observers",
        "off",
        "owner",
        "plain_step",
        "rounding",
        "scaling",
        "step_via",
        "unit_scale",
    )

    def __init__(self, fragments: tuple[Fragment, ...]) -> None:
        self.off: tuple[str, ...] = tuple(
            dict.fromkeys(f.autocast_off for f in fragments if f.autocast_off)
        )
        self.scaling: Scaler[Any] | None = _single(
            fragments, "scaling", "loss-scaling transforms"
        )
        self.masters: tuple[Masters, ...] = tuple(
            f.masters for f in fragments if f.masters is not None
        )
        self.rounding: Rounding | None = _single(
            fragments, "rounding", "stochastic-rounding transforms"
        )
        if self.rounding is not None and self.masters:
            raise ValueError(
                "ampfn: master weights and stochastic rounding are both active in one step; keep one"
            )
        self.step_via = _single(
            fragments, "step_via", "transforms that replace optimizer.step"
        )
        self.after_step = tuple(
            f.after_step for f in fragments if f.after_step is not None
        )
        self.observers: tuple[Observer, ...] = tuple(
            f.observer for f in fragments if f.observer is not None
        )
        self.unit_scale = any(f.unit_scale for f in fragments)
        # the scaler's name and number of losses, which loss ids must stay below
        self.losses: tuple[str, int] | None = (
            None
            if self.scaling is None
            else (self.scaling.api, getattr(self.scaling, "num_losses", 1))
        )
        # the transform whose work surrounds optimizer.step: only ampfn.step may step then
        owners = [f.name for f in fragments if f.scaling or f.masters or f.rounding]
        self.owner: str | None = owners[0] if owners else None
        if self.owner is not None:
            install()  # the guards on torch's own step and clipping (ampfn._guard)
        self.plain_step = not (
            self.scaling
            or self.masters
            or self.rounding
            or self.step_via
            or self.after_step
            or self.observers
            or self.off
        )

    def direct_step_error(self, optimizer: Optimizer) -> str:
        """Why a direct ``optimizer.step()`` inside this plan's call is refused."""
        what = (
            "the gradients are still multiplied by the loss scale, so the update would be "
            "the scale times too large"
            if self.scaling is not None
            else "the optimizer holds fp32 master weights, so the step would move them but "
            "not the model"
            if self.masters
            else "the update would be rounded to nearest into the bf16 weights, not "
            "stochastically"
        )
        return (
            f"{type(optimizer).__name__}.step() was called directly inside a step wrapped by "
            f"{self.owner}: {what}; call ampfn.step(optimizer) instead (nothing has changed)"
        )

    # --- backward and grad ---------------------------------------------------------

    def backward(self, loss: torch.Tensor, kwargs: Kwargs) -> None:
        loss_id = (
            check_loss_id(kwargs.pop("loss_id"), losses=self.losses)
            if "loss_id" in kwargs
            else 0
        )
        check_loss(loss, kwargs)
        without_autocast(self.off, self._backward, local.call, loss, loss_id, kwargs)

    def _backward(
        self, call: Call, loss: torch.Tensor, loss_id: int, kwargs: Kwargs
    ) -> None:
        for o in self.observers:
            o.before_backward(call, loss_id)
        sc = self.scaling
        if sc is None:
            loss.backward(**kwargs)  # type: ignore[no-untyped-call]
        else:
            sc.scale(call.scaling, loss, loss_id).backward(**kwargs)  # type: ignore[no-untyped-call]
        for m in self.masters:
            m.collect()
        if sc is not None:
            sc.after_backward(call.scaling, loss_id)
        call.backward_seen = True

    def grad(self, outputs: Any, inputs: Any, kwargs: Kwargs) -> Grads:
        api = "ampfn.grad(outputs, inputs, loss_id)"
        loss_id = (
            check_loss_id(kwargs.pop("loss_id"), api, self.losses)
            if "loss_id" in kwargs
            else 0
        )
        sc = self.scaling
        if sc is None:
            return without_autocast(self.off, _autograd_grad, outputs, inputs, kwargs)
        state = local.call.scaling
        return without_autocast(
            self.off, sc.grad, state, outputs, inputs, loss_id, kwargs
        )

    # --- step, unscale_, clip_grad_norm_ -------------------------------------------

    def step(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Stepped:
        call: Call = local.call
        stepped = without_autocast(self.off, self._step, call, optimizer, args, kwargs)
        if self.off and not torch.compiler.is_dynamo_compiling():
            # The region's cached half copies of the weights are stale now: hand-written
            # code steps after leaving the region, which drops them. (A traced region keeps
            # no cache: its graph casts the weights itself.)
            torch.clear_autocast_cache()
        return stepped

    def _step(
        self, call: Call, optimizer: Optimizer, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Stepped:
        sc, rounding = self.scaling, self.rounding
        for m in self.masters:  # (a scaler knows whether a backward ran: its message)
            m.before_step(optimizer, call.backward_seen or sc is not None)
        # No try/finally around the optimizer's step (dynamo cannot resume a frame inside
        # one after the step's graph break): an exception leaves `sanctioned` set only for
        # the rest of a call that is failing. Rounding must put the weights back, though.
        if rounding is None:
            stepped = self._dispatch(call, sc, optimizer, args, kwargs)
        else:
            rounding.before_step(optimizer)
            try:
                stepped = self._dispatch(call, sc, optimizer, args, kwargs)
            finally:
                rounding.after_step(optimizer)
        for m in self.masters:
            m.after_step(optimizer, stepped)
        for f in self.after_step:
            f(optimizer)
        for o in self.observers:
            o.on_step(call, optimizer, stepped, self.masters)
        for m in self.masters:  # the masters' gradients are spent (observers saw them)
            m.release(optimizer)
        call.stepped.add(id(optimizer))
        return stepped

    def _dispatch(
        self,
        call: Call,
        sc: Scaler[Any] | None,
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> Stepped:
        if sc is not None:
            return sc.step(call.scaling, optimizer, args, kwargs)
        call.sanctioned = True
        if self.step_via is not None:
            self.step_via(optimizer, *args, **kwargs)
        else:
            optimizer.step(*args, **kwargs)
        call.sanctioned = False
        return True

    def unscale_(self, optimizer: Optimizer) -> None:
        if self.scaling is not None:
            self.scaling.unscale(local.call.scaling, optimizer)

    def clip_grad_norm_(
        self, parameters: Params, max_norm: float, optimizer: Optimizer, kwargs: Kwargs
    ) -> torch.Tensor:
        max_norm = check_max_norm(max_norm)
        params = (
            [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        )
        call: Call = local.call
        sc = self.scaling
        if sc is not None:
            sc.unscale(call.scaling, optimizer)
            if not sc.true_gradients(call.scaling, params):
                raise ValueError(
                    "ampfn.clip_grad_norm_(parameters, max_norm, optimizer): some of the "
                    "parameters have gradients that the optimizer does not hold, so "
                    f"unscaling it left them multiplied by the loss scale ({sc.api}); pass the "
                    "optimizer that holds them (clip each optimizer's parameters with it)"
                )
        for m in self.masters:
            params = m.clip_params(params)
        norm = without_autocast(self.off, _clip, params, max_norm, kwargs)
        for o in self.observers:
            o.on_clip(call, norm)
        return norm


def _clip(params: list[torch.Tensor], max_norm: float, kwargs: Kwargs) -> torch.Tensor:
    return torch_clip_grad_norm_(params, max_norm, **kwargs)


def _autograd_grad(outputs: Any, inputs: Any, kwargs: Kwargs) -> Grads:
    return tuple(torch.autograd.grad(outputs, inputs, **kwargs))
