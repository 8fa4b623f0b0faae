"""``with_apex``: NVIDIA Apex AMP's opt levels O0-O3, native or through ``apex.amp``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ampfn._autocast import autocast_transform, check_autocast, default_device_type
from ampfn._core import Stateful, Transform, compute_tag
from ampfn._effects import Handler, Params, handler_wrapper
from ampfn._modules import cast_module, castable_parameters, patch_forward
from ampfn._scaling import BoundedScaler, scaling_transform

LEVELS = ("O0", "O1", "O2", "O3")
_BACKENDS = ("auto", "native", "apex")
_API = "with_apex(level)"


@dataclasses.dataclass(frozen=True)
class ApexLevel:
    """The properties of an opt level, after overrides (as ``apex/amp/frontend.py``)."""

    level: str
    cast_model_type: torch.dtype | None
    autocast: bool  # Apex's patch_torch_functions
    keep_batchnorm_fp32: bool | None
    master_weights: bool | None
    loss_scale: float | str


_DEFAULTS = {
    "O0": ApexLevel("O0", torch.float32, False, None, False, 1.0),
    "O1": ApexLevel("O1", None, True, None, None, "dynamic"),
    "O2": ApexLevel("O2", torch.float16, False, True, True, "dynamic"),
    "O3": ApexLevel("O3", torch.float16, False, False, False, 1.0),
}


def resolve_level(
    level: object,
    loss_scale: object,
    keep_batchnorm_fp32: object,
    master_weights: object,
) -> ApexLevel:
    """Validate ``level`` and the overrides, and apply them, with Apex's consistency rules."""
    if not isinstance(level, str):
        raise TypeError(
            f"{_API}: level must be one of {', '.join(LEVELS)}, got {type(level).__name__} {level!r}"
        )
    props = (
        _DEFAULTS.get(level.upper())
        if level in (*LEVELS, *(x.lower() for x in LEVELS))
        else None
    )
    if props is None:
        raise ValueError(
            f"{_API}: level must be one of {', '.join(LEVELS)}, got {level!r}"
        )
    if keep_batchnorm_fp32 is not None:
        if not isinstance(keep_batchnorm_fp32, bool):
            raise TypeError(
                f"{_API}: keep_batchnorm_fp32 must be a bool or None, got {keep_batchnorm_fp32!r}"
            )
        if props.level == "O1":
            raise ValueError(
                f"{_API}: with O1 batch norm already runs in fp32 under autocast, so keep_batchnorm_fp32 "
                "must be None (as in Apex)"
            )
        props = dataclasses.replace(props, keep_batchnorm_fp32=keep_batchnorm_fp32)
    if master_weights is not None:
        if not isinstance(master_weights, bool):
            raise TypeError(
                f"{_API}: master_weights must be a bool or None, got {master_weights!r}"
            )
        if props.level == "O1":
            raise ValueError(
                f"{_API}: master_weights makes no sense with O1, whose model weights stay fp32 (as in Apex); "
                "use O2 for fp16 weights with fp32 masters"
            )
        props = dataclasses.replace(props, master_weights=master_weights)
    if loss_scale is not None:
        if loss_scale != "dynamic" and (
            isinstance(loss_scale, bool)
            or not isinstance(loss_scale, (int, float))
            or not loss_scale > 0
        ):
            raise ValueError(
                f"{_API}: loss_scale must be 'dynamic' or a positive number, got {loss_scale!r}"
            )
        props = dataclasses.replace(
            props,
            loss_scale=loss_scale if loss_scale == "dynamic" else float(loss_scale),
        )
    return props


def _check_scale_bounds(
    min_loss_scale: object, max_loss_scale: object
) -> tuple[float | None, float]:
    def number(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(
                f"{_API}: {name} must be a non-negative number, got {value!r}"
            )
        return float(value)

    if max_loss_scale is None:
        raise ValueError(
            f"{_API}: max_loss_scale must be a number (Apex's default is 2.0**24)"
        )
    hi = number("max_loss_scale", max_loss_scale)
    lo = None if min_loss_scale is None else number("min_loss_scale", min_loss_scale)
    if lo is not None and lo > hi:
        raise ValueError(
            f"{_API}: min_loss_scale ({lo}) is above max_loss_scale ({hi})"
        )
    return lo, hi


def _check_model(model: object, optimizer: object, props: ApexLevel) -> str:
    """Check what the level needs of ``model`` and ``optimizer``; return the device type."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"{_API}: model must be an nn.Module, got {type(model).__name__}"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{_API}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    changes = props.cast_model_type not in (None, torch.float32) or bool(
        props.master_weights
    )
    if changes and (model is None or optimizer is None):
        raise ValueError(
            f"{_API}: {props.level} casts the model and its optimizer's parameters, so it needs both: "
            f"with_apex({props.level!r}, model, optimizer)"
        )
    if model is None:
        return default_device_type()
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(
                f"{_API}: parameter {name!r} is {p.dtype}; pass the model in float32 (as Apex requires), "
                "with_apex casts it for the level"
            )
    first = next(model.parameters(), None)
    return first.device.type if first is not None else default_device_type()


class MasterWeights(Handler):
    """O2's fp32 master weights: the optimizer holds the masters, the model fp16 copies.

    After each backward the model's gradients move into the masters' (in fp32, so
    gradient accumulation sums in fp32); after each real step the masters are copied
    into the model; clipping acts on the masters' gradients.
    """

    __slots__ = ("_by_id", "masters", "model_params", "optimizer")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep_batchnorm_fp32: bool,
    ) -> None:
        to_cast = {
            id(p)
            for p in castable_parameters(model, keep_batchnorm_fp32=keep_batchnorm_fp32)
        }
        # Masters start from the fp32 values, before the model is cast (Apex copies the
        # already-rounded fp16 weights; starting exact is strictly better).
        pairs = [
            (p, p.detach().clone().requires_grad_(True))
            for g in optimizer.param_groups
            for p in g["params"]
        ]
        pairs = [(p, m) for p, m in pairs if id(p) in to_cast]
        swap = {id(p): m for p, m in pairs}
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        for p, m in pairs:
            if p in optimizer.state:
                optimizer.state[m] = optimizer.state.pop(p)
        self.model_params = [p for p, _ in pairs]
        self.masters = [m for _, m in pairs]
        self.optimizer = optimizer
        self._by_id = swap

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        proceed(loss, kwargs)
        for p, m in zip(self.model_params, self.masters, strict=True):
            if p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    def step(self, proceed: Callable[..., bool], optimizer: Any) -> bool:
        stepped = proceed(optimizer)
        if stepped and optimizer is self.optimizer:
            self.copy_to_model()
        return stepped

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Any,
        norm_type: float,
    ) -> torch.Tensor:
        params = (
            [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        )
        return proceed(
            [self._by_id.get(id(p), p) for p in params], max_norm, optimizer, norm_type
        )

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if self.masters:
            torch._foreach_copy_(self.model_params, self.masters)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], /) -> None:
        saved = state["masters"]
        if len(saved) != len(self.masters):
            raise ValueError(
                f"ampfn.load_state_dict: {len(saved)} saved master weights, the pipeline has {len(self.masters)}"
            )
        for m, s in zip(self.masters, saved, strict=True):
            m.copy_(s)
        self.copy_to_model()


class _ApexState:
    """The combined state of a native ``with_apex`` pipeline."""

    __slots__ = ("parts",)

    def __init__(self, **parts: Stateful) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def _passthrough(step: Callable[..., Any]) -> Callable[..., Any]:
    def apex_step(*args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs)

    return apex_step


def _native(
    props: ApexLevel,
    model: Any,
    optimizer: Any,
    device_type: str,
    bounds: tuple[float | None, float],
) -> Transform:
    wraps: list[
        Callable[[Callable[..., Any]], Callable[..., Any]]
    ] = []  # outermost first
    parts: dict[str, Stateful] = {}
    half = props.cast_model_type == torch.float16
    if props.master_weights and half:
        masters = MasterWeights(
            model, optimizer, keep_batchnorm_fp32=bool(props.keep_batchnorm_fp32)
        )
        wraps.append(handler_wrapper(masters))
        parts["master_weights"] = masters
    if half:
        cast_module(
            model, torch.float16, keep_batchnorm_fp32=bool(props.keep_batchnorm_fp32)
        )
        patch_forward(model, torch.float16, torch.float32)
    scaler = BoundedScaler(device_type, props.loss_scale, *bounds)
    if scaler.is_enabled():
        scaling = scaling_transform("with_apex", scaler)
        wraps.append(scaling)
        assert scaling.state is not None
        parts["loss_scaler"] = scaling.state
    if props.autocast:
        wraps.append(autocast_transform("with_apex", device_type, torch.float16, None))
    if (
        not wraps
    ):  # O0, O3: nothing to do inside the step, but never return the step itself
        wraps.append(_passthrough)

    def wrap(step: Callable[..., Any]) -> Callable[..., Any]:
        for w in reversed(wraps):
            step = w(step)
        return step

    return Transform(
        "with_apex",
        wrap,
        tags=(
            "loss_scaling",
            compute_tag(torch.float16 if half or props.autocast else torch.float32),
        ),
        state=_ApexState(**parts) if parts else None,
    )


def with_apex(
    level: str,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    backend: str = "auto",
    loss_scale: float | str | None = None,
    keep_batchnorm_fp32: bool | None = None,
    master_weights: bool | None = None,
    min_loss_scale: float | None = None,
    max_loss_scale: float = 2.0**24,
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

    O2 and O3 change ``model`` and ``optimizer`` once, here: the model's parameters and
    buffers are cast in place (batch norm kept fp32 when ``keep_batchnorm_fp32``), its
    ``forward`` casts floating inputs to fp16 and outputs to fp32, and with master weights
    the optimizer's ``param_groups`` hold fp32 masters instead of the model's parameters.
    Keep using your own ``model`` and ``optimizer`` objects. Dynamic loss scaling follows
    Apex: start at 2**16, halve on overflow (not below ``min_loss_scale``), double after
    2000 clean steps (not above ``max_loss_scale``); a static ``loss_scale`` never skips.
    ``with_apex`` owns loss scaling at every level: compose it with no other scaler
    (set ``loss_scale`` instead).

    Args:
        level: "O0", "O1", "O2" or "O3" (lower case accepted).
        model: the fp32 model; needed by O2 and O3, used by O0/O1 for the device type.
        optimizer: the model's optimizer; needed by O2 and O3.
        backend: "native" (ampfn's implementation, any device), "apex" (``apex.amp``,
            CUDA), or "auto": apex when ``apex.amp`` imports and CUDA is present.
        loss_scale, keep_batchnorm_fp32, master_weights: Apex's overrides.
        min_loss_scale, max_loss_scale: the dynamic scale's floor and ceiling.

    Returns:
        A stateful transform; ``ampfn.state_dict`` holds the loss scaler and the masters.

    Raises:
        TypeError, ValueError: a bad level, backend, override or model (the message
            says which); O2/O3 without model and optimizer; overrides Apex forbids.
        ImportError: ``backend="apex"`` without NVIDIA Apex.

    Example:
        >>> import torch, ampfn
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> t = ampfn.with_apex("O2", model, opt, backend="native")
        >>> model.weight.dtype, opt.param_groups[0]["params"][0].dtype
        (torch.float16, torch.float32)
    """
    props = resolve_level(level, loss_scale, keep_batchnorm_fp32, master_weights)
    if backend not in _BACKENDS:
        raise ValueError(
            f"{_API}: backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}"
        )
    bounds = _check_scale_bounds(min_loss_scale, max_loss_scale)
    device_type = _check_model(model, optimizer, props)
    if props.autocast:
        check_autocast(device_type, torch.float16, _API)
    from ampfn._apex_backend import apex_amp, apex_transform

    amp = apex_amp(backend)
    if amp is not None:
        return apex_transform(amp, props, model, optimizer, bounds)
    return _native(props, model, optimizer, device_type, bounds)
