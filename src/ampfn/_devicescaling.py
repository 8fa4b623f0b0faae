"""Loss scaling whose arithmetic ampfn does on the device, with PyTorch's own kernels.

- :class:`SyncFreeScaling` (``with_grad_scaling(sync=False)``) keeps a
  ``torch.amp.GradScaler``'s scale and growth tracker, and unscales, skips and updates
  them on the device: nothing is read back to the host, so the step traces under
  ``torch.compile`` with none of GradScaler's graph breaks and runs in CUDA graphs.
- :class:`ApexScaling` is NVIDIA Apex's loss scaler, for what one GradScaler cannot do:
  ``num_losses`` scalers, fp16 gradients, a static scale. As in Apex, each backward is
  unscaled as soon as it finishes (with its own loss's scale) and its scale updated,
  and the step is skipped, for every optimizer, when any backward since the last step
  overflowed. With several ranks, each backward's overflow is all-reduced (so the
  scales stay identical), and before a step the gradients made since the ranks last
  agreed are checked once more and the flag all-reduced again (once per update when
  every backward comes before the steps), so that a gradient made non-finite on one
  rank after its backward skips the step on every rank.

The kernels are GradScaler's: ``torch._amp_foreach_non_finite_check_and_unscale_`` and
``torch._amp_update_scale_``.
"""

from __future__ import annotations

from typing import Any

import torch

from ampfn._scaling import ScalerState, Scaling, refuse_closure, times

# ------------------------------------------------------------------ kernels


def unscale_grads(
    grads: list[torch.Tensor], inv_scale: torch.Tensor, found: torch.Tensor
) -> None:
    """Multiply ``grads`` by ``inv_scale`` in place, setting ``found`` to 1 where any is
    inf or NaN, grouped by device and dtype as GradScaler does."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g.is_sparse:
            g = (g.coalesce() if g.dtype is torch.float16 else g)._values()
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


# ------------------------------------------------------------------ sync-free GradScaler


class SyncFreeScaling(ScalerState):
    """``with_grad_scaling(scaler, sync=False)``: GradScaler's algorithm on its own tensors."""

    scaler: torch.amp.GradScaler
    sync_free = True

    def __init__(
        self, api: str, scaler: torch.amp.GradScaler, *, sync_ranks: bool | None
    ) -> None:
        super().__init__(api, sync_ranks)
        self.scaler = scaler
        self.founds: dict[int, torch.Tensor] = {}
        if scaler._enabled and scaler._scale is None:  # now, not inside a traced step
            scaler._lazy_init_scale_growth_tracker(torch.device(scaler._device))

    def forget(self, optimizer: Any) -> None:
        super().forget(optimizer)
        self.founds.pop(id(optimizer), None)

    def _scale(self, device: torch.device) -> torch.Tensor:
        scale = self.scaler._scale
        if scale is None:
            self.scaler._lazy_init_scale_growth_tracker(device)
            scale = self.scaler._scale
            assert scale is not None
        return scale

    def scale(self, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        if not self.scaler._enabled:
            return loss
        scale = self._scale(loss.device)
        return loss * (scale if scale.device == loss.device else scale.to(loss.device))

    def grad(
        self, outputs: Any, inputs: Any, loss_id: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        if not self.scaler._enabled:
            return tuple(torch.autograd.grad(outputs, inputs, **kwargs))
        first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        scale = self._scale(first.device)
        scaled = (
            outputs * scale
            if isinstance(outputs, torch.Tensor)
            else [o * scale for o in outputs]
        )
        grads = torch.autograd.grad(scaled, inputs, **kwargs)
        inv_scale = scale.double().reciprocal().float()
        return times(grads, inv_scale)  # allow_unused gives None

    def unscale(self, optimizer: Any) -> None:
        key = id(optimizer)
        if key in self.founds or not self.scaler._enabled:
            return
        scale = self.scaler._scale
        if scale is None:  # nothing was scaled yet
            return
        found = torch.zeros((), dtype=torch.float32, device=scale.device)
        grads = [p.grad for p in _params_with_grads(optimizer)]
        if any(g.dtype == torch.float16 for g in grads):  # type: ignore[union-attr]
            raise ValueError(_fp16_grads(grads))  # GradScaler's own rule
        unscale_grads(grads, scale.double().reciprocal().float(), found)  # type: ignore[arg-type]
        self.founds[key] = found
        self.unscaled[key] = optimizer

    def step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        self.check_step(optimizer)
        self.unscale(optimizer)
        found = self.founds.get(id(optimizer))
        if found is None:  # a disabled scaler, or an optimizer with nothing scaled
            found = torch.zeros((), dtype=torch.float32, device=_device(optimizer))
        elif self.sync_ranks is not False and self.ranks():
            self.agree(optimizer)
        self.sanctioned = True
        try:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                fused_step(optimizer, found, args, kwargs)
            else:
                masked_step(optimizer, found, args, kwargs)
        finally:
            self.sanctioned = False
        self.stepped_now(optimizer)
        return found == 0

    def agree(self, optimizer: Any) -> None:
        """All-reduce (MAX) the found_inf of every optimizer unscaled in this update and not
        yet agreed on, in one collective, on the device."""
        from ampfn._distributed import all_reduce_max

        keys = [k for k in self.founds if k not in self.agreed]
        if keys:
            found = torch.stack([self.founds[k] for k in keys])
            all_reduce_max(found)
            for i, k in enumerate(keys):
                self.founds[k].copy_(found[i])
            self.agreed.update(keys)

    def finish(self, failed: bool) -> None:
        updated = self.any_step
        if updated:
            try:
                s = self.scaler
                if s._enabled and self.founds and s._scale is not None:
                    assert s._growth_tracker is not None
                    founds = list(self.founds.values())
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
            except Exception:
                if not failed:
                    raise
            self.founds.clear()
        self.end_call(failed, updated)


def _fp16_grads(grads: list[Any]) -> str:
    """Why the sync-free mode refuses these fp16 gradients, and what to do instead."""
    if any(type(g).__name__ == "DTensor" for g in grads):
        return (
            "with_grad_scaling(sync=False): the FSDP-sharded gradients are fp16, and the "
            "sync-free mode needs fp32 gradients (it unscales them as torch.amp.GradScaler "
            "does, which refuses fp16 ones, whatever the scaler); keep the model's "
            "parameters fp32 and let FSDP2 compute in fp16 (fully_shard(module, "
            "mp_policy=ampfn.fsdp_mixed_precision('16-mixed')) keeps the sharded gradients "
            "fp32), or use sync=True with a ShardedGradScaler, which unscales fp16 gradients"
        )
    return (
        "with_grad_scaling(sync=False): the gradients are fp16, and the sync-free mode "
        "needs fp32 gradients (it unscales them as torch.amp.GradScaler does, which "
        "refuses fp16 ones); keep the model's parameters fp32 and compute in fp16 with "
        "with_autocast('fp16'), or for an fp16 model use with_apex('O2', model, "
        "optimizer) (fp32 master weights, or Apex's scaler for fp16 gradients)"
    )


def _device(optimizer: Any) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device  # type: ignore[no-any-return]
    return torch.device("cpu")


# ------------------------------------------------------------------ Apex's loss scaler


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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self.tracker.fill_(state["_growth_tracker"])


class ApexScaling(Scaling):
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
        super().__init__(api, sync_ranks)
        self.scales = scales
        self.optimizers = optimizers
        self.dynamic = any(s.dynamic for s in scales)
        self.overflow = torch.zeros(
            (), dtype=torch.float32, device=scales[0].scale.device
        )
        # with several ranks: whether a backward ran since the ranks last agreed (the
        # same on every rank, so every rank takes part in the collective), and the
        # parameters it gave gradients (this rank's: the ones to check)
        self.pending = False
        self.touched: dict[int, torch.Tensor] = {}
        self._stash: list[torch.Tensor | None] = []

    def state_dict(self) -> dict[str, Any]:
        return {"loss_scalers": [s.state_dict() for s in self.scales]}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        saved = state["loss_scalers"]
        if len(saved) != len(self.scales):
            raise ValueError(
                f"ampfn.load_state_dict: {len(saved)} saved loss scalers, the pipeline has {len(self.scales)}"
            )
        for s, st in zip(self.scales, saved, strict=True):
            s.load_state_dict(st)

    def loss_scale(self, loss_id: int = 0) -> float:
        return float(self._loss(loss_id).scale)

    def _loss(self, loss_id: int) -> LossScale:
        if loss_id >= len(self.scales):
            raise ValueError(
                f"ampfn.backward(loss, loss_id): loss_id is {loss_id}, but {self.api} has "
                f"num_losses={len(self.scales)} (loss ids 0 to {len(self.scales) - 1})"
            )
        return self.scales[loss_id]

    def _params(self) -> list[torch.Tensor]:
        return [p for o in self.optimizers for g in o.param_groups for p in g["params"]]

    def scale(self, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        ls = self._loss(loss_id)
        params = self._params()
        self._stash = [
            p.grad for p in params
        ]  # already unscaled: set aside, added back after
        for p in params:
            p.grad = None
        return loss.float() * ls.scale

    def after_backward(self, loss_id: int) -> None:
        ls = self.scales[loss_id]
        params = self._params()
        fresh = [p.grad for p in params if p.grad is not None]
        syncing = ls.dynamic and self.sync_ranks is not False and self.ranks()
        if syncing:
            self.pending = True
            self.touched.update((id(p), p) for p in params if p.grad is not None)
        found = torch.zeros((), dtype=torch.float32, device=ls.scale.device)
        if fresh and ls.dynamic:
            unscale_grads(fresh, ls.scale.double().reciprocal().float(), found)
        elif fresh and float(ls.scale) != 1.0:  # static: Apex unscales, never checks
            torch._foreach_mul_(fresh, 1.0 / float(ls.scale))
        for p, old in zip(params, self._stash, strict=True):
            if old is not None:
                p.grad = old if p.grad is None else p.grad.add_(old)
        self._stash = []
        if ls.dynamic:
            if syncing:
                from ampfn._distributed import all_reduce_max

                all_reduce_max(found)
            ls.update(found)
            self.overflow.add_(found)

    def grad(
        self, outputs: Any, inputs: Any, loss_id: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        scale = self._loss(loss_id).scale
        scaled = (
            outputs.float() * scale
            if isinstance(outputs, torch.Tensor)
            else [o.float() * scale for o in outputs]
        )
        grads = torch.autograd.grad(scaled, inputs, **kwargs)
        inv_scale = scale.double().reciprocal().float()
        return times(grads, inv_scale)  # allow_unused gives None

    def unscale(self, optimizer: Any) -> None:
        """Nothing to do: each backward was unscaled when it finished."""

    def step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        self.check_step(optimizer)
        if self.dynamic:
            if self.pending:
                self.agree()
            if bool(self.overflow):  # Apex reads its overflow flag on the host too
                self.stepped_now(optimizer)
                return False
        self.sanctioned = True
        try:
            optimizer.step(*args, **kwargs)
        finally:
            self.sanctioned = False
        self.stepped_now(optimizer)
        return True

    def agree(self) -> None:
        """Before a step, with several ranks: fold in whether a gradient made since the
        ranks last agreed is non-finite now (each backward was checked as it finished,
        but a rank-local hook, clip or fault may change a gradient after that), and
        all-reduce (MAX) the overflow flag, once for all of them, on the device. Only
        those gradients: an optimizer's stale ones (from its own skipped step, not yet
        cleared) are not this update's."""
        from ampfn._distributed import all_reduce_max

        grads = [p.grad for p in self.touched.values() if p.grad is not None]
        self.touched, self.pending = {}, False
        found = torch.zeros_like(self.overflow)
        if grads:  # GradScaler's kernel, times 1: a check that changes nothing
            unscale_grads(grads, torch.ones_like(self.overflow), found)
        self.overflow.add_(found)
        all_reduce_max(self.overflow)

    def finish(self, failed: bool) -> None:
        updated = self.any_step
        if updated:
            self.overflow.zero_()
        if updated or failed:
            self.touched, self.pending = {}, False
        self.end_call(failed, updated)
