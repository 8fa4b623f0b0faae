"""Loss scaling: ``with_grad_scaling``, and the mechanism every scaling transform shares.

Three implementations share one interface (``scale``, ``unscale``, ``step``, ``grad``,
``finish``, ``loss_scale``) and the bookkeeping of :class:`Scaling`:

- :class:`GradScalerScaling` drives the user's ``torch.amp.GradScaler`` (or any object
  with its interface) through its public methods only: ``with_grad_scaling()``, and
  ``with_apex``'s dynamic scale (a GradScaler with Apex's settings and bounds).
- ``SyncFreeScaling`` (``ampfn._devicescaling``) keeps a GradScaler's own tensors but
  does the arithmetic on the device, never reading a value back: ``sync=False``.
- ``ApexScaling`` (``ampfn._devicescaling``) is Apex's per-loss scaler, for what a
  GradScaler cannot do: several losses, fp16 gradients, a static scale.

The bookkeeping makes misuse a clear error: ``optimizer.step()`` called directly inside a
scaled step (a process-wide optimizer pre-hook, installed once, that does nothing
outside one), ``loss.backward()`` instead of ``ampfn.backward``, backward after unscaling
in the same update. When ``torch.distributed`` runs several ranks, the skip decision is
all-reduced so that every rank takes the same one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ampfn._autocast import default_device_type
from ampfn._core import Transform, factory
from ampfn._effects import local
from ampfn._plan import Fragment

INTERFACE = (
    "scale",
    "unscale_",
    "step",
    "update",
    "get_scale",
    "state_dict",
    "load_state_dict",
)

_BACKWARD_AFTER_UNSCALE = (
    "ampfn.backward(loss): called after ampfn.unscale_ or ampfn.clip_grad_norm_ and before "
    "ampfn.step in the same update, which would mix scaled and unscaled gradients; run every "
    "backward first, then unscale or clip, then step"
)

# ------------------------------------------------------------------ the direct-step guard

_GUARD: list[Any] = []  # the hook's handle, once installed


def _guard(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Every optimizer's step pre-hook: inside a scaled step, only ampfn.step may step."""
    plan = getattr(local, "plan", None)
    if plan is None:
        return
    sc = plan.engine.scaling
    if sc is None:
        return
    if not sc.sanctioned:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() was called directly inside a step wrapped by "
            f"{sc.api}: the gradients are still multiplied by the loss scale, so the update would "
            "be wrong; call ampfn.step(optimizer) instead (it unscales, skips steps with inf/NaN "
            "gradients and says whether it stepped)"
        )
    sc.called = True
    sc.found = getattr(optimizer, "found_inf", None)


def install_guard() -> None:
    """Register :func:`_guard` for every optimizer (once per process)."""
    if not _GUARD:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _GUARD.append(register_optimizer_step_pre_hook(_guard))


@contextlib.contextmanager
def guard_suspended() -> Iterator[None]:
    """Without the guard hook for a while: benchmarks/ times hand-written loops exactly
    as they run in a process that never imported ampfn."""
    installed = bool(_GUARD)
    if installed:
        _GUARD.pop().remove()
    try:
        yield
    finally:
        if installed:
            install_guard()


# ------------------------------------------------------------------ shared bookkeeping


def stack_found(
    per_device: list[list[torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """One found_inf per optimizer (summed over its devices), stacked on ``device``."""
    zero = torch.zeros((), device=device)
    return torch.stack([sum((t.to(device) for t in ts), zero) for ts in per_device])


def times(grads: tuple[torch.Tensor, ...], factor: Any) -> tuple[torch.Tensor, ...]:
    """Each gradient times ``factor``; a None (``allow_unused``) stays None."""
    return tuple(g if g is None else g * factor for g in grads)


def _grads(optimizer: Any) -> list[torch.Tensor]:
    return [
        p.grad
        for g in optimizer.param_groups
        for p in g["params"]
        if p.grad is not None
    ]


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


def resolve_sync_ranks(sync_ranks: bool | None, api: str) -> bool | None:
    """Validate ``sync_ranks`` at construction (None: decided at the first step)."""
    if sync_ranks is not None and not isinstance(sync_ranks, bool):
        raise TypeError(
            f"{api}: sync_ranks must be a bool or None, got {type(sync_ranks).__name__}"
        )
    if sync_ranks:
        from ampfn._distributed import world_size

        if world_size() < 1:
            raise ValueError(
                f"{api}: sync_ranks=True needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group), and there is none"
            )
    return sync_ranks


class Scaling:
    """What every loss-scaling implementation tracks between calls and updates.

    Per update (until the scale updates): whether ``ampfn.backward`` ran, the optimizers
    unscaled in this call (``unscaled``) and in earlier calls without a step (``stale``),
    and those whose skip decision is final (``agreed``). Per call: the optimizers
    stepped. Around ``optimizer.step``: ``sanctioned`` (ampfn itself is stepping),
    ``called`` and ``found`` (what the guard hook saw).
    """

    per_backward = False  # True: unscale after each backward (Apex's way)
    sync_free = False  # True: with_grad_scaling(sync=False)
    direct = False  # True: the engine scales the loss with self.scaler.scale itself

    def __init__(self, api: str, sync_ranks: bool | None) -> None:
        self.api = api
        self.sync_ranks = sync_ranks
        self.seen_backward = False
        self.unscaled: dict[int, Any] = {}
        self.stale: dict[int, Any] = {}
        self.agreed: set[int] = set()
        self.stepped: set[int] = set()
        self.checked: set[int] = set()  # optimizers whose gradients were checked once
        self.any_step = False
        self.sanctioned = False
        self.called = False
        self.found: torch.Tensor | None = None
        install_guard()

    # --- checks ---------------------------------------------------------------------

    def check_step(self, optimizer: Any) -> None:
        if not self.seen_backward:
            raise RuntimeError(
                f"ampfn.step(optimizer): no ampfn.backward ran under {self.api} since the last "
                "update, so the gradients were not made with the loss scale this step unscales by "
                "(was loss.backward() called directly?); call ampfn.backward(loss) instead"
            )
        if id(optimizer) in self.stepped:
            raise RuntimeError(
                "ampfn.step(optimizer): this optimizer already stepped in this call; under loss "
                "scaling each optimizer steps at most once per call of the wrapped step"
            )
        if id(optimizer) not in self.checked:
            from ampfn._distributed import check_sharded_grads

            check_sharded_grads(
                optimizer,
                getattr(self, "scaler", None),
                self.api,
                sync_free=self.sync_free,
            )
            self.checked.add(id(optimizer))

    def restart_or_refuse(self) -> None:
        """Before a backward: unscaled gradients must not be mixed with scaled ones.

        Optimizers unscaled in an earlier call that did not step start a fresh update if
        their gradients were cleared since; otherwise the backward is an error.
        """
        if self.unscaled:
            raise RuntimeError(_BACKWARD_AFTER_UNSCALE)
        for optimizer in list(self.stale.values()):
            grads = _grads(optimizer)
            if not grads:
                self.restart(optimizer)
                continue
            if all(not bool(g.any()) for g in grads):
                raise RuntimeError(
                    "ampfn.backward(loss): this optimizer's gradients were unscaled (by ampfn.unscale_ "
                    "or ampfn.clip_grad_norm_) in an earlier call that did not step, and they were "
                    "zeroed in place since, not cleared, so ampfn cannot tell a fresh update from "
                    "gradients to accumulate; clear them with optimizer.zero_grad(set_to_none=True), "
                    "or call ampfn.step(optimizer) in the call that unscales"
                )
            raise RuntimeError(
                "ampfn.backward(loss): this optimizer's gradients were unscaled (by ampfn.unscale_ or "
                "ampfn.clip_grad_norm_) in an earlier call that did not step, and this backward would "
                "add scaled gradients to them; step that optimizer first, or clear its gradients "
                "(optimizer.zero_grad()) to start a fresh update"
            )

    def restart(self, optimizer: Any) -> None:
        """A fresh update for an optimizer unscaled in an earlier call that did not step,
        whose gradients were cleared since."""
        self.forget(optimizer)

    def forget(self, optimizer: Any) -> None:
        """Drop an unscale that did not lead to a step (a fresh update begins)."""
        key = id(optimizer)
        self.stale.pop(key, None)
        self.unscaled.pop(key, None)
        self.agreed.discard(key)

    def stepped_now(self, optimizer: Any) -> None:
        key = id(optimizer)
        self.stepped.add(key)
        self.any_step = True
        self.unscaled.pop(key, None)
        self.stale.pop(key, None)

    def end_call(self, failed: bool, updated: bool) -> None:
        if updated:
            self.seen_backward = False
            self.unscaled.clear()
            self.stale.clear()
            self.agreed.clear()
        elif failed:
            for optimizer in list(self.unscaled.values()):
                self.forget(optimizer)
        elif self.unscaled:
            self.stale.update(self.unscaled)
            self.unscaled.clear()
        self.stepped.clear()
        self.any_step = False

    def ranks(self) -> bool:
        """Whether skip decisions are all-reduced across ranks (decided once, lazily)."""
        if self.sync_ranks is None:
            from ampfn._distributed import world_size

            self.sync_ranks = world_size() > 1
            if self.sync_ranks:
                self.check_ranks()
        return self.sync_ranks

    def check_ranks(self) -> None:
        """Raise if this scaler cannot be made to agree across ranks."""


class ScalerState(Scaling):
    """Scaling whose state is a GradScaler's (or an object with its interface)."""

    scaler: Any

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

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


# ------------------------------------------------------------------ GradScaler, public API


class GradScalerScaling(ScalerState):
    """Loss scaling through a GradScaler's public methods (``with_grad_scaling()``).

    ``ampfn.step`` reports a skip from what the guard hook saw: a non-fused optimizer's
    step ran or did not, and a fused optimizer took the ``found_inf`` the scaler handed
    it. With ``together`` (``with_apex``), an overflow in any of those optimizers skips
    them all, and ``bounds`` clamp the scale after each update (Apex's floor and ceiling).
    """

    def __init__(
        self,
        api: str,
        scaler: Any,
        *,
        sync_ranks: bool | None = None,
        together: tuple[Any, ...] = (),
        bounds: tuple[float | None, float | None] | None = None,
    ) -> None:
        super().__init__(api, sync_ranks)
        self.scaler = scaler
        self.direct = True
        self.together = together if len(together) > 1 else ()
        self.bounds = bounds

    def check_ranks(self) -> None:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        if isinstance(self.scaler, ShardedGradScaler):
            self.sync_ranks = False  # it all-reduces found_inf in unscale_ itself
        elif not isinstance(getattr(self.scaler, "_per_optimizer_states", None), dict):
            raise TypeError(
                f"{self.api}: torch.distributed runs several ranks, and ampfn makes them take the "
                f"same skip decisions through torch.amp.GradScaler's per-optimizer state, which "
                f"{type(self.scaler).__name__} lacks; pass a torch.amp.GradScaler, or sync_ranks=False "
                "if your scaler makes the ranks agree itself"
            )

    def restart(self, optimizer: Any) -> None:
        if not isinstance(getattr(self.scaler, "_per_optimizer_states", None), dict):
            raise RuntimeError(
                f"ampfn.backward(loss): {self.api} cannot start a fresh update for an optimizer "
                "unscaled (by ampfn.unscale_ or ampfn.clip_grad_norm_) in an earlier call that "
                f"did not step: {type(self.scaler).__name__} has only GradScaler's public methods, "
                "and its unscale_ refuses a second call before update(), which ampfn cannot reset; "
                "call ampfn.step(optimizer) in the call that unscales, or pass a torch.amp.GradScaler"
            )
        super().restart(optimizer)

    def forget(self, optimizer: Any) -> None:
        super().forget(optimizer)
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if isinstance(states, dict):
            states.pop(id(optimizer), None)

    # --- the effects --------------------------------------------------------------------

    def scale(self, loss: torch.Tensor, loss_id: int) -> torch.Tensor:
        return self.scaler.scale(loss)  # type: ignore[no-any-return]

    def grad(
        self, outputs: Any, inputs: Any, loss_id: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        """PyTorch's gradient-penalty recipe: grad of the scaled outputs, times 1/scale."""
        grads = torch.autograd.grad(self.scaler.scale(outputs), inputs, **kwargs)
        inv_scale = 1.0 / self.scaler.get_scale()
        return times(grads, inv_scale)  # allow_unused gives None

    def unscale(self, optimizer: Any) -> None:
        key = id(optimizer)
        if key not in self.unscaled and key not in self.stale:
            self.scaler.unscale_(optimizer)
            self.unscaled[key] = optimizer

    def step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bool:
        if args or kwargs:
            refuse_closure(self.api, args, kwargs)
        key = id(optimizer)
        if not self.seen_backward or key in self.stepped or key not in self.checked:
            self.check_step(optimizer)
        if self.together or (self.sync_ranks is not False and self.ranks()):
            self.agree(optimizer)
        duck = not isinstance(optimizer, torch.optim.Optimizer)
        if (
            duck
        ):  # a wrapper whose step may not run a torch optimizer's hooks: look ourselves
            self.unscale(optimizer)
            overflow = any(not bool(g.isfinite().all()) for g in _grads(optimizer))
        self.sanctioned, self.called, self.found = True, False, None
        try:
            self.scaler.step(optimizer, *args, **kwargs)
        finally:
            self.sanctioned = False
        self.stepped.add(key)
        self.any_step = True
        if self.unscaled:
            self.unscaled.pop(key, None)
        if self.stale:
            self.stale.pop(key, None)
        if duck:
            return not overflow
        found, self.found = self.found, None
        if found is not None:  # a fused optimizer stepped with the scaler's found_inf
            return self.called and not bool(found)
        return self.called

    def agree(self, optimizer: Any) -> None:
        """Make this update's skip decisions final: one found_inf per optimizer, combined
        across ``together`` and all-reduced (MAX) across ranks, in one collective, written
        back into the scaler so that its step and update follow them."""
        pending = {**self.unscaled, **self.stale}
        targets = {id(o): o for o in (*self.together, *pending.values(), optimizer)}
        targets = {k: o for k, o in targets.items() if k not in self.agreed}
        if not targets:
            return
        for o in targets.values():
            self.unscale(o)
        states = self.scaler._per_optimizer_states
        per_device = [list(states[k]["found_inf_per_device"].values()) for k in targets]
        found = stack_found(per_device, self.scaler._scale.device)
        if self.together:
            found = found.amax().expand(len(per_device)).clone()
        if self.sync_ranks:
            from ampfn._distributed import all_reduce_max

            all_reduce_max(found)
        for i, ts in enumerate(per_device):
            for t in ts:
                t.copy_(found[i])
        self.agreed.update(targets)

    def finish(self, failed: bool) -> None:
        """End one call: update the scale once if anything stepped (after an exception
        too, never hiding the step's own exception behind the scaler's)."""
        if not self.any_step:
            if failed:
                states = getattr(self.scaler, "_per_optimizer_states", None)
                if isinstance(states, dict):
                    for key in self.unscaled:
                        states.pop(key, None)
            self.end_call(failed, False)
            return
        try:
            self.scaler.update()
            if self.bounds is not None and self.scaler._scale is not None:
                self.scaler._scale.clamp_(*self.bounds)
        except Exception:
            if not failed:
                raise
        # end_call(failed, updated=True), inline: this runs after every step
        self.seen_backward = self.any_step = False
        self.stepped.clear()
        if self.unscaled:
            self.unscaled.clear()
        if self.stale:
            self.stale.clear()
        if self.agreed:
            self.agreed.clear()


def default_scaler() -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` for CUDA when available, else the CPU.

    It is correct for FSDP2's DTensor gradients too: its unscale kernel runs on DTensors,
    whose found_inf is reduced over the mesh (tests/test_distributed.py)."""
    return torch.amp.GradScaler(default_device_type())


@factory()
def with_grad_scaling(
    scaler: Any = None, *, sync: bool = True, sync_ranks: bool | None = None
) -> Transform:
    """Dynamic loss scaling: scale the loss, skip steps with inf/NaN gradients, adapt.

    Inside the wrapped step, ``ampfn.backward`` backpropagates ``scaler.scale(loss)``;
    ``ampfn.unscale_`` and ``ampfn.clip_grad_norm_`` unscale an optimizer's gradients
    once per update; ``ampfn.step`` calls ``scaler.step`` and returns False when it
    skipped the step (each optimizer on its own overflow, as GradScaler decides).
    ``scaler.update()`` runs once at the end of each call in which at least one optimizer
    stepped (after all of them), so gradient accumulation (calls with backward and no
    step) and several optimizers work as in PyTorch's AMP examples.

    Inside a scaled step, calling ``optimizer.step()`` directly is an error (raised before
    any parameter changes), and so is ``ampfn.step`` when no ``ampfn.backward`` ran since
    the last update. Unscaling in a call that does not step is allowed: the next call may
    step, or clear the gradients (``zero_grad()``) to start afresh (which needs a
    ``torch.amp.GradScaler``: a scaler with only its public methods cannot forget an
    unscale, and the next backward says so).

    Args:
        scaler: a ``torch.amp.GradScaler`` or an object with its interface (such as
            FSDP's ``ShardedGradScaler``). None creates ``torch.amp.GradScaler`` for
            "cuda" when CUDA is available, else "cpu" (correct for FSDP2 too).
        sync: True: ``ampfn.step`` returns a Python bool, which reads the overflow flag
            back from the device. False (sync-free): no effect reads a value back;
            ``ampfn.step`` returns a 0-dim bool tensor, the skip happens on the device
            (fused optimizers take ``found_inf``; others get a masked update, which costs
            one copy of their parameters and optimizer state per step), and the scale
            updates on the device. Needs fp32 gradients (fp16 ones are a ValueError, as
            in GradScaler) and a ``torch.amp.GradScaler``, whose state stays
            the authority: its ``get_scale()`` and ``state_dict()`` are what a syncing run
            shows. Traces under ``torch.compile`` without GradScaler's graph breaks.
        sync_ranks: make every rank take the same skip decision when
            ``torch.distributed`` runs several ranks: ``found_inf`` is all-reduced (MAX)
            on the device before the skip is decided. None: when a process group of
            more than one rank is initialized. False: never (a scaler that agrees by
            itself, or one rank). Costs one small all-reduce per ``ampfn.step`` of an
            optimizer not yet agreed on in this update: one in all for one optimizer,
            or for several optimizers all unscaled (``ampfn.unscale_`` or
            ``ampfn.clip_grad_norm_``) before the first step; otherwise one per
            optimizer, since ampfn cannot know a later optimizer's gradients at the
            first step without unscaling them early.

    Returns:
        A stateful transform: ``ampfn.state_dict`` of a wrapped step includes the scaler.

    Raises:
        TypeError: ``scaler`` lacks GradScaler's methods, or ``sync=False`` with a scaler
            that is not a ``torch.amp.GradScaler``.
        ValueError: ``sync_ranks=True`` with no process group; at the first step,
            ``sync=False`` with fp16 gradients.

    Example:
        >>> import torch, ampfn
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        >>> @ampfn.compose(ampfn.with_grad_scaling(scaler), ampfn.with_autocast("fp16", "cpu"))
        ... def train_step(x):
        ...     loss = model(x).float().pow(2).mean()
        ...     ampfn.backward(loss)
        ...     stepped = ampfn.step(opt)
        ...     opt.zero_grad(set_to_none=True)
        ...     return stepped
        >>> train_step(torch.randn(8, 4))
        True
    """
    api = "with_grad_scaling(scaler, *, sync, sync_ranks)"
    if scaler is None:
        scaler = default_scaler()
    missing = [m for m in INTERFACE if not callable(getattr(scaler, m, None))]
    if missing:
        raise TypeError(
            "with_grad_scaling(scaler): expected a torch.amp.GradScaler or an object with its interface; "
            f"{type(scaler).__name__} lacks {', '.join(missing)}"
        )
    if not isinstance(sync, bool):
        raise TypeError(f"{api}: sync must be a bool, got {type(sync).__name__}")
    sync_ranks = resolve_sync_ranks(sync_ranks, api)
    state: Scaling
    if sync:
        state = GradScalerScaling("with_grad_scaling", scaler, sync_ranks=sync_ranks)
        if sync_ranks:
            state.check_ranks()
    else:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"{api}: sync=False keeps the scale on the device inside a torch.amp.GradScaler, "
                f"and {type(scaler).__name__} is not one; pass a torch.amp.GradScaler or use sync=True"
            )
        from ampfn._devicescaling import SyncFreeScaling

        state = SyncFreeScaling("with_grad_scaling", scaler, sync_ranks=sync_ranks)
    return scaling_transform("with_grad_scaling", state)


def scaling_transform(name: str, state: Any, **fragment: Any) -> Transform:
    end: Callable[[bool], None] = state.finish
    tags = ["loss_scaling"]
    scaler = getattr(state, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and not _unscales_fp16(scaler):
        tags.append("fp32_grads_only")
    return Transform(
        name,
        fragment=Fragment(name, scaling=state, end=end, **fragment),
        tags=tags,
        state=state,
    )


def _unscales_fp16(scaler: torch.amp.GradScaler) -> bool:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return isinstance(scaler, ShardedGradScaler)


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
