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


def test_an_exception_after_the_step_leaves_the_scaler_as_before_the_call() -> None:
    """A call that raises commits nothing: the scale and its growth tracker stay as they
    were (the optimizer's step itself happened), and the next correct call updates the
    scaler exactly as the first call of a fresh pipeline would."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s, fresh = scaler("cpu"), scaler("cpu")
    fail = {"now": True}

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch) -> None:
        ampfn.backward(model(b[0]).sum())
        ampfn.step(opt)
        opt.zero_grad()
        if fail["now"]:
            raise ValueError("after the step")

    for b in batches(2):
        with pytest.raises(ValueError, match="after the step"):
            train_step(b)
    assert s.state_dict() == fresh.state_dict()
    fail["now"] = False
    train_step(batches(1)[0])
    reference = mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    fresh.scale(reference(batches(1)[0][0]).sum()).backward()
    fresh.step(ref_opt)
    fresh.update()
    assert s.state_dict() == fresh.state_dict()


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
    # the failed call committed nothing: one update, 1 of 2 toward growth
    assert s.state_dict()["_growth_tracker"] == 1
    assert s.get_scale() == 2.0**10


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


# --------------------------------------------------------------------------- misuse is an error


class PublicOnly:
    """A scaler with GradScaler's public methods and nothing else (delegating)."""

    def __init__(self, inner: torch.amp.GradScaler) -> None:
        self._inner = inner

    def scale(self, x: Any) -> Any:
        return self._inner.scale(x)

    def unscale_(self, o: Any) -> None:
        self._inner.unscale_(o)

    def step(self, o: Any, *args: Any, **kwargs: Any) -> Any:
        return self._inner.step(o, *args, **kwargs)

    def update(self) -> None:
        self._inner.update()

    def get_scale(self) -> float:
        return self._inner.get_scale()

    def state_dict(self) -> dict[str, Any]:
        return self._inner.state_dict()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self._inner.load_state_dict(s)


def scaling_transforms() -> list[Any]:
    return [
        pytest.param(
            lambda m, o: ampfn.with_grad_scaling(scaler("cpu")), id="with_grad_scaling"
        ),
        pytest.param(
            lambda m, o: ampfn.with_grad_scaling(scaler("cpu"), sync=False),
            id="sync-free",
        ),
        pytest.param(
            lambda m, o: ampfn.with_apex("O1", m, o, backend="native"), id="apex-O1"
        ),
        pytest.param(
            lambda m, o: ampfn.with_apex("O2", m, o, backend="native"), id="apex-O2"
        ),
        pytest.param(
            lambda m, o: ampfn.with_apex("O1", m, o, backend="native", num_losses=2),
            id="apex-O1-2-losses",
        ),
    ]


@pytest.mark.parametrize("transform", scaling_transforms())
def test_calling_optimizer_step_directly_is_an_error_before_anything_changes(
    transform: Any,
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @transform(model, opt)
    def train_step(b: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
        opt.step()  # the classic slip: the gradients are still scaled

    before = twin(model)  # after with_apex cast it
    with pytest.raises(
        RuntimeError,
        match=r"SGD.step\(\) was called directly .* call ampfn.step\(optimizer\)",
    ):
        train_step(batches(1)[0])
    assert params_equal(model, before)
    opt.step()  # outside the step it is plain PyTorch again
    ampfn.step(opt)


@pytest.mark.parametrize("transform", scaling_transforms())
def test_loss_backward_called_directly_is_an_error_naming_ampfn_backward(
    transform: Any,
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    direct = {"now": False}

    @transform(model, opt)
    def train_step(b: Batch) -> Any:
        loss = F.cross_entropy(model(b[0]).float(), b[1])
        if direct["now"]:
            loss.backward()
        else:
            ampfn.backward(loss)
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    data = batches(3)
    train_step(data[0])  # a correct call first: later calls must be caught too
    direct["now"] = True
    for b in data[1:]:
        with pytest.raises(
            RuntimeError,
            match=r"no ampfn.backward ran .* call ampfn.backward\(loss\) instead",
        ):
            train_step(b)
        opt.zero_grad()


# --------------------------------------------------------------------------- skips are reported truly


def optimizer_kinds() -> list[Any]:
    kinds: list[Any] = [
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), id="SGD"),
        pytest.param(
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
            id="SGD-loop",
        ),
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2), id="Adam"),
        pytest.param(
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), id="AdamW-fused"
        ),
        pytest.param(
            lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), id="Adam-fused"
        ),
        pytest.param(
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
            id="SGD-fused",
        ),
        pytest.param(lambda ps: torch.optim.RMSprop(ps, lr=1e-3), id="RMSprop"),
    ]
    return kinds


def scaler_kinds() -> list[Any]:
    # ShardedGradScaler needs a process group: tests/test_distributed.py
    return [
        pytest.param(lambda: scaler("cpu"), id="GradScaler"),
        pytest.param(lambda: PublicOnly(scaler("cpu")), id="public-methods-only"),
    ]


@pytest.mark.parametrize("make_scaler", scaler_kinds())
@pytest.mark.parametrize("make_opt", optimizer_kinds())
def test_step_reports_every_skip_for_every_optimizer_and_scaler(
    make_opt: Any, make_scaler: Any
) -> None:
    model = mlp()
    try:
        opt = make_opt(model.parameters())
    except RuntimeError as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"optimizer unavailable: {e}")
    s = make_scaler()

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch, inf: bool) -> bool:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        if inf:
            poison(model)
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    pattern = [False, True, True, False, False, True]
    before: list[torch.nn.Module] = []
    results = []
    for b, inf in zip(batches(len(pattern)), pattern, strict=True):
        before.append(twin(model))
        results.append(train_step(b, inf))
        if inf:  # a skipped step leaves the parameters as they were
            assert params_equal(model, before[-1])
    assert results == [not inf for inf in pattern]


def test_clipping_a_fused_optimizer_under_scaling_matches_hand_written() -> None:
    """Lightning refuses this; GradScaler supports it, and so does ampfn."""
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True)
    s1, s2 = scaler("cpu"), scaler("cpu")
    step = ampfn.with_grad_scaling(s2)(make_step(m2, o2, clip=0.5))
    for i, (x, y) in enumerate(batches(ITERS)):
        s1.scale(F.cross_entropy(m1(x).float(), y)).backward()
        if i == SKIP_AT:
            poison(m1)
        s1.unscale_(o1)
        torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
        s1.step(o1)
        s1.update()
        o1.zero_grad(set_to_none=True)

        @ampfn.with_handler(_PoisonAt(m2, i == SKIP_AT))
        def poisoned(b: Batch) -> Any:
            return step(b)

        poisoned((x, y))
    assert params_equal(m1, m2)
    assert s1.state_dict() == s2.state_dict()


class _PoisonAt(ampfn.Handler):
    def __init__(self, model: torch.nn.Module, now: bool) -> None:
        self.model, self.now = model, now

    def backward(
        self, proceed: Any, loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        proceed(loss, kwargs)
        if self.now:
            poison(self.model)


# --------------------------------------------------------------------------- unscaling without a step


def test_unscale_for_logging_then_step_in_a_later_call() -> None:
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    s, ref_s = scaler("cpu"), scaler("cpu")
    x, y = batches(1)[0]

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch | None) -> Any:
        if b is not None:  # backward, and read the true gradient norm for logging
            ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
            return float(ampfn.clip_grad_norm_(model.parameters(), 1e9, opt))
        return ampfn.step(opt)  # a later call steps

    norm = train_step((x, y))
    ref_s.scale(F.cross_entropy(ref(x), y)).backward()
    ref_s.unscale_(ref_opt)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9))
    ref_s.step(ref_opt)
    ref_s.update()
    assert norm == ref_norm
    assert train_step(None) is True
    assert params_equal(model, ref)
    assert s.state_dict() == ref_s.state_dict()


def test_unscale_then_clearing_the_gradients_starts_a_fresh_update() -> None:
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    s, ref_s = scaler("cpu"), scaler("cpu")
    data = batches(3)
    log_only = {"now": True}

    @ampfn.with_grad_scaling(s)
    def train_step(b: Batch) -> bool | None:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        ampfn.unscale_(opt)  # read the true gradients, e.g. to log their norm
        if log_only["now"]:
            opt.zero_grad()  # clears them (set_to_none): the next call starts afresh
            return None
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    assert train_step(data[0]) is None
    log_only["now"] = False
    assert train_step(data[1]) is True
    assert train_step(data[2]) is True
    for x, y in data[1:]:  # the reference never saw the cleared call
        ref_s.scale(F.cross_entropy(ref(x), y)).backward()
        ref_s.unscale_(ref_opt)
        ref_s.step(ref_opt)
        ref_s.update()
        ref_opt.zero_grad()
    assert params_equal(model, ref)
    assert s.state_dict() == ref_s.state_dict()


def test_unscale_then_zeroing_in_place_names_the_case_and_its_fixes() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(2)
    first = {"now": True}

    @ampfn.with_grad_scaling(scaler("cpu"))
    def train_step(b: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        ampfn.unscale_(opt)
        if first["now"]:
            opt.zero_grad(set_to_none=False)
            return
        ampfn.step(opt)

    train_step(data[0])
    first["now"] = False
    with pytest.raises(
        RuntimeError,
        match=r"zeroed in place since, not cleared.*zero_grad\(set_to_none=True\), or call ampfn.step\(optimizer\) in the call that unscales",
    ):
        train_step(data[1])


# --------------------------------------------------------------------------- gradient penalty, step arguments


def penalty_by_hand(
    model: torch.nn.Module, opt: Any, s: torch.amp.GradScaler, data: list[Batch]
) -> list[float]:
    """PyTorch's AMP example "Gradient penalty", hand-written with GradScaler; the scale
    after each step."""
    scales = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaled_grads = torch.autograd.grad(
            s.scale(loss), list(model.parameters()), create_graph=True
        )
        inv_scale = 1.0 / s.get_scale()
        grads = [p * inv_scale for p in scaled_grads]
        with torch.autocast("cpu", dtype=torch.float16):
            penalty = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
            loss = loss + penalty
        s.scale(loss).backward()
        s.step(opt)
        s.update()
        opt.zero_grad()
        scales.append(s.get_scale())
    return scales


def test_gradient_penalty_matches_pytorchs_amp_recipe() -> None:
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.05)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05)
    s1, s2 = scaler("cpu"), scaler("cpu")
    data = batches(ITERS)
    penalty_by_hand(m1, o1, s1, data)

    @ampfn.compose(ampfn.with_grad_scaling(s2), ampfn.with_autocast("fp16", "cpu"))
    def train_step(b: Batch) -> bool:
        loss = F.cross_entropy(m2(b[0]).float(), b[1])
        grads = ampfn.grad(loss, list(m2.parameters()), create_graph=True)
        penalty = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        ampfn.backward(loss + penalty)
        stepped = ampfn.step(o2)
        o2.zero_grad()
        return stepped

    for b in data:
        train_step(b)
    assert params_equal(m1, m2)
    assert s1.state_dict() == s2.state_dict()


@pytest.mark.parametrize("transform", scaling_transforms())
def test_grad_returns_the_true_gradients_under_every_scaler(transform: Any) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    ref = twin(model)
    (ref_grad,) = torch.autograd.grad(
        F.cross_entropy(ref(x), y), [next(ref.parameters())]
    )

    @transform(model, opt)
    def train_step(b: Batch) -> torch.Tensor:
        loss = F.cross_entropy(model(b[0]).float(), b[1])
        (g,) = ampfn.grad(loss, [next(model.parameters())])
        return g

    g = train_step((x, y))
    torch.testing.assert_close(g.float(), ref_grad, atol=2e-3, rtol=2e-2)


def test_stepping_twice_in_one_call_is_allowed_without_scaling() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.5)

    @ampfn.with_autocast("bf16", "cpu")
    def twice() -> tuple[bool, bool]:
        ampfn.backward(w.sum())
        return ampfn.step(opt), ampfn.step(opt)

    assert twice() == (True, True)
    assert torch.equal(w.detach(), torch.zeros(1))


def closure_step(
    transform: Any, model: torch.nn.Module, opt: Any, positional: bool
) -> tuple[Any, list[int]]:
    """A step that hands ampfn.step a closure (which must never run under scaling)."""
    ran: list[int] = []
    x, y = batches(1)[0]

    def closure() -> torch.Tensor:
        ran.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    @transform
    def step(_: Any) -> Any:
        ampfn.backward(F.cross_entropy(model(x).float(), y))
        if positional:
            return ampfn.step(opt, closure)
        return ampfn.step(opt, closure=closure)

    return step, ran


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_a_closure_under_loss_scaling_is_refused_before_anything_changes(
    sync: bool, positional: bool
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    s = scaler("cpu")
    step, ran = closure_step(
        ampfn.with_grad_scaling(s, sync=sync), model, opt, positional
    )
    with pytest.raises(
        RuntimeError,
        match=r"ampfn.step\(optimizer, closure\): with_grad_scaling refuses closures.*"
        r"not scaled.*GradScaler does not support closures",
    ):
        step(None)
    assert not ran
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )
    assert s.get_scale() == 2.0**10


def test_unscaling_without_stepping_then_clearing_needs_a_grad_scaler() -> None:
    """A scaler with only GradScaler's public methods cannot forget an unscale_: clearing
    the gradients and starting afresh is a clear error at the next backward."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = PublicOnly(scaler("cpu"))
    x, y = batches(1)[0]
    stepping = [False]

    @ampfn.with_grad_scaling(s)
    def train_step(_: Any) -> Any:
        ampfn.backward(F.cross_entropy(model(x).float(), y))
        ampfn.unscale_(opt)
        stepped = ampfn.step(opt) if stepping[0] else None
        opt.zero_grad(set_to_none=True)
        return stepped

    train_step(None)  # unscales, does not step, clears the gradients
    before = [p.detach().clone() for p in model.parameters()]
    stepping[0] = True
    with pytest.raises(
        RuntimeError,
        match=r"with_grad_scaling.*PublicOnly.*public methods.*call ampfn.step\(optimizer\) "
        r"in the call that unscales, or pass a torch.amp.GradScaler",
    ):
        train_step(None)
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )


def every_scaler() -> list[Any]:
    """The scaling transforms, and Apex O3's dynamic scale."""
    return [
        *scaling_transforms(),
        pytest.param(
            lambda m, o: ampfn.with_apex(
                "O3", m, o, backend="native", loss_scale="dynamic"
            ),
            id="apex-O3-dynamic",
        ),
    ]


@pytest.mark.parametrize("make_transform", every_scaler())
def test_nonfinite_gradients_from_ampfn_grad_make_the_step_skip(
    make_transform: Any,
) -> None:
    """A gradient penalty whose gradients overflow: the step skips under every scaler."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t = make_transform(model, opt)
    before = [p.detach().clone() for p in model.parameters()]

    @t
    def step(batch: Batch) -> tuple[bool, bool]:
        loss = F.cross_entropy(model(batch[0]).float(), batch[1])
        grads = ampfn.grad(
            loss * float("inf"), list(model.parameters()), create_graph=True
        )
        finite = all(bool(g.isfinite().all()) for g in grads)
        penalty = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        ampfn.backward(loss + penalty)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return finite, bool(stepped)

    assert step(batches(1)[0]) == (False, False)
    assert all(
        torch.equal(p.float(), q.float())
        for p, q in zip(model.parameters(), before, strict=True)
    )


class FactorSGD(torch.optim.SGD):
    """An optimizer whose step takes an argument of its own."""

    def step(self, closure: Any = None, *, factor: float = 1.0) -> Any:  # type: ignore[override]
        self.factor = factor
        return super().step(closure)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_step_arguments_reach_the_optimizer_under_scaling(sync: bool) -> None:
    model = mlp()
    opt = FactorSGD(model.parameters(), lr=0.05)

    @ampfn.with_grad_scaling(scaler("cpu"), sync=sync)
    def step(batch: Batch) -> Any:
        ampfn.backward(F.cross_entropy(model(batch[0]), batch[1]))
        return ampfn.step(opt, factor=3.0)

    assert bool(step(batches(1)[0]))
    assert opt.factor == 3.0


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_an_optimizer_like_wrapper_steps_and_skips_as_the_optimizer_it_wraps(
    sync: bool,
) -> None:
    from test_apex import Larc

    def run(wrap: bool) -> tuple[torch.nn.Module, list[bool]]:
        model = mlp()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt: Any = Larc(inner) if wrap else inner

        @ampfn.with_grad_scaling(scaler("cpu"), sync=sync)
        def step(batch: Batch, inf: bool) -> bool:
            loss = F.cross_entropy(model(batch[0]), batch[1])
            ampfn.backward(loss * (float("inf") if inf else 1.0))
            stepped = ampfn.step(opt)
            opt.zero_grad()
            return bool(stepped)

        return model, [step(b, i == SKIP_AT) for i, b in enumerate(batches(ITERS))]

    wrapped, r1 = run(True)
    plain, r2 = run(False)
    assert r1 == r2 == [i != SKIP_AT for i in range(ITERS)]
    assert params_equal(wrapped, plain)
