"""ampfn.testing: the strategies, the checks on every pipeline, and the checks failing when they must."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ampfn
from ampfn import testing
from ampfn._transform import Transform
from ampfn._types import Handler

PIPELINES = testing.available_pipelines("cpu")
SKIPPING = testing.available_pipelines("cpu", skipping=True)


def make(seed: int) -> tuple[Callable[[Any], Any], nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x).float(), y)
        ampfn.backward(loss)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, opt


BATCHES = testing.batches((16, 6), num_classes=3)
# Each example of a check trains a few steps: an eighth of the profile's examples
# (3 under "ci", 50 under "thorough").
FEW = settings(max_examples=max(3, settings().max_examples // 8))


def fixed(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- strategies


@given(
    st.sampled_from([torch.float16, torch.bfloat16]).flatmap(
        lambda d: st.tuples(st.just(d), testing.edge_values(d))
    )
)
def test_edge_values_are_finite_float32(drawn: tuple[torch.dtype, float]) -> None:
    _, v = drawn
    assert torch.tensor(v, dtype=torch.float32).isfinite()


@given(testing.tensors((3, 4), nonfinite="any", at=[0, 5]))
def test_tensors_inject_nonfinite_exactly_where_asked(t: torch.Tensor) -> None:
    assert t.shape == (3, 4)
    bad = (~t.isfinite()).view(-1).nonzero().view(-1).tolist()
    assert bad[:1] == [0]
    assert 5 in bad


@given(testing.tensors((64,), torch.float16))
def test_tensors_cast_to_the_requested_dtype(t: torch.Tensor) -> None:
    assert t.dtype == torch.float16


def test_tensors_probe_the_fp16_edges() -> None:
    seen: dict[str, bool] = {"overflow": False, "subnormal": False, "near_max": False}

    @settings(max_examples=60, derandomize=True)
    @given(testing.tensors((32,)))
    def collect(t: torch.Tensor) -> None:
        h = t.half()
        seen["overflow"] |= bool((h.isinf() & t.isfinite()).any())
        seen["subnormal"] |= bool(((h != 0) & (h.abs() < 6.1035e-05)).any())
        seen["near_max"] |= bool(((t.abs() > 30000) & (t.abs() <= 65504)).any())

    collect()
    assert all(seen.values()), seen


@given(BATCHES)
def test_batches_have_the_requested_shape(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = batch
    assert x.shape == (16, 6)
    assert y.shape == (16,)
    assert y.dtype == torch.long
    assert int(y.min()) >= 0
    assert int(y.max()) < 3


@given(testing.loss_scale_settings())
def test_loss_scale_settings_build_grad_scalers(s: testing.LossScaleSettings) -> None:
    scaler = s.grad_scaler("cpu")
    assert scaler.get_scale() == s.init_scale
    assert scaler.state_dict()["growth_interval"] == s.growth_interval


def test_bad_strategy_arguments() -> None:
    with pytest.raises(ValueError, match=r"tensors\(shape, ...\): nonfinite must be"):
        testing.tensors((2,), nonfinite="big")
    with pytest.raises(
        ValueError, match=r"tensors\(shape, ...\): positions \[7\] are outside"
    ):
        testing.tensors((2,), nonfinite="nan", at=[7])


def test_pipelines_cover_every_cpu_transform() -> None:
    names = {p.name for p in PIPELINES}
    assert {
        "autocast-bf16",
        "scaling+autocast-bf16",
        "apex-O1",
        "apex-O2",
        "apex-O3",
    } <= names
    assert all(p.skips_nonfinite for p in SKIPPING)


# --------------------------------------------------------------------------- checks pass on every pipeline


@pytest.mark.parametrize("pipeline", SKIPPING, ids=lambda p: p.name)
def test_check_skips_nonfinite_on_every_scaling_pipeline(
    pipeline: testing.TrialPipeline,
) -> None:
    testing.check_skips_nonfinite(
        make, pipeline, BATCHES, poison_at=(1, 2), settings=FEW
    )
    testing.check_skips_nonfinite(make, pipeline, fixed(), value="nan")


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_check_matches_reference_on_every_pipeline(
    pipeline: testing.TrialPipeline,
) -> None:
    testing.check_matches_reference(make, pipeline, BATCHES, steps=6, settings=FEW)


@pytest.mark.parametrize("pipeline", SKIPPING, ids=lambda p: p.name)
def test_check_never_nonfinite_on_every_scaling_pipeline(
    pipeline: testing.TrialPipeline,
) -> None:
    edgy = testing.batches((16, 6), num_classes=3, probe=torch.float16)
    testing.check_never_nonfinite(make, pipeline, edgy, steps=4, settings=FEW)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_check_state_roundtrip_on_every_pipeline(
    pipeline: testing.TrialPipeline,
) -> None:
    testing.check_state_roundtrip(make, pipeline, fixed(), save_at=3, steps=6)


def make_two(
    seed: int,
) -> tuple[Callable[[Any], Any], nn.Module, list[torch.optim.Optimizer]]:
    """Two optimizers over two halves of one model, as in PyTorch's AMP examples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opts = [
        torch.optim.SGD(model[0].parameters(), lr=0.05),
        torch.optim.Adam(model[2].parameters(), lr=1e-3),
    ]

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
        for opt in opts:
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)

    return step, model, opts


def test_checks_take_a_list_of_optimizers() -> None:
    scaled = next(p for p in SKIPPING if p.name == "scaling+autocast-bf16")
    # Poison lands in optimizer 0 only: GradScaler skips it and steps optimizer 1.
    testing.check_skips_nonfinite(make_two, scaled, fixed())
    testing.check_state_roundtrip(make_two, scaled, fixed())
    testing.check_matches_reference(make_two, scaled, fixed())


def test_checks_accept_a_plain_transform_inside_a_users_given() -> None:
    @FEW
    @given(st.lists(BATCHES, min_size=6, max_size=6))
    def users_test(data: list[Any]) -> None:
        testing.check_matches_reference(
            make, ampfn.with_autocast("bf16", "cpu"), data, steps=6
        )

    users_test()


# --------------------------------------------------------------------------- checks catch broken transforms


class _ReportsTrue(Handler):
    """Broken: says every step was taken, skipped or not."""

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> bool:
        proceed(optimizer, args, kwargs)
        return True


class _Perturbs(Handler):
    """Broken: nudges every parameter after each step."""

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        result = proceed(optimizer, args, kwargs)
        with torch.no_grad():
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.add_(1e-2)
        return result


class _Forgetful:
    """Broken: a state that ignores what it is asked to load."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state.state_dict())

    def check_state(self, state: object, /) -> None:
        self.state.check_state(state)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        pass


def _broken(handler: Handler) -> testing.TrialPipeline:
    return testing.TrialPipeline(
        "broken",
        lambda m, o: ampfn.compose(
            ampfn.with_handler(handler, name="broken"),
            ampfn.with_grad_scaling(
                torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
            ),
        ),
    )


def test_check_skips_nonfinite_catches_a_pipeline_that_steps_on_inf() -> None:
    with pytest.raises(
        AssertionError,
        match=r"step 1: optimizer 0's gradients were poisoned \(non-finite\) but ampfn.step returned True",
    ):
        testing.check_skips_nonfinite(make, _broken(_ReportsTrue()), fixed())


def test_check_skips_nonfinite_catches_a_pipeline_without_a_scaler() -> None:
    with pytest.raises(AssertionError, match="has no dynamic loss scaler"):
        testing.check_skips_nonfinite(make, ampfn.with_autocast("bf16", "cpu"), fixed())


def test_check_matches_reference_catches_a_perturbed_update() -> None:
    with pytest.raises(
        AssertionError,
        match=r"parameter '\d\.(weight|bias)' is .* away from the fp32 reference, beyond atol=",
    ):
        testing.check_matches_reference(make, _broken(_Perturbs()), fixed())


class _NeverUpdates(Handler):
    """Broken: reports a step and never takes one."""

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return True


def test_check_matches_reference_catches_a_pipeline_that_never_updates() -> None:
    """Its updates are smaller than bf16's elementwise tolerance: only the check on the
    training as a whole sees that nothing moved."""
    broken = testing.TrialPipeline(
        "never updates",
        lambda m, o: ampfn.compose(
            ampfn.with_handler(_NeverUpdates()), ampfn.with_autocast("bf16", "cpu")
        ),
    )
    with pytest.raises(
        AssertionError,
        match=r"beyond update_rtol=0\.\d+ of that plus 0 for rounding the weights "
        r"\(the updates are off by 100% of their size\)",
    ):
        testing.check_matches_reference(make, broken, fixed(), steps=6)


def _make_sgd(lr: float) -> Callable[[int], Any]:
    def make_with(seed: int) -> Any:
        _, model, _ = make(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            ampfn.backward(F.cross_entropy(model(batch[0]).float(), batch[1]))
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)

        return train_step, model, opt

    return make_with


@pytest.mark.parametrize("lr", [1e-3, 1e-6])
@pytest.mark.parametrize("name", ["bf16-true+master", "16-true+master+scaling"])
def test_check_matches_reference_allows_the_rounding_of_half_weights(
    name: str, lr: float
) -> None:
    """Master-weight pipelines track the fp32 run; their half model weights are that run
    rounded, which at small learning rates is more than the updates themselves."""
    pipeline = next(p for p in testing.available_pipelines("cpu") if p.name == name)
    testing.check_matches_reference(_make_sgd(lr), pipeline, fixed(), steps=8)


def test_check_matches_reference_compares_the_master_weights() -> None:
    """With fp32 masters the whole-training bound compares them, not the half model
    weights, so a pipeline that never updates is caught at a small learning rate too
    (the rounding of bf16 model weights hid it)."""
    masters = next(
        p for p in testing.available_pipelines("cpu") if p.name == "bf16-true+master"
    )
    broken = testing.TrialPipeline(
        "never updates",
        lambda m, o: ampfn.compose(
            ampfn.with_handler(_NeverUpdates()), masters.build(m, o)
        ),
    )
    with pytest.raises(AssertionError, match=r"off by 100% of their size"):
        testing.check_matches_reference(_make_sgd(1e-3), broken, fixed(), steps=8)


def test_check_matches_reference_elementwise_and_update_tolerances_are_separate() -> (
    None
):
    bf16 = ampfn.with_autocast("bf16", "cpu")
    testing.check_matches_reference(make, bf16, fixed(), rtol=0.0, atol=0.05)
    broken = testing.TrialPipeline(
        "never updates",
        lambda m, o: ampfn.compose(ampfn.with_handler(_NeverUpdates()), bf16),
    )
    testing.check_matches_reference(make, broken, fixed(), update_rtol=math.inf)
    with pytest.raises(ValueError, match=r"update_rtol must be a number >= 0, got -1"):
        testing.check_matches_reference(make, bf16, fixed(), update_rtol=-1)
    with pytest.raises(ValueError, match=r"update_rtol must be a number >= 0, got nan"):
        testing.check_matches_reference(make, bf16, fixed(), update_rtol=math.nan)
    np = pytest.importorskip("numpy")
    testing.check_matches_reference(make, bf16, fixed(), update_rtol=np.float32(0.5))


def test_check_never_nonfinite_catches_fp16_without_scaling() -> None:
    huge = [(torch.full((16, 6), 6e4), torch.zeros(16, dtype=torch.long))] * 3
    with pytest.raises(
        AssertionError,
        match=r"check_never_nonfinite: after step \d, model\.[\w.]+\[[\d, ]+\] is nan",
    ):
        testing.check_never_nonfinite(make, ampfn.with_autocast("fp16", "cpu"), huge)


def test_check_state_roundtrip_catches_a_transform_that_loses_its_scale() -> None:
    def build(m: nn.Module, o: Any) -> Transform:
        real = ampfn.with_grad_scaling(
            torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        )
        return Transform(
            "lossy",
            fragment=real.fragment,
            tags=("loss_scaling",),
            state=_Forgetful(real.state),
        )

    with pytest.raises(
        AssertionError,
        match=r"right after loading the state saved at step 3, ampfn.state_dict.*\['scaler'\]",
    ):
        testing.check_state_roundtrip(
            make, testing.TrialPipeline("lossy", build), fixed()
        )


def _failing_run(shrink: bool) -> tuple[AssertionError, int]:
    """check_never_nonfinite on fp16 without loss scaling, which edge values break."""
    calls = {"make": 0}

    def counting_make(seed: int) -> Any:
        calls["make"] += 1
        return make(seed)

    edgy = testing.batches((4, 6), num_classes=3, probe=torch.float16)
    with pytest.raises(
        AssertionError,
        match=r"check_never_nonfinite: after step 0, model\.[\w.]+\[[\d, ]+\] is nan",
    ) as e:
        testing.check_never_nonfinite(
            counting_make,
            ampfn.with_autocast("fp16", "cpu"),
            edgy,
            steps=1,
            settings=settings(max_examples=50, database=None, derandomize=True),
            shrink=shrink,
        )
    return e.value, calls["make"]


def test_a_failing_check_reports_its_first_failing_example_without_shrinking() -> None:
    error, tries = _failing_run(shrink=False)
    notes = "\n".join(getattr(error, "__notes__", []))
    assert (
        "check(" in notes
    )  # hypothesis's "Falsifying example:" / "Failing test case:"
    assert "tensor(" in notes
    shrunk_error, shrunk_tries = _failing_run(
        shrink=True
    )  # asked for: a minimal example
    assert shrunk_tries > tries
    assert "tensor(" in "\n".join(getattr(shrunk_error, "__notes__", []))


def test_checks_and_strategies_validate_eagerly() -> None:
    with pytest.raises(
        TypeError, match=r"check_matches_reference: make must be a function"
    ):
        testing.check_matches_reference(None, SKIPPING[0], fixed())  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"check_never_nonfinite: transform must be a transform or a TrialPipeline",
    ):
        testing.check_never_nonfinite(make, 3, fixed())
    with pytest.raises(
        ValueError, match=r"check_matches_reference: steps must be an int >= 1, got 0"
    ):
        testing.check_matches_reference(make, SKIPPING[0], fixed(), steps=0)
    with pytest.raises(
        ValueError,
        match=r"check_skips_nonfinite: poison_at\[0\] must be an int >= 0, got -1",
    ):
        testing.check_skips_nonfinite(make, SKIPPING[0], fixed(), poison_at=(-1,))
    with pytest.raises(
        ValueError, match=r"batches\(shape, ...\): num_classes must be a positive int"
    ):
        testing.batches((4, 2), num_classes=0)
    with pytest.raises(
        ValueError,
        match=r"loss_scale_settings\(max_interval\): expected a positive int",
    ):
        testing.loss_scale_settings(0)


def test_bad_check_arguments() -> None:
    with pytest.raises(ValueError, match="check_skips_nonfinite: value must be"):
        testing.check_skips_nonfinite(make, SKIPPING[0], fixed(), value="big")
    with pytest.raises(
        ValueError, match=r"check_state_roundtrip: save_at must be in \[0, steps\]"
    ):
        testing.check_state_roundtrip(make, SKIPPING[0], fixed(), save_at=9, steps=4)
    with pytest.raises(ValueError, match="batches is an empty sequence"):
        testing.check_never_nonfinite(make, SKIPPING[0], [])


def test_missing_hypothesis_names_the_extra() -> None:
    code = "import sys; sys.modules['hypothesis'] = None; import ampfn.testing"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "ampfn.testing needs hypothesis" in proc.stderr
    assert "pip install -e '.[test]' in an ampfn checkout" in proc.stderr


def test_states_compare_nan_as_equal_and_dtype_as_part_of_the_value() -> None:
    from ampfn.testing._trial import first_difference

    nan = float("nan")
    a = {"w": torch.tensor([1.0, nan, -0.0]), "s": [nan, 2]}
    same = {"w": torch.tensor([1.0, nan, -0.0]), "s": [nan, 2]}
    assert first_difference(a, same) is None  # identical NaNs on every rank agree
    moved = {"w": torch.tensor([1.0, 2.0, -0.0]), "s": [nan, 2]}
    assert first_difference(a, moved) is not None
    elsewhere = {"w": torch.tensor([nan, 1.0, -0.0]), "s": [nan, 2]}
    assert first_difference(a, elsewhere) is not None
    assert first_difference(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert first_difference(torch.ones(2), torch.ones(1, 2))
    assert first_difference(torch.ones(2, dtype=torch.int64), torch.ones(2)) is not None


# --------------------------------------------------------------------------- misuse (issue 20)

CHECKS: list[tuple[str, Callable[..., None]]] = [
    ("check_matches_reference", testing.check_matches_reference),
    ("check_never_nonfinite", testing.check_never_nonfinite),
    ("check_state_roundtrip", testing.check_state_roundtrip),
    ("check_skips_nonfinite", testing.check_skips_nonfinite),
]
SCALED = ampfn.with_grad_scaling(torch.amp.GradScaler("cpu", init_scale=2.0**8))


def _one_model() -> Callable[[int], Any]:
    step, model, opt = make(0)
    return lambda seed: (step, model, opt)


@pytest.mark.parametrize(
    ("bad_make", "match"),
    [
        (
            lambda seed: make(seed)[:2],
            r"make must return \(step, model, optimizer\).*a tuple of 2",
        ),
        (lambda seed: (*make(seed)[:2], None), r"optimizer make returned .*got None"),
        (lambda seed: (make(seed)[0], "model", make(seed)[2]), "not an nn.Module"),
    ],
    ids=["two values", "optimizer None", "model str"],
)
@pytest.mark.parametrize(("api", "check"), CHECKS, ids=[n for n, _ in CHECKS])
def test_a_make_that_breaks_the_contract_is_a_type_error_naming_make(
    api: str, check: Callable[..., None], bad_make: Callable[[int], Any], match: str
) -> None:
    with pytest.raises(TypeError, match=rf"{api}: .*{match}"):
        check(bad_make, SCALED, fixed(6))


@pytest.mark.parametrize(
    ("api", "check"), CHECKS[:3:2], ids=[n for n, _ in CHECKS[:3:2]]
)
def test_a_make_that_returns_one_model_every_time_is_refused(
    api: str, check: Callable[..., None]
) -> None:
    """Checks that compare two trials (the pipeline with its reference, a run with its
    resumed twin) would compare the model with itself, and a broken pipeline would pass."""
    with pytest.raises(TypeError, match=rf"{api}: make returned the same model object"):
        check(_one_model(), SCALED, fixed(6))


def test_a_step_that_changes_the_default_dtype_has_it_restored() -> None:
    def changing(seed: int) -> Any:
        step, model, opt = make(seed)

        def wrapped(batch: Any) -> Any:
            torch.set_default_dtype(torch.float64)
            return step(batch)

        return wrapped, model, opt

    try:
        testing.check_never_nonfinite(changing, SCALED, fixed(4), steps=4)
    finally:
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
    assert dtype == torch.float32


def test_an_unreproducible_reference_is_named_instead_of_the_tolerance() -> None:
    def unseeded(seed: int) -> Any:
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))  # no seed
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(batch: Any) -> Any:
            x, y = batch
            ampfn.backward(F.cross_entropy(model(x).float(), y))
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)

        return step, model, opt

    with pytest.raises(
        AssertionError, match=r"the fp32 reference is not reproducible.*seed"
    ):
        testing.check_matches_reference(unseeded, SCALED, fixed(4), steps=4)
    # seeded, the same check passes
    testing.check_matches_reference(make, SCALED, fixed(4), steps=4)
