"""with_telemetry and its sinks: step records wherever the transform sits."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ampfn
from ampfn import telemetry
from helpers import Batch, batches, mlp

SKIP_AT = 2


def gs() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)


def run(
    transform: Any,
    model: torch.nn.Module,
    opts: list[Any],
    n: int = 5,
    clip: bool = False,
) -> list[Any]:
    calls = {"i": 0}

    @transform
    def train_step(b: Batch) -> None:
        overflow = calls["i"] == SKIP_AT
        calls["i"] += 1
        loss = F.cross_entropy(model(b[0]).float(), b[1]) * (
            float("inf") if overflow else 1.0
        )
        ampfn.backward(loss)
        if clip:  # each optimizer's own parameters, with it (they are unscaled by it)
            for o in opts:
                params = [p for g in o.param_groups for p in g["params"]]
                ampfn.clip_grad_norm_(params, 1e9, o)
        for o in opts:
            ampfn.step(o)
            o.zero_grad(set_to_none=True)

    for b in batches(n):
        train_step(b)
    return [train_step]


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_records_follow_the_scaler_wherever_telemetry_sits(where: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records: list[ampfn.StepRecord] = []
    t = ampfn.with_telemetry(records, model=model)
    scaling = ampfn.with_grad_scaling(gs())
    pipeline = (
        ampfn.compose(t, scaling) if where == "outside" else ampfn.compose(scaling, t)
    )
    (step,) = run(pipeline, model, [opt])
    assert [r.step for r in records] == [0, 1, 2, 3, 4]
    # the scale each backward used; the update's change shows in the next record
    assert [r.loss_scale for r in records] == [1024.0, 1024.0, 2048.0, 1024.0, 1024.0]
    assert [r.stepped for r in records] == [
        (True,),
        (True,),
        (False,),
        (True,),
        (True,),
    ]
    assert [r.skipped for r in records] == [False, False, True, False, False]
    assert records[SKIP_AT].nonfinite == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert all(r.nonfinite == () for i, r in enumerate(records) if i != SKIP_AT)
    assert ampfn.loss_scale(step) == 2048.0


class HalvedScaler(torch.amp.GradScaler):
    """A subclass whose get_scale says something else: ampfn must ask it."""

    def get_scale(self) -> float:
        return super().get_scale() / 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.amp.GradScaler("cpu", init_scale=8.0),
        lambda: torch.amp.GradScaler("cpu", enabled=False),
        lambda: HalvedScaler("cpu", init_scale=8.0),
    ],
    ids=["GradScaler", "disabled", "subclass"],
)
def test_loss_scale_is_the_scalers_get_scale(make: Any) -> None:
    scaler = make()
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    records: list[ampfn.StepRecord] = []

    @ampfn.compose(ampfn.with_telemetry(records), ampfn.with_grad_scaling(scaler))
    def train_step(x: torch.Tensor) -> None:
        ampfn.backward((w * x).sum())
        ampfn.step(opt)
        opt.zero_grad()

    seen = [ampfn.loss_scale(train_step)]
    expected = [scaler.get_scale()]  # before the first step too (no scale tensor yet)
    for x in (1.0, float("inf"), 1.0):
        train_step(torch.full((2,), x))
        seen.append(ampfn.loss_scale(train_step))
        expected.append(scaler.get_scale())
    assert seen == expected
    assert [r.loss_scale for r in records] == expected[:-1]


def test_every_and_grad_norm_and_names_without_a_model() -> None:
    model = mlp()
    opts = [
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        torch.optim.SGD(model[2].parameters(), lr=0.1),
    ]
    records: list[ampfn.StepRecord] = []
    run(
        ampfn.compose(
            ampfn.with_grad_scaling(gs()), ampfn.with_telemetry(records, every=2)
        ),
        model,
        opts,
        clip=True,
    )
    assert [r.step for r in records] == [0, 2, 4]
    assert records[1].stepped == (False, False)  # each optimizer's step, in order
    assert records[1].nonfinite == ("param_groups[0][0]", "param_groups[0][1]")
    assert all(isinstance(r.grad_norm, float) for r in (records[0], records[2]))


def test_apex_levels_master_weights_and_sync_free() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records: list[ampfn.StepRecord] = []
    run(
        ampfn.compose(
            ampfn.with_telemetry(records, model=model),
            ampfn.with_apex("O2", model, opt, backend="native"),
        ),
        model,
        [opt],
    )
    assert records[0].loss_scale == 2.0**16
    assert (
        records[SKIP_AT].nonfinite[0] == "0.weight"
    )  # the model's name for the master
    o3 = mlp()
    o3_opt = torch.optim.SGD(o3.parameters(), lr=0.1)
    records = []
    run(
        ampfn.compose(
            ampfn.with_apex("O3", o3, o3_opt, backend="native"),
            ampfn.with_telemetry(records),
        ),
        o3,
        [o3_opt],
        n=2,
    )
    assert [r.loss_scale for r in records] == [1.0, 1.0]
    plain = mlp()
    records = []
    run(
        ampfn.compose(
            ampfn.with_telemetry(records), ampfn.with_grad_scaling(gs(), sync=False)
        ),
        plain,
        [torch.optim.SGD(plain.parameters(), lr=0.1)],
        n=4,
    )
    assert [r.stepped for r in records] == [(True,), (True,), (False,), (True,)]


SRC = str(Path(ampfn.__file__).parent)


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records each Tensor.item / __bool__ / __float__ / __int__ / tolist called from ampfn."""
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    calls: list[str] = []

    def counted(name: str, fn: Any) -> Any:
        def read(t: torch.Tensor, *args: Any) -> Any:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(SRC):
                calls.append(f"{name} in {caller.co_name}")
            return fn(t, *args)

        return read

    for n, fn in originals.items():
        setattr(torch.Tensor, n, counted(n, fn))
    try:
        yield calls
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)


def test_only_a_recorded_call_reads_the_device() -> None:
    """A host read is a sync on a GPU: calls that emit no record must make none (every=3)."""
    model = mlp()
    # (momentum: plain SGD keeps no tensor state, so sync-free scaling reads it on the host)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records: list[ampfn.StepRecord] = []
    overflow = {"now": False}

    @ampfn.compose(
        ampfn.with_telemetry(records, model=model, every=3),
        ampfn.with_grad_scaling(gs(), sync=False),
    )
    def train_step(b: Batch) -> None:
        loss = F.cross_entropy(model(b[0]).float(), b[1])
        ampfn.backward(loss * (float("inf") if overflow["now"] else 1.0))
        ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    reads_per_call = []
    for i, b in enumerate(batches(7)):
        overflow["now"] = i in (
            1,
            3,
        )  # a skipped step on a quiet call and a recorded one
        with host_reads() as calls:
            train_step(b)
        reads_per_call.append(calls)
    assert [r.step for r in records] == [0, 3, 6]
    assert [i for i, calls in enumerate(reads_per_call) if calls] == [0, 3, 6]
    assert records[1].skipped
    assert records[1].nonfinite


def test_no_scaler_means_no_scale() -> None:
    model = mlp()
    records: list[ampfn.StepRecord] = []
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)

    @ampfn.compose(ampfn.with_telemetry(records), ampfn.with_autocast("bf16", "cpu"))
    def train_step(x: torch.Tensor) -> None:
        ampfn.backward((w * x).sum())
        ampfn.step(opt)

    train_step(torch.ones(1))
    assert records == [ampfn.StepRecord(0, None, (True,), None, ())]
    del model


def test_a_failing_call_is_not_recorded_but_counted() -> None:
    records: list[ampfn.StepRecord] = []

    @ampfn.with_telemetry(records)
    def train_step(fail: bool) -> None:
        if fail:
            raise KeyError("data")

    train_step(False)
    with pytest.raises(KeyError):
        train_step(True)
    train_step(False)
    assert [r.step for r in records] == [0, 2]


def test_sinks_log_and_write_to_tensorboard(caplog: pytest.LogCaptureFixture) -> None:
    record = ampfn.StepRecord(7, 512.0, (True, False), 1.5, ("head.weight",))
    with caplog.at_level(logging.INFO, logger="ampfn"):
        telemetry.to_logging()(record)
    assert (
        "ampfn: step 7; loss scale 512; stepped yes,SKIPPED; grad norm 1.5; non-finite gradients: head.weight"
        in caplog.text
    )

    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.calls.append((tag, value, global_step))

        def add_text(self, tag: str, text: str, global_step: int) -> None:
            self.calls.append((tag, text, global_step))

    w = Writer()
    telemetry.to_tensorboard(w)(record)
    assert w.calls == [
        ("ampfn/loss_scale", 512.0, 7),
        ("ampfn/skipped", 1, 7),
        ("ampfn/grad_norm", 1.5, 7),
        ("ampfn/nonfinite", "head.weight", 7),
    ]


def test_bad_arguments() -> None:
    with pytest.raises(
        TypeError,
        match=r"sink must be a callable taking a StepRecord, or a list, got int",
    ):
        ampfn.with_telemetry(3)
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        ampfn.with_telemetry([], every=0)
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        ampfn.with_telemetry([], model="m")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="object lacks add_scalar, add_text"):
        telemetry.to_tensorboard(object())
    with pytest.raises(TypeError, match=r"level must be a logging level .*, got str"):
        telemetry.to_logging(level="INFO")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"compose\(\*transforms\): the transform at position 0 is the factory with_telemetry",
    ):
        ampfn.compose(ampfn.with_telemetry)


def test_a_bare_decorator_on_a_step_is_caught() -> None:
    """@ampfn.with_telemetry without a call makes the step the sink: caught at once
    (a step of two arguments cannot be a sink) or at the step's first call."""
    model = torch.nn.Linear(2, 1)
    call_it = r"ampfn.with_telemetry is a transform factory, not a transform: call it: @ampfn.with_telemetry\(sink\)"
    with pytest.raises(
        TypeError,
        match=r"the sink train_step\(model, x\) cannot be called with one StepRecord",
    ):

        @ampfn.with_telemetry
        def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
            ampfn.backward(model(x).sum())

    @ampfn.with_telemetry
    def one_argument(batch: Any) -> None:
        ampfn.backward(model(batch).sum())

    args: tuple[Any, ...]
    for args in [(model,), (torch.ones(2),), ((torch.ones(2), 1),), ()]:
        with pytest.raises(TypeError, match=call_it):
            one_argument(*args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got 2 arguments"):
        one_argument(model, torch.ones(2))  # type: ignore[call-arg]
    assert model.weight.grad is None


def test_a_module_whose_forward_calls_the_effects_is_a_step() -> None:
    """As under every transform: with_telemetry(sink)(module) wraps the module."""

    class Trainer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.opt = torch.optim.SGD(self.lin.parameters(), lr=0.1)

        def forward(self, x: torch.Tensor) -> None:
            ampfn.backward(self.lin(x).sum())
            ampfn.step(self.opt)

    records: list[ampfn.StepRecord] = []
    ampfn.with_telemetry(records)(Trainer())(torch.ones(3, 2))
    assert [r.stepped for r in records] == [(True,)]

    def sink(record: ampfn.StepRecord) -> None:  # a plain function: the misuse's shape
        records.append(record)

    trainer = Trainer()
    with pytest.raises(TypeError, match=r"wrap it in a function"):
        ampfn.with_telemetry(sink)(trainer)
    ampfn.with_telemetry(sink)(lambda batch: trainer(batch))(torch.ones(3, 2))
    assert len(records) == 2


class Sink:
    def __init__(self) -> None:
        self.records: list[ampfn.StepRecord] = []

    def __call__(self, record: ampfn.StepRecord) -> None:
        self.records.append(record)

    def add(self, *records: ampfn.StepRecord, prefix: str = "") -> None:
        self.records.extend(records)


def test_every_kind_of_sink_is_still_a_sink() -> None:
    got: list[Any] = []

    def log(record: ampfn.StepRecord) -> None:
        got.append(record)

    obj = Sink()
    sinks: list[Any] = [
        got,
        got.append,
        log,
        lambda r: got.append(r),
        telemetry.to_logging(),
        obj,
        obj.add,
        functools.partial(obj.add, prefix="x"),
        logging.getLogger("ampfn.test").debug,
        str,  # a builtin without a signature
        tuple,  # a class called with the record
    ]
    for sink in sinks:
        step = ampfn.with_telemetry(sink)(lambda batch: batch)
        assert step(3) == 3
    assert len(got) == 4
    assert len(obj.records) == 3
