"""Loss scaling on the device: sync-free GradScaler scaling, Apex's per-loss scaler."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ampfn
from ampfn._scaling import LossScale
from helpers import Batch, batches, mlp, params_equal

SRC = str(Path(ampfn.__file__).parent)
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "Adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
}
POISON = {
    2,
    3,
    6,
}  # overflowing steps (the first step stays clean: its state is created)


def gs(device: str = "cpu") -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)


def hand_written(
    device: str,
    make: Callable[[Any], torch.optim.Optimizer],
    clip: bool,
    data: list[Batch],
) -> tuple[Any, ...]:
    model = mlp(device=device)
    opt = make(model.parameters())
    s = gs(device)
    for i, (x, y) in enumerate(data):
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        s.scale(loss * (float("inf") if i in POISON else 1.0)).backward()
        if clip:
            s.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        s.step(opt)
        s.update()
        opt.zero_grad(set_to_none=True)
    return model, opt, s


def with_ampfn(
    device: str,
    make: Callable[[Any], torch.optim.Optimizer],
    clip: bool,
    data: list[Batch],
    sync: bool,
) -> tuple[Any, ...]:
    model = mlp(device=device)
    opt = make(model.parameters())
    s = gs(device)
    calls = {"i": 0}

    @ampfn.compose(
        ampfn.with_grad_scaling(s, sync=sync), ampfn.with_autocast("fp16", device)
    )
    def train_step(b: Batch) -> Any:
        poisoned = calls["i"] in POISON
        calls["i"] += 1
        loss = F.cross_entropy(model(b[0]).float(), b[1])
        ampfn.backward(loss * (float("inf") if poisoned else 1.0))
        if clip:
            ampfn.clip_grad_norm_(model.parameters(), 0.5, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    results = [train_step(b) for b in data]
    return model, opt, s, results


def state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k][n], sb[k][n])
        if isinstance(sa[k][n], torch.Tensor)
        else sa[k][n] == sb[k][n]
        for k in sa
        for n in sa[k]
    )


@pytest.mark.parametrize("clip", [False, True], ids=["", "clip"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_both_modes_match_hand_written_grad_scaler(
    device: str, opt_name: str, sync: bool, clip: bool
) -> None:
    data = batches(8, device=device)
    try:
        m1, o1, s1 = hand_written(device, OPTIMIZERS[opt_name], clip, data)
    except RuntimeError as e:  # pragma: no cover - fused kernels depend on the build
        pytest.skip(f"{opt_name} unavailable here: {e}")
    m2, o2, s2, results = with_ampfn(device, OPTIMIZERS[opt_name], clip, data, sync)
    assert params_equal(m1, m2)
    assert state_equal(o1, o2)
    assert s1.state_dict() == s2.state_dict()
    expected = [i not in POISON for i in range(len(data))]
    if sync:
        assert results == expected
    else:  # 0-dim bool tensors on the gradients' device
        assert all(
            r.dtype == torch.bool and r.dim() == 0 and r.device.type == device
            for r in results
        )
        assert [bool(r) for r in results] == expected


class HostReads:
    """Counts Tensor.item / __bool__ / __float__ / __int__ / tolist called from ampfn's code."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __init__(self) -> None:
        self.calls: list[str] = []

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        originals = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def wrap(name: str, fn: Any) -> Any:
            def counted(t: torch.Tensor, *args: Any) -> Any:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(SRC):
                    self.calls.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
                return fn(t, *args)

            return counted

        for n, fn in originals.items():
            setattr(torch.Tensor, n, wrap(n, fn))
        try:
            yield
        finally:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_sync_free_steps_read_nothing_back_from_the_device(opt_name: str) -> None:
    data = batches(8)
    model = mlp()
    try:
        opt = OPTIMIZERS[opt_name](model.parameters())
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(str(e))
    s = gs()
    overflow = {"now": False}

    @ampfn.compose(
        ampfn.with_grad_scaling(s, sync=False), ampfn.with_autocast("fp16", "cpu")
    )
    def train_step(b: Batch) -> torch.Tensor:
        loss = F.cross_entropy(model(b[0]).float(), b[1]) * (
            float("inf") if overflow["now"] else 1.0
        )
        ampfn.backward(loss)
        ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped  # type: ignore[no-any-return]

    train_step(
        data[0]
    )  # the optimizer's first step creates its state (one read allowed)
    reads = HostReads()
    with reads.watching():
        for i, b in enumerate(data[1:]):
            overflow["now"] = i % 3 == 1
            train_step(b)
    assert reads.calls == []


@pytest.mark.cuda
def test_sync_free_steps_do_not_synchronize_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = mlp(device="cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    s = gs("cuda")

    @ampfn.compose(
        ampfn.with_grad_scaling(s, sync=False), ampfn.with_autocast("fp16", "cuda")
    )
    def train_step(b: Batch) -> torch.Tensor:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]))
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped  # type: ignore[no-any-return]

    data = batches(4, device="cuda")
    train_step(data[0])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with (
            warnings.catch_warnings()
        ):  # "a prototype feature": the mode is set all the same
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        for b in data[1:]:
            train_step(b)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.cuda.get_sync_debug_mode() == previous


def test_an_overflow_on_the_first_step_creates_no_state() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    @ampfn.with_grad_scaling(gs(), sync=False)
    def train_step(b: Batch) -> torch.Tensor:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]) * float("inf"))
        return ampfn.step(opt)  # type: ignore[no-any-return]

    before = [p.detach().clone() for p in model.parameters()]
    assert not bool(train_step(batches(1)[0]))
    assert opt.state == {}  # as GradScaler leaves it: the step never ran
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )


def test_sync_free_needs_a_torch_grad_scaler() -> None:
    class Duck:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    with pytest.raises(
        TypeError,
        match=r"sync=False keeps the scale on the device inside a torch.amp.GradScaler",
    ):
        ampfn.with_grad_scaling(Duck(), sync=False)
    with pytest.raises(TypeError, match="sync must be a bool"):
        ampfn.with_grad_scaling(sync="no")  # type: ignore[arg-type]


def test_sync_free_state_is_the_scalers_own() -> None:
    s = gs()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_grad_scaling(s, sync=False)
    def step(b: Batch) -> None:
        ampfn.backward(model(b[0]).sum())
        ampfn.step(opt)
        opt.zero_grad()

    for b in batches(4):
        step(b)
    assert s.get_scale() == 2.0**12  # four clean updates, growth interval 2: grew twice
    assert ampfn.state_dict(step)["transforms"][0]["state"]["scaler"] == s.state_dict()
    assert ampfn.loss_scale(step) == s.get_scale()


def test_apex_loss_scale_keeps_grad_scalers_state_format() -> None:
    ls = LossScale(
        2.0**16,
        dynamic=True,
        lo=None,
        hi=2.0**24,
        window=2000,
        device=torch.device("cpu"),
    )
    ls.update(torch.ones(()))
    state = ls.state_dict()
    assert state == torch.amp.GradScaler(
        "cpu", init_scale=2.0**15, growth_interval=2000
    ).state_dict() | {"_growth_tracker": 0}
    other = LossScale(
        1.0, dynamic=True, lo=None, hi=2.0**24, window=2000, device=torch.device("cpu")
    )
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize("clip", [False, True], ids=["step", "clip"])
def test_sync_free_fp16_gradients_are_a_clear_error(clip: bool) -> None:
    model = mlp().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]

    @ampfn.with_grad_scaling(gs(), sync=False)
    def step(b: Batch) -> Any:
        ampfn.backward(F.cross_entropy(model(b[0].half()).float(), b[1]))
        if clip:
            ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
        return ampfn.step(opt)

    with pytest.raises(
        ValueError,
        match=r"with_grad_scaling\(sync=False\): .*fp16.* needs fp32 gradients.*"
        r"with_autocast.*with_apex",
    ):
        step((x, y))
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )


def _poison(model: torch.nn.Module) -> None:
    grad = next(model.parameters()).grad
    assert grad is not None
    grad.view(-1)[0] = float("inf")


def test_sync_free_skips_each_optimizer_on_its_own_overflow_as_grad_scaler_does() -> (
    None
):
    """Two optimizers, one loss; one optimizer's gradients overflow: GradScaler skips
    that one only, and so does the sync-free mode, bit for bit."""
    skip_at, n = 3, 8
    data = batches(n)

    def build() -> tuple[Any, ...]:
        a, b = mlp(0), mlp(1)
        oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
        ob = torch.optim.Adam(b.parameters(), lr=1e-3)
        return a, b, oa, ob, gs()

    a1, b1, oa1, ob1, s1 = build()
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(a1(x).float() + b1(x).float(), y)
        s1.scale(loss).backward()
        if i == skip_at:
            _poison(b1)
        s1.step(oa1)
        s1.step(ob1)
        s1.update()
        oa1.zero_grad()
        ob1.zero_grad()

    a2, b2, oa2, ob2, s2 = build()
    calls = [0]

    @ampfn.compose(
        ampfn.with_grad_scaling(s2, sync=False), ampfn.with_autocast("fp16", "cpu")
    )
    def step(batch: Batch) -> tuple[bool, bool]:
        x, y = batch
        ampfn.backward(F.cross_entropy(a2(x).float() + b2(x).float(), y))
        if calls[0] == skip_at:
            _poison(b2)
        calls[0] += 1
        stepped = bool(ampfn.step(oa2)), bool(ampfn.step(ob2))
        oa2.zero_grad()
        ob2.zero_grad()
        return stepped

    results = [step(b) for b in data]
    assert results == [(True, i != skip_at) for i in range(n)]
    assert params_equal(a1, a2)
    assert params_equal(b1, b2)
    assert s1.state_dict() == s2.state_dict()


def test_sync_free_gradient_accumulation_matches_the_syncing_mode_bit_for_bit() -> None:
    skip_at, n, micro = 3, 6, 3

    def run(sync: bool) -> tuple[torch.nn.Module, torch.amp.GradScaler, list[Any]]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        s = gs()
        calls = [0]

        @ampfn.compose(
            ampfn.with_grad_scaling(s, sync=sync), ampfn.with_autocast("fp16", "cpu")
        )
        def step(batch: Batch) -> Any:
            i, j = divmod(calls[0], micro)
            calls[0] += 1
            loss = F.cross_entropy(model(batch[0]).float(), batch[1]) / micro
            ampfn.backward(loss)
            if j < micro - 1:
                return None  # accumulate: backward only
            if i == skip_at:
                _poison(model)
            ampfn.clip_grad_norm_(model.parameters(), 0.5, opt)
            stepped = ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return bool(stepped)

        results = [step(b) for b in batches(n * micro)]
        return model, s, [r for r in results if r is not None]

    m1, s1, r1 = run(True)
    m2, s2, r2 = run(False)
    assert r1 == r2 == [i != skip_at for i in range(n)]
    assert params_equal(m1, m2)
    assert s1.state_dict() == s2.state_dict()
