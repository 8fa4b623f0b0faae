"""ampfn.fp32 islands (``ampfn._islands``): float32 inside, and the dtype they hand back."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import ampfn


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), ampfn.fp32(nn.Linear(8, 8)), nn.Linear(8, 2))


def _apex(level: str) -> Callable[[nn.Module, Any], Any]:
    return lambda m, o: ampfn.with_apex(level, m, o, backend="native")


def _policy(name: str, **kwargs: Any) -> Callable[[nn.Module, Any], Any]:
    return lambda m, o: ampfn.with_policy(name, m, o, **kwargs)


CAST_MODELS = {
    "apex-O2": (_apex("O2"), torch.float16),
    "apex-O3": (_apex("O3"), torch.float16),
    "bf16-true": (_policy("bf16-true"), torch.bfloat16),
    "16-true+master": (_policy("16-true", master_weights=True), torch.float16),
}


@pytest.mark.parametrize("name", sorted(CAST_MODELS))
def test_an_island_in_a_cast_model_hands_back_the_models_dtype(name: str) -> None:
    # the bug: the island's fp32 output reached the next half Linear, which raised
    # "mat1 and mat2 must have the same dtype"
    build, half = CAST_MODELS[name]
    model = _model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = build(model, opt)(lambda x: model(x))
    x = torch.randn(4, 8)
    out = step(x)
    # the identical hand-written code: half layers around an fp32 layer
    first, last = reference[0].to(half), reference[2].to(half)
    island = reference[1]
    assert isinstance(island, ampfn.FP32Island)
    inner = island.module(first(x.to(half)).float())
    assert inner.dtype == torch.float32
    expected = last(inner.to(half))
    assert torch.equal(out, expected.to(out.dtype))
    assert all(p.dtype == torch.float32 for p in model[1].parameters())


def test_under_autocast_an_island_returns_float32() -> None:
    island = ampfn.fp32(nn.Linear(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = island(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert island.output_dtype is None


def test_islands_nested_in_an_island_return_float32() -> None:
    inner = ampfn.fp32(nn.Linear(4, 4))
    outer = ampfn.fp32(nn.Sequential(inner, nn.ReLU()))
    model = nn.Sequential(nn.Linear(4, 4), outer)
    ampfn._islands.return_in(model, torch.float16)  # type: ignore[attr-defined]
    assert outer.output_dtype == torch.float16
    assert inner.output_dtype is None


def test_an_island_without_floating_input_returns_the_models_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ampfn.fp32(nn.Embedding(10, 8)), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ampfn.with_policy("bf16-true", model, opt)(lambda ids: model[0](ids))
    assert step(torch.tensor([1, 2, 3])).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model[0].parameters())


def test_fp32_refuses_what_is_neither_a_function_nor_a_module() -> None:
    with pytest.raises(TypeError, match=r"fp32\(fn_or_module\): expected"):
        ampfn.fp32(3)  # type: ignore[call-overload]
