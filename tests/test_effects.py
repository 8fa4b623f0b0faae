"""The effects: plain PyTorch without transforms, one active plan per call and thread,
users' handlers as middleware, clear errors for what is not an optimizer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ampfn
from ampfn._runtime import current_call as active
from helpers import batches, make_step, mlp, params_equal


def test_effects_without_transforms_equal_plain_torch() -> None:
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    step = make_step(model, opt, clip=0.5)
    for x, y in batches(5):
        _, stepped = step((x, y))
        assert stepped is True
        loss = F.cross_entropy(ref(x).float(), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert norm.isfinite()
    assert params_equal(model, ref)
    ampfn.unscale_(opt)  # a no-op outside transforms


def test_grad_without_transforms_is_autograd_grad() -> None:
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    ours = ampfn.grad((w * x).pow(2).sum(), [w], create_graph=True)
    (ref,) = torch.autograd.grad((w * x).pow(2).sum(), [w], create_graph=True)
    assert torch.equal(ours[0], ref)
    assert ours[0].requires_grad


def test_step_passes_arguments_to_the_optimizer() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    calls: list[int] = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = (w * 2).sum()
        loss.backward()
        return loss

    assert ampfn.step(opt, closure) is True
    assert calls == [1]
    assert torch.equal(w.detach(), torch.zeros(2))


def test_effects_validate_loss_and_optimizer_types() -> None:
    with pytest.raises(
        TypeError,
        match=r"ampfn.backward\(loss, \*\*kwargs\): expected the loss as a torch.Tensor, got float",
    ):
        ampfn.backward(1.0)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"ampfn.step\(optimizer\): expected a torch.optim.Optimizer .*got int 3",
    ):
        ampfn.step(3)
    with pytest.raises(
        TypeError,
        match=r"ampfn.unscale_\(optimizer\): expected a torch.optim.Optimizer",
    ):
        ampfn.unscale_("opt")
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(
        TypeError,
        match=r"ampfn.clip_grad_norm_\(parameters, max_norm, optimizer\): expected a torch.optim.Optimizer .*got str",
    ):
        ampfn.clip_grad_norm_([w], 1.0, "opt")
    with pytest.raises(
        ValueError,
        match=r"ampfn.backward\(loss, loss_id\): loss_id must be an int >= 0, got -1",
    ):
        ampfn.backward(w.sum(), loss_id=-1)


@pytest.mark.parametrize(
    "transform",
    [
        lambda: ampfn.with_autocast("bf16", "cpu"),
        lambda: ampfn.with_grad_scaling(),
        lambda: ampfn.with_apex("O1", backend="native"),
    ],
    ids=["autocast", "scaling", "apex-O1"],
)
def test_effects_validate_optimizer_types_inside_transforms(
    transform: Callable[[], Any],
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def bad_step(bad: object) -> None:
        ampfn.backward(model(batches(1)[0][0]).sum())
        ampfn.clip_grad_norm_(model.parameters(), 1.0, bad)

    def bad_clip_then_step(bad: object) -> None:
        ampfn.backward(model(batches(1)[0][0]).sum())
        ampfn.step(bad)

    with pytest.raises(
        TypeError,
        match=r"ampfn.clip_grad_norm_\(parameters, max_norm, optimizer\): .*got str",
    ):
        transform()(bad_step)("opt")
    with pytest.raises(TypeError, match=r"ampfn.step\(optimizer\): .*got int 3"):
        transform()(bad_clip_then_step)(3)
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, old)  # nothing stepped
    del opt


def test_optimizer_like_wrappers_are_accepted() -> None:
    class Larc:  # an optimizer-like wrapper: param_groups, state and step, as Apex's LARC
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optim = inner

        @property
        def param_groups(self) -> list[dict[str, Any]]:
            return self.optim.param_groups

        @property
        def state(self) -> Any:
            return self.optim.state

        def step(self) -> None:
            self.optim.step()

    w = torch.nn.Parameter(torch.ones(2))
    opt = Larc(torch.optim.SGD([w], lr=0.5))
    ampfn.backward(w.sum())
    assert ampfn.step(opt) is True
    assert torch.equal(w.detach(), torch.full((2,), 0.5))


def test_the_plan_exists_only_while_the_step_runs_even_on_error() -> None:
    seen = []

    @ampfn.compose(ampfn.with_grad_scaling(), ampfn.with_autocast("bf16", "cpu"))
    def failing(batch: int) -> None:
        seen.append((active() is not None, torch.is_autocast_enabled("cpu")))
        raise KeyError(batch)

    with pytest.raises(KeyError):
        failing(1)
    assert seen == [(True, True)]
    assert active() is None
    assert not torch.is_autocast_enabled("cpu")


def test_plans_are_per_thread() -> None:
    barrier = threading.Barrier(2)
    seen: dict[str, bool] = {}

    @ampfn.with_autocast("bf16", "cpu")
    def wrapped(name: str) -> None:
        barrier.wait()
        seen[name] = active() is not None
        barrier.wait()

    def plain(name: str) -> None:
        barrier.wait()
        seen[name] = active() is not None
        barrier.wait()

    threads = [
        threading.Thread(target=wrapped, args=("a",)),
        threading.Thread(target=plain, args=("b",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": True, "b": False}


class _Log(ampfn.Handler):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        self.log.append(f"{self.name}:{loss.item():g}")
        proceed(loss, kwargs)
        self.log.append(f"{self.name}:done")


def test_handlers_run_outermost_first_around_the_builtin_effects() -> None:
    log: list[str] = []
    w = torch.ones(1, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    step = ampfn.compose(
        ampfn.with_handler(_Log("outer", log)),
        ampfn.with_grad_scaling(scaler),
        ampfn.with_handler(_Log("inner", log)),
    )(lambda: ampfn.backward(w.sum()))
    step()
    # handlers see the loss before scaling, wherever they sit; scaling ran once, innermost
    assert log == ["outer:1", "inner:1", "inner:done", "outer:done"]
    assert torch.equal(w.grad, torch.tensor([8.0]))  # type: ignore[arg-type]


def test_handlers_keep_working_through_a_users_own_wrapper() -> None:
    log: list[str] = []
    w = torch.ones(1, requires_grad=True)

    def my_transform(step: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            log.append("mine")
            step()

        return wrapped

    step = ampfn.compose(
        ampfn.with_handler(_Log("outer", log)),
        my_transform,
        ampfn.with_autocast("bf16", "cpu"),
    )(lambda: ampfn.backward(w.sum()))
    step()
    assert log == ["mine", "outer:1", "outer:done"]


def test_with_handler_validates() -> None:
    with pytest.raises(
        TypeError, match=r"with_handler\(handler\): expected an ampfn.Handler, got int"
    ):
        ampfn.with_handler(3)  # type: ignore[arg-type]


def test_a_handler_with_state_is_checkpointed() -> None:
    class Counter(ampfn.Handler):
        def __init__(self) -> None:
            self.n = 0

        def backward(
            self,
            proceed: Callable[..., None],
            loss: torch.Tensor,
            kwargs: dict[str, Any],
        ) -> None:
            self.n += 1
            proceed(loss, kwargs)

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.n = state["n"]

    w = torch.ones(1, requires_grad=True)
    first = ampfn.with_handler(Counter(), name="counter")(
        lambda: ampfn.backward(w.sum())
    )
    first()
    first()
    saved = ampfn.state_dict(first)
    assert saved == {"transforms": [{"name": "counter", "state": {"n": 2}}]}
    second_counter = Counter()
    second = ampfn.with_handler(second_counter, name="counter")(lambda: None)
    ampfn.load_state_dict(second, saved)
    assert second_counter.n == 2


# --- misuse (issue 20): a bad loss, said by ampfn.backward ---------------------------

_BAD_LOSSES: list[tuple[str, type[Exception], str]] = [
    ("detached", RuntimeError, r"does not require grad.*with gradients enabled"),
    ("no_grad", RuntimeError, r"does not require grad.*torch\.no_grad\(\)"),
    ("integer", TypeError, r"the loss is torch\.int64.*loss\.float\(\)"),
    ("vector", RuntimeError, r".*3 elements.*loss\.mean\(\)"),
    ("keyword", TypeError, r"unknown keyword 'retain'.*retain_graph"),
    ("not a tensor", TypeError, r"expected the loss as a torch\.Tensor, got float"),
]


@pytest.mark.parametrize("pipeline", ["plain", "with_grad_scaling", "O2"])
@pytest.mark.parametrize(
    ("bad", "error", "match"), _BAD_LOSSES, ids=[b for b, _, _ in _BAD_LOSSES]
)
def test_a_bad_loss_is_refused_by_ampfn_backward_before_anything_changes(
    pipeline: str, bad: str, error: type[Exception], match: str
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    transform: Callable[[Any], Any] = (
        (lambda f: f)
        if pipeline == "plain"
        else ampfn.with_grad_scaling()
        if pipeline == "with_grad_scaling"
        else ampfn.with_apex("O2", model, opt, backend="native")
    )
    x, y = batches(1)[0]

    def step(_: Any) -> None:
        loss = F.cross_entropy(model(x).float(), y)
        if bad == "detached":
            ampfn.backward(loss.detach())
        elif bad == "no_grad":
            with torch.no_grad():
                ampfn.backward(F.cross_entropy(model(x).float(), y))
        elif bad == "integer":
            ampfn.backward(y.sum())
        elif bad == "vector":
            ampfn.backward(model(x).float().sum(0))
        elif bad == "keyword":
            ampfn.backward(loss, retain=True)
        else:
            ampfn.backward(loss.item())  # type: ignore[arg-type]

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=r"ampfn\.backward\(loss, \*\*kwargs\): .*" + match):
        transform(step)(None)
    assert all(p.grad is None for p in model.parameters())
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )
    assert transform(make_step(model, opt))(batches(1)[0])[1]
