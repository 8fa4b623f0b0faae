"""Layer 1, vocabulary: the words every other layer speaks.

- :data:`Step` and :data:`TransformFn`: a step is any callable, a transform maps a step
  to a step.
- :class:`Call`: one call of a wrapped step, as a value (see "A call leaves nothing
  half-done" in docs/architecture.md).
- The plan's parts, as Protocols: a loss :class:`Scaler`, :class:`Masters` (fp32 master
  weights), :class:`Rounding` (stochastic rounding), an :class:`Observer` (telemetry);
  and :class:`Stateful`, what a checkpointed part provides.
- :class:`Fragment`: what one transform contributes to a pipeline.
- :class:`Handler`: a user's effect handler; its methods are the effects' signatures.

Nothing here imports another ampfn module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeVar, Union

import torch

Step: TypeAlias = Callable[..., Any]
TransformFn: TypeAlias = Callable[[Step], Step]
# A torch.optim.Optimizer, or an optimizer-like wrapper (Apex's LARC): the user's object.
Optimizer: TypeAlias = Any
Params = Union[torch.Tensor, Iterable[torch.Tensor]]  # noqa: UP007 (a runtime alias)
Kwargs: TypeAlias = dict[str, Any]
# What ampfn.step returns: a bool, or a 0-dim bool tensor in sync-free scaling.
Stepped: TypeAlias = Union[bool, torch.Tensor]  # noqa: UP007
Grads: TypeAlias = tuple[Union[torch.Tensor, None], ...]  # noqa: UP007
S = TypeVar("S", contravariant=True)  # a scaler's per-call state


class Call:
    """One call of a wrapped step: what it has done so far, as a value.

    The outermost ampfn layer of a call makes it; nested layers share it. Each part with
    per-call state keeps that state here (``scaling``: the loss scaler's, ``record``:
    telemetry's) and commits it into its own long-lived state when its layer's call ends,
    or drops it when the call raised. So a call that fails anywhere leaves every
    pipeline as it was before the call.

    Attributes:
        plan: the plan active now (the union of the nested layers' plans).
        backward_seen: an ``ampfn.backward`` ran in this call.
        stepped: the optimizers stepped in this call, by ``id``.
        sanctioned: ampfn itself is stepping an optimizer now (the step guard lets only
            such steps through while the plan owns the step); ``ran`` and ``found``: what
            the guard saw of that step (it ran; the ``found_inf`` a fused optimizer took).
        scaling: the loss scaler's per-call state; record: telemetry's, by observer.
    """

    __slots__ = (
        "backward_seen",
        "found",
        "plan",
        "ran",
        "record",
        "sanctioned",
        "scaling",
        "stepped",
    )

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.backward_seen = False
        self.stepped: set[int] = set()
        self.sanctioned = False
        self.ran = False
        self.found: torch.Tensor | None = None
        self.scaling: Any = None
        self.record: Any = None


class Stateful(Protocol):
    """A part whose state ``ampfn.state_dict`` saves.

    ``check_state`` raises (``TypeError`` or ``ValueError``, naming what is wrong) for a
    state that ``load_state_dict`` could not load whole; it changes nothing. ``ampfn.
    load_state_dict`` checks every part first, then loads them all.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def check_state(self, state: object, /) -> None: ...

    def load_state_dict(self, state: dict[str, Any], /) -> None: ...


class Scaler(Protocol[S]):
    """Loss scaling: the one interface of ``ampfn._scaling``'s three scalers.

    ``S`` is the scaler's per-call state: ``begin`` makes it (into ``call.scaling``) when
    its layer's call starts, every effect then passes it back, and ``finish`` commits it
    into the scaler's long-lived state (its scale, growth tracker, pending backward) or,
    for a failed call, discards it.
    """

    api: str
    sync_free: bool

    def begin(self, call: Call) -> None: ...

    def scale(self, state: S, loss: torch.Tensor, loss_id: int) -> torch.Tensor: ...

    def after_backward(self, state: S, loss_id: int) -> None: ...

    def grad(
        self, state: S, outputs: Any, inputs: Any, loss_id: int, kwargs: Kwargs
    ) -> Grads: ...

    def unscale(self, state: S, optimizer: Optimizer) -> None: ...

    def step(
        self, state: S, optimizer: Optimizer, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Stepped: ...

    def true_gradients(self, state: S, params: list[torch.Tensor]) -> bool: ...

    def finish(self, call: Call, failed: bool) -> None: ...

    def loss_scale(self, loss_id: int = 0) -> float: ...


class Masters(Protocol):
    """fp32 master weights held by the optimizers in place of the model's parameters."""

    api: str

    def collect(self) -> None: ...

    def before_step(self, optimizer: Optimizer, backward_seen: bool) -> None: ...

    def after_step(self, optimizer: Optimizer, stepped: Stepped) -> None: ...

    def release(self, optimizer: Optimizer) -> None: ...

    def clip_params(self, parameters: Params) -> list[torch.Tensor]: ...

    def model_param_of(self, master: torch.Tensor) -> torch.Tensor | None: ...


class Rounding(Protocol):
    """Stochastic rounding of an optimizer's update into low-precision weights."""

    def before_step(self, optimizer: Optimizer) -> None: ...

    def after_step(self, optimizer: Optimizer) -> None: ...


class Observer(Protocol):
    """Telemetry: sees the built-in effects of a call, reports at its end."""

    def begin(self, call: Call) -> None: ...

    def before_backward(self, call: Call, loss_id: int) -> None: ...

    def on_step(
        self,
        call: Call,
        optimizer: Optimizer,
        stepped: Stepped,
        masters: tuple[Masters, ...],
    ) -> None: ...

    def on_clip(self, call: Call, norm: torch.Tensor) -> None: ...

    def finish(self, call: Call, failed: bool) -> None: ...


class Autocast(NamedTuple):
    """A ``torch.autocast`` region: device type, dtype and ``cache_enabled`` (None: torch's
    default)."""

    device_type: str
    dtype: torch.dtype
    cache_enabled: bool | None = None


InputCast: TypeAlias = Callable[
    [tuple[Any, ...], Kwargs], tuple[tuple[Any, ...], Kwargs]
]


@dataclasses.dataclass(frozen=True)
class Fragment:
    """One transform's part of a pipeline; every field but the name is optional.

    Around the call: ``autocast`` (the forward's region), ``inputs`` and ``outputs``
    (casts of the step's arguments and result; user objects, hence ``Any``), ``end``
    (work at the end of each call, told whether it failed). The built-in effects:
    ``autocast_off`` (the device type whose autocast backward, grad, clipping and step
    leave off), ``scaling``, ``masters``, ``rounding``, ``step_via`` (in place of
    ``optimizer.step``), ``after_step`` (after each step that may have changed
    weights), ``observer``, ``unit_scale`` (owns loss scaling with a static scale of
    1.0: Apex O0 and O3), and a user's ``handler``.
    """

    name: str
    autocast: Autocast | None = None
    inputs: InputCast | None = None
    outputs: Callable[[Any], Any] | None = None
    end: Callable[[Call, bool], None] | None = None
    autocast_off: str | None = None
    scaling: Scaler[Any] | None = None
    masters: Masters | None = None
    rounding: Rounding | None = None
    step_via: Callable[..., None] | None = None
    after_step: Callable[[Optimizer], None] | None = None
    observer: Observer | None = None
    unit_scale: bool = False
    handler: Handler | None = None

    def around(self) -> tuple[str, ...]:
        """The around-the-call slots this fragment fills (two fragments filling the same
        slot go in separate wrappers)."""
        return tuple(
            s for s in ("autocast", "inputs", "outputs") if getattr(self, s) is not None
        )

    def stateful(self) -> bool:
        """Whether the fragment keeps state across calls (re-entering its step is refused)."""
        return any(
            x is not None
            for x in (self.scaling, self.masters, self.rounding, self.observer)
        )


class Handler:
    """Your own effect handler: subclass it and override the effects you need.

    A handler method receives ``proceed``, the rest of the chain, and the effect's
    arguments; it may act before and after calling ``proceed``, change the arguments,
    or not call it at all. Handlers run from the outermost transform to the innermost,
    like middleware, and around ampfn's own work: the last ``proceed`` runs the
    pipeline's built-in effects (autocast off, loss scaling, master weights, ...) as one
    fixed sequence. So a handler sees the loss before it is scaled and the result of a
    step after a skip. Methods it does not override cost nothing. A handler's own code
    runs in the step's context (under the forward's autocast, if any); only what it
    proceeds to runs with autocast off.

    Install one with :func:`ampfn.with_handler`.

    Example:
        >>> import torch, ampfn
        >>> class CountSteps(ampfn.Handler):
        ...     def __init__(self):
        ...         self.steps = 0
        ...     def step(self, proceed, optimizer, args, kwargs):
        ...         stepped = proceed(optimizer, args, kwargs)
        ...         self.steps += bool(stepped)
        ...         return stepped
        >>> counter = CountSteps()
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> @ampfn.with_handler(counter)
        ... def train_step(x):
        ...     ampfn.backward((w * x).sum())
        ...     return ampfn.step(opt)
        >>> train_step(torch.ones(1)), counter.steps
        (True, 1)
    """

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: Kwargs
    ) -> None:
        proceed(loss, kwargs)

    def grad(
        self,
        proceed: Callable[..., Grads],
        outputs: Any,
        inputs: Any,
        kwargs: Kwargs,
    ) -> Grads:
        return proceed(outputs, inputs, kwargs)

    def step(
        self,
        proceed: Callable[..., Stepped],
        optimizer: Optimizer,
        args: tuple[Any, ...],
        kwargs: Kwargs,
    ) -> Stepped:
        return proceed(optimizer, args, kwargs)

    def unscale_(self, proceed: Callable[..., None], optimizer: Optimizer) -> None:
        proceed(optimizer)

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Optimizer,
        kwargs: Kwargs,
    ) -> torch.Tensor:
        return proceed(parameters, max_norm, optimizer, kwargs)


EFFECTS = ("backward", "grad", "step", "unscale_", "clip_grad_norm_")
