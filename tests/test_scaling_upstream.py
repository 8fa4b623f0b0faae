"""PyTorch's own GradScaler tests, ported to ampfn's effects under ``with_grad_scaling``.

Upstream: pytorch/pytorch ``test/test_cuda.py`` (``TestCuda.test_grad_scaling_*``; the
device-generic copies now live in ``test/test_torch.py``), on the shared case of
``torch/testing/_internal/common_cuda.py``: ``_create_scaling_case`` (four batches of
8x8 inputs and targets, ``MSELoss``, an inf written into ``model[1].weight.grad`` at
``skip_iter = 2``) and ``_create_scaling_models_optimizers`` (two twin
``Sequential(Linear(8, 8), Linear(8, 8))`` with SGD at lr=1), run by ``_run_scaling_case``
(``GradScaler(init_scale=128, growth_factor=2, growth_interval=1)``, enabled and
disabled; the scale must end at ``128 * 2**unskipped * 0.5**skipped``).

Each scenario runs four ways, on the CPU: upstream's control loop (no scaling, the step
skipped by hand at ``skip_iter``), upstream's hand-written GradScaler loop, and the same
step written with ampfn's effects under ``with_grad_scaling(scaler)`` and
``with_grad_scaling(scaler, sync=False)``. The hand-written loop must meet upstream's
own assertions against the control; the syncing ampfn run must equal the hand-written
loop bit for bit (parameters, gradients, optimizer state, the scaler's state, which
steps skipped); the sync-free run must equal it in values.

| upstream test | here |
|---|---|
| ``test_grad_scaling_autocast`` (SGD; Adam, AdamW, foreach, fused) | ``test_scenario[autocast-*]`` |
| its ``try_pickle`` half (the scaler pickled every iteration) | ``test_checkpoint_every_iteration_is_the_pickle_round_trip`` |
| ``test_grad_scaling_clipping`` | ``test_scenario[clipping]`` (see ``clipping``), ``test_clipping_scaled_gradients_is_refused`` |
| ``test_grad_scaling_clipping_separate_unscale`` | ``test_scenario[clipping_separate_unscale]`` |
| ``test_grad_scaling_penalty`` | ``test_scenario[penalty]`` |
| ``test_grad_scaling_accumulation`` | ``test_scenario[accumulation]`` |
| ``test_grad_scaling_multiple`` | ``test_multiple_models_optimizers_and_losses`` |
| ``test_grad_scaling_update_scale`` | ``test_update_scale_follows_amp_update_scale`` |
| ``test_grad_scaling_unscale`` | ``test_unscale_finds_inf_and_nan_in_any_gradient_layout``, ``test_fp16_gradients_are_refused_as_grad_scaler_refuses_them`` |
| ``test_grad_scaling_unscale_sparse`` | ``test_sparse_gradients`` |
| ``test_grad_scaling_state_dict`` | ``test_state_dict_loads_another_scalers_settings`` |
| ``test_grad_scale_will_not_overflow`` | ``test_scale_will_not_overflow`` |
| ``test_grad_scaling_autocast_fused_optimizers`` (``found_inf``) | ``test_fused_optimizers_take_found_inf`` |

Not ported: ``test_grad_scaling_device_as_key``, ``test_grad_scaling_scale`` and
``test_grad_scaling_multigpu`` need two GPUs; the raw kernel calls of
``test_grad_scaling_unscale`` (mismatched dtypes and devices passed to
``torch._amp_foreach_non_finite_check_and_unscale_``) test torch, not a path ampfn drives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

import pytest
import torch
from torch import nn

import ampfn

Data = list[tuple[torch.Tensor, torch.Tensor]]
Make = Callable[..., torch.optim.Optimizer]
SKIP_ITER = 2  # _create_scaling_case's skip_iter
LOSS = nn.MSELoss()


def create_case(seed: int = 0) -> tuple[nn.Module, Data]:
    """``_create_scaling_case`` on the CPU: one model (its twins are deep copies), data."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
    return model, data


def upstream_scaler(enabled: bool = True) -> torch.amp.GradScaler:
    """``_run_scaling_case``'s scaler."""
    return torch.amp.GradScaler(
        "cpu", init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1
    )


def poison(model: nn.Module) -> None:
    """Upstream's injection: ``model[1].weight.grad.fill_(inf)``."""
    grad = model[1].weight.grad  # type: ignore[index]
    assert grad is not None
    with torch.no_grad():
        grad.fill_(float("inf"))


def as_bool(stepped: Any) -> bool:
    return bool(stepped)


# --- the scenarios: upstream's two branches of run(), and the step with ampfn's effects ---


SGD: Make = partial(torch.optim.SGD, lr=1.0)  # _create_scaling_models_optimizers'


@dataclass(frozen=True)
class Scenario:
    """One upstream ``run(..., try_scaling_api)``: ``control`` is its False branch,
    ``by_hand`` its True branch, ``effects`` one iteration written with ampfn's effects
    (``(i, batch) -> stepped or None``, None where it does not step)."""

    name: str
    control: Callable[[Data, nn.Module, torch.optim.Optimizer, bool], None]
    by_hand: Callable[[Data, nn.Module, torch.optim.Optimizer, Any], None]
    effects: Callable[[nn.Module, torch.optim.Optimizer, bool], Callable[..., Any]]
    unskipped: int
    skipped: int
    atol: float = 1e-7  # upstream's, against the control
    autocast: bool = False
    make: Make = SGD
    # upstream itself expects the control comparison to fail (Adam at lr=1 under fp16)
    control_fails: bool = False


def plain_control(clip: float | None = None) -> Callable[..., None]:
    def control(
        data: Data, model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
    ) -> None:
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = LOSS(model(x), y)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if not enabled or i != SKIP_ITER:
                opt.step()

    return control


def autocast_by_hand(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> None:
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.half):
            loss = LOSS(model(x), y)
        scaler.scale(loss).backward()
        if i == SKIP_ITER and scaler.is_enabled():
            poison(model)
        scaler.step(opt)
        scaler.update()


def plain_effects(clip: float | None = None) -> Callable[..., Callable[..., Any]]:
    """The step upstream's autocast and clipping scenarios take, with ampfn's effects
    (autocast comes from ``with_autocast`` where the scenario has it)."""

    def effects(
        model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
    ) -> Callable[..., Any]:
        def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
            opt.zero_grad()
            x, y = batch
            ampfn.backward(LOSS(model(x), y))
            if i == SKIP_ITER and enabled:
                poison(model)
            if clip is not None:
                ampfn.clip_grad_norm_(model.parameters(), clip, opt)
            return ampfn.step(opt)

        return step

    return effects


MAX_NORM = 0.2  # upstream's clipping scenarios


def clipping_by_hand(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> None:
    """``test_grad_scaling_clipping``: clip the scaled gradients by ``max_norm * scale``."""
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(LOSS(model(x), y)).backward()
        torch.nn.utils.clip_grad_norm_(
            model.parameters(), MAX_NORM * scaler.get_scale()
        )
        if i == SKIP_ITER and scaler.is_enabled():
            poison(model)
        scaler.step(opt)
        scaler.update()


def separate_unscale_by_hand(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> None:
    """``test_grad_scaling_clipping_separate_unscale``: unscale, then clip the true ones."""
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(LOSS(model(x), y)).backward()
        if i == SKIP_ITER and scaler.is_enabled():
            poison(model)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(opt)
        scaler.update()


def penalty_loss(loss: torch.Tensor, grads: Any) -> torch.Tensor:
    grad_norm: Any = 0
    for grad in grads:
        grad_norm += grad.pow(2).sum()
    return loss + grad_norm.sqrt()


def penalty_control(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
) -> None:
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = LOSS(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        penalty_loss(loss, grads).backward()
        if not enabled or i != SKIP_ITER:
            opt.step()


def penalty_by_hand(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> None:
    """``test_grad_scaling_penalty``: the gradients of the scaled loss, times 1/scale."""
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = LOSS(model(x), y)
        scaled = torch.autograd.grad(
            scaler.scale(loss), list(model.parameters()), create_graph=True
        )
        inv_scale = 1.0 / scaler.get_scale()
        grads = [p * inv_scale for p in scaled]
        scaler.scale(penalty_loss(loss, grads)).backward()
        if i == SKIP_ITER and scaler.is_enabled():
            poison(model)
        scaler.step(opt)
        scaler.update()


def penalty_effects(
    model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
) -> Callable[..., Any]:
    def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        opt.zero_grad()
        x, y = batch
        loss = LOSS(model(x), y)
        grads = ampfn.grad(loss, list(model.parameters()), create_graph=True)
        ampfn.backward(penalty_loss(loss, grads))
        if i == SKIP_ITER and enabled:
            poison(model)
        return ampfn.step(opt)

    return step


ACCUMULATE = 2  # test_grad_scaling_accumulation's iters_to_accumulate


def accumulation_control(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
) -> None:
    for i, (x, y) in enumerate(data):
        (LOSS(model(x), y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            opt.step()
            opt.zero_grad()


def accumulation_by_hand(
    data: Data, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any
) -> None:
    for i, (x, y) in enumerate(data):
        scaler.scale(LOSS(model(x), y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def accumulation_effects(
    model: nn.Module, opt: torch.optim.Optimizer, enabled: bool
) -> Callable[..., Any]:
    def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x, y = batch
        ampfn.backward(LOSS(model(x), y) / ACCUMULATE)
        if (i + 1) % ACCUMULATE:
            return None  # no step in this call: the scaler does not update
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    return step


# test_grad_scaling_autocast's optimizers (test_torch.py: SGD, Adam, AdamW; their
# foreach and fused variants); upstream expects Adam's comparison with the fp32
# control to fail at lr=1 and asserts that it does: here it is not asserted at all
AUTOCAST_OPTIMIZERS: dict[str, tuple[Make, bool]] = {
    "SGD": (partial(torch.optim.SGD, lr=1.0), False),
    "SGD-foreach": (partial(torch.optim.SGD, lr=1.0, foreach=True), False),
    "SGD-fused": (partial(torch.optim.SGD, lr=1.0, fused=True), False),
    "Adam": (partial(torch.optim.Adam, lr=1.0), True),
    "Adam-fused": (partial(torch.optim.Adam, lr=1.0, fused=True), True),
    "AdamW-foreach": (partial(torch.optim.AdamW, lr=1.0, foreach=True), True),
    "AdamW-fused": (partial(torch.optim.AdamW, lr=1.0, fused=True), True),
}

SCENARIOS = [
    *(
        Scenario(
            f"autocast-{name}",
            plain_control(),
            autocast_by_hand,
            plain_effects(),
            unskipped=3,
            skipped=1,
            atol=1e-3,  # upstream's: pure fp32 against fp16 and fp32
            autocast=True,
            make=make,
            control_fails=fails,
        )
        for name, (make, fails) in AUTOCAST_OPTIMIZERS.items()
    ),
    # ampfn clips the true gradients (ampfn.clip_grad_norm_ unscales first), so its
    # bit-for-bit partner is the separate-unscale loop; upstream's own loop, clipping
    # the scaled gradients by max_norm * scale, is matched in values (test_scenario)
    Scenario(
        "clipping",
        plain_control(MAX_NORM),
        clipping_by_hand,
        plain_effects(MAX_NORM),
        unskipped=3,
        skipped=1,
    ),
    Scenario(
        "clipping_separate_unscale",
        plain_control(MAX_NORM),
        separate_unscale_by_hand,
        plain_effects(MAX_NORM),
        unskipped=3,
        skipped=1,
    ),
    Scenario(
        "penalty", penalty_control, penalty_by_hand, penalty_effects, 3, 1, atol=1e-6
    ),
    Scenario(
        "accumulation",
        accumulation_control,
        accumulation_by_hand,
        accumulation_effects,
        unskipped=2,
        skipped=0,
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def pipeline(
    scenario: Scenario,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    sync: bool,
) -> Callable[..., Any]:
    transforms = [ampfn.with_grad_scaling(scaler, sync=sync)]
    if scenario.autocast:
        transforms.append(ampfn.with_autocast(torch.float16, "cpu"))
    step = scenario.effects(model, opt, scaler.is_enabled())
    return ampfn.compose(*transforms)(step)


def run_effects(
    scenario: Scenario, data: Data, model: nn.Module, scaler: Any, sync: bool
) -> tuple[torch.optim.Optimizer, list[bool]]:
    opt = scenario.make(model.parameters())
    step = pipeline(scenario, model, opt, scaler, sync)
    results = [step(i, batch) for i, batch in enumerate(data)]
    return opt, [as_bool(r) for r in results if r is not None]


def expected_steps(scenario: Scenario, enabled: bool) -> list[bool]:
    n = scenario.unskipped + scenario.skipped
    return [not (enabled and scenario.skipped and i == SKIP_ITER) for i in range(n)]


def grads_and_params(model: nn.Module) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for p in model.parameters():
        out += [p.detach(), p.grad]
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[Any]:
    state = opt.state_dict()["state"]
    return [state[k][n] for k in sorted(state) for n in sorted(state[k])]


def assert_bitwise(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert x.dtype == y.dtype
            assert torch.equal(x, y) or (
                x.isnan().any() and torch.equal(x.isnan(), y.isnan())
            )
        else:
            assert x == y


def assert_values(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        else:
            assert x == y


def scenario_params() -> list[Any]:
    out = []
    for name in BY_NAME:
        for enabled in (True, False):
            for sync in (True, False):
                ids = f"{name}-{'enabled' if enabled else 'disabled'}-{'sync' if sync else 'sync-free'}"
                out.append(pytest.param(name, enabled, sync, id=ids))
    return out


@pytest.mark.parametrize(("name", "enabled", "sync"), scenario_params())
def test_scenario(name: str, enabled: bool, sync: bool) -> None:
    scenario = BY_NAME[name]
    model, data = create_case()
    m_control, m_hand, m_ours = (copy.deepcopy(model) for _ in range(3))

    scenario.control(data, m_control, scenario.make(m_control.parameters()), enabled)
    hand_scaler = upstream_scaler(enabled)
    o_hand = scenario.make(m_hand.parameters())
    scenario.by_hand(data, m_hand, o_hand, hand_scaler)

    # upstream's own assertions, on the hand-written loop
    if enabled:
        expected = 128.0 * 2.0**scenario.unskipped * 0.5**scenario.skipped
        assert hand_scaler.get_scale() == expected
    else:
        assert hand_scaler.get_scale() == 1.0
    if not scenario.control_fails:
        for c, s in zip(m_control.parameters(), m_hand.parameters(), strict=True):
            torch.testing.assert_close(s, c, atol=scenario.atol, rtol=1e-5)

    our_scaler = upstream_scaler(enabled)
    o_ours, stepped = run_effects(scenario, data, m_ours, our_scaler, sync)
    assert stepped == expected_steps(scenario, enabled)
    assert our_scaler.get_scale() == hand_scaler.get_scale()
    assert our_scaler.state_dict() == hand_scaler.state_dict()
    ours = grads_and_params(m_ours) + optimizer_tensors(o_ours)
    hand = grads_and_params(m_hand) + optimizer_tensors(o_hand)
    if name == "clipping":
        # ampfn clips the true gradients, upstream's loop the scaled ones (max_norm *
        # scale): the same up to rounding, so upstream's own tolerance
        for x, y in zip(hand, ours, strict=True):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)
        m_sep = copy.deepcopy(model)
        o_sep = scenario.make(m_sep.parameters())
        separate_unscale_by_hand(data, m_sep, o_sep, upstream_scaler(enabled))
        hand = grads_and_params(m_sep) + optimizer_tensors(o_sep)
    (assert_bitwise if sync else assert_values)(hand, ours)


def test_clipping_scaled_gradients_is_refused() -> None:
    """Upstream's ``test_grad_scaling_clipping`` clips the scaled gradients with
    ``torch.nn.utils.clip_grad_norm_(params, max_norm * scaler.get_scale())``. Inside a
    scaled ampfn step that call is refused before it clips (ampfn clips true gradients:
    ``ampfn.clip_grad_norm_``), and the pipeline is as before the call."""
    model, data = create_case()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = upstream_scaler()
    before = copy.deepcopy(model.state_dict())

    @ampfn.with_grad_scaling(scaler)
    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        opt.zero_grad()
        ampfn.backward(LOSS(model(batch[0]), batch[1]))
        torch.nn.utils.clip_grad_norm_(
            model.parameters(), MAX_NORM * scaler.get_scale()
        )
        return ampfn.step(opt)

    with pytest.raises(RuntimeError, match=r"ampfn\.clip_grad_norm_"):
        step(data[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 128.0


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_checkpoint_every_iteration_is_the_pickle_round_trip(sync: bool) -> None:
    """``test_grad_scaling_autocast``'s ``try_pickle``: the scaler is replaced by a pickled
    copy after every iteration. ampfn's pipeline holds its scaler, so the round trip is
    ``ampfn.state_dict`` into a new pipeline with a fresh GradScaler, every iteration."""
    scenario = BY_NAME["autocast-SGD"]
    model, data = create_case()
    m_hand, m_ours = model, copy.deepcopy(model)
    o_hand = scenario.make(m_hand.parameters())
    hand_scaler = upstream_scaler()
    autocast_by_hand(data, m_hand, o_hand, hand_scaler)

    o_ours = scenario.make(m_ours.parameters())
    state = None
    stepped = []
    for i, batch in enumerate(data):
        # a fresh scaler with other settings after the first iteration: the load brings them
        scaler = upstream_scaler() if state is None else torch.amp.GradScaler("cpu")
        step = pipeline(scenario, m_ours, o_ours, scaler, sync)
        if state is not None:
            ampfn.load_state_dict(step, state)
        stepped.append(as_bool(step(i, batch)))
        state = copy.deepcopy(ampfn.state_dict(step))
    assert stepped == [True, True, False, True]
    assert scaler.state_dict() == hand_scaler.state_dict()
    (assert_bitwise if sync else assert_values)(
        grads_and_params(m_hand), grads_and_params(m_ours)
    )


@pytest.mark.parametrize(
    ("enabled", "sync"),
    [
        pytest.param(True, True, id="enabled-sync"),
        pytest.param(True, False, id="enabled-sync-free"),
        pytest.param(False, True, id="disabled-sync"),
        pytest.param(False, False, id="disabled-sync-free"),
    ],
)
def test_multiple_models_optimizers_and_losses(enabled: bool, sync: bool) -> None:
    """``test_grad_scaling_multiple``: two models and two optimizers, both fed by two
    losses; ``optimizer0`` unscaled on its own first; the inf in model1 skips only
    ``optimizer1``, and the scale backs off once."""
    model0, data = create_case()
    model1, _ = create_case(seed=1)
    models = [copy.deepcopy((model0, model1)) for _ in range(3)]

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=1.0)

    def losses(m0: nn.Module, m1: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        out0, out1 = m0(x), m1(x)
        return LOSS(0.3 * out0 + 0.7 * out1, y), LOSS(0.6 * out0 - 0.4 * out1, y)

    (c0, c1), (h0, h1), (a0, a1) = models
    oc0, oc1, oh0, oh1, oa0, oa1 = map(sgd, (c0, c1, h0, h1, a0, a1))
    hand_scaler = upstream_scaler(enabled)
    for i, (x, y) in enumerate(data):
        for o in (oc0, oc1, oh0, oh1):
            o.zero_grad()
        loss0, loss1 = losses(c0, c1, x, y)
        loss0.backward(retain_graph=True)
        loss1.backward()
        oc0.step()
        if not enabled or i != SKIP_ITER:
            oc1.step()

        loss0, loss1 = losses(h0, h1, x, y)
        hand_scaler.scale(loss0).backward(retain_graph=True)
        hand_scaler.scale(loss1).backward()
        if i == SKIP_ITER and enabled:
            poison(h1)
        hand_scaler.unscale_(oh0)
        hand_scaler.step(oh0)
        hand_scaler.step(oh1)
        hand_scaler.update()

    our_scaler = upstream_scaler(enabled)

    @ampfn.with_grad_scaling(our_scaler, sync=sync)
    def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[Any, Any]:
        oa0.zero_grad()
        oa1.zero_grad()
        loss0, loss1 = losses(a0, a1, *batch)
        ampfn.backward(loss0, retain_graph=True)
        ampfn.backward(loss1)
        if i == SKIP_ITER and enabled:
            poison(a1)
        ampfn.unscale_(oa0)
        return ampfn.step(oa0), ampfn.step(oa1)

    stepped = [tuple(map(as_bool, step(i, b))) for i, b in enumerate(data)]
    assert stepped == [(True, not (enabled and i == SKIP_ITER)) for i in range(4)]
    assert hand_scaler.get_scale() == (128.0 * 2.0**3 * 0.5 if enabled else 1.0)
    for c, h in zip(
        chain(c0.parameters(), c1.parameters()),
        chain(h0.parameters(), h1.parameters()),
        strict=True,
    ):
        torch.testing.assert_close(h, c, atol=1e-7, rtol=1e-5)  # upstream's
    assert our_scaler.state_dict() == hand_scaler.state_dict()
    (assert_bitwise if sync else assert_values)(
        grads_and_params(h0) + grads_and_params(h1),
        grads_and_params(a0) + grads_and_params(a1),
    )


def poisoned_steps(
    scaler: torch.amp.GradScaler, sync: bool, poisoned: list[bool]
) -> list[tuple[float, int]]:
    """Calls of a one-parameter step, an inf gradient where ``poisoned``; the scale and
    the growth tracker after each."""
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)

    @ampfn.with_grad_scaling(scaler, sync=sync)
    def step(bad: bool) -> Any:
        ampfn.backward((w * (float("inf") if bad else 1.0)).sum())
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    out = []
    for bad in poisoned:
        assert as_bool(step(bad)) is not bad
        out.append((scaler.get_scale(), scaler.state_dict()["_growth_tracker"]))
    return out


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_update_scale_follows_amp_update_scale(sync: bool) -> None:
    """``test_grad_scaling_update_scale`` drives ``torch._amp_update_scale_`` itself
    (growth 2, backoff 0.25, interval 2, scale 4): two clean iterations grow the scale
    once, an overflow backs it off. Here the same three updates come from three calls."""
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=4.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=2
    )
    assert poisoned_steps(scaler, sync, [False, False, True]) == [
        (4.0, 1),
        (8.0, 0),
        (2.0, 0),
    ]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_scale_will_not_overflow(sync: bool) -> None:
    """``test_grad_scale_will_not_overflow``: a scale of 1e38 grown 16x stays finite
    (``_amp_update_scale_`` keeps the old scale when the grown one is not finite)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler(
        "cpu", growth_interval=1, growth_factor=2**4, init_scale=1e38
    )
    x, y = torch.randn(1, 5), 1e-30 * torch.randn(1, 1)

    @ampfn.with_grad_scaling(scaler, sync=sync)
    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        opt.zero_grad()
        ampfn.backward(((model(batch[0]) - batch[1]) ** 2).mean())
        return ampfn.step(opt)

    step((x, y))
    assert math.isfinite(scaler.get_scale())
    assert scaler.get_scale() == torch.tensor(1e38).item()


def layouts(inject: int, bad: float) -> list[torch.Tensor]:
    """``test_grad_scaling_unscale``'s layouts of 4.0-filled gradients: contiguous, a
    transpose (dense, not contiguous), and column slices (neither), with ``bad`` written
    into gradient ``inject`` (none where negative)."""
    g = torch.full((20, 20), 4.0)
    grads = [g.clone(), g.clone().t(), torch.full((20, 40), 4.0)[:, :20], g.clone()]
    if inject >= 0:
        grads[inject][2, 2] = bad
    return grads


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("inject", [-1, 0, 1, 2, 3])
def test_unscale_finds_inf_and_nan_in_any_gradient_layout(
    inject: int, bad: float, sync: bool
) -> None:
    """``test_grad_scaling_unscale``: gradients of every layout are unscaled (4 * 1/4 =
    1), and an inf or NaN in any of them is found: the step skips."""
    params = [nn.Parameter(torch.zeros(20, 20)) for _ in range(4)]
    opt = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    seen: list[torch.Tensor] = []

    @ampfn.with_grad_scaling(scaler, sync=sync)
    def step(_: Any) -> Any:
        ampfn.backward(sum(p.sum() for p in params))  # type: ignore[arg-type]
        for p, g in zip(params, layouts(inject, bad), strict=True):
            p.grad = g
        ampfn.unscale_(opt)
        seen.extend(p.grad.clone() for p in params if p.grad is not None)
        return ampfn.step(opt)

    stepped = as_bool(step(None))
    assert stepped is (inject < 0)
    if inject < 0:
        for g in seen:
            assert torch.equal(g, torch.ones(20, 20))
        assert all(torch.equal(p, -torch.ones(20, 20)) for p in params)
    else:
        assert all(torch.equal(p, torch.zeros(20, 20)) for p in params)
    assert scaler.get_scale() == (4.0 if inject < 0 else 2.0)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_fp16_gradients_are_refused_as_grad_scaler_refuses_them(sync: bool) -> None:
    """``test_grad_scaling_unscale``'s "perfect storm" mixes fp16 gradients into
    ``GradScaler._unscale_grads_(..., allow_fp16=True)``; GradScaler's public
    ``unscale_`` refuses them ("Attempting to unscale FP16 gradients"), and so does
    ``with_grad_scaling``, before anything is stepped."""
    p16 = nn.Parameter(torch.ones(4, dtype=torch.float16))
    p32 = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p32, p16], lr=1.0)
    hand = torch.amp.GradScaler("cpu")
    hand.scale(p32.sum() + p16.float().sum()).backward()
    with pytest.raises(ValueError, match="FP16"):
        hand.unscale_(opt)
    opt.zero_grad()

    @ampfn.with_grad_scaling(torch.amp.GradScaler("cpu"), sync=sync)
    def step(_: Any) -> Any:
        ampfn.backward(p32.sum() + p16.float().sum())
        return ampfn.step(opt)

    with pytest.raises(ValueError, match=r"with_grad_scaling.*the gradients are fp16"):
        step(None)
    assert torch.equal(p16, torch.ones(4, dtype=torch.float16))
    assert torch.equal(p32, torch.ones(4))


def embedding_run(
    sync: bool | None, poisoned: set[int]
) -> tuple[nn.Module, torch.amp.GradScaler, list[bool]]:
    """An ``Embedding(sparse=True)`` with SGD: sparse gradients (None: by hand)."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    scaler = upstream_scaler()
    idx = [torch.tensor([[0, 1, 1], [2, 0, 2]]) + i for i in range(4)]

    def loss_of(i: int) -> torch.Tensor:
        return emb(idx[i]).pow(2).sum() * (float("inf") if i in poisoned else 1.0)

    if sync is None:
        for i in range(4):
            scaler.scale(loss_of(i)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return emb, scaler, []

    @ampfn.with_grad_scaling(scaler, sync=sync)
    def step(i: int) -> Any:
        ampfn.backward(loss_of(i))
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    return emb, scaler, [as_bool(step(i)) for i in range(4)]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
def test_sparse_gradients(sync: bool) -> None:
    """``test_grad_scaling_unscale_sparse``: sparse gradients (an ``Embedding`` with
    ``sparse=True``, duplicated indices: uncoalesced) are unscaled and checked, an inf
    in their values found."""
    hand, hand_scaler, _ = embedding_run(None, {2})
    ours, our_scaler, stepped = embedding_run(sync, {2})
    assert stepped == [True, True, False, True]
    assert our_scaler.state_dict() == hand_scaler.state_dict()
    (assert_bitwise if sync else assert_values)(
        grads_and_params(hand), grads_and_params(ours)
    )


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
@pytest.mark.parametrize("lazy_init_scale", [True, False], ids=["lazy", "fresh"])
def test_state_dict_loads_another_scalers_settings(
    lazy_init_scale: bool, sync: bool
) -> None:
    """``test_grad_scaling_state_dict``: a scaler's state loaded into one built with other
    settings takes them all (scale, factors, interval, growth tracker), whether or not
    its scale tensor exists yet; here through ``ampfn.state_dict`` of two pipelines."""
    s0 = torch.amp.GradScaler(
        "cpu", init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2
    )
    s1 = torch.amp.GradScaler(
        "cpu", init_scale=6.0, growth_factor=7.0, backoff_factor=0.8, growth_interval=1
    )
    s1._init_growth_tracker = 7  # a value for the load to overwrite
    if lazy_init_scale:
        s1.scale(torch.full((1,), 4.0))
        assert isinstance(s1._scale, torch.Tensor)
    f0 = ampfn.with_grad_scaling(s0, sync=sync)(lambda b: b)
    f1 = ampfn.with_grad_scaling(s1, sync=sync)(lambda b: b)
    ampfn.load_state_dict(f1, ampfn.state_dict(f0))
    assert s1.get_scale() == 3.0
    assert s1.get_growth_factor() == 4.0
    assert s1.get_backoff_factor() == 0.5
    assert s1.get_growth_interval() == 2
    assert s1._init_growth_tracker == 0
    # and the loaded scaler goes on as the one it was loaded from
    assert poisoned_steps(s1, sync, [False, False, True]) == poisoned_steps(
        s0, sync, [False, False, True]
    )


FUSED: dict[str, Make] = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "SGD": partial(torch.optim.SGD, momentum=0.9),
    "Adagrad": torch.optim.Adagrad,
}


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "sync-free"])
@pytest.mark.parametrize("separate_unscale", [False, True], ids=["", "unscale"])
@pytest.mark.parametrize("opt_name", list(FUSED))
def test_fused_optimizers_take_found_inf(
    opt_name: str, separate_unscale: bool, sync: bool
) -> None:
    """``test_grad_scaling_autocast_fused_optimizers`` (test_cuda.py; CPU has fused Adam,
    AdamW, SGD and Adagrad): a fused optimizer under autocast and a GradScaler, with and
    without a separate ``unscale_``, matches the non-fused one in values. Upstream
    injects no inf; here one is injected at ``skip_iter`` so that the fused kernel's
    ``found_inf`` decides the skip, and ampfn's run must equal the hand-written fused
    loop bit for bit (syncing) or in values (sync-free)."""
    make = FUSED[opt_name]
    model, data = create_case()
    m_control, m_hand, m_ours = (copy.deepcopy(model) for _ in range(3))

    def by_hand(m: nn.Module, opt: torch.optim.Optimizer) -> torch.amp.GradScaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.half):
                loss = LOSS(m(x), y)
            scaler.scale(loss).backward()
            if i == SKIP_ITER:
                poison(m)
            if separate_unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        return scaler

    o_control = make(m_control.parameters(), lr=1.0, foreach=False)
    by_hand(m_control, o_control)
    o_hand = make(m_hand.parameters(), lr=1.0, fused=True)
    hand_scaler = by_hand(m_hand, o_hand)
    for c, h in zip(m_control.parameters(), m_hand.parameters(), strict=True):
        torch.testing.assert_close(h, c, rtol=1e-3, atol=1e-3)

    o_ours = make(m_ours.parameters(), lr=1.0, fused=True)
    our_scaler = torch.amp.GradScaler("cpu", init_scale=128.0)

    @ampfn.compose(
        ampfn.with_grad_scaling(our_scaler, sync=sync),
        ampfn.with_autocast(torch.float16, "cpu"),
    )
    def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        o_ours.zero_grad()
        ampfn.backward(LOSS(m_ours(batch[0]), batch[1]))
        if i == SKIP_ITER:
            poison(m_ours)
        if separate_unscale:
            ampfn.unscale_(o_ours)
        return ampfn.step(o_ours)

    stepped = [as_bool(step(i, b)) for i, b in enumerate(data)]
    assert stepped == [i != SKIP_ITER for i in range(4)]
    assert our_scaler.state_dict() == hand_scaler.state_dict()
    (assert_bitwise if sync else assert_values)(
        grads_and_params(m_hand) + optimizer_tensors(o_hand),
        grads_and_params(m_ours) + optimizer_tensors(o_ours),
    )
