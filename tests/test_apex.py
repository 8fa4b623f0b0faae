"""with_apex: Apex's O0-O3 semantics, native backend (the real apex only where installed)."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ampfn
from ampfn._scaling import ApexScaler, GradScalerScaler, LossScale
from ampfn._transform import Transform
from ampfn._types import Fragment
from helpers import Batch, batches, make_step, max_param_error, mlp, params_equal, twin


def build(
    level: str, seed: int = 0, **kw: Any
) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    model = mlp(seed, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t = ampfn.with_apex(level, model, opt, backend="native", **kw)
    return t(make_step(model, opt)), model, opt


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {
        n: t.dtype
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point()
    }


@pytest.mark.parametrize(
    ("level", "linear", "batchnorm"),
    [
        ("O0", torch.float32, torch.float32),
        ("O1", torch.float32, torch.float32),
        ("O2", torch.float16, torch.float32),
        ("O3", torch.float16, torch.float16),
    ],
)
def test_level_weight_dtypes(
    level: str, linear: torch.dtype, batchnorm: torch.dtype
) -> None:
    _, model, opt = build(level)
    for name, dtype in dtypes(model).items():
        assert dtype == (batchnorm if name.startswith("1.") else linear), name
    masters = [p.dtype for g in opt.param_groups for p in g["params"]]
    # O2's optimizer holds fp32 masters; O3 steps the fp16 model itself.
    assert masters == ([torch.float16] * 6 if level == "O3" else [torch.float32] * 6)


def test_keep_batchnorm_fp32_override() -> None:
    _, model, _ = build("O3", keep_batchnorm_fp32=True)
    assert dtypes(model)["1.weight"] == torch.float32
    assert dtypes(model)["0.weight"] == torch.float16
    _, model, _ = build("O2", keep_batchnorm_fp32=False)
    assert dtypes(model)["1.running_mean"] == torch.float16


@pytest.mark.parametrize(
    ("level", "hidden", "output"),
    [
        ("O0", torch.float32, torch.float32),
        ("O1", torch.float16, torch.float32),
        ("O2", torch.float16, torch.float32),
        ("O3", torch.float16, torch.float32),
    ],
)
def test_level_compute_dtype(
    level: str, hidden: torch.dtype, output: torch.dtype
) -> None:
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    @ampfn.with_apex(level, model, opt, backend="native")
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).float() if level == "O1" else model(x)

    assert (
        forward(torch.randn(4, 8)).dtype == output
    )  # the user's data stays fp32 in and out
    assert seen == [hidden]


@pytest.mark.parametrize(
    ("level", "tolerance"), [("O0", 0.0), ("O1", 0.02), ("O2", 0.02), ("O3", 0.05)]
)
def test_level_trains_close_to_fp32(level: str, tolerance: float) -> None:
    step, model, _ = build(level)
    ref = mlp(batchnorm=True)
    ref_step = make_step(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9))
    data = batches(40)
    for b in data:
        step(b)
        ref_step(b)
    x, y = batches(1, seed=99, size=256)[0]
    model.eval()
    ref.eval()
    with torch.no_grad():
        loss, ref_loss = (
            F.cross_entropy(model(x), y).item(),
            F.cross_entropy(ref(x), y).item(),
        )
    assert ref_loss < 0.5  # it learned
    assert abs(loss - ref_loss) <= tolerance, (level, loss, ref_loss)


def test_o1_equals_core_autocast_plus_scaling() -> None:
    step, model, _ = build("O1")
    twin_model = mlp(batchnorm=True)
    twin_opt = torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9)
    core = ampfn.compose(
        ampfn.with_grad_scaling(
            torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
        ),
        ampfn.with_autocast("fp16", "cpu"),
    )(make_step(twin_model, twin_opt))
    for b in batches(20):
        step(b)
        core(b)
    assert params_equal(model, twin_model)
    assert (
        ampfn.state_dict(step)["transforms"][0]["state"]["loss_scaler"]
        == ampfn.state_dict(core)["transforms"][0]["state"]
    )


def test_o2_masters_copied_back_and_skip_is_exact() -> None:
    model = mlp(batchnorm=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    poison = {"now": False}

    @ampfn.with_apex("O2", model, opt, backend="native")
    def train_step(b: Batch) -> bool:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        if poison["now"]:
            masters = opt.param_groups[0]["params"]
            masters[0].grad.view(-1)[0] = float("inf")
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    data = batches(6)
    masters = opt.param_groups[0]["params"]
    for b in data[:3]:
        assert train_step(b) is True
        for p, m in zip(model.parameters(), masters, strict=True):
            assert torch.equal(p, m.to(p.dtype))
            assert p.grad is None
    before_model = twin(model)
    before_masters = [m.detach().clone() for m in masters]
    before_state = {
        id(k): {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()
    }
    scale = ampfn.state_dict(train_step)["transforms"][0]["state"]["loss_scaler"][
        "scaler"
    ]["scale"]
    poison["now"] = True
    assert train_step(data[3]) is False
    assert params_equal(model, before_model)
    assert all(torch.equal(m, b) for m, b in zip(masters, before_masters, strict=True))
    for k, v in opt.state.items():
        assert all(torch.equal(t, before_state[id(k)][n]) for n, t in v.items())
    after = ampfn.state_dict(train_step)["transforms"][0]["state"]["loss_scaler"][
        "scaler"
    ]["scale"]
    assert after == scale / 2
    poison["now"] = False
    assert train_step(data[4]) is True


def test_o2_accumulates_and_clips_master_gradients() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []

    @ampfn.with_apex("O2", model, opt, backend="native")
    def train_step(b: Batch, last: bool) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]) / 2)
        if last:
            norms.append(ampfn.clip_grad_norm_(model.parameters(), 0.1, opt))
            ampfn.step(opt)
            opt.zero_grad()

    ref = mlp()
    data = batches(2)
    for i, b in enumerate(data):
        train_step(b, last=i == 1)
        (F.cross_entropy(ref(b[0]), b[1]) / 2).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    assert norms[0].dtype == torch.float32
    torch.testing.assert_close(norms[0], ref_norm, rtol=5e-3, atol=0)


def test_o2_checkpoint_resumes_bit_for_bit() -> None:
    data = batches(12)
    straight, m1, _ = build("O2")
    for b in data:
        straight(b)
    first, m2, o2 = build("O2")
    for b in data[:6]:
        first(b)
    saved = (ampfn.state_dict(first), m2.state_dict(), o2.state_dict())
    resumed, m3, o3 = build(
        "O2", seed=5
    )  # other initial weights: the checkpoint must restore them
    ampfn.load_state_dict(resumed, saved[0])
    m3.load_state_dict(saved[1])
    o3.load_state_dict(saved[2])
    for b in data[6:]:
        resumed(b)
    assert params_equal(m1, m3)
    assert max_param_error(m1, m3) == 0.0
    s1, s3 = ampfn.state_dict(straight), ampfn.state_dict(resumed)
    assert (
        s1["transforms"][0]["state"]["loss_scaler"]
        == s3["transforms"][0]["state"]["loss_scaler"]
    )


def test_static_loss_scale_never_skips() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_apex("O3", model, opt, backend="native", loss_scale=128.0)
    def train_step(b: Batch) -> bool:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))
        next(model.parameters()).grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]
        return ampfn.step(opt)

    assert train_step(batches(1)[0]) is True  # Apex steps anyway with a static scale
    assert not next(model.parameters()).isfinite().all()


# --------------------------------------------------------------------------- Apex's scale law


def apex_law(
    events: list[bool], init: float, window: int, lo: float | None, hi: float
) -> list[float]:
    """apex/amp/scaler.py LossScaler.update_scale, transcribed: the scale after each step."""
    scale, unskipped, out = min(hi, init), 0, []
    for overflow in events:
        if overflow:
            scale = max(lo, scale / 2.0) if lo else scale / 2.0
            unskipped = 0
        else:
            unskipped += 1
        if unskipped == window:
            scale, unskipped = min(hi, scale * 2.0), 0
        out.append(scale)
    return out


@given(
    events=st.lists(st.booleans(), min_size=1, max_size=30),
    window=st.integers(1, 4),
    lo=st.sampled_from([None, 0.0, 2.0**12, 2.0**15]),
    hi=st.sampled_from([2.0**14, 2.0**16, 2.0**17, 2.0**24]),
)
@pytest.mark.parametrize("law", ["GradScaler + bounds", "Apex's LossScale"])
def test_law_dynamic_scale_follows_apex(
    law: str, events: list[bool], window: int, lo: float | None, hi: float
) -> None:
    if lo is not None and lo > hi:
        lo = hi
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    init = min(2.0**16, hi)
    if (
        law == "GradScaler + bounds"
    ):  # one loss: with_apex's GradScaler with Apex's bounds
        state: Any = GradScalerScaler(
            "with_apex",
            torch.amp.GradScaler("cpu", init_scale=init, growth_interval=window),
            bounds=(lo, hi),
        )
    else:  # several losses, fp16 gradients: Apex's own per-loss scaler
        scale = LossScale(
            init, dynamic=True, lo=lo, hi=hi, window=window, device=torch.device("cpu")
        )
        state = ApexScaler("with_apex", [scale], (opt,), sync_ranks=False)

    @Transform("with_apex", fragment=Fragment("with_apex", scaling=state), state=state)
    def train_step(overflow: bool) -> None:
        # the overflow happens in the backward, where Apex's scaler looks for it
        ampfn.backward(w.sum() * (float("inf") if overflow else 1.0))
        ampfn.step(opt)
        opt.zero_grad()

    scales = []
    for overflow in events:
        train_step(overflow)
        scales.append(state.loss_scale())
    assert scales == apex_law(events, 2.0**16, window, lo, hi)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("level", "error"),
    [
        ("O4", ValueError),
        ("", ValueError),
        ("o5", ValueError),
        (1, TypeError),
        (None, TypeError),
    ],
)
def test_bad_level(level: Any, error: type[Exception]) -> None:
    with pytest.raises(
        error, match=r"with_apex\(level\): level must be one of O0, O1, O2, O3"
    ):
        ampfn.with_apex(level)


def test_lower_case_level_is_accepted() -> None:
    assert ampfn.with_apex("o1", backend="native").name == "with_apex"


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (
            {"level": "O1", "keep_batchnorm_fp32": True},
            ValueError,
            "keep_batchnorm_fp32 must be None",
        ),
        (
            {"level": "O1", "master_weights": True},
            ValueError,
            "master_weights makes no sense with O1",
        ),
        (
            {"level": "O2"},
            ValueError,
            "O2 casts the model and its optimizer's parameters, so it needs both",
        ),
        ({"level": "O3"}, ValueError, "O3 casts the model"),
        (
            {"level": "O1", "backend": "cuda"},
            ValueError,
            "backend must be one of 'auto', 'native', 'apex'",
        ),
        (
            {"level": "O1", "loss_scale": "static"},
            ValueError,
            "loss_scale must be 'dynamic' or a positive number",
        ),
        (
            {"level": "O1", "loss_scale": -1.0},
            ValueError,
            r"loss_scale \(or 'dynamic'\) must be",
        ),
        # settings under which no scale can work: refused when the transform is built
        (
            {"level": "O2", "loss_scale": math.inf},
            ValueError,
            "a finite positive number, got inf",
        ),
        (
            {"level": "O2", "loss_scale": math.nan},
            ValueError,
            "a finite positive number, got nan",
        ),
        (
            {"level": "O1", "max_loss_scale": 0},
            ValueError,
            "max_loss_scale must be a finite positive",
        ),
        (
            {"level": "O1", "max_loss_scale": math.inf},
            ValueError,
            "max_loss_scale must be a finite",
        ),
        (
            {"level": "O1", "min_loss_scale": math.nan},
            ValueError,
            "min_loss_scale must be a finite",
        ),
        (
            {"level": "O1", "min_loss_scale": 8.0, "max_loss_scale": 4.0},
            ValueError,
            "min_loss_scale \\(8.0\\) is above",
        ),
        (
            {"level": "O1", "max_loss_scale": None},
            ValueError,
            "max_loss_scale must be a number",
        ),
        (
            {"level": "O1", "keep_batchnorm_fp32": "True"},
            TypeError,
            "keep_batchnorm_fp32 must be a bool",
        ),
        (
            {"level": "O2", "master_weights": 1},
            TypeError,
            "master_weights must be a bool",
        ),
        ({"level": "O1", "model": "net"}, TypeError, "model must be an nn.Module"),
    ],
)
def test_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], needle: str
) -> None:
    level = kwargs.pop("level")
    with pytest.raises(error, match=r"with_apex\(level\): .*" + needle):
        ampfn.with_apex(level, **kwargs)


def test_model_must_arrive_in_fp32() -> None:
    model = mlp().half()
    with pytest.raises(
        ValueError,
        match=r"with_apex\(level\): parameter '0.weight' is torch.float16; pass the model in float32",
    ):
        ampfn.with_apex(
            "O2", model, torch.optim.SGD(model.parameters(), lr=0.1), backend="native"
        )


HAS_APEX = (
    importlib.util.find_spec("apex") is not None
    and importlib.util.find_spec("apex.amp") is not None
)


@pytest.mark.skipif(HAS_APEX, reason="apex is installed")
def test_apex_backend_without_apex_names_the_fix() -> None:
    with pytest.raises(
        ImportError,
        match=r"with_apex\(level, backend='apex'\): apex.amp cannot be imported .*NVIDIA/apex.*backend='native'",
    ):
        ampfn.with_apex("O1", backend="apex")
    assert ampfn.with_apex("O1").name == "with_apex"  # auto falls back to native


def test_sync_ranks_needs_the_native_backend() -> None:
    with pytest.raises(ValueError, match=r"sync_ranks=True needs backend='native'"):
        ampfn.with_apex("O1", backend="apex", sync_ranks=True)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (HAS_APEX and torch.cuda.is_available()),
    reason="NVIDIA apex.amp and CUDA are not available here",
)
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_apex_backend_matches_native(
    level: str,
) -> None:  # pragma: no cover - needs apex
    def run(backend: str) -> nn.Module:
        model = mlp(device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = ampfn.with_apex(level, model, opt, backend=backend)(
            make_step(model, opt)
        )
        for b in batches(10, device="cuda"):
            step(b)
        return model

    assert max_param_error(run("apex"), run("native")) < 1e-2


# --------------------------------------------------------------------------- what migrating users bring


def test_converting_a_model_twice_says_it_was_converted_by_with_apex() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ampfn.with_apex("O2", model, opt, backend="native")
    with pytest.raises(
        ValueError, match=r"this model was already converted by with_apex\('O2'\)"
    ):
        ampfn.with_apex("O2", model, opt, backend="native")


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_checkpoints_are_fp32_and_portable(level: str) -> None:
    fp32 = mlp(batchnorm=True)
    model = twin(fp32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = ampfn.with_apex(level, model, opt, backend="native")(make_step(model, opt))
    saved = model.state_dict()
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}
    if level == "O2":  # the masters' exact values, not the fp16 copies
        assert all(torch.equal(saved[n], p) for n, p in fp32.state_dict().items())
    for b in batches(3):
        step(b)
    saved = model.state_dict()
    plain = mlp(batchnorm=True, seed=7)
    plain.load_state_dict(saved)  # into an fp32 model
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    # an fp32 checkpoint (or an fp16 one) loads back into a converted model
    other = mlp(batchnorm=True, seed=9)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    ampfn.with_apex(level, other, other_opt, backend="native")
    other.load_state_dict(plain.state_dict())
    assert params_equal(other, model)
    if level == "O2":  # and sets the masters from the fp32 values
        masters = other_opt.param_groups[0]["params"]
        assert torch.equal(masters[0], saved["0.weight"])
    halves = {k: v.half() if v.is_floating_point() else v for k, v in saved.items()}
    other.load_state_dict(
        halves
    )  # an fp16 checkpoint: batch norm rounded, the rest as is
    for (name, p), q in zip(other.named_parameters(), model.parameters(), strict=True):
        assert (
            torch.equal(p, q)
            if p.dtype == torch.float16
            else torch.equal(p, q.half().float())
        ), name


def test_several_models_and_optimizers() -> None:
    a, b = mlp(0), mlp(1)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.Adam(b.parameters(), lr=1e-2)
    poison = {"now": False}

    @ampfn.with_apex("O2", [a, b], [oa, ob], backend="native")
    def train_step(batch: Batch) -> tuple[bool, bool]:
        x, y = batch
        ampfn.backward(F.cross_entropy(a(x) + b(x), y))
        if poison["now"]:  # only b's gradients overflow
            ob.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
        stepped = ampfn.step(oa), ampfn.step(ob)
        oa.zero_grad()
        ob.zero_grad()
        return stepped

    assert {p.dtype for p in [*a.parameters(), *b.parameters()]} == {torch.float16}
    data = batches(3)
    assert train_step(data[0]) == (True, True)
    before = twin(a), twin(b)
    poison["now"] = True
    # Apex's rule: an overflow skips every optimizer given to with_apex
    assert train_step(data[1]) == (False, False)
    assert params_equal(a, before[0])
    assert params_equal(b, before[1])
    poison["now"] = False
    assert train_step(data[2]) == (True, True)


class Larc:
    """An optimizer-like wrapper, as Apex's LARC: param_groups, state and step."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optim = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optim.param_groups = value

    @property
    def state(self) -> Any:
        return self.optim.state

    def step(self) -> None:
        self.optim.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_optimizer_like_wrappers_are_accepted(level: str) -> None:
    model, ref = mlp(), mlp()
    opt = Larc(torch.optim.SGD(model.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    transform = ampfn.with_apex(level, model, opt, backend="native")  # type: ignore[arg-type]
    step = transform(make_step(model, opt))  # type: ignore[arg-type]
    ref_step = ampfn.with_apex(level, ref, ref_opt, backend="native")(
        make_step(ref, ref_opt)
    )
    for b in batches(4):
        assert step(b)[1] == ref_step(b)[1]
    assert params_equal(model, ref)

    @transform
    def overflowing(b: Batch) -> bool:
        ampfn.backward(F.cross_entropy(model(b[0]).float(), b[1]) * float("inf"))
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    assert overflowing(batches(1)[0]) is False


# --------------------------------------------------------------------------- several losses


def apex_by_hand(
    data: list[Batch], poison_at: int
) -> tuple[nn.Module, nn.Module, list[float], list[float]]:
    """Apex's scale_loss for two losses, transcribed (apex/amp/handle.py, scaler.py):
    unscale each backward as it finishes with its own loss's scale, update that scale,
    skip every optimizer's step if any backward overflowed."""
    a, b = mlp(0), mlp(1)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    params = [*a.parameters(), *b.parameters()]
    scales = [torch.full((), 2.0**16), torch.full((), 2.0**16)]
    trackers = [torch.zeros((), dtype=torch.int32), torch.zeros((), dtype=torch.int32)]
    history: tuple[list[float], list[float]] = ([], [])
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            losses = [
                F.cross_entropy((a(x) + b(x)).float(), y),
                b(x).float().pow(2).mean() * (float("inf") if i == poison_at else 1.0),
            ]
        overflow = torch.zeros(())
        for k, loss in enumerate(losses):
            stash = [p.grad for p in params]
            for p in params:
                p.grad = None
            (loss.float() * scales[k]).backward()
            found = torch.zeros(())
            fresh = [p.grad for p in params if p.grad is not None]
            torch._amp_foreach_non_finite_check_and_unscale_(
                fresh, found, scales[k].double().reciprocal().float()
            )  # type: ignore[arg-type]
            for p, old in zip(params, stash, strict=True):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad.add_(old)
            torch._amp_update_scale_(scales[k], trackers[k], found, 2.0, 0.5, 2000)
            overflow += found
        if not overflow.item():
            oa.step()
            ob.step()
        oa.zero_grad()
        ob.zero_grad()
        for k in range(2):
            history[k].append(float(scales[k]))
    return a, b, *history


def test_several_losses_follow_apexs_scale_loss() -> None:
    data = batches(5)
    poison_at = 2
    ref_a, ref_b, ref_s0, ref_s1 = apex_by_hand(data, poison_at)
    a, b = mlp(0), mlp(1)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    pipeline = ampfn.with_apex("O1", [a, b], [oa, ob], backend="native", num_losses=2)
    calls = {"i": 0}

    @pipeline
    def train_step(batch: Batch) -> tuple[bool, bool]:
        x, y = batch
        loss0 = F.cross_entropy((a(x) + b(x)).float(), y)
        loss1 = b(x).float().pow(2).mean() * (
            float("inf") if calls["i"] == poison_at else 1.0
        )
        calls["i"] += 1
        ampfn.backward(loss0, loss_id=0)
        ampfn.backward(loss1, loss_id=1)
        stepped = ampfn.step(oa), ampfn.step(ob)
        oa.zero_grad()
        ob.zero_grad()
        return stepped

    results, s0, s1 = [], [], []
    for batch in data:
        results.append(train_step(batch))
        s0.append(ampfn.loss_scale(train_step, loss_id=0))
        s1.append(ampfn.loss_scale(train_step, loss_id=1))
    # loss 1 overflowed: both optimizers skipped, only loss 1's scale backed off
    assert results == [(i != poison_at, i != poison_at) for i in range(len(data))]
    assert s0 == ref_s0 == [2.0**16] * len(data)
    assert s1 == ref_s1 == [2.0**16] * poison_at + [2.0**15] * (len(data) - poison_at)
    assert params_equal(a, ref_a)
    assert params_equal(b, ref_b)


def test_several_losses_validate_the_loss_id() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @ampfn.with_apex("O1", model, opt, backend="native", num_losses=2)
    def train_step(b: Batch) -> None:
        ampfn.backward(model(b[0]).float().sum(), loss_id=2)

    with pytest.raises(
        ValueError,
        match=r"loss_id is 2, but with_apex has num_losses=2 \(loss ids 0 to 1\)",
    ):
        train_step(batches(1)[0])
    with pytest.raises(ValueError, match="num_losses must be an int >= 1, got 0"):
        ampfn.with_apex("O1", model, opt, backend="native", num_losses=0)
    with pytest.raises(ValueError, match="needs the optimizers"):
        ampfn.with_apex("O1", model, backend="native", num_losses=2)


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
@pytest.mark.parametrize(
    ("level", "kw"),
    [
        ("O1", {}),
        ("O2", {}),
        ("O1", {"num_losses": 2}),
        ("O3", {"loss_scale": 128.0}),
    ],
    ids=["O1", "O2", "O1-num_losses=2", "O3-static-128"],
)
def test_a_closure_is_refused_before_anything_changes(
    level: str, kw: dict[str, Any], positional: bool
) -> None:
    from test_scaling import closure_step

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t = ampfn.with_apex(level, model, opt, backend="native", **kw)
    before = [p.detach().clone() for p in model.parameters()]
    step, ran = closure_step(t, model, opt, positional)
    with pytest.raises(
        RuntimeError,
        match=r"ampfn.step\(optimizer, closure\): with_apex refuses closures.*"
        r"Amp does not support closure use",
    ):
        step(None)
    assert not ran
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
    )


def test_o1_gradient_penalty_matches_the_hand_written_grad_scaler_recipe() -> None:
    """PyTorch's AMP gradient-penalty recipe with Apex's scaler settings, bit for bit."""
    from test_scaling import penalty_by_hand

    data = batches(6)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    s = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2000)
    ref_scales = penalty_by_hand(ref, ref_opt, s, data)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    @ampfn.with_apex("O1", model, opt, backend="native")
    def step(batch: Batch) -> Any:
        loss = F.cross_entropy(model(batch[0]).float(), batch[1])
        grads = ampfn.grad(loss, list(model.parameters()), create_graph=True)
        ampfn.backward(loss + torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt())
        stepped = ampfn.step(opt)
        opt.zero_grad()
        return stepped

    scales = []
    for b in data:
        step(b)
        scales.append(ampfn.loss_scale(step))
    assert params_equal(model, ref)
    assert scales == ref_scales


def test_the_apex_backend_refuses_a_closure_before_stepping() -> None:
    """As every loss-scaling path does (real Apex refuses closures in its patched steps)."""
    import types

    from ampfn._apex_backend import ApexAmp

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handler = ApexAmp(types.ModuleType("apex.amp"), [opt])

    def closure() -> torch.Tensor:
        raise AssertionError("the closure ran")

    before = model.weight.detach().clone()
    for args, kwargs in [((closure,), {}), ((), {"closure": closure})]:
        with pytest.raises(RuntimeError, match=r"with_apex refuses closures"):
            handler.step(lambda *a: None, opt, args, dict(kwargs))
    assert torch.equal(model.weight, before)


# --- misuse (issue 20) -------------------------------------------------------------


@pytest.mark.parametrize("level", ["01", "02", "00"])
def test_a_digit_zero_level_says_the_level_is_the_letter_o(level: str) -> None:
    with pytest.raises(
        ValueError, match=rf"the letter O, not the digit zero: 'O{level[1]}'"
    ):
        ampfn.with_apex(level)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss_scale": math.inf},
        {"loss_scale": math.nan},
        {"loss_scale": 0.0},
        {"max_loss_scale": 0},
        {"max_loss_scale": math.inf},
        {"max_loss_scale": math.nan},
        {"min_loss_scale": math.nan},
        {"min_loss_scale": math.inf},
    ],
)
def test_loss_scale_settings_that_cannot_work_are_refused_when_built(
    kwargs: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match=r"with_apex\(level\): \w+_scale"):
        ampfn.with_apex("O1", backend="native", **kwargs)


def test_o3_with_adams_default_eps_warns_as_16_true_does() -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), eps=1e-8)
    with pytest.warns(
        UserWarning, match=r"with_apex\('O3'\): AdamW has eps=1e-08.*O2"
    ) as w:
        ampfn.with_apex("O3", model, opt, backend="native")
    assert w[0].filename == __file__
    quiet = mlp()
    ampfn.with_apex(
        "O2", quiet, torch.optim.AdamW(quiet.parameters(), eps=1e-8), backend="native"
    )  # masters: the optimizer works in fp32, no warning (filterwarnings = error)


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_a_refused_composition_leaves_the_model_and_optimizer_as_they_were(
    level: str,
) -> None:
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="compose: "):
        ampfn.compose(
            ampfn.with_grad_scaling(),
            ampfn.with_apex(level, model, opt, backend="native"),
        )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert list(model.parameters()) == params
    assert opt.param_groups[0]["params"] == params  # no masters left in the optimizer
    assert "forward" not in vars(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # retrying as the message advises works, as on a fresh model
    fresh = mlp(batchnorm=True)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    runs = []
    for m, o in ((model, opt), (fresh, fresh_opt)):
        step = ampfn.with_apex(level, m, o, backend="native")(make_step(m, o))
        for b in batches(3):
            step(b)
        runs.append(m)
    assert params_equal(*runs)


def test_a_transform_whose_conversion_was_taken_back_cannot_be_applied() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    o2 = ampfn.with_apex("O2", model, opt, backend="native")
    with pytest.raises(ValueError, match="two loss-scaling"):
        ampfn.compose(ampfn.with_grad_scaling(), o2)
    with pytest.raises(ValueError, match=r"taken back; call with_apex\(\.\.\.\) again"):
        o2(make_step(model, opt))


def test_o2_given_another_models_optimizer_is_refused_before_the_cast() -> None:
    model, other = mlp(), mlp()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        ampfn.with_apex("O2", model, opt, backend="native")
    assert all(p.dtype == torch.float32 for p in model.parameters())


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(i))


def test_o2_tied_weights_give_the_fp32_master_under_both_names() -> None:
    torch.manual_seed(0)
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(i: torch.Tensor) -> None:
        ampfn.backward(model(i).float().logsumexp(-1).mean())
        ampfn.step(opt)
        opt.zero_grad()

    ampfn.with_apex("O2", model, opt, backend="native")(train)(torch.arange(10))
    state = model.state_dict()
    master = opt.param_groups[0]["params"][0]
    assert master.dtype == torch.float32
    assert torch.equal(state["emb.weight"], master)
    assert torch.equal(state["head.weight"], master)
