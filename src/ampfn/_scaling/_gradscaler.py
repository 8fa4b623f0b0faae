"""Layer 4, loss scaling: the syncing scaler, a ``torch.amp.GradScaler`` driven as PyTorch's
AMP recipe drives it.

:class:`GradScalerScaler` calls the GradScaler's public methods (``scale``, ``unscale_``,
``step``, ``update``), so any object with its interface works (FSDP's
``ShardedGradScaler``). It reads GradScaler's private per-optimizer state only where a
public method cannot do the job: to reset an optimizer's stage when a call fails or an
update restarts, to make skip decisions agree across optimizers (``with_apex``) or ranks,
and to unscale fp16 gradients for ``with_apex`` (Apex's O1 does, GradScaler refuses).
``ampfn.step`` reports a skip from what the step guard saw: a non-fused optimizer's step
ran or did not, a fused one took the ``found_inf`` GradScaler handed it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from ampfn import _distributed as distributed
from ampfn._args import grads_of, optimizer_params
from ampfn._distributed import is_sharded_scaler
from ampfn._runtime import default_device_type
from ampfn._scaling._base import ScalerBase, ScalingCall, has_grads, rescale
from ampfn._scaling._kernels import stack_found, times
from ampfn._scaling._misuse import check_step, refuse_closure
from ampfn._scaling._settings import check_scaler_state
from ampfn._types import Grads, Kwargs, Optimizer

# what with_grad_scaling needs of a scaler
INTERFACE = (
    "scale",
    "unscale_",
    "step",
    "update",
    "get_scale",
    "state_dict",
    "load_state_dict",
)


def default_scaler() -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for CUDA when available, else the CPU.

    It is correct for FSDP2's DTensor gradients too: its unscale kernel runs on DTensors,
    whose found_inf is reduced over the mesh (tests/test_distributed.py)."""
    return torch.amp.GradScaler(default_device_type())


class GradScalerScaler(ScalerBase):
    """Loss scaling through a GradScaler (``with_grad_scaling()``; ``with_apex``'s one loss).

    With ``together`` (``with_apex``), an overflow in any of those optimizers skips them
    all; ``bounds`` clamp the scale after each update (Apex's floor and ceiling);
    ``allow_fp16`` unscales fp16 gradients in place (Apex's O1 on an fp16 model).
    """

    def __init__(
        self,
        api: str,
        scaler: Any,
        *,
        sync_ranks: bool | None = None,
        together: tuple[Any, ...] = (),
        bounds: tuple[float | None, float | None] | None = None,
        allow_fp16: bool = False,
    ) -> None:
        super().__init__(api, sync_ranks, together)
        self.scaler = scaler
        self.together = together if len(together) > 1 else ()
        self.bounds = bounds
        self.allow_fp16 = allow_fp16
        self._fp16: dict[int, bool] = {}  # optimizer -> has fp16 gradients (allow_fp16)
        # a torch.amp.GradScaler (or subclass): its per-optimizer stages can be reset
        self.resettable = isinstance(
            getattr(scaler, "_per_optimizer_states", None), dict
        )

    def check_ranks(self) -> None:
        if is_sharded_scaler(self.scaler):
            self.sync_ranks = False  # it all-reduces found_inf in unscale_ itself
        elif not self.resettable:
            raise TypeError(
                f"{self.api}: torch.distributed runs several ranks, and ampfn makes them take the "
                f"same skip decisions through torch.amp.GradScaler's per-optimizer state, which "
                f"{type(self.scaler).__name__} lacks; pass a torch.amp.GradScaler, or sync_ranks=False "
                "if your scaler makes the ranks agree itself"
            )

    # --- state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def check_state(self, state: object, /) -> None:
        saved = state.get("scaler") if isinstance(state, dict) else None
        check_scaler_state(saved)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def loss_scale(self, loss_id: int = 0) -> float:
        s = self.scaler
        if (
            type(s) is torch.amp.GradScaler
        ):  # its get_scale, inline (telemetry's per-step read)
            if not s._enabled:
                return 1.0
            t = s._scale
            return float(s._init_scale) if t is None else float(t.item())
        return float(s.get_scale())

    # --- the effects ------------------------------------------------------------

    def scale(self, st: ScalingCall, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        self.before_backward(st, loss)
        return self.scaler.scale(loss)  # type: ignore[no-any-return]

    def after_backward(self, st: ScalingCall, loss_id: int) -> None:
        pass

    def grad(
        self, st: ScalingCall, outputs: Any, inputs: Any, loss_id: int, kwargs: Kwargs
    ) -> Grads:
        """PyTorch's gradient-penalty recipe: grad of the scaled outputs, times 1/scale."""
        grads = torch.autograd.grad(self.scaler.scale(outputs), inputs, **kwargs)
        return times(
            tuple(grads), 1.0 / self.scaler.get_scale()
        )  # allow_unused gives None

    def unscale(self, st: ScalingCall, optimizer: Optimizer) -> None:
        key = id(optimizer)
        if key in st.unscaled or key in self.stale:
            return
        self.check_unscale(st, optimizer, self.scaler)
        if self._fp16.get(key):
            self._unscale_fp16(optimizer)
        else:
            try:
                self.scaler.unscale_(optimizer)
            except RuntimeError as e:
                # the step called GradScaler.unscale_ itself first (a port that kept
                # scaler.unscale_(optimizer)): the gradients are unscaled already
                if "has already been called" not in str(e):
                    raise
        st.unscaled[key] = optimizer

    def check_unscale(
        self, st: ScalingCall, optimizer: Optimizer, scaler: Any = None
    ) -> None:
        if (self.allow_fp16 and self._fp16.get(id(optimizer)) is None) or (
            self._checked.get(id(optimizer)) != len(optimizer.param_groups)
        ):
            self._fp16[id(optimizer)] = self.allow_fp16 and any(
                g.dtype == torch.float16 for g in grads_of(optimizer)
            )
        super().check_unscale(st, optimizer, scaler)

    def _unscale_fp16(self, optimizer: Optimizer) -> None:
        """GradScaler.unscale_, allowing fp16 gradients (``with_apex``'s own scaler)."""
        s = self.scaler
        state = s._per_optimizer_states[id(optimizer)]
        if state["stage"] is not OptState.READY:
            return
        if s._scale is None:
            s._lazy_init_scale_growth_tracker(
                next(
                    p.device for p in optimizer_params(optimizer) if p.grad is not None
                )
            )
        inv_scale = s._scale.double().reciprocal().float()
        found = torch.full((), 0.0, dtype=torch.float32, device=s._scale.device)
        state["found_inf_per_device"] = s._unscale_grads_(
            optimizer, inv_scale, found, True
        )
        state["stage"] = OptState.UNSCALED

    def step(
        self,
        st: ScalingCall,
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> bool:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        key = id(optimizer)
        check_step(self.api, st.backward, key in st.steps)
        if not has_grads(
            optimizer
        ):  # nothing to unscale, check or step: as optimizer.step()
            st.steps.add(key)
            return True
        if not torch.compiler.is_dynamo_compiling():
            self.known[key] = optimizer
        if self.together or (self.sync_ranks is not False and self.ranks()):
            self.unscale(st, optimizer)  # agreeing needs every found_inf
            self.agree(st, optimizer)
        elif key not in st.unscaled and key not in self.stale:
            # GradScaler.step unscales by itself, as in hand-written code; fp16 gradients
            # (with_apex) are unscaled here first
            self.check_unscale(st, optimizer, self.scaler)
            if self._fp16.get(key):
                self._unscale_fp16(optimizer)
            st.unscaled[key] = optimizer
        duck = not isinstance(optimizer, torch.optim.Optimizer)
        if (
            duck
        ):  # a wrapper whose step may not run a torch optimizer's hooks: look ourselves
            overflow = any(not bool(g.isfinite().all()) for g in grads_of(optimizer))
        call = st.call
        call.sanctioned, call.ran, call.found = True, False, None
        self.scaler.step(optimizer, *args, **kwargs)  # (no try: see Engine._step)
        call.sanctioned = False
        st.steps.add(key)
        st.stepped = True
        if duck:
            return not overflow
        found, call.found = call.found, None
        if found is not None:  # a fused optimizer stepped with the scaler's found_inf
            return call.ran and not bool(found)
        return call.ran

    def agree(self, st: ScalingCall, optimizer: Optimizer) -> None:
        """Make this update's skip decisions final: one found_inf per optimizer, combined
        across ``together`` and all-reduced (MAX) across ranks, in one collective, written
        back into the scaler so that its step and update follow them."""
        pending = {**st.unscaled, **self.stale}
        targets = {id(o): o for o in (*self.together, *pending.values(), optimizer)}
        targets = {
            k: o for k, o in targets.items() if k not in st.agreed and has_grads(o)
        }
        if not targets:
            return
        for o in targets.values():
            self.unscale(st, o)
        states = self.scaler._per_optimizer_states
        per_device = [list(states[k]["found_inf_per_device"].values()) for k in targets]
        found = stack_found(per_device, self.scaler._scale.device)
        if self.together:
            found = found.amax().expand(len(per_device)).clone()
        if self.sync_ranks:
            distributed.all_reduce_max(found)
        for i, ts in enumerate(per_device):
            for t in ts:
                t.copy_(found[i])
        st.agreed.update(targets)

    # --- the end of a call --------------------------------------------------------

    def commit(self, st: ScalingCall) -> None:
        if st.stepped:
            self.scaler.update()
            if self.bounds is not None and self.scaler._scale is not None:
                self.scaler._scale.clamp_(*self.bounds)
        self.settle(st, st.stepped)

    def discard(self, st: ScalingCall) -> None:
        """Scale again what this call unscaled; reset the stages it moved."""
        if not (st.unscaled or st.stepped):
            return
        if self.scaler.is_enabled():
            scale = self.scaler._scale if self.resettable else self.scaler.get_scale()
            for optimizer in st.unscaled.values():
                rescale(grads_of(optimizer), scale)
        if self.resettable:
            states = self.scaler._per_optimizer_states
            for key in (*st.unscaled, *st.steps):
                states.pop(key, None)
        else:  # only its public methods: update() is the one reset it has
            # (GradScaler's update asserts when nothing stepped; the call's own error wins)
            with contextlib.suppress(AssertionError, RuntimeError):
                self.scaler.update()

    def restart(self, optimizer: Optimizer) -> None:
        if not self.resettable:
            raise RuntimeError(
                f"ampfn.backward(loss): {self.api} cannot start a fresh update for an optimizer "
                "unscaled (by ampfn.unscale_ or ampfn.clip_grad_norm_) in an earlier call that "
                f"did not step: {type(self.scaler).__name__} has only GradScaler's public methods, "
                "and its unscale_ refuses a second call before update(), which ampfn cannot reset; "
                "call ampfn.step(optimizer) in the call that unscales, or pass a torch.amp.GradScaler"
            )
        super().restart(optimizer)
        self.scaler._per_optimizer_states.pop(id(optimizer), None)
