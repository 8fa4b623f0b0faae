"""Layer 7, the demo: the precision inspector on the demo's model, one table per pipeline.

Used by ``python -m ampfn.inspect`` and ``ampfn-demo --inspect``: each pipeline's step
(the demo's own training step) is compared with fp32 on one batch of the digits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import ampfn
from ampfn.demo._data import build_model, load_digits
from ampfn.demo._pipelines import make_pipeline


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

        def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(model(x).float(), y)
            ampfn.backward(loss)
            ampfn.clip_grad_norm_(model.parameters(), 5.0, opt)
            ampfn.step(opt)
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return train_step, model, opt

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
