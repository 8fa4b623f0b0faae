"""torch.distributed helpers: how many ranks run, and the one collective loss scaling needs."""

from __future__ import annotations

import torch


def world_size() -> int:
    """The default process group's size, or 0 when torch.distributed is not initialized."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_world_size()


def all_reduce_max(found: torch.Tensor) -> None:
    """All-reduce ``found`` (MAX) in place over the default process group, on its device."""
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
