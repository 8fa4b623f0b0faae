"""Model and input casting shared by fp32 islands, apex O2/O3 and XLA bf16-true."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import ampfn
from ampfn._casting import (
    affine_batchnorm,
    cast_module,
    castable_parameters,
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
