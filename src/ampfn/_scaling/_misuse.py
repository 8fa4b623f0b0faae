"""Layer 4, loss scaling: the one misuse guard every scaler shares.

Each check runs before anything changes and raises with the API and the fix:

- a closure given to ``ampfn.step`` (:func:`refuse_closure`);
- ``ampfn.step`` with no ``ampfn.backward`` since the last update, or twice for one
  optimizer in one call (:func:`check_step`);
- a backward after unscaling in the same update (:data:`BACKWARD_AFTER_UNSCALE`);
- gradients a scaler cannot unscale: fp16 ones where GradScaler refuses them, complex
  ones, FSDP-sharded ones of the wrong kind (:func:`check_gradients`);
- one parameter held by two optimizers of one update (:func:`check_shared`);
- a direct ``optimizer.step()`` outside the pipeline on gradients an accumulation call
  left scaled (:class:`LeftScaled`, asked by the step guard of ``ampfn._guard``).

A direct ``optimizer.step()`` or ``torch.nn.utils.clip_grad_norm_`` inside a scaled call
is caught by the guards of ``ampfn._guard``, which ask the scaler
(``true_gradients``).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

from ampfn._args import optimizer_params
from ampfn._distributed import check_sharded_grads, is_sharded_scaler
from ampfn._types import Optimizer

BACKWARD_AFTER_UNSCALE = (
    "ampfn.backward(loss): called after ampfn.unscale_ or ampfn.clip_grad_norm_ and before "
    "ampfn.step in the same update, which would mix scaled and unscaled gradients; run every "
    "backward first, then unscale or clip, then step"
)


def refuse_closure(api: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``ampfn.step(optimizer, closure)`` under loss scaling is an error (before anything
    changes); ``closure=None`` is dropped."""
    if "closure" in kwargs and kwargs["closure"] is None:
        del kwargs["closure"]
    if "closure" in kwargs or any(callable(a) for a in args):
        raise RuntimeError(
            f"ampfn.step(optimizer, closure): {api} refuses closures: the optimizer would call "
            "the closure to recompute the loss and its gradients, and that loss is not scaled "
            "nor its backward unscaled (torch.amp.GradScaler does not support closures, and "
            "Apex says 'Amp does not support closure use'); compute the loss in the step, call "
            "ampfn.backward(loss), then ampfn.step(optimizer) with no closure"
        )


def check_step(api: str, backward: bool, stepped: bool) -> None:
    if not backward:
        raise RuntimeError(
            f"ampfn.step(optimizer): no ampfn.backward ran under {api} since the last update, "
            "so the gradients were not made with the loss scale this step unscales by (was "
            "loss.backward() called directly?); call ampfn.backward(loss) instead"
        )
    if stepped:
        raise RuntimeError(
            "ampfn.step(optimizer): this optimizer already stepped in this call; under loss "
            "scaling each optimizer steps at most once per call of the wrapped step"
        )


def _fp16_message(api: str, sync_free: bool, sharded: bool, cast_by: str | None) -> str:
    mode = "with_grad_scaling(sync=False)" if sync_free else api
    if sharded:
        fix = (
            "keep the model's parameters fp32 and let FSDP2 compute in fp16 "
            "(fully_shard(module, mp_policy=ampfn.fsdp_mixed_precision('16-mixed')) keeps "
            "the sharded gradients fp32)"
            + (
                ", or use sync=True with a ShardedGradScaler, which unscales fp16 gradients"
                if sync_free
                else ", or pass with_grad_scaling(ShardedGradScaler(device)), which "
                "unscales fp16 gradients"
            )
        )
        return (
            f"{mode}: the FSDP-sharded gradients are fp16, and torch.amp.GradScaler refuses "
            f"to unscale fp16 gradients; {fix}"
        )
    where = (
        f" (the parameters were cast to fp16 by {cast_by}, and this optimizer holds them, "
        "not fp32 masters)"
        if cast_by
        else ""
    )
    return (
        f"{mode}: the gradients are fp16{where}, and {mode} needs fp32 gradients (it unscales "
        "them as torch.amp.GradScaler does, which refuses fp16 ones); keep the model's "
        "parameters fp32 and compute in fp16 with with_autocast('fp16'), or for an fp16 "
        "model use with_apex('O2', model, optimizer) or with_policy('16-true', model, "
        "optimizer, master_weights=True) (fp32 master weights), built before the optimizer "
        "is used elsewhere"
    )


def check_gradients(
    api: str, optimizer: Optimizer, scaler: Any, *, allow_fp16: bool, sync_free: bool
) -> None:
    """Before an optimizer's gradients are first unscaled (and again after it gains
    parameter groups): what the scaler cannot unscale is an error naming the fix."""
    grads = [p.grad for p in optimizer_params(optimizer) if p.grad is not None]
    if any(g.is_complex() for g in grads):
        raise TypeError(
            f"{api}: the optimizer has complex gradients, which loss scaling cannot unscale "
            "(GradScaler's kernels take real floating tensors); keep complex parameters "
            "out of the scaled optimizer (give them an optimizer of their own outside the "
            "pipeline), or use bf16 autocast, which needs no loss scaling"
        )
    if "torch.distributed.tensor" in sys.modules:
        check_sharded_grads(optimizer, scaler, api, sync_free=sync_free)
    if allow_fp16:
        return
    if is_sharded_scaler(scaler) and not sync_free:
        return
    half = [g for g in grads if g.dtype == torch.float16]
    if half:
        sharded = any(type(g).__name__ == "DTensor" for g in half)
        cast_by = next(
            (
                by
                for p in optimizer_params(optimizer)
                if (by := getattr(p, "_ampfn_cast_by", None)) is not None
            ),
            None,
        )
        raise ValueError(_fp16_message(api, sync_free, sharded, cast_by))


def check_shared(api: str, optimizer: Optimizer, others: list[Optimizer]) -> None:
    """One parameter in two optimizers of one update would be unscaled twice."""
    if not others:
        return
    mine = {id(p) for p in optimizer_params(optimizer)}
    for other in others:
        if other is optimizer:
            continue
        if mine & {id(p) for p in optimizer_params(other)}:
            raise ValueError(
                f"{api}: this optimizer ({type(optimizer).__name__}) and another one stepped "
                "in the same update hold the same parameter, whose gradient would be "
                "unscaled once per optimizer (divided by the scale twice); give each "
                "parameter to one optimizer (param_groups can give it its own settings)"
            )


class LeftScaled:
    """Gradients an accumulation call left multiplied by the loss scale.

    Recorded at the end of a call that ran ``ampfn.backward`` without ``ampfn.step``:
    for each optimizer the scaler knows, one of its gradients (the object and its
    version counter); for parameters learned from the loss's graph before any optimizer
    is known, each of their gradients. A direct ``optimizer.step()`` outside the
    pipeline on such an optimizer, while that gradient is unchanged, is refused: it
    would apply gradients the scale times too large. Clearing or changing them
    (``zero_grad``) lifts it.
    """

    __slots__ = ("__weakref__", "api", "marks")

    def __init__(self, api: str) -> None:
        self.api = api
        # id(param) -> (param, grad, grad._version), held weakly
        self.marks: dict[int, tuple[Any, Any, int]] = {}

    def mark(self, params: list[torch.Tensor]) -> None:
        for p in params:
            g = p.grad
            if g is not None:
                self.marks[id(p)] = (weakref.ref(p), weakref.ref(g), g._version)

    def check_outside(self, optimizer: Optimizer) -> None:
        for p in optimizer_params(optimizer):
            entry = self.marks.get(id(p))
            if entry is None:
                continue
            param, grad, version = entry
            if (
                param() is p
                and p.grad is not None
                and grad() is p.grad
                and p.grad._version == version
            ):
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step() outside the wrapped step: its "
                    "gradients are still multiplied by the loss scale, left so by a call "
                    f"of a step wrapped by {self.api} that ran ampfn.backward without "
                    "ampfn.step (gradient accumulation), so the update would be the scale "
                    "times too large; step inside the wrapped step with "
                    "ampfn.step(optimizer), or clear the gradients (optimizer.zero_grad()) "
                    "to drop them (nothing has changed)"
                )
