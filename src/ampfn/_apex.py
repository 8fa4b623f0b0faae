"""Layer 5, transform: ``with_apex``, NVIDIA Apex AMP's opt levels O0-O3, native or through
``apex.amp`` (``ampfn._apex_backend``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ampfn import _distributed as distributed
from ampfn._apex_backend import apex_amp, apex_transform
from ampfn._apex_levels import API as _API
from ampfn._apex_levels import ApexLevel, check_scale_bounds, resolve_level
from ampfn._args import is_optimizer, optimizer_params
from ampfn._autocast_region import check_autocast
from ampfn._casting import (
    affine_batchnorm,
    cast_module,
    castable_parameters,
    fp32_checkpoints,
    patch_forward,
)
from ampfn._grad_scaling import resolve_sync_ranks
from ampfn._masters import MasterWeights
from ampfn._policy import warn_fp16_eps
from ampfn._runtime import default_device_type
from ampfn._scaling import ApexScaler, GradScalerScaler, LossScale, ScalerBase
from ampfn._transform import BOUND, Parts, Transform, factory, precision_tags
from ampfn._types import Autocast, Fragment, Stateful
from ampfn._undo import Snapshot

_BACKENDS = ("auto", "native", "apex")


def _as_list(obj: Any) -> list[Any]:
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _check_models(
    model: object, optimizer: object, props: ApexLevel, num_losses: object
) -> tuple[list[nn.Module], list[Any], str]:
    """Check what the level needs of the models and optimizers; return them as lists and
    the device type."""
    models, optimizers = _as_list(model), _as_list(optimizer)
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"{_API}: model must be an nn.Module or a list of them, got {type(m).__name__}"
            )
    for o in optimizers:
        if not is_optimizer(o):
            raise TypeError(
                f"{_API}: optimizer must be a torch.optim.Optimizer (or an object with param_groups, "
                f"state and step, such as a LARC wrapper), or a list of them, got {type(o).__name__}"
            )
    if (
        isinstance(num_losses, bool)
        or not isinstance(num_losses, int)
        or num_losses < 1
    ):
        raise ValueError(f"{_API}: num_losses must be an int >= 1, got {num_losses!r}")
    changes = props.cast_model_type not in (None, torch.float32) or bool(
        props.master_weights
    )
    if changes and (not models or not optimizers):
        raise ValueError(
            f"{_API}: {props.level} casts the model and its optimizer's parameters, so it needs both: "
            f"with_apex({props.level!r}, model, optimizer)"
        )
    for m in models:
        converted = getattr(m, "_ampfn_apex_level", None)
        if converted is not None:
            raise ValueError(
                f"{_API}: this model was already converted by with_apex({converted!r}) (its weights are "
                "fp16 and its forward casts); call with_apex once per model and reuse the transform, "
                "or pass a fresh fp32 model"
            )
        for name, p in m.named_parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                raise ValueError(
                    f"{_API}: parameter {name!r} is {p.dtype}; pass the model in float32 (as Apex "
                    "requires), with_apex casts it for the level"
                )
    mine = {id(p) for m in models for p in m.parameters()}
    if changes and not any(
        id(p) in mine for o in optimizers for p in optimizer_params(o)
    ):
        raise ValueError(
            f"{_API}: the optimizer holds none of the model's parameters (another model's "
            f"optimizer?), so {props.level} would cast the model and no step would ever move "
            "it; pass the optimizer built on this model's parameters "
            "(torch.optim.SGD(model.parameters(), ...))"
        )
    first = next((p for m in models for p in m.parameters()), None)
    return (
        models,
        optimizers,
        first.device.type if first is not None else default_device_type(),
    )


def _scaling(
    props: ApexLevel,
    optimizers: list[Any],
    device_type: str,
    bounds: tuple[float | None, float],
    num_losses: int,
    sync_ranks: bool | None,
) -> ScalerBase | None:
    """Apex's loss scaling for this level: a GradScaler with Apex's settings and bounds
    where one does (one loss, fp32 gradients), Apex's own per-loss scaler elsewhere."""
    lo, hi = bounds
    fp16_grads = props.cast_model_type == torch.float16 and not props.master_weights
    dynamic = props.loss_scale == "dynamic"
    if not dynamic and float(props.loss_scale) == 1.0:
        return None
    if dynamic and num_losses == 1 and not fp16_grads:
        scaler = torch.amp.GradScaler(
            device_type, init_scale=min(2.0**16, hi), growth_interval=2000
        )
        return GradScalerScaler(
            "with_apex",
            scaler,
            together=tuple(optimizers),
            bounds=(lo, hi),
            sync_ranks=sync_ranks,
            allow_fp16=True,
        )
    if not optimizers:
        raise ValueError(
            f"{_API}: with num_losses > 1, fp16 gradients or a static loss scale, with_apex unscales "
            "each backward as Apex does, so it needs the optimizers: with_apex(level, model, optimizer)"
        )
    init = min(2.0**16, hi) if dynamic else float(props.loss_scale)
    device = next(
        p.device for o in optimizers for g in o.param_groups for p in g["params"]
    )
    scales = [
        LossScale(init, dynamic=dynamic, lo=lo, hi=hi, window=2000, device=device)
        for _ in range(num_losses)
    ]
    return ApexScaler("with_apex", scales, tuple(optimizers), sync_ranks=sync_ranks)


def _native(
    props: ApexLevel,
    models: list[nn.Module],
    optimizers: list[Any],
    device_type: str,
    bounds: tuple[float | None, float],
    num_losses: int,
    sync_ranks: bool | None,
) -> Transform:
    parts: dict[str, Stateful] = {}
    half = props.cast_model_type == torch.float16
    keep_bn = affine_batchnorm if props.keep_batchnorm_fp32 else None
    masters = None
    before = Snapshot(models, optimizers)
    if props.master_weights and half:
        to_master = [p for m in models for p in castable_parameters(m, keep=keep_bn)]
        masters = MasterWeights("with_apex", to_master, optimizers)
        parts["master_weights"] = masters
    if half:
        for m in models:
            cast_module(m, torch.float16, keep=keep_bn)
            patch_forward(m, torch.float16, torch.float32)
            fp32_checkpoints(m, masters.named(m) if masters is not None else {})
            m._ampfn_apex_level = props.level  # type: ignore[assignment]
    scaling = _scaling(props, optimizers, device_type, bounds, num_losses, sync_ranks)
    if scaling is not None:
        parts["loss_scaler"] = scaling
    fragment = Fragment(
        "with_apex",
        autocast=Autocast(device_type, torch.float16) if props.autocast else None,
        autocast_off=device_type if props.autocast else None,
        scaling=scaling,
        masters=masters,
        unit_scale=scaling is None,
    )
    return Transform(
        "with_apex",
        fragment=fragment,
        tags=(
            "loss_scaling",
            *precision_tags(torch.float16 if half or props.autocast else torch.float32),
            *((BOUND,) if models or optimizers else ()),
        ),
        state=Parts(**parts) if parts else None,
        undo=before.restore,
    )


def _ranks_must_agree(backend: str, sync_ranks: bool | None) -> bool:
    """Whether 'auto' must be native: ranks agree on skips only through ampfn's code."""
    if sync_ranks is None and backend == "auto":
        return distributed.world_size() > 1
    return bool(sync_ranks)


@factory()
def with_apex(
    level: str,
    model: nn.Module | list[nn.Module] | None = None,
    optimizer: Any = None,
    *,
    backend: str = "auto",
    loss_scale: float | str | None = None,
    keep_batchnorm_fp32: bool | None = None,
    master_weights: bool | None = None,
    min_loss_scale: float | None = None,
    max_loss_scale: float = 2.0**24,
    num_losses: int = 1,
    sync_ranks: bool | None = None,
) -> Transform:
    """NVIDIA Apex AMP's opt levels as one transform.

    ============ ============================ ===================== ============== ===============
    level        model weights                forward compute       fp32 masters   loss scale
    ============ ============================ ===================== ============== ===============
    O0           fp32 (checked)               fp32                  no             1.0
    O1           fp32                         fp16 autocast         no             dynamic
    O2           fp16, batch norm fp32        fp16                  yes            dynamic
    O3           fp16 (batch norm too)        fp16                  no             1.0
    ============ ============================ ===================== ============== ===============

    O2 and O3 change the models and optimizers once, here: parameters and buffers are
    cast in place (batch norm kept fp32 when ``keep_batchnorm_fp32``, non-persistent
    buffers such as RoPE's ``inv_freq`` always), ``forward`` casts
    floating inputs to fp16 and outputs to fp32, ``model.state_dict()`` returns fp32
    tensors (the masters' values at O2) and ``load_state_dict`` takes fp32 or fp16, and
    with master weights the optimizers' ``param_groups`` hold fp32 masters instead of the
    model's parameters. Keep using your own model and optimizer objects. Dynamic loss
    scaling follows Apex: start at ``min(2**16, max_loss_scale)``, halve on overflow (not
    below ``min_loss_scale``), double after 2000 clean steps (not above
    ``max_loss_scale``); a static ``loss_scale`` never skips. An overflow skips the step
    of every optimizer given here (Apex's rule), where ``with_grad_scaling`` skips only
    the optimizer whose gradients overflowed (GradScaler's). ``with_apex`` owns loss
    scaling at every level: compose it with no other scaler (set ``loss_scale`` instead).

    With ``num_losses=N`` each loss has its own dynamic scaler: call
    ``ampfn.backward(loss, loss_id=i)``. As in Apex, each backward is then unscaled with
    its own loss's scale when it finishes, and that scale updates; an overflow backs off
    only that loss's scale and skips every optimizer's step. With one loss (fp32
    gradients) the scaler is a ``torch.amp.GradScaler``, updated once per step.

    Args:
        level: "O0", "O1", "O2" or "O3" (lower case accepted).
        model: the fp32 model, or a list of them (as ``amp.initialize``); needed by O2
            and O3, used by O0/O1 for the device type.
        optimizer: the models' optimizer or a list of them (optimizer-like wrappers such
            as LARC too); needed by O2 and O3 and by ``num_losses > 1``.
        backend: "native" (ampfn's implementation, any device), "apex" (``apex.amp``,
            CUDA), or "auto": apex when ``apex.amp`` imports and CUDA is present, unless
            ranks must agree on skips (``apex.amp`` decides each rank's alone):
            ``sync_ranks=True``, or ``sync_ranks=None`` with a process group of more than
            one rank already initialized when ``with_apex`` is called.
        loss_scale, keep_batchnorm_fp32, master_weights: Apex's overrides.
        min_loss_scale, max_loss_scale: the dynamic scale's floor and ceiling.
        num_losses: how many losses, each with its own loss scaler.
        sync_ranks: agree on skips across ``torch.distributed`` ranks (as in
            :func:`with_grad_scaling`); native backend only: ``apex.amp`` decides each
            rank's skips alone, as it always did. Costs one all-reduce per update with
            one loss and fp32 gradients (a GradScaler, every optimizer together); with
            Apex's per-loss scaler (``num_losses > 1``, O2 without master weights,
            dynamic O3), one per backward plus one before the first step after new
            backwards (one per update when every backward comes first).

    Returns:
        A stateful transform; ``ampfn.state_dict`` holds the loss scaler and the masters.
        If the first pipeline it joins is refused (``compose`` with another loss
        scaler), the models and optimizers are put back as they were.

    Warns:
        UserWarning: fp16 weights without masters (O3) and an Adam-family ``eps`` that
            fp16 flushes to zero, as ``with_policy("16-true")`` warns.

    Raises:
        TypeError, ValueError: a bad level, backend, override or model (the message
            says which); O2/O3 without model and optimizer, or with optimizers that
            hold none of the model's parameters; overrides Apex forbids; a model already
            converted by ``with_apex``.
        ImportError: ``backend="apex"`` without NVIDIA Apex.

    Example:
        >>> import torch, ampfn
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> t = ampfn.with_apex("O2", model, opt, backend="native")
        >>> model.weight.dtype, opt.param_groups[0]["params"][0].dtype
        (torch.float16, torch.float32)
        >>> model.state_dict()["weight"].dtype
        torch.float32
    """
    props = resolve_level(level, loss_scale, keep_batchnorm_fp32, master_weights)
    if backend not in _BACKENDS:
        raise ValueError(
            f"{_API}: backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}"
        )
    if sync_ranks is True and backend == "apex":
        raise ValueError(
            f"{_API}: sync_ranks=True needs backend='native' (apex.amp decides each "
            "rank's skips alone); pass backend='native', or leave sync_ranks out"
        )
    bounds = check_scale_bounds(min_loss_scale, max_loss_scale)
    models, optimizers, device_type = _check_models(model, optimizer, props, num_losses)
    if props.cast_model_type == torch.float16 and not props.master_weights:
        for o in optimizers:  # the user's with_apex call, through ampfn's factory
            warn_fp16_eps(
                o,
                f"with_apex({props.level!r})",
                "O2 (fp32 master weights: the optimizer then works in fp32)",
                stacklevel=3,
            )
    sync_ranks = resolve_sync_ranks(sync_ranks, _API)
    if props.autocast:
        check_autocast(device_type, torch.float16, _API)
    amp = apex_amp("native" if _ranks_must_agree(backend, sync_ranks) else backend)
    if amp is not None:
        return apex_transform(
            amp,
            props.level,
            models,
            optimizers,
            num_losses=num_losses,
            keep_batchnorm_fp32=props.keep_batchnorm_fp32,
            master_weights=props.master_weights,
            loss_scale=props.loss_scale,
            bounds=bounds,
        )
    return _native(
        props, models, optimizers, device_type, bounds, num_losses, sync_ranks
    )
