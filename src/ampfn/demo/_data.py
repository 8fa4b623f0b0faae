"""Layer 7, the demo: its data (scikit-learn's bundled digits) and its model."""

from __future__ import annotations

import torch
from torch import nn


def load_digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Standardized digits, split 1,500 train / 297 test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit(
            f"ampfn.demo needs scikit-learn's bundled digits data set ({e}): pip install -e '.[demo]'"
        ) from e
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    x = (x - x[:1500].mean(0)) / (x[:1500].std(0) + 1e-3)
    return tuple(t.to(device) for t in (x[:1500], y[:1500], x[1500:], y[1500:]))


def build_model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).to(device)
