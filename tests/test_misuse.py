"""The loss-scaling misuse battery (issue 20), mirroring ``ampfn._scaling._misuse``.

Each misuse is written as a hurried user writes it, on a tiny CPU model, under every
kind of loss scaler: the error names the API and the fix, nothing (parameters,
optimizer state, the scaler's scale and growth tracker) has changed when it comes, and
a later correct call works as on a fresh pipeline.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn.testing._trial import first_difference
from helpers import batches, effect_step, mlp

# torch 2.9 (the xla session): behaviours below that only torch 2.13 has
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)

X, Y = batches(1)[0]
KINDS = ["sync", "sync_free", "apex_o1", "apex_o2", "apex_two_losses"]


def loss_of(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(X).float(), Y)


def scaling(kind: str, model: nn.Module, opt: Any) -> ampfn.Transform:
    if kind == "sync":
        return ampfn.with_grad_scaling()
    if kind == "sync_free":
        return ampfn.with_grad_scaling(sync=False)
    level = "O2" if kind == "apex_o2" else "O1"
    losses = 2 if kind == "apex_two_losses" else 1
    return ampfn.with_apex(level, model, opt, backend="native", num_losses=losses)


def setup(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, ampfn.Transform]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, scaling(kind, model, opt)


def train(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Any], Any]:
    return effect_step(model, opt, loss_of)


def snapshot(model: nn.Module, opts: list[Any], wrapped: Any) -> Any:
    return copy.deepcopy(
        (
            [p.detach() for p in model.parameters()],
            [[p.detach() for g in o.param_groups for p in g["params"]] for o in opts],
            [o.state_dict()["state"] for o in opts],
            ampfn.state_dict(wrapped),
        )
    )


def assert_unchanged(
    before: Any, model: nn.Module, opts: list[Any], wrapped: Any
) -> None:
    diff = first_difference(before, snapshot(model, opts, wrapped))
    assert diff is None, f"the misuse changed {diff}"


def assert_refused(
    wrapped: Any, model: nn.Module, opts: list[Any], error: type[Exception], match: str
) -> None:
    """Calling ``wrapped`` raises ``error`` matching ``match``, and nothing changed."""
    before = snapshot(model, opts, wrapped)
    with pytest.raises(error, match=match):
        wrapped(None)
    assert_unchanged(before, model, opts, wrapped)


def assert_recovers(kind: str, model: nn.Module, opt: Any, t: ampfn.Transform) -> None:
    """After clearing the gradients, a correct call works as on a fresh pipeline."""
    opt.zero_grad(set_to_none=True)
    assert bool(t(train(model, opt))(None))
    assert_matches_fresh(kind, model)


def assert_matches_fresh(kind: str, model: nn.Module, calls: int = 1) -> None:
    """``model`` is where a fresh pipeline of ``kind`` is after ``calls`` correct calls."""
    fresh, opt, t = setup(kind)
    step = t(train(fresh, opt))
    for _ in range(calls):
        assert bool(step(None))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", KINDS)
def test_a_direct_step_on_gradients_left_scaled_by_accumulation_is_refused(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if OLD_TORCH and kind in ("sync", "sync_free"):
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="torch < 2.13: the guard does not see gradients left scaled "
                "through GradScaler's scale (not refused there)",
            )
        )
    model, opt, t = setup(kind)
    accumulate = t(lambda _: ampfn.backward(loss_of(model)))
    accumulate(None)
    before = snapshot(model, [opt], accumulate)
    with pytest.raises(RuntimeError, match=r"outside the wrapped step.*ampfn\.step"):
        opt.step()
    assert_unchanged(before, model, [opt], accumulate)
    opt.zero_grad(set_to_none=True)  # as the message advises: drop them
    step = t(train(model, opt))
    assert bool(step(None))
    assert_matches_fresh(kind, model)


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_after_backward_leaves_the_direct_backward_check_armed(
    kind: str,
) -> None:
    model, opt, t = setup(kind)

    def failing(_: Any) -> None:
        ampfn.backward(loss_of(model))
        raise KeyError("the user's bug")

    def direct(_: Any) -> Any:
        loss_of(model).backward()
        return ampfn.step(opt)

    with pytest.raises(KeyError):
        t(failing)(None)
    wrapped = t(direct)
    assert_refused(
        wrapped,
        model,
        [opt],
        RuntimeError,
        match=r"call ampfn\.backward\(loss\) instead",
    )
    assert_recovers(kind, model, opt, t)


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_after_unscale_leaves_the_next_call_as_on_a_fresh_pipeline(
    kind: str,
) -> None:
    model, opt, t = setup(kind)

    def failing(_: Any) -> None:
        ampfn.backward(loss_of(model))
        ampfn.unscale_(opt)
        raise KeyError("the user's bug")

    wrapped = t(failing)
    assert_refused(wrapped, model, [opt], KeyError, "the user's bug")
    assert_recovers(kind, model, opt, t)


@pytest.mark.parametrize("kind", KINDS)
def test_clearing_the_gradients_before_the_step_steps_nothing_and_sticks_nothing(
    kind: str,
) -> None:
    """``backward; zero_grad(set_to_none=True); step``: as in plain PyTorch, the step has
    nothing to apply; GradScaler's "No inf checks were recorded" never reaches the user,
    and later calls work."""
    model, opt, t = setup(kind)

    def cleared(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        opt.zero_grad(set_to_none=True)
        return ampfn.step(opt)

    start = [p.detach().clone() for p in model.parameters()]
    t(cleared)(None)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True)
    )
    step = t(train(model, opt))
    assert bool(step(None))
    assert bool(step(None))
    assert_matches_fresh(kind, model, calls=2)


@pytest.mark.parametrize("kind", KINDS)
def test_an_optimizer_that_got_no_gradients_steps_as_in_plain_pytorch(
    kind: str,
) -> None:
    model = mlp()
    extra = nn.Parameter(torch.ones(3))  # in no loss: never a gradient
    opts = [
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.SGD([extra], lr=0.1),
    ]
    t = scaling(kind, model, opts)

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        stepped = [ampfn.step(o) for o in opts]
        for o in opts:
            o.zero_grad(set_to_none=True)
        return stepped

    wrapped = t(step)
    for _ in range(3):
        assert all(bool(s) for s in wrapped(None))
    assert torch.equal(extra, torch.ones(3))


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_with_apex_given_one_optimizer_twice_trains_as_given_once(level: str) -> None:
    runs = []
    for twice in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        t = ampfn.with_apex(
            level, model, [opt, opt] if twice else opt, backend="native"
        )
        step = t(train(model, opt))
        for _ in range(3):
            assert bool(step(None))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def test_an_optimizer_built_after_o2_steps_the_model() -> None:
    model = mlp()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    t = ampfn.with_apex("O2", model, first, backend="native")
    later = torch.optim.SGD(model.parameters(), lr=0.1)  # on the fp16 parameters
    step = t(train(model, later))
    start = [p.detach().clone() for p in model.parameters()]
    assert bool(step(None))
    assert bool(step(None))
    assert all(
        not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True)
    )
    assert all(
        p.dtype == torch.float32 for g in later.param_groups for p in g["params"]
    )


def test_o2_then_add_param_group_of_a_layer_it_cast() -> None:
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    t = ampfn.with_apex("O2", model, opt, backend="native")
    opt.add_param_group({"params": list(model[2].parameters())})
    step = t(train(model, opt))
    layer = model[2]
    assert isinstance(layer, nn.Linear)
    start = layer.weight.detach().clone()
    assert bool(step(None))
    assert bool(step(None))
    assert not torch.equal(layer.weight, start)


def test_two_threads_sharing_one_scaled_pipeline_are_refused_clearly() -> None:
    model, opt, t = setup("sync")
    paused, resume = threading.Event(), threading.Event()

    def step(pause: bool) -> Any:
        ampfn.backward(loss_of(model))
        if pause:
            paused.set()
            resume.wait(10)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    wrapped = t(step)
    results: list[Any] = []
    other = threading.Thread(target=lambda: results.append(wrapped(True)))
    other.start()
    assert paused.wait(10)
    before = snapshot(model, [opt], wrapped)
    try:
        with pytest.raises(RuntimeError, match=r"another thread.*one pipeline"):
            wrapped(False)
        assert_unchanged(before, model, [opt], wrapped)
    finally:
        resume.set()
        other.join(10)
    assert results == [True]
    assert bool(wrapped(False))
    assert_matches_fresh("sync", model, calls=2)


@pytest.mark.parametrize("kind", ["sync", "sync_free", "apex_o1"])
def test_one_parameter_in_two_optimizers_is_refused(kind: str) -> None:
    model = mlp()
    opts = [
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.SGD(model[0].parameters(), lr=0.1),
    ]

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        return [ampfn.step(o) for o in opts]

    with pytest.raises(
        ValueError, match=r"hold the same parameter.*give each parameter"
    ):
        scaling(kind, model, opts)(step)(None)


@pytest.mark.parametrize("sync", [True, False])
def test_fp16_gradients_name_the_fp32_master_fix(sync: bool) -> None:
    model = mlp().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(_: Any) -> Any:
        ampfn.backward(F.cross_entropy(model(X.half()).float(), Y))
        return ampfn.step(opt)

    wrapped = ampfn.with_grad_scaling(sync=sync)(step)
    assert_refused(
        wrapped, model, [opt], ValueError, match=r"gradients are fp16.*with_apex\('O2'"
    )


@pytest.mark.parametrize("kind", ["sync", "sync_free"])
def test_complex_parameters_are_refused_clearly(kind: str) -> None:
    w = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = torch.optim.SGD([w], lr=0.1)

    def step(_: Any) -> Any:
        ampfn.backward((w.abs() ** 2).sum())
        return ampfn.step(opt)

    wrapped = scaling(kind, nn.Linear(1, 1), opt)(step)
    start = w.detach().clone()
    with pytest.raises(TypeError, match=r"complex gradients.*optimizer of their own"):
        wrapped(None)
    assert torch.equal(w, start)


@pytest.mark.parametrize("outer", [True, False])
def test_a_raising_telemetry_sink_leaves_later_calls_working(outer: bool) -> None:
    model, opt, t = setup("sync")
    calls = []

    def sink(record: ampfn.StepRecord) -> None:
        calls.append(record)
        if len(calls) == 1:
            raise OSError("the log is full")

    telemetry = ampfn.with_telemetry(sink)
    pipeline = ampfn.compose(telemetry, t) if outer else ampfn.compose(t, telemetry)
    step = pipeline(train(model, opt))
    with pytest.raises(OSError, match="the log is full"):
        step(None)  # the step itself ran, as the user's code did
    assert bool(step(None))
    assert bool(step(None))
    assert_matches_fresh("sync", model, calls=3)


def test_a_step_that_calls_itself_is_told_it_was_re_entered() -> None:
    model, opt, t = setup("sync")

    @t
    def step(depth: int) -> Any:
        if depth:
            return step(depth - 1)
        return train(model, opt)(None)

    with pytest.raises(RuntimeError, match="re-entered"):
        step(1)
    assert bool(step(0))
    assert_matches_fresh("sync", model)


@pytest.mark.parametrize("kind", ["sync", "sync_free", "apex_o1", "apex_o2"])
def test_torch_clip_on_scaled_gradients_is_refused(kind: str) -> None:
    model, opt, t = setup(kind)

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return ampfn.step(opt)

    wrapped = t(step)
    assert_refused(
        wrapped,
        model,
        [opt],
        RuntimeError,
        match=r"ampfn\.clip_grad_norm_.*ampfn\.unscale_",
    )


@pytest.mark.parametrize("kind", ["apex_o2", "apex_two_losses", "with_policy_masters"])
def test_torch_clip_where_the_gradients_are_true_clips_what_ampfn_clips(
    kind: str,
) -> None:
    """Apex's per-loss scaler unscales each backward, and after ``ampfn.unscale_`` (or
    with masters and no scaler) torch's clipping sees the true gradients: the masters'
    where the model's moved there."""
    runs = []
    for ours in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        t = (
            ampfn.with_policy("bf16-true", model, opt, master_weights=True)
            if kind == "with_policy_masters"
            else scaling(kind, model, opt)
        )

        def step(
            _: Any, model: nn.Module = model, opt: Any = opt, ours: bool = ours
        ) -> Any:
            ampfn.backward(loss_of(model))
            if ours:
                norm = ampfn.clip_grad_norm_(model.parameters(), 0.1, opt)
            else:
                ampfn.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return norm

        norm = t(step)(None)
        assert float(norm) > 0.1  # it did clip
        runs.append((norm, [p.detach().clone() for p in model.parameters()]))
    (n1, p1), (n2, p2) = runs
    assert torch.equal(n1, n2)
    assert all(torch.equal(p, q) for p, q in zip(p1, p2, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_norm", [float("nan"), -1.0])
def test_a_bad_max_norm_is_refused_before_unscaling(kind: str, max_norm: float) -> None:
    model, opt, t = setup(kind)

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        ampfn.clip_grad_norm_(model.parameters(), max_norm, opt)
        return ampfn.step(opt)

    wrapped = t(step)
    assert_refused(
        wrapped,
        model,
        [opt],
        ValueError,
        match=r"ampfn\.clip_grad_norm_.*max_norm must be",
    )
    assert_recovers(kind, model, opt, t)


@pytest.mark.parametrize("kind", ["sync", "sync_free", "apex_o1"])
def test_clipping_parameters_the_optimizer_does_not_hold_is_refused(kind: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    other = torch.optim.SGD(model[2].parameters(), lr=0.1)
    t = scaling(kind, model, [opt, other])

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        ampfn.clip_grad_norm_(model.parameters(), 1.0, opt)
        return ampfn.step(opt), ampfn.step(other)

    wrapped = t(step)
    assert_refused(
        wrapped,
        model,
        [opt, other],
        ValueError,
        match=r"does not hold.*pass the optimizer that holds",
    )


def test_a_nanogpt_port_that_keeps_scaler_unscale_matches_its_torch_amp_loop() -> None:
    """``scaler.unscale_(opt)`` left before ``ampfn.clip_grad_norm_``: accepted, and the
    same training as the hand-written loop it was ported from."""
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)

    @ampfn.with_grad_scaling(scaler)
    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        scaler.unscale_(opt)
        ampfn.clip_grad_norm_(model.parameters(), 0.5, opt)
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    for _ in range(3):
        assert bool(step(None))
        ref_scaler.scale(loss_of(ref)).backward()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
    assert all(
        torch.equal(p, q)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True)
    )
    assert scaler.state_dict() == ref_scaler.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_a_loss_id_beyond_num_losses_is_refused(kind: str) -> None:
    model, opt, t = setup(kind)
    loss_id = 2 if kind == "apex_two_losses" else 1

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model), loss_id=loss_id)
        return ampfn.step(opt)

    wrapped = t(step)
    assert_refused(
        wrapped, model, [opt], ValueError, match=rf"loss_id is {loss_id}.*num_losses"
    )
    assert all(p.grad is None for p in model.parameters())
    assert bool(t(train(model, opt))(None))
    assert_matches_fresh(kind, model)


@pytest.mark.parametrize("kind", KINDS)
def test_a_direct_optimizer_step_inside_the_step_is_refused(kind: str) -> None:
    model, opt, t = setup(kind)

    def step(_: Any) -> None:
        ampfn.backward(loss_of(model))
        opt.step()

    wrapped = t(step)
    assert_refused(
        wrapped,
        model,
        [opt],
        RuntimeError,
        match=r"called directly.*ampfn\.step\(optimizer\)",
    )
    assert_recovers(kind, model, opt, t)


@pytest.mark.parametrize("num_losses", [1, 2])
def test_an_uncoalesced_sparse_fp16_gradient_is_unscaled_in_place(
    num_losses: int,
) -> None:
    """O3 with a dynamic scale (Apex's per-loss scaler) on a sparse embedding whose
    gradient has duplicate indices: the step is plain fp16 SGD's, not the scale times
    larger."""
    idx = torch.tensor([1, 1, 2, 3, 3, 3])
    runs = []
    for scaled in (True, False):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        if scaled:
            t = ampfn.with_apex(
                "O3",
                emb,
                opt,
                backend="native",
                loss_scale="dynamic",
                max_loss_scale=2.0**8,
                num_losses=num_losses,
            )

            def step(_: Any, emb: nn.Embedding = emb, opt: Any = opt) -> Any:
                ampfn.backward(emb(idx).float().pow(2).sum())
                grad = emb.weight.grad
                assert grad is not None
                assert not grad.is_coalesced()
                stepped = ampfn.step(opt)
                opt.zero_grad()
                return stepped

            assert bool(t(step)(None))
        else:
            emb.half()
            emb(idx).float().pow(2).sum().backward()
            opt.step()
        runs.append(emb.weight.detach().clone())
    assert torch.equal(*runs)


_SETTINGS = [
    ({"init_scale": 0.0}, "scale", "init_scale"),
    ({"init_scale": float("nan")}, "scale", "init_scale"),
    ({"init_scale": float("inf")}, "scale", "init_scale"),
    ({"backoff_factor": 0.0}, "backoff_factor", "backoff_factor"),
    ({"growth_interval": 0}, "growth_interval", "growth_interval"),
    ({"growth_interval": -3}, "growth_interval", "growth_interval"),
    ({"growth_interval": 2.0}, "growth_interval", "growth_interval"),
]


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize(
    ("settings", "key", "name"), _SETTINGS, ids=[str(s) for s, _, _ in _SETTINGS]
)
def test_grad_scaler_settings_that_cannot_work_are_refused_when_built_and_loaded(
    sync: bool, settings: dict[str, Any], key: str, name: str
) -> None:
    """A user's GradScaler does not check its own settings; a float interval would fail
    inside ``update()``, after the optimizer stepped. ``with_grad_scaling`` refuses them,
    and ``ampfn.load_state_dict`` refuses the same values in a saved state, with nothing
    loaded."""
    with pytest.raises(ValueError, match=rf"with_grad_scaling\(scaler.*{name}"):
        ampfn.with_grad_scaling(torch.amp.GradScaler("cpu", **settings), sync=sync)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ampfn.with_grad_scaling(sync=sync)(train(model, opt))
    step(None)
    good = copy.deepcopy(ampfn.state_dict(step))
    bad = copy.deepcopy(good)
    value = settings[next(iter(settings))]
    bad["transforms"][0]["state"]["scaler"][key] = value
    with pytest.raises(ValueError, match=rf"ampfn\.load_state_dict.*{key}"):
        ampfn.load_state_dict(step, bad)
    assert first_difference(good, ampfn.state_dict(step)) is None
    assert bool(step(None))
