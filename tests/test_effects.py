"""The effects: plain PyTorch without transforms, a handler stack per call and thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ampfn
from ampfn._effects import HANDLERS, Handler, handler_wrapper
from helpers import batches, make_step, mlp, params_equal


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

            super().__init__(name, handler_wrapper(handler))

    w = torch.ones(1, requires_grad=True)
    ampfn.compose(Logging("outer"), Logging("inner"))(lambda: ampfn.backward(w.sum()))()
    assert log == ["outer", "inner"]
    assert w.grad is not None


class _LogHandler(Handler):
    __slots__ = ("log", "name")

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        self.log.append(self.name)
        proceed(loss, kwargs)
