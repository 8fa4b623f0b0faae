"""Model and input casting shared by fp32 islands, apex O2/O3 and XLA bf16-true."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ampfn
from ampfn._casting import (
    affine_batchnorm,
    cast_module,
    castable_parameters,
    is_norm,
    patch_forward,
)
from ampfn._tree import cast_floating


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_cast_floating_walks_nested_containers_and_leaves_the_rest() -> None:
    x = {
        "f": [torch.ones(2), (torch.ones(1, dtype=torch.float64), 3)],
        "i": torch.ones(2, dtype=torch.long),
    }
    out = cast_floating(x, torch.float16)
    assert out["f"][0].dtype == torch.float16
    assert out["f"][1][0].dtype == torch.float16
    assert out["f"][1][1] == 3
    assert out["i"].dtype == torch.long
    pair = cast_floating(Pair(torch.ones(1), torch.ones(1)), torch.bfloat16)
    assert isinstance(pair, Pair)
    assert pair.a.dtype == torch.bfloat16


def test_cast_module_keeps_parameter_identity_and_skips_islands_and_batchnorm() -> None:
    model = nn.Sequential(
        nn.Linear(2, 3),
        nn.BatchNorm1d(3),
        ampfn.fp32(nn.Linear(3, 3)),
        nn.BatchNorm1d(3, affine=False),
    )
    first = model[0].weight
    assert [p.shape for p in castable_parameters(model, keep=affine_batchnorm)] == [
        (3, 2),
        (3,),
    ]
    cast_module(model, torch.float16, keep=affine_batchnorm)
    assert model[0].weight is first
    assert first.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32
    assert model[1].running_mean.dtype == torch.float32
    assert model[2].module.weight.dtype == torch.float32  # type: ignore[union-attr]  # the island stays fp32
    assert (
        model[3].running_mean.dtype == torch.float16
    )  # non-affine batch norm is cast, as in Apex
    assert model[1].num_batches_tracked.dtype == torch.long


def test_patch_forward_casts_inputs_and_outputs() -> None:
    lin = nn.Linear(2, 2).half()
    patch_forward(lin, torch.float16, torch.float32)
    out = lin(torch.ones(1, 2))
    assert out.dtype == torch.float32
    assert lin.forward.__name__ == "forward"


class LayerNorm(nn.Module):
    """nanoGPT's own layer norm: a weight and an optional bias."""

    def __init__(self, n: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LlamaRMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x.to(dtype)


class SubNorm(LayerNorm):  # the name rule looks at base classes too
    pass


class PreNorm(nn.Module):  # a wrapper: it holds a half layer, so it is no norm
    def __init__(self) -> None:
        super().__init__()
        self.norm = LayerNorm(4, bias=True)
        self.fn = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))  # type: ignore[no-any-return]


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@pytest.mark.parametrize(
    "module",
    [
        nn.LayerNorm(4),
        nn.GroupNorm(2, 4),
        nn.BatchNorm1d(4),
        nn.InstanceNorm2d(4),
        nn.RMSNorm(4),
        LayerNorm(4, bias=True),
        LayerNorm(4, bias=False),
        LlamaRMSNorm(4),
        SubNorm(4, bias=True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_norm_layers_are_recognised_as_real_models_write_them(
    module: nn.Module,
) -> None:
    assert is_norm(module)


def test_wrappers_and_other_layers_are_no_norms() -> None:
    assert not is_norm(PreNorm())
    assert not is_norm(nn.Linear(2, 2))
    assert not is_norm(Scale())


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), LlamaRMSNorm(4), nn.Linear(4, 4), LayerNorm(4, True), Scale()
    )


def test_16_true_keeps_real_models_norms_fp32_and_computes_them_in_fp32() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ampfn.with_policy("16-true", model, opt, master_weights=True)(model)
    assert model[1].weight.dtype == model[3].weight.dtype == torch.float32
    assert model[3].bias.dtype == torch.float32
    assert model[0].weight.dtype == model[4].s.dtype == torch.float16
    out = step(torch.randn(2, 4))  # half layers around fp32 norms: no dtype mismatch
    assert out.dtype == torch.float32  # 16-true's output dtype
    assert torch.isfinite(out).all()


def test_keep_fp32_names_more_classes() -> None:
    model = _net()
    ampfn.with_policy("bf16-true", model, keep_fp32=(Scale,))
    assert model[4].s.dtype == torch.float32
    assert model[1].weight.dtype == torch.bfloat16  # keep_norm_fp32 is off for bf16
    assert model(torch.randn(2, 4)).dtype == torch.float32


def test_keep_fp32_of_the_wrong_type_is_a_type_error_before_the_model_changes() -> None:
    model = _net()
    with pytest.raises(TypeError, match=r"with_policy.*keep_fp32 must be a tuple"):
        ampfn.with_policy("bf16-true", model, keep_fp32=("Scale",))  # type: ignore[arg-type]
    assert model[0].weight.dtype == torch.float32


class Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("mask", torch.ones(3))
        self.lin = nn.Linear(2, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: ampfn.with_policy("bf16-true", m),
        lambda m: ampfn.with_policy(
            "16-true", m, torch.optim.SGD(m.parameters(), lr=0.1), master_weights=True
        ),
        lambda m: ampfn.with_apex(
            "O2", m, torch.optim.SGD(m.parameters(), lr=0.1), backend="native"
        ),
        lambda m: ampfn.with_apex("O3", m, torch.optim.SGD(m.parameters(), lr=0.1)),
    ],
    ids=["bf16-true", "16-true-masters", "O2", "O3"],
)
def test_non_persistent_floating_buffers_stay_fp32(make: Any) -> None:
    model = Rotary()
    before = model.get_buffer("inv_freq").clone()
    make(model)
    assert model.get_buffer("inv_freq").dtype == torch.float32
    assert torch.equal(model.get_buffer("inv_freq"), before)
    assert (
        model.get_buffer("mask").dtype != torch.float32
    )  # persistent buffers are cast
    assert model.lin.weight.dtype != torch.float32
