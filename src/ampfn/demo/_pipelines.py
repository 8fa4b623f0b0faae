"""Layer 7, the demo: the pipelines it compares, by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import ampfn

PIPELINES = (
    "fp32",
    "bf16",
    "fp16",
    "fp16-syncfree",
    "apex-O0",
    "apex-O1",
    "apex-O2",
    "apex-O3",
    "bf16-true",
    "16-true",
    "bf16-true+master",
    "bf16-true+sr",
)
_XLA_PIPELINES = (
    "fp32",
    "bf16",
    "bf16-true",
    "16-true",
    "bf16-true+master",
    "bf16-true+sr",
)
_DEFAULT = "fp32,bf16,fp16,bf16-true,bf16-true+sr"
_XLA_DEFAULT = "fp32,bf16,bf16-true"


def make_pipeline(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> Any:
    """The transform for a pipeline name (the same step runs under each)."""
    if name == "bf16-true" and device.type == "xla":
        return ampfn.with_xla_bf16(mode="true", model=model)
    if "-true" in name:
        policy, _, remedy = name.partition("+")
        return ampfn.with_policy(
            policy,
            model,
            opt,
            master_weights=remedy == "master",
            stochastic_rounding=remedy == "sr",
        )
    if device.type == "xla":
        return ampfn.with_xla_bf16() if name == "bf16" else ampfn.compose()
    if name == "fp32":
        return ampfn.compose()
    if name == "bf16":
        return ampfn.with_autocast("bf16", device.type)
    if name in ("fp16", "fp16-syncfree"):
        # growth every 100 steps (PyTorch's default is 2000), so that the scale's growth
        # and back-off show within a demo's few hundred steps
        scaler = torch.amp.GradScaler(device.type, growth_interval=100)
        return ampfn.compose(
            ampfn.with_grad_scaling(scaler, sync=name == "fp16"),
            ampfn.with_autocast("fp16", device.type),
        )
    return ampfn.with_apex(name.removeprefix("apex-"), model, opt)
