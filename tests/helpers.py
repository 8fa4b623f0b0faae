"""Small models and steps shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ampfn

Batch = tuple[torch.Tensor, torch.Tensor]


def mlp(seed: int = 0, device: str = "cpu", batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(device)


def batches(n: int, seed: int = 1, device: str = "cpu", size: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        out.append((x.to(device), y.to(device)))
    return out


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, clip: float | None = None
) -> Callable[[Batch], Any]:
    """A step written with ampfn's effects; returns (loss, stepped)."""

    def train_step(batch: Batch) -> tuple[torch.Tensor, bool]:
        x, y = batch
        loss = F.cross_entropy(model(x).float(), y)
        ampfn.backward(loss)
        if clip is not None:
            ampfn.clip_grad_norm_(model.parameters(), clip, optimizer)
        stepped = ampfn.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), stepped

    return train_step


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def max_param_error(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p.float() - q.float()).abs().max().item()
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def effect_step(
    model: nn.Module, opt: Any, loss_of: Callable[[nn.Module], torch.Tensor]
) -> Callable[[Any], Any]:
    """A correct step written with the effects: backward, step, clear the gradients."""

    def step(_: Any) -> Any:
        ampfn.backward(loss_of(model))
        stepped = ampfn.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    return step
