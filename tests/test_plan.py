"""Plans: what each effect resolves to, and what that costs per call."""

from __future__ import annotations

import functools
import gc
import sys
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ampfn
from ampfn._plan import Plan
from ampfn._types import EFFECTS
from helpers import Batch, batches, mlp


class OnlyStep(ampfn.Handler):
    """Overrides one effect; passes the others through (the base class's methods)."""

    def __init__(self) -> None:
        self.steps = 0

    def step(
        self, proceed: Callable[..., Any], optimizer: Any, args: Any, kwargs: Any
    ) -> Any:
        self.steps += 1
        return proceed(optimizer, args, kwargs)


def pipelines(handler: ampfn.Handler | None) -> list[Any]:
    """The same pipelines, with and without ``handler`` among their transforms."""
    extra = [ampfn.with_handler(handler)] if handler is not None else []
    return [
        ampfn.compose(*extra, ampfn.with_grad_scaling()),
        ampfn.compose(*extra, ampfn.with_autocast("bf16", "cpu")),
        ampfn.compose(
            ampfn.with_grad_scaling(), *extra, ampfn.with_autocast("fp16", "cpu")
        ),
    ]


def plan_of(wrapped: Any) -> Plan:
    return wrapped.__ampfn_layer__.plan  # type: ignore[no-any-return]


def effects_of(plan: Plan) -> list[Any]:
    """What each effect calls, as (function, owner) so that two plans compare."""
    out = []
    for effect in EFFECTS:
        fn = getattr(plan, effect)
        owner = getattr(fn, "__self__", None)
        kind = "engine" if owner is plan.engine else type(owner).__name__
        out.append((effect, getattr(fn, "__func__", fn), kind))
    return [*out, ("plain_step", plan.plain_step, "")]


@pytest.mark.parametrize(
    "handler", [ampfn.Handler(), OnlyStep()], ids=["base", "only step"]
)
def test_a_pass_through_handler_takes_no_part_in_the_plan(
    handler: ampfn.Handler,
) -> None:
    """_chain: an effect the handler does not override resolves to exactly what it does
    without the handler (the engine's method, or the scaler's step), with no wrapper."""

    def step(batch: int) -> int:
        return batch

    for bare, with_handler in zip(pipelines(None), pipelines(handler), strict=True):
        ours, theirs = (
            effects_of(plan_of(with_handler(step))),
            effects_of(plan_of(bare(step))),
        )
        if isinstance(handler, OnlyStep):
            # the one overridden effect is a link of the chain; every other is untouched
            link = plan_of(with_handler(step)).step
            assert isinstance(link, functools.partial)
            assert link.func.__self__ is handler  # type: ignore[attr-defined]
            ours = [e for e in ours if e[0] not in ("step", "plain_step")]
            theirs = [e for e in theirs if e[0] not in ("step", "plain_step")]
        assert ours == theirs


def python_calls(fn: Callable[[], Any]) -> int:
    """How many Python functions ``fn()`` enters (C functions not counted)."""
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    gc.collect()  # no collection (and its weakref callbacks) inside the measured call
    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def test_a_pass_through_handler_adds_no_python_call_per_step() -> None:
    """Per call, a pipeline with a pass-through handler enters the same Python frames as
    the same pipeline without it; a handler that overrides ``step`` adds its own method
    to ``ampfn.step`` only."""
    data = batches(4)

    def counts(handler: ampfn.Handler | None) -> list[int]:
        out = []
        for transform in pipelines(handler):
            model = mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def train_step(b: Batch, model: Any = model, opt: Any = opt) -> None:
                ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
                ampfn.step(opt)
                opt.zero_grad(set_to_none=True)

            wrapped = transform(train_step)
            for b in data[:3]:  # warm: optimizer state, lazy imports, caches
                wrapped(b)
            out.append(python_calls(functools.partial(wrapped, data[3])))
        return out

    without = counts(None)
    assert counts(ampfn.Handler()) == without
    only_step = counts(OnlyStep())
    # OnlyStep.step, plus (where ampfn.step went straight to the optimizer or the
    # scaler) the engine's step that the chain now ends in
    assert all(0 < a - b <= 3 for a, b in zip(only_step, without, strict=True)), (
        only_step,
        without,
    )


def test_a_nested_step_builds_each_union_once_whatever_pipeline_calls_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An inner wrapped step called in turn from two outer pipelines: each union of plans
    is built once, not on every call (the cache held only the last outer plan)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records: list[ampfn.StepRecord] = []

    @ampfn.with_autocast("bf16", "cpu")
    def inner(b: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    # the outer transforms wrap a function of the user's, so they do not fuse with inner
    outer_a = ampfn.with_grad_scaling()(lambda b: inner(b))
    outer_b = ampfn.with_telemetry(records)(lambda b: inner(b))
    data = batches(6)
    outer_a(data[0])
    outer_b(data[1])
    built = {"plans": 0}
    init = Plan.__init__

    def counting(self: Plan, fragments: Any) -> None:
        built["plans"] += 1
        init(self, fragments)

    monkeypatch.setattr(Plan, "__init__", counting)
    for i, b in enumerate(data[2:]):
        (outer_a if i % 2 == 0 else outer_b)(b)
    assert built["plans"] == 0
    assert len(records) == 3  # the telemetry of outer_b saw inner's steps


def test_a_union_goes_with_its_outer_pipeline() -> None:
    """The cache of unions must not keep a discarded outer pipeline (and the master
    weights or scaler it holds) alive: it held up to 8 of them."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_autocast("bf16", "cpu")
    def inner(b: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    gone = []
    for b in batches(3):
        big = mlp()
        big_opt = torch.optim.SGD(big.parameters(), lr=0.1)
        policy = ampfn.with_policy("bf16-true", big, big_opt, master_weights=True)
        outer = policy(lambda b: inner(b))
        outer(b)
        gone.append(weakref.ref(big_opt))
        del outer, policy, big, big_opt
    gc.collect()  # frees the outer plans (and the cache entries, by their weakrefs)
    gc.collect()  # then the unions (an engine is in a reference cycle)
    assert [r() for r in gone] == [None, None, None]
    unions = plan_of(inner)._under
    assert len(unions) == 0


@pytest.mark.parametrize(
    "pipeline",
    ["scaling", "sync-free", "telemetry", "apex O2"],
)
def test_a_call_leaves_no_reference_cycle_behind(pipeline: str) -> None:
    """Each call's state is freed by reference counting when the call ends: a cycle
    (the call and its per-call state pointing at each other) made every scaled step pay
    for the cycle collector, about 100 µs per step on the tiny benchmark."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records: list[Any] = []
    transforms: dict[str, Callable[[], Callable[..., Any]]] = {
        "scaling": lambda: ampfn.with_grad_scaling(torch.amp.GradScaler("cpu")),
        "sync-free": lambda: ampfn.with_grad_scaling(
            torch.amp.GradScaler("cpu"), sync=False
        ),
        "telemetry": lambda: ampfn.compose(
            ampfn.with_telemetry(records.append),
            ampfn.with_grad_scaling(torch.amp.GradScaler("cpu")),
        ),
        "apex O2": lambda: ampfn.with_apex("O2", model, opt, backend="native"),
    }
    transform = transforms[pipeline]()

    @transform
    def train_step(batch: Batch) -> None:
        x, y = batch
        ampfn.backward(F.cross_entropy(model(x).float(), y))
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    data = batches(3)
    train_step(data[0])
    gc.collect()
    gc.disable()
    try:
        for b in data:
            train_step(b)
        assert gc.collect() == 0
    finally:
        gc.enable()
