"""Layer 4, building block: torch.distributed: how many ranks run, the one collective loss
scaling needs, and what a scaler must handle when gradients are FSDP-sharded.

Skips agree across ranks by construction: the scaling transforms all-reduce (MAX) the
``found_inf`` flags on the device before deciding (see ``ampfn._scaling``).
``with_grad_scaling`` (and ``with_apex``'s GradScaler) all-reduces once per
``ampfn.step`` of an optimizer not yet agreed on in this update: one collective for
every optimizer unscaled (``ampfn.unscale_``, ``ampfn.clip_grad_norm_``) before the first
step, and one more for each optimizer stepped without that, since ampfn cannot know a
later optimizer's gradients at the first step without unscaling them early; one
optimizer costs one all-reduce per update. ``with_apex``'s GradScaler steps all its
optimizers together, in one collective. Apex's own per-loss scaler (``num_losses > 1``,
fp16 gradients, dynamic O3) all-reduces once per backward (which keeps the loss scales
identical) and once before the first step that follows new backwards (once per update
when every backward comes before the steps). With DDP a non-finite value produced in the backward already reaches
every rank through the gradient all-reduce; the extra collective covers what happens to
a rank's gradients after it (a rank-local hook or clip, parameters DDP ignores, a
hardware fault). With FSDP2, GradScaler's unscale kernel already reduces ``found_inf``
over the mesh (DTensor does it); the collective is then redundant, and cheap.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def world_size() -> int:
    """The default process group's size, or 0 when torch.distributed is not initialized."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_world_size()


def is_sharded_scaler(scaler: object) -> bool:
    """Whether ``scaler`` is FSDP's ``ShardedGradScaler`` (which unscales fp16 gradients);
    its module is not imported here: a scaler can only be one once it is."""
    module = sys.modules.get("torch.distributed.fsdp.sharded_grad_scaler")
    return module is not None and isinstance(scaler, module.ShardedGradScaler)


def all_reduce_max(found: torch.Tensor) -> None:
    """All-reduce ``found`` (MAX) in place over the default process group, on its device."""
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)


def check_sharded_grads(
    optimizer: Any, scaler: Any, api: str, *, sync_free: bool = False
) -> None:
    """Before an optimizer's first scaled step: gradients that FSDP2 shards (DTensors) must
    be what the scaler can unscale, or the error says what to change. ``sync_free``: the
    scaler is ``with_grad_scaling(sync=False)``, which refuses fp16 gradients itself."""
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is None:  # nothing made a DTensor in this process
        return
    dtensor = tensor_module.DTensor
    grads = [
        p.grad
        for g in optimizer.param_groups
        for p in g["params"]
        if p.grad is not None
    ]
    sharded = [g for g in grads if isinstance(g, dtensor)]
    if not sharded:
        return
    plain = {(g.device, g.dtype) for g in grads if not isinstance(g, dtensor)}
    if plain & {(g.device, g.dtype) for g in sharded}:
        raise ValueError(
            f"{api}: this optimizer holds both FSDP-sharded (DTensor) and plain gradients of the "
            "same dtype, which GradScaler cannot unscale together; shard those parameters too "
            "(fully_shard the modules that own them), or give them their own optimizer"
        )
    if (
        not sync_free
        and any(g.dtype == torch.float16 for g in sharded)
        and isinstance(scaler, torch.amp.GradScaler)
        and not is_sharded_scaler(scaler)
    ):
        raise ValueError(
            f"{api}: the FSDP-sharded gradients are fp16, which torch.amp.GradScaler refuses to "
            "unscale; keep the model's parameters fp32 and let FSDP2 compute in fp16 "
            "(fully_shard(module, mp_policy=ampfn.fsdp_mixed_precision('16-mixed'))), or pass "
            "with_grad_scaling(ShardedGradScaler(device)), which unscales fp16 gradients"
        )
