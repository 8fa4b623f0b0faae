"""Layer 7, the demo: the precision inspector on the demo's model, one table per pipeline.

Used by ``python -m ampfn.inspect`` and ``ampfn-demo --inspect``: each pipeline's step
(the demo's own training step) is compared with fp32 on one batch of the digits.
"""

from __future__ import annotations

from typing import Any

import torch

import ampfn
from ampfn.demo._data import build_model, load_digits
from ampfn.demo._pipelines import make_pipeline
from ampfn.demo._train import training_step


class _Built:
    """A demo pipeline built afresh on each model ``inspect_precision`` makes."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device

    def build(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
        return make_pipeline(self.name, model, opt, self.device)

    def __repr__(self) -> str:
        return self.name


def _maker(device: torch.device, lr: float) -> Any:
    def make(seed: int) -> Any:
        model = build_model(seed, device)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return training_step(model, opt), model, opt

    return make


def inspect_demo(
    pipelines: list[str],
    device: torch.device,
    *,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 0.05,
) -> list[ampfn.PrecisionReport]:
    """Inspect each pipeline on one batch of the digits; print and return the reports."""
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(
            f"inspecting precision runs on cpu or cuda, not {device.type}; use --device cpu"
        )
    x_train, y_train, _, _ = load_digits(seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, len(x_train), (batch_size,), generator=g).to(device)
    batch = (x_train[idx], y_train[idx])
    make = _maker(device, lr)
    reports = []
    for name in pipelines:
        report = ampfn.inspect_precision(make, _Built(name, device), batch, seed=seed)
        print(report, end="\n\n")
        reports.append(report)
    return reports
