"""ampfn.state_dict / load_state_dict of whole pipelines (scalers: tests/test_scaling.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ampfn
from helpers import batches, make_step, mlp


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
        match=r"ampfn.load_state_dict\(wrapped_step, state\): expected the dict ampfn.state_dict",
    ):
        ampfn.load_state_dict(plain, [])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"ampfn.state_dict\(wrapped_step\): expected a step"
    ):
        ampfn.state_dict(3)  # type: ignore[arg-type]


# --- misuse (issue 20) -------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: ampfn.state_dict(m),
        lambda m: ampfn.load_state_dict(m, {"transforms": []}),
        lambda m: ampfn.loss_scale(m),
    ],
    ids=["state_dict", "load_state_dict", "loss_scale"],
)
def test_a_model_in_place_of_the_wrapped_step_is_a_type_error(
    call: Callable[[Any], Any],
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"expected the wrapped step.*got the model"):
        call(model)
    with pytest.raises(
        TypeError, match=r"expected the wrapped step.*got the optimizer"
    ):
        call(opt)


def _o2() -> tuple[Any, torch.nn.Module]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ampfn.with_apex("O2", model, opt, backend="native")(make_step(model, opt))
    step(batches(1)[0])
    return step, model


def _bad_states() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    def scaler(state: dict[str, Any]) -> dict[str, Any]:
        return state["transforms"][0]["state"]["loss_scaler"]["scaler"]  # type: ignore[no-any-return]

    def with_(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
        def bad(state: dict[str, Any]) -> Any:
            scaler(state)[key] = value
            return state

        return bad

    def drop(key: str) -> Callable[[dict[str, Any]], Any]:
        def bad(state: dict[str, Any]) -> Any:
            del scaler(state)[key]
            return state

        return bad

    def wrong_masters(state: dict[str, Any]) -> Any:
        state["transforms"][0]["state"]["master_weights"]["masters"].pop()
        return state

    return [
        ("a list of ints", lambda s: [1, 2, 3]),
        ("{}", lambda s: {}),
        ("scale 0", with_("scale", 0.0)),
        ("scale nan", with_("scale", float("nan"))),
        ("scale inf", with_("scale", float("inf"))),
        ("backoff 0", with_("backoff_factor", 0.0)),
        ("interval 0", with_("growth_interval", 0)),
        ("interval float", with_("growth_interval", 2.0)),
        ("missing scale", drop("scale")),
        ("missing tracker", drop("_growth_tracker")),
        ("one master short", wrong_masters),
    ]


@pytest.mark.parametrize(
    "make_bad", [f for _, f in _bad_states()], ids=[n for n, _ in _bad_states()]
)
def test_a_bad_state_is_refused_whole_with_nothing_loaded(
    make_bad: Callable[[dict[str, Any]], Any],
) -> None:
    """The masters come first in the saved state and the scaler second: a bad scaler
    must not leave the masters loaded (and the other way round)."""
    source, _ = _o2()
    saved = ampfn.state_dict(source)
    for _ in range(3):
        source(batches(1, seed=2)[0])
    target, model = _o2()
    good = copy.deepcopy(ampfn.state_dict(target))
    params = [p.detach().clone() for p in model.parameters()]
    state = ampfn.state_dict(source)
    state["transforms"][0]["state"]["loss_scaler"]["scaler"]["scale"] = 2.0**10
    with pytest.raises((TypeError, ValueError), match=r"ampfn\.load_state_dict"):
        ampfn.load_state_dict(target, make_bad(copy.deepcopy(state)))
    assert str(ampfn.state_dict(target)) == str(good)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True)
    )
    ampfn.load_state_dict(target, saved)  # a good state still loads


def test_states_of_other_configurations_are_refused_naming_the_cause() -> None:
    def build(level: str, losses: int) -> Any:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return ampfn.with_apex(level, model, opt, backend="native", num_losses=losses)(
            make_step(model, opt)
        )

    o1, o2, two = build("O1", 1), build("O2", 1), build("O1", 2)
    with pytest.raises(ValueError, match=r"expected the parts .* another level"):
        ampfn.load_state_dict(o2, ampfn.state_dict(o1))
    with pytest.raises(TypeError, match=r"another loss scaler .*num_losses"):
        ampfn.load_state_dict(o1, ampfn.state_dict(two))
    with pytest.raises(TypeError, match=r"ampfn\.load_state_dict.*loss_scalers"):
        ampfn.load_state_dict(two, ampfn.state_dict(o1))
