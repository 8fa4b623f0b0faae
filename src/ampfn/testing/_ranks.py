"""Layer 7, testing: ``check_ranks_agree``, the checks' contract across the ranks of a process group."""

from __future__ import annotations

import sys
from typing import Any

import hypothesis
import torch
from hypothesis import strategies as st

from ampfn._scaling import loss_scale
from ampfn.testing._trial import (
    Make,
    Trial,
    first_difference,
    for_each_example,
    validate,
)


def check_ranks_agree(
    make: Make,
    transform: Any,
    batches: Any,
    *,
    steps: int = 4,
    poison_rank: int = 1,
    poison_at: int = 2,
    seed: int = 0,
    settings: Any = None,
    shrink: bool = False,
) -> None:
    """Every rank takes the same skip decisions and keeps the same parameters and scale,
    even when one rank's gradients go non-finite after the backward (after DDP's
    all-reduce: a rank-local hook, a local clip, a hardware fault).

    Every rank of an initialized ``torch.distributed`` process group calls it, with its
    own ``make`` (which may wrap the model in DDP or shard it with FSDP2) and its own
    batches. After ``ampfn.backward`` at step ``poison_at``, one gradient entry of
    ``poison_rank``'s first optimizer is made inf, on that rank only (its local shard,
    under FSDP2). After every step the ranks exchange (``all_gather_object``) their skip
    flags, loss scale and full parameters; a difference raises ``AssertionError`` on
    every rank. A strategy as ``batches`` is drawn derandomized, so that every rank
    draws the same examples.

    Raises:
        ValueError: no process group is initialized, or ``poison_rank``/``poison_at`` is
            out of range.
    """
    api = "check_ranks_agree"
    make = validate(
        api, make, transform, steps=steps, poison_rank=poison_rank, poison_at=poison_at
    )
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{api}: every rank of an initialized torch.distributed process group calls it, and "
            "none is initialized (torch.distributed.init_process_group)"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if poison_rank >= world:
        raise ValueError(
            f"{api}: poison_rank must be below the world size {world}, got {poison_rank}"
        )
    if poison_at >= steps:
        raise ValueError(
            f"{api}: poison_at must be below steps ({steps}), got {poison_at}"
        )
    if isinstance(batches, st.SearchStrategy):
        settings = hypothesis.settings(
            settings if settings is not None else hypothesis.settings.default,
            derandomize=True,
            database=None,
        )

    def prop(drawn: list[Any]) -> None:
        trial = Trial(make, transform, seed)
        for i, batch in enumerate(drawn[:steps]):
            poisoned = rank == poison_rank and i == poison_at
            results = trial.run(batch, float("inf") if poisoned else None, late=True)
            scale = loss_scale(trial.pipeline)
            params = _full_params(trial.model)
            mine = (results, scale, params)
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, mine)
            first = everyone[0]
            for r, theirs in enumerate(everyone[1:], start=1):
                if theirs[0] != first[0]:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r}'s ampfn.step results {theirs[0]} differ from "
                        f"rank 0's {first[0]} (poisoned rank {poison_rank} at step {poison_at})"
                    )
                if theirs[1] != first[1]:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r}'s loss scale {theirs[1]} differs from rank 0's {first[1]}"
                    )
                diff = first_difference(first[2], theirs[2], "parameter")
                if diff is not None:
                    raise AssertionError(
                        f"{api}: after step {i}, rank {r} differs from rank 0: {diff}"
                    )

    for_each_example(prop, batches, steps, settings, shrink)


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters, on the CPU: FSDP2's sharded ones are gathered, and so are
    FSDP1's flat shards (collectives, which every rank runs)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None and isinstance(model, fsdp1):
        with fsdp1.summon_full_params(model, writeback=False):
            return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[n] = (full() if callable(full) else p).detach().cpu()
    return out
