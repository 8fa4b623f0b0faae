"""Layer 4, loss scaling: Apex's scale law, for what one GradScaler cannot do.

``with_apex`` uses :class:`ApexScaler` for ``num_losses`` scalers, fp16 gradients (O2
without masters, dynamic O3) and a static scale. As in Apex's ``scale_loss``, each
backward is unscaled as soon as it finishes (with its own loss's scale, a
:class:`LossScale`) and that scale updated, and the step is skipped, for every optimizer,
when any backward since the last step overflowed. With several ranks, each backward's
overflow is all-reduced (so the scales stay identical), and before a step the gradients
made since the ranks last agreed are checked once more and the flag all-reduced again
(once per update when every backward comes before the steps), so that a gradient made
non-finite on one rank after its backward skips the step on every rank.

Within a call the scales move at each backward, as Apex's do; a call that raises puts
them back, with the overflow flag and the gradients it set aside.
"""

from __future__ import annotations

from typing import Any

import torch

from ampfn import _distributed as distributed
from ampfn._args import check_loss_id, optimizer_params
from ampfn._scaling._base import ScalerBase, ScalingCall
from ampfn._scaling._kernels import times, unscale_grads
from ampfn._scaling._misuse import check_step, refuse_closure
from ampfn._scaling._settings import check_scale
from ampfn._types import Grads, Kwargs, Optimizer


class LossScale:
    """One loss's scale under Apex's law, on the device, in GradScaler's state format.

    Dynamic: start at ``init``, halve on overflow (not below ``lo``), double after
    ``window`` clean updates (not above ``hi``). Static: never changes, never skips.
    """

    __slots__ = ("dynamic", "hi", "lo", "scale", "tracker", "window")

    def __init__(
        self,
        init: float,
        *,
        dynamic: bool,
        lo: float | None,
        hi: float,
        window: int,
        device: torch.device,
    ) -> None:
        self.dynamic, self.lo, self.hi, self.window = dynamic, lo, hi, window
        self.scale = torch.full((), init, dtype=torch.float32, device=device)
        self.tracker = torch.zeros((), dtype=torch.int32, device=device)

    def update(self, found: torch.Tensor) -> None:
        if self.dynamic:
            torch._amp_update_scale_(
                self.scale, self.tracker, found, 2.0, 0.5, self.window
            )
            self.scale.clamp_(self.lo, self.hi)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": float(self.scale),
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": self.window,
            "_growth_tracker": int(self.tracker),
        }

    def check_state(self, state: object) -> None:
        if not isinstance(state, dict) or not {"scale", "_growth_tracker"} <= set(
            state
        ):
            raise ValueError(
                f"a loss scaler's state needs 'scale' and '_growth_tracker', got {state!r}"[
                    :200
                ]
            )
        check_scale(state["scale"], "a saved loss scaler", "scale")
        tracker = state["_growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, int) or tracker < 0:
            raise ValueError(
                f"a saved loss scaler's _growth_tracker must be an int >= 0, got {tracker!r}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self.tracker.fill_(state["_growth_tracker"])


class ApexScaler(ScalerBase):
    """Apex's ``scale_loss``: per-loss scalers, unscale after each backward, skip all."""

    per_backward = True

    def __init__(
        self,
        api: str,
        scales: list[LossScale],
        optimizers: tuple[Any, ...],
        *,
        sync_ranks: bool | None,
    ) -> None:
        super().__init__(api, sync_ranks, optimizers)
        self.scales = scales
        self.num_losses = len(scales)
        self.optimizers = optimizers
        self.dynamic = any(s.dynamic for s in scales)
        self.overflow = torch.zeros(
            (), dtype=torch.float32, device=scales[0].scale.device
        )
        # with several ranks: whether a backward ran since the ranks last agreed (the
        # same on every rank, so every rank takes part in the collective), and the
        # parameters it gave gradients (this rank's: the ones to check)
        self.unagreed = False
        self.touched: dict[int, torch.Tensor] = {}

    # --- state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"loss_scalers": [s.state_dict() for s in self.scales]}

    def check_state(self, state: object, /) -> None:
        saved = state.get("loss_scalers") if isinstance(state, dict) else None
        if not isinstance(saved, list):
            raise TypeError(f"expected {{'loss_scalers': [...]}}, got {state!r}"[:200])
        if len(saved) != len(self.scales):
            raise ValueError(
                f"{len(saved)} saved loss scalers, the pipeline has {len(self.scales)} "
                f"(num_losses={len(self.scales)})"
            )
        for s, st in zip(self.scales, saved, strict=True):
            s.check_state(st)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        for s, st in zip(self.scales, state["loss_scalers"], strict=True):
            s.load_state_dict(st)

    def loss_scale(self, loss_id: int = 0) -> float:
        return float(self._loss(loss_id).scale)

    def _loss(self, loss_id: int) -> LossScale:
        check_loss_id(loss_id, losses=(self.api, len(self.scales)))
        return self.scales[loss_id]

    def _params(self) -> list[torch.Tensor]:
        return [p for o in self.optimizers for p in optimizer_params(o)]

    # --- the effects ------------------------------------------------------------

    def scale(self, st: ScalingCall, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        ls = self._loss(loss_id)
        self.before_backward(st, loss)
        if st.saved is None:  # what a failure of this call puts back
            st.saved = (
                [(s.scale.clone(), s.tracker.clone()) for s in self.scales],
                self.overflow.clone(),
                self.unagreed,
                dict(self.touched),
            )
        params = self._params()
        st.stash = [
            p.grad for p in params
        ]  # already unscaled: set aside, added back after
        for p in params:
            p.grad = None
        return loss.float() * ls.scale

    def before_backward(self, st: ScalingCall, loss: torch.Tensor) -> None:
        # each backward is unscaled as it finishes: a later backward mixes nothing
        st.backward = True

    def after_backward(self, st: ScalingCall, loss_id: int) -> None:
        ls = self.scales[loss_id]
        params = self._params()
        fresh = [p.grad for p in params if p.grad is not None]
        syncing = ls.dynamic and self.sync_ranks is not False and self.ranks()
        if syncing:
            self.unagreed = True
            self.touched.update((id(p), p) for p in params if p.grad is not None)
        found = torch.zeros((), dtype=torch.float32, device=ls.scale.device)
        if fresh and ls.dynamic:
            unscale_grads(fresh, ls.scale.double().reciprocal().float(), found)
        elif fresh and float(ls.scale) != 1.0:  # static: Apex unscales, never checks
            torch._foreach_mul_(fresh, 1.0 / float(ls.scale))
        for p, old in zip(params, st.stash, strict=True):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        st.stash = []
        if ls.dynamic:
            if syncing:
                distributed.all_reduce_max(found)
            ls.update(found)
            self.overflow.add_(found)

    def grad(
        self, st: ScalingCall, outputs: Any, inputs: Any, loss_id: int, kwargs: Kwargs
    ) -> Grads:
        scale = self._loss(loss_id).scale
        scaled = (
            outputs.float() * scale
            if isinstance(outputs, torch.Tensor)
            else [o.float() * scale for o in outputs]
        )
        grads = torch.autograd.grad(scaled, inputs, **kwargs)
        return times(
            tuple(grads), scale.double().reciprocal().float()
        )  # allow_unused: None

    def unscale(self, st: ScalingCall, optimizer: Optimizer) -> None:
        """Nothing to do: each backward was unscaled when it finished."""

    def true_gradients(self, st: ScalingCall, params: list[torch.Tensor]) -> bool:
        return True

    def step(
        self,
        st: ScalingCall,
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> bool:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        check_step(self.api, st.backward, id(optimizer) in st.steps)
        st.steps.add(id(optimizer))
        st.stepped = True
        if self.dynamic:
            if self.unagreed:
                self.agree()
            if bool(self.overflow):  # Apex reads its overflow flag on the host too
                return False
        call = st.call
        call.sanctioned = True  # (no try: see Engine._step)
        optimizer.step(*args, **kwargs)
        call.sanctioned = False
        return True

    def agree(self) -> None:
        """Before a step, with several ranks: fold in whether a gradient made since the
        ranks last agreed is non-finite now (each backward was checked as it finished,
        but a rank-local hook, clip or fault may change a gradient after that), and
        all-reduce (MAX) the overflow flag, once for all of them, on the device. Only
        those gradients: an optimizer's stale ones (from its own skipped step, not yet
        cleared) are not this update's."""
        grads = [p.grad for p in self.touched.values() if p.grad is not None]
        self.touched, self.unagreed = {}, False
        found = torch.zeros_like(self.overflow)
        if grads:  # GradScaler's kernel, times 1: a check that changes nothing
            unscale_grads(grads, torch.ones_like(self.overflow), found)
        self.overflow.add_(found)
        distributed.all_reduce_max(self.overflow)

    # --- the end of a call --------------------------------------------------------

    def commit(self, st: ScalingCall) -> None:
        if st.stepped:
            self.overflow.zero_()
            self.touched, self.unagreed = {}, False
        self.settle(st, st.stepped)

    def discard(self, st: ScalingCall) -> None:
        """Put back the scales, the overflow flag, and the gradients set aside."""
        if st.stash:  # a backward raised: its partial gradients go, the old ones return
            for p, old in zip(self._params(), st.stash, strict=True):
                p.grad = old
        if st.saved is not None:
            scales, overflow, unagreed, touched = st.saved
            for s, (scale, tracker) in zip(self.scales, scales, strict=True):
                s.scale.copy_(scale)
                s.tracker.copy_(tracker)
            self.overflow.copy_(overflow)
            self.unagreed, self.touched = unagreed, touched
