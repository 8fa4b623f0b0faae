"""Precision policies: parsing, true low precision, and weights that keep learning."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn import testing
from helpers import Batch, batches, make_step, mlp, params_equal

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# --------------------------------------------------------------------------- parsing

LIGHTNING = {
    "32-true": (F32, F32, F32),
    "32": (F32, F32, F32),
    "64-true": (F64, F64, F64),
    "64": (F64, F64, F64),
    "16-true": (F16, F16, F32),
    "bf16-true": (BF16, BF16, F32),
    "16-mixed": (F32, F16, F32),
    "16": (F32, F16, F32),
    "bf16-mixed": (F32, BF16, F32),
    "bf16": (F32, BF16, F32),
}
JMP = {
    "params=float32,compute=bfloat16,output=float32": (F32, BF16, F32),
    "p=f32,c=bf16,o=f32": (F32, BF16, F32),
    "params=bfloat16": (BF16, BF16, BF16),
    "c=f16": (F32, F16, F16),
    "p=f32,c=half": (F32, F16, F16),
    "compute=bfloat16,output=float32": (F32, BF16, F32),
    "p=f64,o=f32": (F64, F64, F32),
    "float16": (F16, F16, F16),
    "full": (F32, F32, F32),
}


@pytest.mark.parametrize(("spec", "dtypes"), [*LIGHTNING.items(), *JMP.items()])
def test_specs_map_to_the_documented_dtypes(
    spec: str, dtypes: tuple[torch.dtype, ...]
) -> None:
    p = ampfn.get_policy(spec)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == dtypes
    assert ampfn.get_policy(p) is p
    assert ampfn.get_policy(str(p)) == p  # str() round-trips through jmp's syntax


def test_ints_are_lightnings_names_and_mixed_or_true_is_decided() -> None:
    assert ampfn.get_policy(16) == ampfn.get_policy("16-mixed")
    assert ampfn.get_policy("bf16-mixed").is_mixed
    assert not ampfn.get_policy("bf16-mixed").is_true
    assert ampfn.get_policy("bf16-true").is_true
    assert ampfn.get_policy("32-true").is_true


@pytest.mark.parametrize("name", ["transformer-engine", "transformer-engine-float16"])
def test_lightnings_fp8_names_point_at_with_float8(name: str) -> None:
    with pytest.raises(ValueError, match=rf"'{name}' is fp8 .*with_float8\(model\)"):
        ampfn.get_policy(name)


def test_bad_specs_name_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown precision 'fp8'; valid: '32-true', '32', '64-true'"
    ):
        ampfn.get_policy("fp8")
    with pytest.raises(
        ValueError, match=r"unknown dtype 'int8' in 'p=int8'; valid: float16, f16"
    ):
        ampfn.get_policy("p=int8")
    with pytest.raises(
        ValueError, match=r"unknown key 'weights' .*; valid: params, p, compute"
    ):
        ampfn.get_policy("weights=f32")
    with pytest.raises(ValueError, match=r"neither mixed .* nor true"):
        ampfn.get_policy("p=f16,c=f32")  # compute wider than params
    with pytest.raises(ValueError, match="neither mixed"):
        ampfn.get_policy("p=f64,c=f32")
    with pytest.raises(TypeError, match="expected a precision name"):
        ampfn.get_policy(torch.float16)
    with pytest.raises(ValueError, match=r"must be a floating torch.dtype"):
        ampfn.Policy(F32, torch.int8, F32)


# --------------------------------------------------------------------------- with_policy


def test_mixed_policies_are_autocast_and_fp16_adds_loss_scaling() -> None:
    model = mlp()
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ampfn.with_policy("bf16-mixed", model)(lambda x: model(x))(torch.randn(2, 8))
    assert seen == [BF16]
    assert model[0].weight.dtype == F32  # weights stay fp32
    fp16 = ampfn.with_policy("16-mixed", model)(lambda x: x)
    assert [t["name"] for t in ampfn.state_dict(fp16)["transforms"]] == [
        "with_grad_scaling"
    ]
    assert ampfn.loss_scale(fp16) == 2.0**16


@pytest.mark.parametrize(
    ("spec", "linear", "norm"),
    [("bf16-true", BF16, BF16), ("16-true", F16, F32), ("64-true", F64, F64)],
)
def test_true_policies_cast_the_model_once(
    spec: str, linear: torch.dtype, norm: torch.dtype
) -> None:
    model = mlp(batchnorm=True)
    weight = model[0].weight
    step = ampfn.with_policy(spec, model)(lambda x: model(x))
    assert model[0].weight is weight  # the user's own parameters, cast in place
    assert model[0].weight.dtype == linear
    assert model[1].weight.dtype == model[1].running_mean.dtype == norm
    out = step(torch.randn(4, 8))  # inputs cast to the compute dtype, outputs to output
    assert out.dtype == ampfn.get_policy(spec).output_dtype
    assert model.state_dict()["0.weight"].dtype == linear  # what the user chose


def test_keep_norm_fp32_overrides_and_norms_compute_in_fp32() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.GroupNorm(4, 16), nn.Linear(16, 3)
    )
    seen: dict[str, torch.dtype] = {}
    model[1].register_forward_hook(lambda m, i, o: seen.update(ln_in=i[0].dtype))
    ampfn.with_policy("bf16-true", model, keep_norm_fp32=True)(lambda x: model(x))(
        torch.randn(4, 8)
    )
    assert model[1].weight.dtype == model[2].weight.dtype == F32
    assert model[0].weight.dtype == model[3].weight.dtype == BF16
    assert seen["ln_in"] == F32


def test_fp32_islands_are_left_alone() -> None:
    head = nn.Linear(16, 3)
    model = nn.Sequential(nn.Linear(8, 16), ampfn.fp32(head))
    out = ampfn.with_policy("bf16-true", model)(lambda x: model(x))(torch.randn(2, 8))
    assert model[0].weight.dtype == BF16
    assert head.weight.dtype == F32
    assert out.dtype == F32


def test_sixty_four_true_matches_a_float64_reference_bit_for_bit() -> None:
    model, ref = mlp(), mlp().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)

    @ampfn.with_policy("64-true", model, opt)
    def step(b: Batch) -> None:
        ampfn.backward(F.cross_entropy(model(b[0]), b[1]))  # fp64 all the way
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    for x, y in batches(5):
        step((x, y))
        F.cross_entropy(ref(x.double()), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert params_equal(model, ref)


def test_thirty_two_true_is_plain_training() -> None:
    model, ref = mlp(), mlp()
    o1, o2 = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    step = ampfn.with_policy("32-true")(make_step(model, o1))
    plain = make_step(ref, o2)
    for b in batches(3):
        step(b)
        plain(b)
    assert params_equal(model, ref)


def test_bad_arguments_are_clear() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    api = r"with_policy\(policy, model, optimizer\)"
    with pytest.raises(
        ValueError,
        match=rf"{api}: .* casts the model to torch.bfloat16 once, so it needs it",
    ):
        ampfn.with_policy("bf16-true")
    with pytest.raises(ValueError, match="choose one"):
        ampfn.with_policy(
            "bf16-true", model, opt, master_weights=True, stochastic_rounding=True
        )
    with pytest.raises(
        ValueError, match="stochastic_rounding rounds into bfloat16 weights"
    ):
        ampfn.with_policy("16-true", model, opt, stochastic_rounding=True)
    with pytest.raises(ValueError, match="for true policies"):
        ampfn.with_policy("bf16-mixed", model, opt, master_weights=True)
    with pytest.raises(ValueError, match="need the model and its optimizer"):
        ampfn.with_policy("bf16-true", model, master_weights=True)
    with pytest.raises(TypeError, match="keep_norm_fp32 must be a bool or None"):
        ampfn.with_policy("bf16-true", model, keep_norm_fp32="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"call it: @ampfn.with_policy"):
        ampfn.with_policy(lambda b: b)


def test_sixteen_true_with_adams_default_eps_warns() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # eps=1e-8
    with pytest.warns(
        UserWarning,
        match=r"eps=1e-08, below fp16's smallest normal .* Use eps=1e-4 or more",
    ) as caught:
        ampfn.with_policy("16-true", model, opt)
    assert caught[0].filename == __file__  # points at the user's call, not into ampfn
    quiet = mlp()
    ampfn.with_policy("16-true", quiet, torch.optim.Adam(quiet.parameters(), eps=1e-4))
    masters = mlp()
    ampfn.with_policy(
        "16-true", masters, torch.optim.Adam(masters.parameters()), master_weights=True
    )


def test_compositions_and_conflicts() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="two precision policies in one pipeline"):
        ampfn.compose(ampfn.with_policy("bf16-mixed"), ampfn.with_policy("16-mixed"))
    with pytest.raises(ValueError, match="two precision policies"):
        ampfn.compose(
            ampfn.with_apex("O1", backend="native"), ampfn.with_policy("bf16-mixed")
        )
    with pytest.raises(
        ValueError, match=r"fp16 gradients, which torch.amp.GradScaler refuses"
    ):
        ampfn.compose(
            ampfn.with_grad_scaling(), ampfn.with_policy("16-true", mlp(), None)
        )
    # with_autocast beside a policy would decide the forward's dtype behind its back
    for policy in ("bf16-mixed", "bf16-true", "64-true"):
        with pytest.raises(
            ValueError, match=r"with_autocast, with_policy: the precision"
        ):
            ampfn.compose(
                ampfn.with_autocast("fp16", "cpu"), ampfn.with_policy(policy, mlp())
            )
        with pytest.raises(
            ValueError, match=r"with_autocast, with_policy: the precision"
        ):
            ampfn.compose(
                ampfn.with_policy(policy, mlp()), ampfn.with_autocast("fp16", "cpu")
            )
    with pytest.raises(ValueError, match=r"with_autocast, with_apex: the precision"):
        ampfn.compose(
            ampfn.with_autocast("bf16", "cpu"), ampfn.with_apex("O1", backend="native")
        )
    # precision transforms that compute in fp32 leave the forward to autocast
    ampfn.compose(ampfn.with_policy("32-true"), ampfn.with_autocast("bf16", "cpu"))
    ampfn.compose(
        ampfn.with_apex("O0", backend="native"), ampfn.with_autocast("bf16", "cpu")
    )
    # 16-true with masters and loss scaling trains
    step = ampfn.compose(
        ampfn.with_grad_scaling(),
        ampfn.with_policy("16-true", model, opt, master_weights=True),
    )(make_step(model, opt))
    assert all(step(b)[1] for b in batches(3))


# --------------------------------------------------------------------------- a stall, and its remedies

LR, GRAD, STEPS, N = 1e-3, 1.0, 100, 20000


def stalled_run(**options: Any) -> torch.Tensor:
    """N weights at 1.0, a constant gradient: each SGD update (1e-3) is below half a bf16
    ulp at 1.0 (2**-8 = 0.0039), so plain bf16 weights round back to 1.0 every step."""
    torch.manual_seed(0)
    model = nn.Linear(N, 1, bias=False)
    nn.init.ones_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    @ampfn.with_policy("bf16-true", model, opt, **options)
    def train_step(x: torch.Tensor) -> None:
        ampfn.backward(
            model(x).sum() * GRAD
        )  # d/dw = x = 1: the same gradient every step
        ampfn.step(opt)
        opt.zero_grad(set_to_none=True)

    for _ in range(STEPS):
        train_step(torch.ones(1, N))
    return model.weight.detach().float().flatten()


def test_plain_bf16_true_stalls() -> None:
    assert torch.equal(
        stalled_run(), torch.ones(N)
    )  # not one weight moved in 100 steps


def test_master_weights_track_the_fp32_run() -> None:
    fp32 = torch.ones(N)
    for _ in range(STEPS):
        fp32 -= LR * GRAD  # what fp32 SGD computes
    got = stalled_run(master_weights=True)
    assert torch.equal(
        got, fp32.to(BF16).float()
    )  # the model holds the rounded masters


def test_stochastic_rounding_tracks_the_fp32_run_in_expectation() -> None:
    """Each weight's rounding error per step has mean 0 and spread below half an ulp
    (2**-8 near 1): after 100 steps one weight is off by at most sqrt(100) * 2**-8 / 2
    ~ 0.02 (one sigma), the mean of 20000 weights by 0.02 / sqrt(20000) ~ 1.4e-4. We allow
    five sigmas (7e-4) on a total movement of 0.1, with a fixed seed."""
    got = stalled_run(stochastic_rounding=True)
    expected = 1.0 - STEPS * LR * GRAD
    sigma = math.sqrt(STEPS) * 2**-8 / 2 / math.sqrt(N)
    assert abs(float(got.mean()) - expected) < 5 * sigma
    assert float(got.std()) > 0  # the weights really are rounded at random


def test_stochastic_rounding_is_reproducible_and_resumes_bit_for_bit() -> None:
    assert torch.equal(
        stalled_run(stochastic_rounding=True), stalled_run(stochastic_rounding=True)
    )
    torch.manual_seed(0)
    data = batches(8)

    def make(seed: int) -> tuple[Any, nn.Module, Any]:
        torch.manual_seed(seed)
        model = mlp(seed)
        return (
            make_step(model, torch.optim.SGD(model.parameters(), lr=0.1)),
            model,
            None,
        )

    def build(m: nn.Module, o: Any) -> Any:
        return ampfn.with_policy("bf16-true", m, o, stochastic_rounding=True)

    def make_with_opt(seed: int) -> tuple[Any, nn.Module, Any]:
        torch.manual_seed(seed)
        model = mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return make_step(model, opt), model, opt

    testing.check_state_roundtrip(
        make_with_opt, testing.TrialPipeline("bf16-true+sr", build), data
    )
    del make


# --------------------------------------------------------------------------- training the demo model


def demo_accuracy(pipeline: str, steps: int = 300) -> float:
    from ampfn import demo

    args = demo.parse_args(
        [
            "--steps",
            str(steps),
            "--no-progress",
            "--pipelines",
            pipeline,
            "--device",
            "cpu",
        ]
    )
    data = demo.load_digits(args.seed, torch.device("cpu"))
    return float(demo.run(pipeline, args, torch.device("cpu"), data)["test acc"])


@pytest.mark.parametrize(
    "pipeline", ["bf16-true", "16-true", "bf16-true+master", "bf16-true+sr"]
)
def test_true_policies_train_the_demo_model_within_a_point_of_fp32(
    pipeline: str,
) -> None:
    fp32 = demo_accuracy("fp32")
    assert fp32 > 0.9
    assert demo_accuracy(pipeline) >= fp32 - 0.01


# --------------------------------------------------------------------------- ampfn.testing on every policy


def _policy_pipeline(name: str) -> testing.TrialPipeline:
    """A policy ``available_pipelines`` leaves out, built afresh for each trial."""
    return testing.TrialPipeline(
        name,
        lambda model, opt: ampfn.with_policy(name, model, opt),
        skips_nonfinite=name == "16-mixed",  # it brings with_grad_scaling()
    )


# every policy: the remedies and 16-true+scaling from available_pipelines, the rest here
POLICIES = [
    *(
        p
        for p in testing.available_pipelines("cpu")
        if p.name.startswith(("bf16-true", "16-true"))
    ),
    *map(_policy_pipeline, ["16-true", "32-true", "64-true", "16-mixed", "bf16-mixed"]),
]


def make(seed: int) -> tuple[Any, nn.Module, Any]:
    torch.manual_seed(seed)
    model = mlp(seed, batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return make_step(model, opt), model, opt


@pytest.mark.parametrize("pipeline", POLICIES, ids=lambda p: p.name)
def test_property_checks_on_every_policy(pipeline: Any) -> None:
    data = batches(8)
    testing.check_matches_reference(make, pipeline, data, steps=6)
    testing.check_never_nonfinite(make, pipeline, data, steps=6)
    testing.check_state_roundtrip(make, pipeline, data)
    if pipeline.skips_nonfinite:
        testing.check_skips_nonfinite(make, pipeline, data)


def test_policy_casts_as_jmps_does() -> None:
    """jmp's Policy methods: cast floating values (nested too), leave the rest alone."""
    p = ampfn.get_policy("bf16-mixed")
    x = {"a": torch.ones(2), "ids": torch.arange(3), "pair": (torch.ones(1), 7)}
    c = p.cast_to_compute(x)
    assert c["a"].dtype == torch.bfloat16
    assert c["pair"][0].dtype == torch.bfloat16
    assert c["ids"].dtype == torch.int64
    assert c["pair"][1] == 7
    assert p.cast_to_param(c)["a"].dtype == torch.float32
    assert p.cast_to_output(c)["a"].dtype == torch.float32
    half_out = p.with_output_dtype(torch.bfloat16)
    assert half_out == ampfn.Policy(F32, BF16, BF16)
    assert p.output_dtype == F32  # frozen: a new policy
    with pytest.raises(
        ValueError, match=r"output_dtype must be a floating torch\.dtype"
    ):
        p.with_output_dtype(torch.int8)


# --- misuse (issue 20) -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["p=f32,c=bf16,c=f16", "params=f32,p=f16", "o=f32,output=f16,c=bf16"]
)
def test_get_policy_refuses_a_key_given_twice(spec: str) -> None:
    with pytest.raises(ValueError, match=r"get_policy\(spec\): .* twice; give each"):
        ampfn.get_policy(spec)


@pytest.mark.parametrize(
    "bad", ["sgd", [torch.optim.SGD(mlp().parameters(), lr=0.1)], 3]
)
def test_with_policy_refuses_what_is_not_an_optimizer_before_touching_the_model(
    bad: Any,
) -> None:
    model = mlp()
    with pytest.raises(TypeError, match=r"with_policy\(.*optimizer must be"):
        ampfn.with_policy("bf16-true", model, bad, master_weights=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"policy": "16-mixed", "stochastic_rounding": True}, "'16-mixed'"),
        ({"policy": "16-mixed", "master_weights": True}, "'16-mixed'"),
        ({"policy": "bf16"}, None),
    ],
)
def test_with_policy_errors_show_the_name_the_user_wrote(
    kwargs: dict[str, Any], shown: str | None
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if shown is None:  # accepted: nothing to show
        ampfn.with_policy(kwargs.pop("policy"), model, opt, **kwargs)
        return
    with pytest.raises(ValueError, match=re.escape(shown)):
        ampfn.with_policy(kwargs.pop("policy"), model, opt, **kwargs)
    with pytest.raises(ValueError, match=re.escape("'16-true' casts the model")):
        ampfn.with_policy("16-true")


def test_the_fp16_eps_warning_names_the_user_s_call_site() -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), eps=1e-8)
    with pytest.warns(
        UserWarning, match=r"with_policy\('16-true'\): AdamW has eps=1e-08"
    ) as w:
        ampfn.with_policy("16-true", model, opt)
    assert w[0].filename == __file__


@pytest.mark.parametrize("name", ["half", "fp16", "f16", "float16", "bf16", "bfloat16"])
def test_dtype_names_mean_the_same_in_get_policy_and_with_autocast(name: str) -> None:
    policy = ampfn.get_policy(name)
    step = ampfn.with_autocast(name, "cpu")(lambda: torch.get_autocast_dtype("cpu"))
    assert step() == policy.compute_dtype
