"""compose laws, wrapped-step identity, conflicts between transforms."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ampfn
from helpers import batches, make_step, mlp, params_equal, twin

Step = Callable[[tuple[int, ...]], tuple[int, ...]]


def tagger(k: int) -> Callable[[Step], Step]:
    """A transform that appends k to the trace before calling the inner step."""

    def transform(step: Step) -> Step:
        def wrapped(trace: tuple[int, ...]) -> tuple[int, ...]:
            return step((*trace, k))

        return wrapped

    return transform


def ident(trace: tuple[int, ...]) -> tuple[int, ...]:
    return trace


transform_lists = st.lists(st.integers(0, 9), max_size=6)


@given(transform_lists)
def test_law_compose_is_decorator_order(ks: list[int]) -> None:
    by_hand: Step = ident
    for k in reversed(ks):
        by_hand = tagger(k)(by_hand)
    assert ampfn.compose(*map(tagger, ks))(ident)(()) == by_hand(()) == tuple(ks)


@given(transform_lists, transform_lists, transform_lists)
def test_law_compose_is_associative(a: list[int], b: list[int], c: list[int]) -> None:
    ta, tb, tc = (ampfn.compose(*map(tagger, ks)) for ks in (a, b, c))
    left = ampfn.compose(ampfn.compose(ta, tb), tc)(ident)(())
    right = ampfn.compose(ta, ampfn.compose(tb, tc))(ident)(())
    assert left == right == tuple(a + b + c)


@given(transform_lists)
def test_law_compose_identity(ks: list[int]) -> None:
    assert ampfn.compose()(ident) is ident
    t = ampfn.compose(*map(tagger, ks))
    assert (
        ampfn.compose(ampfn.compose(), t)(ident)(())
        == ampfn.compose(t, ampfn.compose())(ident)(())
        == tuple(ks)
    )


def test_compose_rejects_non_callables_naming_the_position() -> None:
    with pytest.raises(
        TypeError,
        match=r"compose\(\*transforms\): transform at position 1 is not callable",
    ):
        ampfn.compose(tagger(0), 3)  # type: ignore[arg-type]


def test_transform_rejects_non_callable_step() -> None:
    with pytest.raises(
        TypeError, match=r"with_grad_scaling\(step\): expected a callable"
    ):
        ampfn.with_grad_scaling()(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "transform",
    [
        lambda: ampfn.with_autocast("bf16", "cpu"),
        lambda: ampfn.with_grad_scaling(),
        lambda: ampfn.compose(
            ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", "cpu")
        ),
        lambda: ampfn.with_apex("O1", backend="native"),
    ],
)
def test_wrapped_step_keeps_identity_and_does_not_mutate(
    transform: Callable[[], Any],
) -> None:
    def train_step(batch: int) -> int:
        """Doc of the step."""
        return batch + 1

    before = dict(train_step.__dict__)
    wrapped = transform()(train_step)
    assert wrapped is not train_step
    assert wrapped.__name__ == "train_step"
    assert wrapped.__doc__ == "Doc of the step."
    inner = wrapped
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    assert inner is train_step
    assert train_step.__dict__ == before
    assert wrapped(1) == 2


def test_two_scalers_in_one_pipeline_are_an_error() -> None:
    with pytest.raises(ValueError, match="two loss-scaling transforms"):
        ampfn.compose(
            ampfn.with_grad_scaling(),
            ampfn.with_autocast("fp16", "cpu"),
            ampfn.with_grad_scaling(),
        )
    inner = ampfn.with_grad_scaling()(lambda b: b)
    with pytest.raises(ValueError, match="two loss-scaling transforms"):
        ampfn.with_grad_scaling()(inner)
    with pytest.raises(ValueError, match="two loss-scaling transforms"):
        ampfn.compose(
            ampfn.with_apex("O1", backend="native"), ampfn.with_grad_scaling()
        )


def test_nested_pipelines_flatten() -> None:
    a, b = ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu")
    assert ampfn.compose(ampfn.compose(a), ampfn.compose(b)).transforms == (a, b)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_model = twin(model)
    twin_opt = torch.optim.SGD(twin_model.parameters(), lr=0.1)
    s1 = torch.amp.GradScaler("cpu", init_scale=256.0)
    s2 = torch.amp.GradScaler("cpu", init_scale=256.0)
    composed = ampfn.compose(
        ampfn.with_grad_scaling(s1), ampfn.with_autocast("bf16", "cpu")
    )(make_step(model, opt))
    stacked = ampfn.with_grad_scaling(s2)(
        ampfn.with_autocast("bf16", "cpu")(make_step(twin_model, twin_opt))
    )
    for batch in batches(4):
        composed(batch)
        stacked(batch)
    assert params_equal(model, twin_model)


FACTORIES = [
    ("with_autocast", "with_autocast(dtype)"),
    ("with_grad_scaling", "with_grad_scaling()"),
    ("with_apex", "with_apex(level)"),
    ("with_xla_bf16", "with_xla_bf16()"),
    ("with_handler", "with_handler(handler)"),
    ("with_telemetry", "with_telemetry(sink)"),
    ("with_policy", "with_policy(policy)"),
    ("with_float8", "with_float8(model)"),
]


def test_every_with_factory_is_covered() -> None:
    public = {n for n in ampfn.__all__ if n.startswith("with_")}
    assert public == {name for name, _ in FACTORIES}


def decorate_and_call(factory: Any) -> None:
    @factory
    def train_step(batch: int) -> int:
        return batch

    # with_telemetry takes functions (its sink), so a one-argument step is caught at its
    # first call; every other factory has raised already
    train_step(1)


@pytest.mark.parametrize(("name", "call"), FACTORIES)
def test_a_factory_used_as_a_decorator_says_call_it(name: str, call: str) -> None:
    with pytest.raises(
        TypeError,
        match=rf"ampfn.{name} is a transform factory, not a transform: call it: @ampfn.{re.escape(call)}",
    ):
        decorate_and_call(getattr(ampfn, name))


@pytest.mark.parametrize(("name", "call"), FACTORIES)
def test_a_factory_composed_uncalled_says_call_it_at_once(name: str, call: str) -> None:
    with pytest.raises(
        TypeError,
        match=rf"compose\(\*transforms\): the transform at position 1 is the factory {name}, not a transform: call it: {re.escape(call)}",
    ):
        ampfn.compose(ampfn.with_autocast("bf16", "cpu"), getattr(ampfn, name))


def test_a_factory_given_as_the_step_is_an_error() -> None:
    with pytest.raises(
        TypeError,
        match=r"with_grad_scaling\(step\): got the transform factory with_autocast\(dtype\)",
    ):
        ampfn.with_grad_scaling()(ampfn.with_autocast)


def test_transforms_applied_on_top_of_each_other_fuse_into_one_wrapper() -> None:
    def step(batch: int) -> int:
        return batch

    fused = ampfn.compose(
        ampfn.with_grad_scaling(),
        ampfn.with_autocast("bf16", "cpu"),
        ampfn.with_handler(ampfn.Handler()),
    )(step)
    layer = fused.__ampfn_layer__  # type: ignore[attr-defined]
    assert layer.step is step  # one wrapper around the user's own step
    assert [f.name for f in layer.fragments] == [
        "with_grad_scaling",
        "with_autocast",
        "with_handler(Handler)",
    ]
    # two autocasts need two wrappers (each enters its own torch.autocast)
    layered = ampfn.compose(
        ampfn.with_autocast("bf16", "cpu"), ampfn.with_autocast("fp16", "cpu")
    )(step)
    assert layered.__ampfn_layer__.step is not step  # type: ignore[attr-defined]
    assert layered(3) == fused(3) == 3


def test_nested_pipelines_through_a_users_wrapper_share_the_effects() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = torch.amp.GradScaler("cpu", init_scale=8.0)

    def opaque(step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(
            *args: Any,
        ) -> Any:  # no functools.wraps: a layer ampfn cannot see into
            return step(*args)

        return wrapped

    inner = ampfn.with_autocast("fp16", "cpu")(make_step(model, opt))
    outer = ampfn.with_grad_scaling(s)(opaque(inner))
    _, stepped = outer(batches(1)[0])
    assert stepped is True
    assert s.get_scale() == 8.0  # one update, no growth yet


def test_two_scalers_active_at_once_through_an_opaque_wrapper_are_an_error() -> None:
    def opaque(step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            return step(*args)

        return wrapped

    w = torch.ones(1, requires_grad=True)
    inner = ampfn.with_grad_scaling()(lambda: ampfn.backward(w.sum()))
    outer = ampfn.with_grad_scaling()(opaque(inner))
    with pytest.raises(
        ValueError, match="two loss-scaling transforms are active in one step"
    ):
        outer()


# --- misuse (issue 20) -------------------------------------------------------------


def test_a_refused_composition_takes_back_with_policys_cast_and_the_retry_works() -> (
    None
):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"master_weights=True"):
        ampfn.compose(
            ampfn.with_grad_scaling(), ampfn.with_policy("16-true", model, opt)
        )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True)
    )
    assert opt.param_groups[0]["params"] == params
    # as the message advises
    retry = ampfn.compose(
        ampfn.with_grad_scaling(),
        ampfn.with_policy("16-true", model, opt, master_weights=True),
    )(make_step(model, opt))
    for b in batches(2):
        retry(b)
    assert model[0].weight.dtype == torch.float16


def test_a_refusal_when_applied_takes_back_the_outer_transforms_conversion() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaled = ampfn.with_grad_scaling()(make_step(model, opt))
    with pytest.raises(ValueError, match="two loss-scaling"):
        ampfn.with_apex("O2", model, opt, backend="native")(scaled)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.param_groups[0]["params"] == list(model.parameters())


def test_an_accepted_transform_is_never_taken_back() -> None:
    """Only a transform that joined no pipeline yet is taken back: one already applied
    (its wrapped step may have trained) keeps its conversion when a later pipeline that
    contains it is refused."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    o2 = ampfn.with_apex("O2", model, opt, backend="native")
    assert o2.undo is not None
    trained = o2(make_step(model, opt))
    assert o2.undo is None  # the snapshot (the model's fp32 tensors) is released
    trained(batches(1)[0])
    with pytest.raises(ValueError, match="two loss-scaling"):
        ampfn.compose(ampfn.with_grad_scaling(), o2)
    assert model[0].weight.dtype == torch.float16
    trained(batches(1)[0])


def _generator_step(batch: Any) -> Any:
    yield batch


async def _async_step(batch: Any) -> Any:
    return batch


async def _async_generator_step(batch: Any) -> Any:
    yield batch


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (_generator_step, "a generator function"),
        (_async_step, r"a coroutine function \(async def\)"),
        (_async_generator_step, "an async generator function"),
    ],
)
def test_a_step_whose_body_runs_later_is_refused_when_applied(
    step: Callable[..., Any], kind: str
) -> None:
    with pytest.raises(
        TypeError, match=rf"the step is {kind}.*make the step a plain function"
    ):
        ampfn.with_grad_scaling()(step)


def test_a_refused_composition_takes_back_optimizer_hooks() -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    hooks = dict(opt._optimizer_load_state_dict_pre_hooks)
    rounding = ampfn.with_policy("bf16-true", model, opt, stochastic_rounding=True)
    assert model[0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="two precision policies"):
        ampfn.compose(rounding, ampfn.with_policy("bf16-mixed"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert dict(opt._optimizer_load_state_dict_pre_hooks) == hooks
    step = ampfn.with_policy("bf16-true", model, opt, stochastic_rounding=True)(
        make_step(model, opt)
    )
    step(batches(1)[0])
    opt.load_state_dict(opt.state_dict())  # the retry's own hooks, once
