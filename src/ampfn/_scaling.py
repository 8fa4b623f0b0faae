"""``with_grad_scaling``: dynamic loss scaling through the effects."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ampfn._autocast import default_device_type
from ampfn._core import Transform
from ampfn._effects import HANDLERS, Handler, Params

_INTERFACE = (
    "scale",
    "unscale_",
    "step",
    "update",
    "get_scale",
    "state_dict",
    "load_state_dict",
)


def _bump(cell: list[int], optimizer: Any, args: Any, kwargs: Any) -> None:
    cell[0] += 1


class ScalingState:
    """A scaler plus what ampfn tracks about it between updates (the transform's state).

    ``pending`` holds the ids of optimizers unscaled since the last update that have not
    stepped yet; ``counters`` count each optimizer's real steps through a step post-hook,
    which tells a skipped step from a taken one without a device sync.
    """

    __slots__ = ("counters", "pending", "scaler", "stepped")

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self.pending: set[int] = set()
        self.stepped: set[int] = (
            set()
        )  # ids of optimizers stepped since the last update
        # id(optimizer) -> (weak reference, step count): cheaper to read on every step
        # than a WeakKeyDictionary.
        self.counters: dict[int, tuple[weakref.ref[Any], list[int]]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def unscale(self, optimizer: Any) -> None:
        if id(optimizer) not in self.pending:
            self.scaler.unscale_(optimizer)
            self.pending.add(id(optimizer))

    def step(self, optimizer: Any) -> bool:
        entry = self.counters.get(id(optimizer))
        if entry is not None and entry[0]() is optimizer:
            cell: list[int] | None = entry[1]
        else:
            cell = self._hook(optimizer)
        if id(optimizer) in self.stepped:
            raise RuntimeError(
                "ampfn.step(optimizer): this optimizer already stepped in this call; under loss "
                "scaling each optimizer steps at most once per call of the wrapped step"
            )
        before = cell[0] if cell is not None else 0
        self.scaler.step(optimizer)
        self.stepped.add(id(optimizer))
        self.pending.discard(id(optimizer))
        if cell is not None:
            return cell[0] != before
        # Fused optimizers (and ones without hooks) step inside the scaler: ask it.
        per_optimizer = getattr(self.scaler, "_per_optimizer_states", {})
        found = per_optimizer.get(id(optimizer), {}).get("found_inf_per_device", {})
        return not any(v.item() for v in found.values())

    def _hook(self, optimizer: Any) -> list[int] | None:
        """Count ``optimizer``'s real steps with a post-hook (once per optimizer)."""
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None or getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        cell = [0]
        register(functools.partial(_bump, cell))
        key, counters = id(optimizer), self.counters
        counters[key] = (
            weakref.ref(optimizer, lambda _: counters.pop(key, None)),
            cell,
        )
        return cell

    def finish(self, stepped: bool, failed: bool) -> None:
        """End one call of the wrapped step: update once if anything stepped. After an
        exception, drop any half-done unscale too, so the next call starts clean, and
        never hide the step's own exception behind the scaler's."""
        if stepped:
            try:
                self.scaler.update()
            except Exception:
                if not failed:
                    raise
        if failed:
            per_optimizer = getattr(self.scaler, "_per_optimizer_states", None)
            if per_optimizer is not None:
                per_optimizer.clear()
        if stepped or failed:
            self.pending.clear()
            self.stepped.clear()


class _ScalingCall(Handler):
    """The handlers for one call of a loss-scaled step."""

    __slots__ = ("state", "stepped")

    def __init__(self, state: ScalingState) -> None:
        self.state = state
        self.stepped = False

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        if self.state.pending:
            raise RuntimeError(
                "ampfn.backward(loss): called after ampfn.unscale_ or ampfn.clip_grad_norm_ and before "
                "ampfn.step in the same update, which would mix scaled and unscaled gradients; run every "
                "backward first, then unscale or clip, then step"
            )
        proceed(self.state.scaler.scale(loss), kwargs)

    def step(self, proceed: Callable[..., bool], optimizer: Any) -> bool:
        self.stepped = True
        return self.state.step(optimizer)

    def unscale_(self, proceed: Callable[..., None], optimizer: Any) -> None:
        self.state.unscale(optimizer)
        proceed(optimizer)

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Any,
        norm_type: float,
    ) -> torch.Tensor:
        self.state.unscale(optimizer)
        return proceed(parameters, max_norm, optimizer, norm_type)


def scaling_transform(name: str, scaler: Any) -> Transform:
    """The transform behind ``with_grad_scaling`` (also used by apex O1/O2)."""
    state = ScalingState(scaler)

    def wrap(step: Callable[..., Any]) -> Callable[..., Any]:
        def scaled_step(*args: Any, **kwargs: Any) -> Any:
            call = _ScalingCall(state)
            token = HANDLERS.set((*HANDLERS.get(), call))
            failed = True
            try:
                out = step(*args, **kwargs)
                failed = False
                return out
            finally:
                HANDLERS.reset(token)
                state.finish(call.stepped, failed)

        return scaled_step

    return Transform(name, wrap, tags=("loss_scaling",), state=state)


def with_grad_scaling(scaler: Any = None) -> Transform:
    """Dynamic loss scaling: scale the loss, skip steps with inf/NaN gradients, adapt.

    Inside the wrapped step, ``ampfn.backward`` backpropagates ``scaler.scale(loss)``;
    ``ampfn.unscale_`` and ``ampfn.clip_grad_norm_`` unscale an optimizer's gradients
    once per update; ``ampfn.step`` calls ``scaler.step`` and returns False when it
    skipped the step. ``scaler.update()`` runs once at the end of each call in which at
    least one optimizer stepped (after all of them), so gradient accumulation (calls with
    backward and no step) and several optimizers work as in PyTorch's AMP examples.

    Args:
        scaler: a ``torch.amp.GradScaler`` or an object with its interface (such as
            FSDP's ``ShardedGradScaler``). None creates ``torch.amp.GradScaler`` for
            "cuda" when CUDA is available, else "cpu".

    Returns:
        A stateful transform: ``ampfn.state_dict`` of a wrapped step includes the scaler.

    Raises:
        TypeError: ``scaler`` lacks GradScaler's methods.

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
    if scaler is None:
        scaler = torch.amp.GradScaler(default_device_type())
    missing = [m for m in _INTERFACE if not callable(getattr(scaler, m, None))]
    if missing:
        raise TypeError(
            "with_grad_scaling(scaler): expected a torch.amp.GradScaler or an object with its interface; "
            f"{type(scaler).__name__} lacks {', '.join(missing)}"
        )
    return scaling_transform("with_grad_scaling", scaler)


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


class BoundedScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` following Apex's loss-scale law.

    Dynamic (``loss_scale="dynamic"``): start at ``min(2**16, max_scale)``, halve on
    overflow but never below ``min_scale`` (when set), double after 2000 clean steps but
    never above ``max_scale``. Static (a number): the scale never changes and, as in
    Apex, a step is never skipped. fp16 gradients may be unscaled (Apex O2 without
    master weights, O3 with a loss scale), which plain GradScaler refuses.
    """

    def __init__(
        self,
        device: str,
        loss_scale: float | str,
        min_scale: float | None,
        max_scale: float,
        *,
        init_scale: float = 2.0**16,
        window: int = 2000,
    ) -> None:
        self.dynamic = loss_scale == "dynamic"
        init = min(init_scale, max_scale) if self.dynamic else float(loss_scale)
        super().__init__(
            device,
            init_scale=init,
            growth_interval=window,
            enabled=self.dynamic or init != 1.0,
        )
        self.min_scale = min_scale or None  # Apex: a floor of 0 is no floor
        self.max_scale = max_scale

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        if not self.dynamic:
            self._per_optimizer_states.clear()
            return
        super().update(new_scale)
        if self._scale is not None:
            self._scale.clamp_(min=self.min_scale, max=self.max_scale)

    def _maybe_opt_step(
        self, optimizer: Any, optimizer_state: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        if self.dynamic:
            return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        return optimizer.step(*args, **kwargs)

    def _unscale_grads_(
        self,
        optimizer: Any,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> Any:
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)
