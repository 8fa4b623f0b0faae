"""with_xla_bf16 where torch_xla is absent: validation and the install hint.

The transform itself is tested on real torch_xla in tests/xla/ (``nox -s xla``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from torch import nn

import ampfn

HAS_XLA = importlib.util.find_spec("torch_xla") is not None


@pytest.mark.skipif(HAS_XLA, reason="torch_xla is installed")
def test_missing_torch_xla_names_the_extra() -> None:
    with pytest.raises(
        ImportError,
        match=r"with_xla_bf16\(\*, mode, model, sync\): torch_xla is not installed .*pip install -e '\.\[xla\]'",
    ):
        ampfn.with_xla_bf16()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (
            {"mode": "bf16"},
            ValueError,
            "mode must be one of 'mixed', 'true', got 'bf16'",
        ),
        (
            {"mode": "true"},
            ValueError,
            "mode='true' casts the model to bf16, so it needs it",
        ),
        (
            {"mode": "mixed", "model": nn.Linear(2, 2)},
            ValueError,
            "model= is only used with mode='true'",
        ),
        ({"mode": "true", "model": "net"}, TypeError, "model must be an nn.Module"),
        ({"sync": 1}, TypeError, "sync must be a bool"),
    ],
)
def test_bad_arguments_fail_before_importing_torch_xla(
    kwargs: dict[str, Any], error: type[Exception], needle: str
) -> None:
    with pytest.raises(
        error, match=r"with_xla_bf16\(\*, mode, model, sync\): " + needle
    ):
        ampfn.with_xla_bf16(**kwargs)
