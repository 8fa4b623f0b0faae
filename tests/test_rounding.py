"""Stochastic rounding into bf16 (ampfn._rounding): the law, and the flat XLA path."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ampfn._rounding import _noise, _round, _round_flat, round_into

F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@given(st.lists(F32, min_size=1, max_size=64), st.integers(0, 2**16 - 1))
def test_rounding_goes_to_a_bf16_neighbour_and_keeps_inf_and_nan(
    values: list[float], n: int
) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    out = _round(x, torch.full_like(x, n, dtype=torch.int32)).float()
    low = x.view(torch.int32) & -(1 << 16)
    down = low.view(torch.float32)  # x truncated to bf16 (toward zero)
    away = (low + (1 << 16)).view(torch.float32)  # the next bf16 away from zero
    finite = x.isfinite()
    assert bool(((out == down) | (out == away))[finite].all())
    assert bool(((out == x) | (out.isnan() & x.isnan()))[~finite].all())
    assert bool((out.isnan() == x.isnan()).all())


def test_rounding_up_happens_with_the_probability_of_the_remainder() -> None:
    x = torch.full((20000,), 1.0 + 2.0**-9)  # a quarter of the way to the next bf16
    g = torch.Generator().manual_seed(0)
    out = _round(x, _noise(x, g)).float()
    share = float((out > 1.0).float().mean())
    assert abs(share - 0.25) < 0.02  # 6.5 standard deviations (fixed seed)


def test_rounding_as_one_flat_tensor_gives_the_same_bits() -> None:
    """The XLA path (one tensor for all parameters) equals rounding each on its own."""
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 2)]
    noises = [_noise(u, g) for u in updates]
    each = [_round(u, n) for u, n in zip(updates, noises, strict=True)]
    flat = [torch.empty_like(u, dtype=torch.bfloat16) for u in updates]
    _round_flat(list(zip(flat, updates, noises, strict=True)))
    for a, b in zip(each, flat, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_round_into_draws_noise_in_parameter_order() -> None:
    updates = [torch.randn(4, 4), torch.randn(4)]
    targets = [torch.empty_like(u, dtype=torch.bfloat16) for u in updates]
    g = torch.Generator().manual_seed(1)
    round_into(list(zip(targets, updates, strict=True)), lambda device: g)
    g = torch.Generator().manual_seed(1)
    for t, u in zip(targets, updates, strict=True):
        assert torch.equal(t, _round(u, _noise(u, g)))
