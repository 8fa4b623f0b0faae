"""compose laws, wrapped-step identity, the effect stack and pipeline state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ampfn
from ampfn._core import HANDLERS
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


def test_effects_without_transforms_equal_plain_torch() -> None:
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    step = make_step(model, opt, clip=0.5)
    for x, y in batches(5):
        _, stepped = step((x, y))
        assert stepped is True
        loss = torch.nn.functional.cross_entropy(ref(x).float(), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert norm.isfinite()
    assert params_equal(model, ref)
    ampfn.unscale_(opt)  # a no-op outside transforms


def test_effects_validate_loss_type() -> None:
    with pytest.raises(
        TypeError, match=r"ampfn.backward\(loss\): expected a torch.Tensor, got float"
    ):
        ampfn.backward(1.0)  # type: ignore[arg-type]


def test_handlers_exist_only_while_the_step_runs_even_on_error() -> None:
    seen = []

    @ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu"))
    def failing(batch: int) -> None:
        seen.append((len(HANDLERS.get()), torch.is_autocast_enabled("cpu")))
        raise KeyError(batch)

    with pytest.raises(KeyError):
        failing(1)
    assert seen == [(2, True)]
    assert HANDLERS.get() == ()
    assert not torch.is_autocast_enabled("cpu")


def test_handlers_are_per_thread() -> None:
    barrier = threading.Barrier(2)
    depths: dict[str, int] = {}

    @ampfn.with_autocast("bf16", "cpu")
    def wrapped(name: str) -> None:
        barrier.wait()
        depths[name] = len(HANDLERS.get())
        barrier.wait()

    def plain(name: str) -> None:
        barrier.wait()
        depths[name] = len(HANDLERS.get())
        barrier.wait()

    threads = [
        threading.Thread(target=wrapped, args=("a",)),
        threading.Thread(target=plain, args=("b",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert depths == {"a": 1, "b": 0}


def test_handlers_chain_from_outermost_to_innermost() -> None:
    log: list[str] = []

    class Logging(ampfn.Transform):
        def __init__(self, name: str) -> None:
            handler = _LogHandler(name, log)
            from ampfn._core import handler_wrapper

            super().__init__(name, handler_wrapper(handler))

    w = torch.ones(1, requires_grad=True)
    ampfn.compose(Logging("outer"), Logging("inner"))(lambda: ampfn.backward(w.sum()))()
    assert log == ["outer", "inner"]
    assert w.grad is not None


class _LogHandler(ampfn._core.Handler):
    __slots__ = ("log", "name")

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        self.log.append(self.name)
        proceed(loss, kwargs)


def test_state_dict_of_plain_and_stateless_pipelines() -> None:
    assert ampfn.state_dict(lambda b: b) == {"transforms": []}
    f = ampfn.with_autocast("bf16", "cpu")(lambda b: b)
    ampfn.load_state_dict(f, ampfn.state_dict(f))


def test_load_state_dict_rejects_another_pipeline() -> None:
    scaled = ampfn.with_grad_scaling()(lambda b: b)
    plain = ampfn.with_autocast("bf16", "cpu")(lambda b: b)
    with pytest.raises(
        ValueError,
        match=r"ampfn.load_state_dict\(wrapped_step, state\): the state was saved",
    ):
        ampfn.load_state_dict(plain, ampfn.state_dict(scaled))
    with pytest.raises(
        TypeError,
        match=r"ampfn.load_state_dict\(wrapped_step, state\): expected a dict",
    ):
        ampfn.load_state_dict(plain, [])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"ampfn.state_dict\(wrapped_step\): expected a step"
    ):
        ampfn.state_dict(3)  # type: ignore[arg-type]


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
