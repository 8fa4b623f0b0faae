"""with_grad_scaling against PyTorch's own GradScaler scenarios, hand-written."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ampfn
from helpers import Batch, batches, make_step, mlp, params_equal, twin

SKIP_AT = 3
ITERS = 8


def scaler(device: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)


def poison(model: torch.nn.Module) -> None:
    first = next(model.parameters())
    assert first.grad is not None
    first.grad.view(-1)[0] = float("inf")


def control_run(
    device: str, clip: float | None = None, accumulate: int = 1
) -> tuple[torch.nn.Module, Any, list[Any]]:
    """The hand-written torch.autocast + GradScaler loop: PyTorch's recipe."""
    model = mlp(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = scaler(device)
    norms = []
    data = batches(ITERS * accumulate, device=device)
    for i in range(ITERS):
        for j in range(accumulate):
            x, y = data[i * accumulate + j]
            with torch.autocast(device, dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y) / accumulate
            s.scale(loss).backward()
        if i == SKIP_AT:
            poison(model)
        if clip is not None:
            s.unscale_(opt)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        s.step(opt)
        s.update()
        opt.zero_grad(set_to_none=True)
    return model, s, norms


def ampfn_run(
    device: str, clip: float | None = None, accumulate: int = 1
) -> tuple[torch.nn.Module, Any, list[Any], list[bool]]:
    model = mlp(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = scaler(device)
    norms: list[Any] = []
    calls = {"n": 0}

    @ampfn.compose(
        ampfn.with_grad_scaling(s), ampfn.with_autocast(torch.float16, device)
    )
    def train_step(batch: Batch) -> bool | None:
        i, j = divmod(calls["n"], accumulate)
        calls["n"] += 1
        x, y = batch
        ampfn.backward(F.cross_entropy(model(x).float(), y) / accumulate)
        if j < accumulate - 1:
            return None  # accumulate: no step, so no update
        if i == SKIP_AT:
            poison(model)
        if clip is not None:
            norms.append(ampfn.clip_grad_norm_(model.parameters(), clip, opt))
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    results = [train_step(b) for b in batches(ITERS * accumulate, device=device)]
    return model, s, norms, [r for r in results if r is not None]


def assert_same(control: tuple[Any, ...], ours: tuple[Any, ...]) -> None:
    (m1, s1, n1), (m2, s2, n2, stepped) = control, ours
    assert params_equal(m1, m2)
    assert s1.get_scale() == s2.get_scale()
    assert s1.state_dict() == s2.state_dict()
    assert stepped == [i != SKIP_AT for i in range(ITERS)]
    assert len(n1) == len(n2)
    for a, b in zip(n1, n2, strict=True):
        assert torch.equal(a, b) or (a.isinf() and b.isinf())


def test_matches_hand_written_grad_scaler(device: str) -> None:
    assert_same(control_run(device), ampfn_run(device))


def test_matches_hand_written_with_clipping(device: str) -> None:
    assert_same(control_run(device, clip=0.5), ampfn_run(device, clip=0.5))


def test_matches_hand_written_with_gradient_accumulation(device: str) -> None:
    assert_same(control_run(device, accumulate=3), ampfn_run(device, accumulate=3))


def test_matches_hand_written_with_two_optimizers(device: str) -> None:
    def build() -> tuple[
        torch.nn.Module,
        torch.nn.Module,
        torch.optim.Optimizer,
        torch.optim.Optimizer,
        Any,
    ]:
        a, b = mlp(0, device), mlp(1, device)
        return (
            a,
            b,
            torch.optim.SGD(a.parameters(), lr=0.05),
            torch.optim.Adam(b.parameters(), lr=1e-3),
            scaler(device),
        )

    a1, b1, oa1, ob1, s1 = build()
    a2, b2, oa2, ob2, s2 = build()
    data = batches(ITERS, device=device)
    for i, (x, y) in enumerate(data):
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(a1(x).float() + b1(x).float(), y)
        s1.scale(loss).backward()
        if i == SKIP_AT:
            poison(b1)
        s1.step(oa1)
        s1.step(ob1)
        s1.update()
        oa1.zero_grad()
        ob1.zero_grad()

    calls = {"n": 0}

    @ampfn.compose(ampfn.with_grad_scaling(s2), ampfn.with_autocast("fp16", device))
    def train_step(batch: Batch) -> tuple[bool, bool]:
        x, y = batch
        ampfn.backward(F.cross_entropy(a2(x).float() + b2(x).float(), y))
        if calls["n"] == SKIP_AT:
            poison(b2)
        calls["n"] += 1
        stepped = ampfn.step(oa2), ampfn.step(ob2)
        oa2.zero_grad()
        ob2.zero_grad()
        return stepped

    results = [train_step(batch) for batch in data]
    assert params_equal(a1, a2)
    assert params_equal(b1, b2)
    assert s1.state_dict() == s2.state_dict()
    # GradScaler skips only the optimizer whose gradients overflowed, and backs off once.
    assert results == [(True, i != SKIP_AT) for i in range(ITERS)]


def test_accumulating_call_updates_nothing() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = scaler("cpu")
    f = ampfn.with_grad_scaling(s)(lambda b: ampfn.backward(model(b[0]).sum()))
    f(batches(1)[0])
    assert s.state_dict()["_growth_tracker"] == 0
    assert s.get_scale() == 2.0**10
    assert opt.state == {}


def test_skip_leaves_parameters_and_optimizer_state_untouched() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = ampfn.with_grad_scaling(scaler("cpu"))(make_step(model, opt))
    step(batches(1)[0])
    before = twin(model)
    state_before = {
        k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()
    }

    @ampfn.with_grad_scaling(scaler("cpu"))
    def poisoned(batch: Batch) -> bool:
        ampfn.backward(F.cross_entropy(model(batch[0]), batch[1]))
        poison(model)
        return ampfn.step(opt)

    assert poisoned(batches(1)[0]) is False
    assert params_equal(model, before)
    for k, v in opt.state.items():
        for n, t in v.items():
            assert torch.equal(t, state_before[k][n])


def test_fused_optimizer_reports_skips() -> None:
    model = mlp()
    try:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    except RuntimeError as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fused Adam unavailable: {e}")

    @ampfn.with_grad_scaling(scaler("cpu"))
    def train_step(batch: Batch, inf: bool) -> bool:
        ampfn.backward(F.cross_entropy(model(batch[0]), batch[1]))
        if inf:
            poison(model)
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    assert [train_step(b, i == 1) for i, b in enumerate(batches(3))] == [
        True,
        False,
        True,
    ]


def test_unscale_is_once_per_update_and_clip_returns_true_norm() -> None:
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = batches(1)[0]

    @ampfn.with_grad_scaling(scaler("cpu"))
    def train_step(b: Batch) -> torch.Tensor:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        ampfn.unscale_(opt)
        ampfn.unscale_(opt)  # idempotent
        norm = ampfn.clip_grad_norm_(model.parameters(), 1e9, opt)
        ampfn.step(opt)
        return norm

    F.cross_entropy(ref(batch[0]), batch[1]).backward()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    torch.testing.assert_close(train_step(batch), expected)


def test_backward_after_unscale_is_an_error() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_grad_scaling(scaler("cpu"))
    def train_step(b: Batch) -> None:
        ampfn.backward(model(b[0]).sum())
        ampfn.unscale_(opt)
        ampfn.backward(model(b[0]).sum())

    with pytest.raises(
        RuntimeError, match=r"ampfn.backward\(loss\): called after ampfn.unscale_"
    ):
        train_step(batches(1)[0])


def test_exception_after_unscale_leaves_a_clean_scaler() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = scaler("cpu")
    fail = {"now": True}

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch) -> bool:
        ampfn.backward(model(b[0]).sum())
        ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
        if fail["now"]:
            raise RuntimeError("data loader hiccup")
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    with pytest.raises(RuntimeError, match="hiccup"):
        train_step(batches(1)[0])
    opt.zero_grad()
    fail["now"] = False
    assert train_step(batches(1)[0]) is True
    assert s.state_dict()["_growth_tracker"] == 1


def test_exception_after_step_completes_the_update() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = scaler("cpu")

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch) -> None:
        ampfn.backward(model(b[0]).sum())
        ampfn.step(opt)
        opt.zero_grad()
        raise ValueError("after the step")

    for b in batches(2):
        with pytest.raises(ValueError, match="after the step"):
            train_step(b)
    assert s.state_dict()["_growth_tracker"] == 0  # grew after 2 clean updates
    assert s.get_scale() == 2.0**11


def test_state_dict_round_trip_continues_bit_for_bit() -> None:
    data = batches(10)

    def build() -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = ampfn.compose(
            ampfn.with_grad_scaling(scaler("cpu")), ampfn.with_autocast("fp16", "cpu")
        )(make_step(model, opt))
        return step, model, opt

    straight, m1, _ = build()
    for b in data:
        straight(b)

    first, m2, o2 = build()
    for b in data[:5]:
        first(b)
    saved = (ampfn.state_dict(first), m2.state_dict(), o2.state_dict())
    resumed, m3, o3 = build()
    ampfn.load_state_dict(resumed, saved[0])
    m3.load_state_dict(saved[1])
    o3.load_state_dict(saved[2])
    for b in data[5:]:
        resumed(b)
    assert params_equal(m1, m3)
    assert ampfn.state_dict(straight) == ampfn.state_dict(resumed)


def test_accepts_objects_with_the_grad_scaler_interface() -> None:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    ampfn.with_grad_scaling(ShardedGradScaler("cpu"))

    class Duck:
        def scale(self, x: Any) -> Any:
            return x

        def unscale_(self, o: Any) -> None: ...
        def step(self, o: Any) -> None: ...
        def update(self) -> None: ...
        def get_scale(self) -> float:
            return 1.0

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, s: Any) -> None: ...

    ampfn.with_grad_scaling(Duck())


def test_rejects_a_non_scaler() -> None:
    with pytest.raises(
        TypeError,
        match=r"with_grad_scaling\(scaler\): expected a torch.amp.GradScaler .* object lacks scale",
    ):
        ampfn.with_grad_scaling(object())
    with pytest.raises(TypeError, match="float lacks"):
        ampfn.with_grad_scaling(2.0**16)


def test_disabled_scaler_is_plain_training() -> None:
    model, ref = mlp(), mlp()
    o1 = torch.optim.SGD(model.parameters(), lr=0.1)
    o2 = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaled = ampfn.with_grad_scaling(torch.amp.GradScaler("cpu", enabled=False))(
        make_step(model, o1)
    )
    plain = make_step(ref, o2)
    for b in batches(3):
        scaled(b)
        plain(b)
    assert params_equal(model, ref)


def test_stepping_an_optimizer_twice_in_one_call_is_an_error_that_leaves_the_scaler_clean() -> (
    None
):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = scaler("cpu")
    twice = {"now": True}

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch) -> bool:
        ampfn.backward(model(b[0]).sum())
        stepped = ampfn.step(opt)
        if twice["now"]:
            ampfn.step(opt)
        opt.zero_grad()
        return stepped

    with pytest.raises(
        RuntimeError,
        match=r"ampfn.step\(optimizer\): this optimizer already stepped in this call",
    ):
        train_step(batches(1)[0])
    twice["now"] = False
    opt.zero_grad()
    assert train_step(batches(1)[0]) is True
    assert s.state_dict()["_growth_tracker"] == 0  # two updates: 1 of 2, then growth
    assert s.get_scale() == 2.0**11


def test_a_failing_step_keeps_its_own_exception() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_grad_scaling(scaler("cpu"))
    def train_step(b: Batch) -> None:
        ampfn.step(opt)  # before any backward: an error, and no update() hides it

    with pytest.raises(
        RuntimeError, match=r"ampfn.step\(optimizer\): no ampfn.backward ran"
    ):
        train_step(batches(1)[0])
