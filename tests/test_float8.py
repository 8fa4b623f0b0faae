"""with_float8: torchao's fp8 training as a transform (emulated fp8 matmuls on the CPU)."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn import testing

pytest.importorskip("torchao", reason="the fp8 extra (torchao) is not installed")

RECIPES = ["tensorwise", "rowwise", "rowwise_with_gw_hp"]
STEPS = 30


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)
    )


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 32, generator=g) for _ in range(n)]
    return [(x, (x[:, :4].argmax(1) * 4) % 16) for x in xs]


def train(fp8: str | None, precision: str) -> tuple[list[float], nn.Module]:
    m = model()
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    transforms: list[Any] = {
        "bf16": [ampfn.with_autocast("bf16", "cpu")],
        "bf16-true": [ampfn.with_policy("bf16-true", m, o)],
        "fp16+scaling": [ampfn.with_grad_scaling(), ampfn.with_autocast("fp16", "cpu")],
    }[precision]
    if fp8 is not None:
        transforms.append(ampfn.with_float8(m, recipe=fp8, emulate=True))

    @ampfn.compose(*transforms)
    def step(b: tuple[torch.Tensor, torch.Tensor]) -> float:
        loss = F.cross_entropy(m(b[0]).float(), b[1])
        ampfn.backward(loss)
        ampfn.step(o)
        o.zero_grad(set_to_none=True)
        return float(loss.detach())

    return [step(b) for b in data(STEPS)], m


@pytest.mark.parametrize("precision", ["bf16", "bf16-true", "fp16+scaling"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_trains_within_a_stated_tolerance_of_the_same_run_without_it(
    recipe: str, precision: str
) -> None:
    """Over 30 steps (SGD, lr 0.1, momentum 0.9) fp8 matmuls move the weights by at most
    0.066 from the run without them (measured over every recipe and precision); we allow
    0.1, and the final loss within 0.3 of the other's, both having learned."""
    losses, m = train(recipe, precision)
    ref_losses, ref = train(None, precision)
    worst = max(
        float((p.detach().float() - q.detach().float()).abs().max())
        for p, q in zip(m.parameters(), ref.parameters(), strict=True)
    )
    assert worst <= 0.1
    assert abs(losses[-1] - ref_losses[-1]) <= 0.3
    assert losses[-1] < losses[0] / 2
    assert ref_losses[-1] < ref_losses[0] / 2


def test_conversion_picks_layers_by_name(caplog: pytest.LogCaptureFixture) -> None:
    m = nn.Sequential(
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        ampfn.fp32(nn.Linear(64, 32)),
        nn.Linear(32, 10),
    )
    with caplog.at_level(logging.DEBUG, logger="ampfn"):
        ampfn.with_float8(m, emulate=True, module_filter=lambda module, fqn: fqn != "2")
    kinds = {
        name: type(mod).__name__
        for name, mod in m.named_modules()
        if isinstance(mod, nn.Linear)
    }
    assert kinds == {
        "0": "Float8Linear",
        "2": "Linear",
        "3.module": "Linear",
        "4": "Linear",
    }
    assert (
        "'4' (32 -> 10) stays as it is: fp8 matmuls need both dimensions divisible by 16"
        in caplog.text
    )


def test_bad_inputs_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError,
        match=r"recipe must be one of 'tensorwise', 'rowwise', 'rowwise_with_gw_hp', got 'delayed'",
    ):
        ampfn.with_float8(model(), recipe="delayed")
    with pytest.raises(
        ValueError, match=r"is itself an nn.Linear.*pass the module that holds it"
    ):
        ampfn.with_float8(nn.Linear(32, 32), emulate=True)
    with pytest.raises(ValueError, match=r"no nn.Linear layer to convert"):
        ampfn.with_float8(nn.Sequential(nn.Linear(8, 10)), emulate=True)
    with pytest.raises(
        ValueError, match="fsdp_float8_all_gather works with the tensorwise recipe only"
    ):
        ampfn.with_float8(
            model(), recipe="rowwise", fsdp_float8_all_gather=True, emulate=True
        )
    with pytest.raises(TypeError, match=r"call it: @ampfn.with_float8"):
        ampfn.with_float8(lambda b: b)  # type: ignore[arg-type]
    import ampfn._float8 as f8

    monkeypatch.setattr(
        f8, "_real_fp8", lambda device: "CUDA compute capability 8.0 has no fp8 matmul"
    )
    with pytest.raises(ValueError, match=r"has no fp8 matmul.*; pass emulate=True"):
        ampfn.with_float8(model())
    converted = model()
    ampfn.with_float8(converted, emulate=True)
    with pytest.raises(ValueError, match=r"already converted by with_float8"):
        ampfn.with_float8(converted, emulate=True)


def test_real_fp8_matmuls_where_torch_has_them() -> None:
    import ampfn._float8 as f8

    m = model()
    if f8._real_fp8(torch.device("cpu")) is not None:
        pytest.skip("torch._scaled_mm does not run on this CPU build")
    ampfn.with_float8(m)  # emulate=None: real fp8 on the CPU with torch 2.13
    assert type(m[0]).__name__ == "Float8Linear"
    assert m[0].config.emulate is False  # type: ignore[union-attr]


def test_missing_torchao_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['torchao'] = None; import torch, ampfn\n"
        "try:\n    ampfn.with_float8(torch.nn.Sequential(torch.nn.Linear(16, 16)))\n"
        "except ImportError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "install the fp8 extra: pip install -e '.[fp8]'" in out


def make(seed: int) -> tuple[Any, nn.Module, Any]:
    m = model(seed)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def step(b: tuple[torch.Tensor, torch.Tensor]) -> Any:
        ampfn.backward(F.cross_entropy(m(b[0]).float(), b[1]))
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    return step, m, opt


FP8 = testing.TrialPipeline(
    "fp8+bf16",
    lambda m, o: ampfn.compose(
        ampfn.with_autocast("bf16", "cpu"), ampfn.with_float8(m, emulate=True)
    ),
)


def test_state_round_trips_and_resumes_bit_for_bit() -> None:
    testing.check_state_roundtrip(make, FP8, data(8))
    m = model()
    ampfn.with_float8(m, emulate=True)
    plain = model(seed=3)
    plain.load_state_dict(m.state_dict())  # the same keys, plain tensors
    m.load_state_dict(plain.state_dict())


def test_check_matches_reference_states_the_fp8_tolerance() -> None:
    testing.check_matches_reference(
        make, FP8, data(8), steps=8
    )  # within eps(e4m3) * sqrt(8)

    class Nudge(ampfn.Handler):  # broken: moves every weight by 0.1 after each step
        def step(self, proceed: Any, optimizer: Any, args: Any, kwargs: Any) -> Any:
            stepped = proceed(optimizer, args, kwargs)
            with torch.no_grad():
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        p.add_(0.1)
            return stepped

    broken = testing.TrialPipeline(
        "broken fp8",
        lambda m, o: ampfn.compose(FP8.build(m, o), ampfn.with_handler(Nudge())),
    )
    with pytest.raises(
        AssertionError,
        match=r"beyond atol=0.354, rtol=0.354 \(eps\(torch.float8_e4m3fn\) \* sqrt\(8 steps\)\)",
    ):
        testing.check_matches_reference(make, broken, data(8), steps=8)


def test_after_each_step_torchao_precomputes_fsdp_scales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torchao.float8 as float8

    calls: list[nn.Module] = []
    monkeypatch.setattr(
        float8, "precompute_float8_dynamic_scale_for_fsdp", calls.append
    )
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    step = ampfn.with_float8(m, emulate=True, fsdp_float8_all_gather=True)(
        make_step_for(m, opt)
    )
    step(data(1)[0])
    step(data(1)[0])
    assert calls == [m, m]


def make_step_for(m: nn.Module, opt: torch.optim.Optimizer) -> Any:
    def step(b: tuple[torch.Tensor, torch.Tensor]) -> Any:
        ampfn.backward(F.cross_entropy(m(b[0]), b[1]))
        return ampfn.step(opt)

    return step


@pytest.mark.cuda
@pytest.mark.filterwarnings(
    "ignore:torch.get_autocast_gpu_dtype:DeprecationWarning"
)  # torchao's own call
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_real_fp8_on_a_gpu_that_has_it(recipe: str) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with compute capability 8.9 or newer")
    m = model().cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)

    @ampfn.compose(
        ampfn.with_autocast("bf16", "cuda"), ampfn.with_float8(m, recipe=recipe)
    )
    def step(b: tuple[torch.Tensor, torch.Tensor]) -> float:
        loss = F.cross_entropy(m(b[0]).float(), b[1])
        ampfn.backward(loss)
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step((x.cuda(), y.cuda())) for x, y in data(STEPS)]
    assert m[0].config.emulate is False  # type: ignore[union-attr]
    assert losses[-1] < losses[0] / 2
