"""fp32 master weights (``ampfn._masters``), under ``with_policy(..., master_weights=True)``
and ``with_apex("O2")``: the misuse guards, and gradients cleared as ``zero_grad``
expects, against Apex's O2 and plain PyTorch."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn.testing._trial import first_difference
from helpers import batches, effect_step, mlp

X, Y = batches(1)[0]
PIPELINES = ["bf16-true masters", "16-true masters", "O2"]


def build(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, ampfn.Transform]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "O2":
        return model, opt, ampfn.with_apex("O2", model, opt, backend="native")
    policy = ampfn.with_policy(kind.split()[0], model, opt, master_weights=True)
    if kind.startswith("16"):  # fp16 weights: loss scaling of the masters' gradients
        return model, opt, ampfn.compose(ampfn.with_grad_scaling(), policy)  # type: ignore[return-value]
    return model, opt, policy


def loss_of(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(X).float(), Y)


def state(model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    return copy.deepcopy(
        (
            [p.detach() for p in model.parameters()],
            [p.detach() for g in opt.param_groups for p in g["params"]],
            opt.state_dict()["state"],
        )
    )


def same(a: Any, b: Any) -> bool:
    return first_difference(a, b) is None


def good(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Any], Any]:
    return effect_step(model, opt, loss_of)


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_direct_optimizer_step_is_refused_before_it_moves_the_masters(
    kind: str,
) -> None:
    model, opt, t = build(kind)

    def step(_: Any) -> None:
        ampfn.backward(loss_of(model))
        opt.step()

    before = state(model, opt)
    with pytest.raises(
        RuntimeError, match=r"called directly.*ampfn\.step\(optimizer\)"
    ):
        t(step)(None)
    assert same(before, state(model, opt))
    opt.zero_grad(set_to_none=True)
    assert bool(t(good(model, opt))(None))
    assert not same(before[0], state(model, opt)[0])  # the model moved


@pytest.mark.parametrize("kind", PIPELINES)
def test_loss_backward_then_ampfn_step_is_refused(kind: str) -> None:
    model, opt, t = build(kind)

    def step(_: Any) -> Any:
        loss_of(model).backward()
        return ampfn.step(opt)

    before = state(model, opt)
    with pytest.raises(RuntimeError, match=r"ampfn\.backward\(loss\) instead"):
        t(step)(None)
    assert same(before, state(model, opt))
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    assert bool(t(good(model, opt))(None))


@pytest.mark.parametrize("kind", PIPELINES)
@pytest.mark.parametrize("skip", [False, True])
def test_zero_grad_clears_every_gradient_after_a_step_or_a_skip(
    kind: str, skip: bool
) -> None:
    """As in Apex's O2 (whose optimizer's zero_grad clears the fp32 masters' gradients)
    and in plain PyTorch: after ``optimizer.zero_grad()`` no gradient is left, on the
    model or on the masters, whether the step ran or was skipped; the model's own
    gradients are never left behind by the backward (they moved into the masters')."""
    model, opt, t = build(kind)

    def step(_: Any) -> Any:
        loss = loss_of(model) * (float("inf") if skip else 1.0)
        ampfn.backward(loss)
        assert all(p.grad is None for p in model.parameters())
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    stepped = t(step)(None)
    scaled = not kind.startswith("bf16")  # without a scaler an inf loss steps
    assert bool(stepped) is not (skip and scaled)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
