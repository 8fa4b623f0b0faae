"""Layer 5, transform: ``with_grad_scaling``, dynamic loss scaling with a GradScaler."""

from __future__ import annotations

from typing import Any

import torch

from ampfn import _distributed as distributed
from ampfn._args import check_bool
from ampfn._distributed import is_sharded_scaler
from ampfn._scaling import (
    INTERFACE,
    GradScalerScaler,
    SyncFreeScaler,
    check_grad_scaler,
    default_scaler,
)
from ampfn._transform import Transform, factory
from ampfn._types import Fragment


@factory()
def with_grad_scaling(
    scaler: Any = None, *, sync: bool = True, sync_ranks: bool | None = None
) -> Transform:
    """Dynamic loss scaling: scale the loss, skip steps with inf/NaN gradients, adapt.

    Inside the wrapped step, ``ampfn.backward`` backpropagates ``scaler.scale(loss)``;
    ``ampfn.unscale_`` and ``ampfn.clip_grad_norm_`` unscale an optimizer's gradients
    once per update; ``ampfn.step`` calls ``scaler.step`` and returns False when it
    skipped the step (each optimizer on its own overflow, as GradScaler decides).
    ``scaler.update()`` runs once at the end of each call in which at least one optimizer
    stepped (after all of them), so gradient accumulation (calls with backward and no
    step) and several optimizers work as in PyTorch's AMP examples.

    Inside a scaled step, calling ``optimizer.step()`` directly is an error (raised before
    any parameter changes), and so is ``ampfn.step`` when no ``ampfn.backward`` ran since
    the last update. Unscaling in a call that does not step is allowed: the next call may
    step, or clear the gradients (``zero_grad()``) to start afresh (which needs a
    ``torch.amp.GradScaler``: a scaler with only its public methods cannot forget an
    unscale, and the next backward says so).

    Args:
        scaler: a ``torch.amp.GradScaler`` or an object with its interface (such as
            FSDP's ``ShardedGradScaler``). None creates ``torch.amp.GradScaler`` for
            "cuda" when CUDA is available, else "cpu" (correct for FSDP2 too).
        sync: True: ``ampfn.step`` returns a Python bool, which reads the overflow flag
            back from the device. False (sync-free): no effect reads a value back;
            ``ampfn.step`` returns a 0-dim bool tensor, the skip happens on the device
            (fused optimizers take ``found_inf``; others get a masked update, which costs
            one copy of their parameters and optimizer state per step), and the scale
            updates on the device. Needs fp32 gradients (fp16 ones are a ValueError, as
            in GradScaler) and a ``torch.amp.GradScaler``, whose state stays
            the authority: its ``get_scale()`` and ``state_dict()`` are what a syncing run
            shows. Traces under ``torch.compile`` without GradScaler's graph breaks.
        sync_ranks: make every rank take the same skip decision when
            ``torch.distributed`` runs several ranks: ``found_inf`` is all-reduced (MAX)
            on the device before the skip is decided. None: when a process group of
            more than one rank is initialized. False: never (a scaler that agrees by
            itself, or one rank). Costs one small all-reduce per ``ampfn.step`` of an
            optimizer not yet agreed on in this update: one in all for one optimizer,
            or for several optimizers all unscaled (``ampfn.unscale_`` or
            ``ampfn.clip_grad_norm_``) before the first step; otherwise one per
            optimizer, since ampfn cannot know a later optimizer's gradients at the
            first step without unscaling them early.

    Returns:
        A stateful transform: ``ampfn.state_dict`` of a wrapped step includes the scaler.

    Raises:
        TypeError: ``scaler`` lacks GradScaler's methods, or ``sync=False`` with a scaler
            that is not a ``torch.amp.GradScaler``.
        ValueError: ``sync_ranks=True`` with no process group; at the first step,
            ``sync=False`` with fp16 gradients.

    Example:
        >>> import torch, ampfn
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        >>> @ampfn.compose(ampfn.with_grad_scaling(scaler), ampfn.with_autocast("fp16", "cpu"))
        ... def train_step(x):
        ...     loss = model(x).float().pow(2).mean()
        ...     ampfn.backward(loss)
        ...     stepped = ampfn.step(opt)
        ...     opt.zero_grad(set_to_none=True)
        ...     return stepped
        >>> train_step(torch.randn(8, 4))
        True
    """
    api = "with_grad_scaling(scaler, *, sync, sync_ranks)"
    if scaler is None:
        scaler = default_scaler()
    missing = [m for m in INTERFACE if not callable(getattr(scaler, m, None))]
    if missing:
        raise TypeError(
            "with_grad_scaling(scaler): expected a torch.amp.GradScaler or an object with its interface; "
            f"{type(scaler).__name__} lacks {', '.join(missing)}"
        )
    check_bool(sync, api, "sync")
    check_grad_scaler(scaler, api)
    sync_ranks = resolve_sync_ranks(sync_ranks, api)
    state: GradScalerScaler | SyncFreeScaler
    if sync:
        state = GradScalerScaler("with_grad_scaling", scaler, sync_ranks=sync_ranks)
        if sync_ranks:
            state.check_ranks()
    else:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"{api}: sync=False keeps the scale on the device inside a torch.amp.GradScaler, "
                f"and {type(scaler).__name__} is not one; pass a torch.amp.GradScaler or use sync=True"
            )
        state = SyncFreeScaler("with_grad_scaling", scaler, sync_ranks=sync_ranks)
    tags = ["loss_scaling"]
    if isinstance(scaler, torch.amp.GradScaler) and not is_sharded_scaler(scaler):
        tags.append("fp32_grads_only")
    return Transform(
        "with_grad_scaling",
        fragment=Fragment("with_grad_scaling", scaling=state),
        tags=tags,
        state=state,
    )


def resolve_sync_ranks(sync_ranks: object, api: str) -> bool | None:
    """Validate ``sync_ranks`` at construction (None: decided at the first step)."""
    check_bool(sync_ranks, api, "sync_ranks", none=True)
    if sync_ranks and distributed.world_size() < 1:
        raise ValueError(
            f"{api}: sync_ranks=True needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group), and there is none"
        )
    return sync_ranks  # type: ignore[return-value]
