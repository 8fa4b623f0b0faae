"""Layer 4, loss scaling: the sync-free scaler, GradScaler's algorithm on the device.

:class:`SyncFreeScaler` (``with_grad_scaling(sync=False)``) keeps a ``torch.amp.GradScaler``'s
scale and growth tracker, and unscales, skips and updates them on the device with
GradScaler's kernels: nothing is read back to the host, so the step traces under
``torch.compile`` with none of GradScaler's graph breaks and runs in CUDA graphs. The
GradScaler stays the authority: its ``get_scale()`` and ``state_dict()`` are what a
syncing run shows.
"""

from __future__ import annotations

from typing import Any

import torch

from ampfn import _distributed as distributed
from ampfn._args import grads_of, optimizer_params
from ampfn._scaling._base import ScalerBase, ScalingCall, has_grads, rescale
from ampfn._scaling._kernels import fused_step, masked_step, times, unscale_grads
from ampfn._scaling._misuse import check_step, refuse_closure
from ampfn._scaling._settings import check_scaler_state
from ampfn._types import Grads, Kwargs, Optimizer


class SyncFreeScaler(ScalerBase):
    """``with_grad_scaling(scaler, sync=False)``: GradScaler's algorithm on its own tensors.

    Between calls, besides the base's bookkeeping: the found-inf flags of optimizers
    unscaled in a call that did not step (``stale_founds``).
    """

    sync_free = True

    def __init__(
        self, api: str, scaler: torch.amp.GradScaler, *, sync_ranks: bool | None
    ) -> None:
        super().__init__(api, sync_ranks)
        self.scaler = scaler
        self.stale_founds: dict[int, torch.Tensor] = {}
        if scaler._enabled and scaler._scale is None:  # now, not inside a traced step
            scaler._lazy_init_scale_growth_tracker(torch.device(scaler._device))

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def check_state(self, state: object, /) -> None:
        check_scaler_state(state.get("scaler") if isinstance(state, dict) else None)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def loss_scale(self, loss_id: int = 0) -> float:
        s = self.scaler
        if not s._enabled:
            return 1.0
        return float(s._init_scale) if s._scale is None else float(s._scale.item())

    def _scale(self) -> torch.Tensor:
        scale = self.scaler._scale
        assert scale is not None  # made at construction
        return scale

    # --- the effects ------------------------------------------------------------

    def scale(self, st: ScalingCall, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        self.before_backward(st, loss)
        if not self.scaler._enabled:
            return loss
        scale = self._scale()
        return loss * (scale if scale.device == loss.device else scale.to(loss.device))

    def after_backward(self, st: ScalingCall, loss_id: int) -> None:
        pass

    def grad(
        self, st: ScalingCall, outputs: Any, inputs: Any, loss_id: int, kwargs: Kwargs
    ) -> Grads:
        if not self.scaler._enabled:
            return tuple(torch.autograd.grad(outputs, inputs, **kwargs))
        scale = self._scale()
        scaled = (
            outputs * scale
            if isinstance(outputs, torch.Tensor)
            else [o * scale for o in outputs]
        )
        grads = torch.autograd.grad(scaled, inputs, **kwargs)
        return times(
            tuple(grads), scale.double().reciprocal().float()
        )  # allow_unused: None

    def unscale(self, st: ScalingCall, optimizer: Optimizer) -> None:
        key = id(optimizer)
        if key in st.founds or key in self.stale_founds or not self.scaler._enabled:
            return
        self.check_unscale(st, optimizer, self.scaler)
        scale = self._scale()
        found = torch.zeros((), dtype=torch.float32, device=scale.device)
        unscale_grads(grads_of(optimizer), scale.double().reciprocal().float(), found)
        st.founds[key] = found
        st.unscaled[key] = optimizer

    def step(
        self,
        st: ScalingCall,
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> torch.Tensor:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        key = id(optimizer)
        check_step(self.api, st.backward, key in st.steps)
        if not has_grads(optimizer):  # nothing to unscale, check or step
            st.steps.add(key)
            return torch.ones((), dtype=torch.bool, device=_device(optimizer))
        if not self.scaler._enabled:  # as GradScaler.step when disabled: a plain step
            st.call.sanctioned = True
            optimizer.step()
            st.call.sanctioned = False
            st.steps.add(key)
            st.stepped = True
            return torch.ones((), dtype=torch.bool, device=_device(optimizer))
        if not torch.compiler.is_dynamo_compiling():
            self.known[key] = optimizer
        self.unscale(st, optimizer)
        found = st.founds.get(key)
        if found is None:  # unscaled in an earlier call that did not step
            found = self.stale_founds[key]
        if self.sync_ranks is not False and self.ranks():
            self.agree(st)
        call = st.call
        call.sanctioned = True  # (no try: see Engine._step)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            fused_step(optimizer, found, args, kwargs)
        else:
            masked_step(optimizer, found, args, kwargs)
        call.sanctioned = False
        st.steps.add(key)
        st.stepped = True
        return found == 0

    def agree(self, st: ScalingCall) -> None:
        """All-reduce (MAX) the found_inf of every optimizer unscaled in this update and not
        yet agreed on, in one collective, on the device."""
        founds = {**self.stale_founds, **st.founds}
        keys = [k for k in founds if k not in st.agreed]
        if keys:
            found = torch.stack([founds[k] for k in keys])
            distributed.all_reduce_max(found)
            for i, k in enumerate(keys):
                founds[k].copy_(found[i])
            st.agreed.update(keys)

    def true_gradients(self, st: ScalingCall, params: list[torch.Tensor]) -> bool:
        return not self.scaler._enabled or super().true_gradients(st, params)

    # --- the end of a call --------------------------------------------------------

    def commit(self, st: ScalingCall) -> None:
        s = self.scaler
        if st.stepped:
            founds = [*self.stale_founds.values(), *st.founds.values()]
            if s._enabled and founds and s._scale is not None:
                assert s._growth_tracker is not None
                combined = founds[0].clone()
                for f in founds[1:]:
                    combined += f.to(combined.device)
                torch._amp_update_scale_(
                    s._scale,
                    s._growth_tracker,
                    combined,
                    s._growth_factor,
                    s._backoff_factor,
                    s._growth_interval,
                )
            self.stale_founds.clear()
        else:
            self.stale_founds.update(st.founds)
        self.settle(st, st.stepped)

    def discard(self, st: ScalingCall) -> None:
        """Scale again what this call unscaled."""
        if self.scaler._enabled:
            for optimizer in st.unscaled.values():
                rescale(grads_of(optimizer), self._scale())

    def restart(self, optimizer: Optimizer) -> None:
        super().restart(optimizer)
        self.stale_founds.pop(id(optimizer), None)


def _device(optimizer: Optimizer) -> torch.device:
    """The device of the optimizer's first parameter (where its step's result goes)."""
    return next(p.device for p in optimizer_params(optimizer))
