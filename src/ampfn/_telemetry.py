"""Layer 5, transform: ``with_telemetry``, what precision did in each call of a step, as ``StepRecord`` values.

The transform observes the pipeline's built-in effects (see ``ampfn._engine``): the loss
scale a backward is about to use, each ``ampfn.step`` result, the norm
``ampfn.clip_grad_norm_`` returned, and on a skipped step which gradients were not
finite. A recorded call keeps what it saw in ``call.record``; at the end of every
``every``-th call one record goes to the sink, after the loss scaler committed the call.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ampfn._scaling import scale_of
from ampfn._transform import Transform, factory
from ampfn._types import Call, Fragment, Masters, Optimizer, Stepped


class StepRecord(NamedTuple):
    """One call of a wrapped step, as :func:`with_telemetry` saw it.

    Attributes:
        step: the call's number, from 0, per pipeline.
        loss_scale: the scale that call's backward used (None without a loss scaler);
            a change made by the call's update shows in the next record.
        stepped: one entry per ``ampfn.step`` in the call, in order (False: skipped).
        grad_norm: what ``ampfn.clip_grad_norm_`` returned, if it was called.
        nonfinite: on a skipped step, the parameters whose gradients were inf or NaN.

    Example:
        >>> import ampfn
        >>> ampfn.StepRecord(step=0, loss_scale=65536.0, stepped=(True,), grad_norm=None, nonfinite=())
        StepRecord(step=0, loss_scale=65536.0, stepped=(True,), grad_norm=None, nonfinite=())
    """

    step: int
    loss_scale: float | None
    stepped: tuple[bool, ...]
    grad_norm: float | None
    nonfinite: tuple[str, ...]

    @property
    def skipped(self) -> bool:
        """Whether any ``ampfn.step`` of the call was skipped."""
        return not all(self.stepped)


_UNSET: Any = object()


class _Seen:
    """What one recorded call saw (its ``call.record``)."""

    __slots__ = ("nonfinite", "norm", "scale", "stepped")

    def __init__(self) -> None:
        self.scale: Any = _UNSET
        self.stepped: list[bool] = []
        self.norm: torch.Tensor | None = None
        self.nonfinite: list[str] = []


class Telemetry:
    """The observer: what each recorded call saw goes into ``call.record`` (by observer:
    a pipeline may have several), and out to the sink when the call ends; only the call
    count is kept between calls."""

    __slots__ = ("count", "every", "names", "sink")

    def __init__(
        self, sink: Callable[[StepRecord], Any], names: dict[int, str], every: int
    ) -> None:
        self.sink, self.names, self.every = sink, names, every
        self.count = 0

    def begin(self, call: Call) -> None:
        if self.count % self.every == 0:
            if call.record is None:
                call.record = {}
            call.record[self] = _Seen()

    def _seen(self, call: Call) -> _Seen | None:
        records = call.record
        return None if records is None else records.get(self)

    def before_backward(self, call: Call, loss_id: int) -> None:
        seen = self._seen(call)
        if seen is not None and seen.scale is _UNSET:
            engine = call.plan.engine
            seen.scale = scale_of(engine.scaling, engine.unit_scale, loss_id)

    def on_step(
        self,
        call: Call,
        optimizer: Optimizer,
        stepped: Stepped,
        masters: tuple[Masters, ...],
    ) -> None:
        seen = self._seen(call)
        if seen is not None:
            took = bool(stepped)
            seen.stepped.append(took)
            if not took:
                seen.nonfinite.extend(self._nonfinite(optimizer, masters))

    def on_clip(self, call: Call, norm: torch.Tensor) -> None:
        seen = self._seen(call)
        if seen is not None:
            seen.norm = norm

    def _nonfinite(
        self, optimizer: Optimizer, masters: tuple[Masters, ...]
    ) -> list[str]:
        """Names of the parameters with inf/NaN gradients (only ever on a skipped step)."""
        out = []
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                local = g.to_local() if hasattr(g, "to_local") else g
                if bool(local.isfinite().all()):
                    continue
                model_param = next(
                    (q for m in masters if (q := m.model_param_of(p)) is not None), p
                )
                out.append(self.names.get(id(model_param), f"param_groups[{i}][{j}]"))
        return out

    def finish(self, call: Call, failed: bool) -> None:
        seen = call.record.pop(self, None) if call.record else None
        count = self.count
        self.count += 1
        if seen is not None and not failed:
            scale = None if seen.scale is _UNSET else seen.scale
            fields = (
                count,
                None if scale is None else float(scale),
                tuple(seen.stepped),
                None if seen.norm is None else float(seen.norm),
                tuple(dict.fromkeys(seen.nonfinite)) if seen.nonfinite else (),
            )
            # StepRecord(*fields) without the Python frame of a NamedTuple's __new__
            self.sink(tuple.__new__(StepRecord, fields))


_CALL_IT = (
    "ampfn.with_telemetry is a transform factory, not a transform: call it: "
    "@ampfn.with_telemetry(sink)"
)


def _cannot_take_a_record(sink: Callable[..., Any]) -> str | None:
    """How ``sink`` is called, if it cannot be called with one record (else None)."""
    try:
        sig = inspect.signature(sink)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell
        return None
    try:
        sig.bind(None)
    except TypeError:
        bare = sig.replace(
            parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
            return_annotation=sig.empty,
        )
        return f"{getattr(sink, '__name__', type(sink).__name__)}{bare}"
    return None


class TelemetryTransform(Transform):
    """The transform :func:`with_telemetry` returns.

    Its sink may be any function, so ``@ampfn.with_telemetry`` put on a step without
    calling it takes the step as the sink, and binds the step's name to this transform.
    The first call of that name then hands it the step's arguments instead of a step: a
    tensor, a batch, a model, or several of them. Those are refused with the fix. A
    module can be a step (its forward may call the effects), so it is refused only where
    the sink is a plain function, the shape of that misuse; wrap such a module in a
    function to use it as the step.
    """

    __slots__ = ("function_sink",)
    function_sink: bool  # the sink is a plain function (set by with_telemetry)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hint = ""
        if len(args) != 1 or kwargs:
            got = f"{len(args)} arguments" + (
                f" and keywords {', '.join(kwargs)}" if kwargs else ""
            )
        elif not callable(args[0]):
            got = f"a {type(args[0]).__name__}"
        elif isinstance(args[0], nn.Module) and self.function_sink:
            got = f"a {type(args[0]).__name__} (a module)"
            hint = (
                " If the module is your step, wrap it in a function: "
                "with_telemetry(sink)(lambda batch: module(batch))."
            )
        else:
            return super().__call__(args[0])
        raise TypeError(
            f"with_telemetry(sink)(step): expected one step function, got {got}. Was "
            f"@ampfn.with_telemetry put on a step without calling it? {_CALL_IT}.{hint}"
        )


@factory(takes_functions=True)
def with_telemetry(
    sink: Any, *, model: nn.Module | None = None, every: int = 1
) -> Transform:
    """Record what precision does in each call of the step: scale, skips, norms, overflows.

    After each call whose number is a multiple of ``every`` (counted from 0 for this
    pipeline), ``sink`` receives a :class:`StepRecord`. It sees the loss scale of
    whichever scaler the pipeline has (``with_grad_scaling``, ``with_apex``, ...),
    wherever it sits in the pipeline. Which gradients were not finite is worked out only
    on skipped steps, so a normal step pays nothing for it. A recorded call reads the
    scale, the step results and the norm back from the device (sync-free scaling's
    tensors too): use ``every`` to record less often. Ready sinks are in
    ``ampfn.telemetry``.

    Args:
        sink: a callable taking a record, or a list to append records to.
        model: gives parameter names (``model.named_parameters()``) to the overflow
            report; without it they read ``param_groups[i][j]``.
        every: record every ``every``-th call.

    Returns:
        A transform.

    Raises:
        TypeError: ``sink`` is neither callable nor a list, or cannot be called with one
            record (``@ampfn.with_telemetry`` put on a step of two arguments without
            calling it); ``model`` is not a module. Put on a one-argument step without
            calling it, the factory makes that step the sink: the first call of the
            step then raises ``TypeError`` (it hands the transform a batch, not a step).
        ValueError: ``every`` is not a positive int.

    Example:
        >>> import torch, ampfn
        >>> records = []
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> @ampfn.compose(ampfn.with_telemetry(records), ampfn.with_grad_scaling(torch.amp.GradScaler("cpu")))
        ... def train_step(x):
        ...     ampfn.backward((w * x).sum())
        ...     ampfn.step(opt)
        ...     opt.zero_grad()
        >>> train_step(torch.ones(2)); train_step(torch.full((2,), float("inf")))
        >>> [(r.loss_scale, r.stepped, r.nonfinite) for r in records]
        [(65536.0, (True,), ()), (65536.0, (False,), ('param_groups[0][0]',))]
    """
    api = "with_telemetry(sink, *, model, every)"
    if isinstance(sink, list):
        sink = sink.append
    elif not callable(sink):
        raise TypeError(
            f"{api}: sink must be a callable taking a StepRecord, or a list, got {type(sink).__name__}"
        )
    else:
        called = _cannot_take_a_record(sink)
        if called is not None:
            raise TypeError(
                f"{api}: the sink {called} cannot be called with one StepRecord. If it is "
                f"your step: {_CALL_IT}"
            )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"{api}: model must be an nn.Module, got {type(model).__name__}"
        )
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{api}: every must be an int >= 1, got {every!r}")
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    observer = Telemetry(sink, names, every)
    transform = TelemetryTransform(
        "with_telemetry",
        fragment=Fragment("with_telemetry", observer=observer),
    )
    transform.function_sink = isinstance(sink, types.FunctionType)
    return transform
