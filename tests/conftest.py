"""Shared fixtures: hypothesis profiles, devices and dtypes (skipping what this machine lacks)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HALF = [torch.float16, torch.bfloat16]


def autocast_supported(device: str, dtype: torch.dtype) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ctx = torch.autocast(device, dtype=dtype)
        except RuntimeError:
            return False
    return not caught and getattr(ctx, "_enabled", True)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return str(request.param)


@pytest.fixture(params=HALF, ids=["fp16", "bf16"])
def half(request: pytest.FixtureRequest, device: str) -> torch.dtype:
    dtype: torch.dtype = request.param
    if not autocast_supported(device, dtype):
        pytest.skip(f"{dtype} autocast is not available on {device}")
    return dtype
