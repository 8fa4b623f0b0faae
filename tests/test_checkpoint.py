"""ampfn.state_dict / load_state_dict of whole pipelines (scalers: tests/test_scaling.py)."""

from __future__ import annotations

import pytest

import ampfn


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
