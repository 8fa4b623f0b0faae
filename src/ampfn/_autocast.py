"""``with_autocast`` and fp32 islands."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch
from torch import nn

from ampfn._core import Transform, compute_tag, factory
from ampfn._modules import cast_floating, floating_devices
from ampfn._plan import Fragment

F = TypeVar("F", bound=Callable[..., Any])

_HALF = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "16-mixed": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
}
_VALID = (
    "torch.float16 or torch.bfloat16 (or one of "
    + ", ".join(repr(k) for k in _HALF)
    + ")"
)


def parse_half_dtype(dtype: object, api: str) -> torch.dtype:
    """Validate a half-precision dtype given as a ``torch.dtype`` or a string."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
        raise ValueError(f"{api}: expected {_VALID}, got {dtype}")
    if isinstance(dtype, str):
        if dtype in _HALF:
            return _HALF[dtype]
        raise ValueError(f"{api}: expected {_VALID}, got {dtype!r}")
    raise TypeError(f"{api}: expected {_VALID}, got {type(dtype).__name__} {dtype!r}")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_autocast(
    device_type: object, dtype: torch.dtype, api: str, **kwargs: Any
) -> str:
    """Fail now, with the reason, if ``torch.autocast(device_type, dtype)`` cannot run here.

    ``torch.autocast`` itself only warns and disables itself for an unsupported dtype or
    an absent device; ampfn turns that into an error at construction.
    """
    if not isinstance(device_type, str):
        raise TypeError(
            f"{api}: device_type must be a string such as 'cuda' or 'cpu', got {type(device_type).__name__}"
        )
    if ":" in device_type:
        raise ValueError(
            f"{api}: device_type is a device type such as 'cuda', not a device; got {device_type!r}"
        )
    is_available = getattr(getattr(torch, device_type, None), "is_available", None)
    if callable(is_available) and not is_available():
        # torch.autocast itself stays enabled for "cuda" without CUDA once torch_xla is installed.
        raise ValueError(
            f"{api}: {dtype} autocast is not available on {device_type!r}: no such device is available here"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            probe = torch.autocast(device_type, dtype=dtype, **kwargs)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{api}: {dtype} autocast is not available on {device_type!r}: {e}"
            ) from None
    if not getattr(probe, "_enabled", True) or caught:
        reason = (
            "; ".join(str(w.message) for w in caught)
            or "torch.autocast disabled itself"
        )
        raise ValueError(
            f"{api}: {dtype} autocast is not available on {device_type!r}: {reason}"
        )
    return device_type


def autocast_fragment(
    name: str, device_type: str, dtype: torch.dtype, cache_enabled: bool | None
) -> Fragment:
    """The forward under ``torch.autocast``; backward, grad, clipping and the optimizer step
    with autocast off (PyTorch's advice). Also used by apex O1, XLA mixed and mixed
    policies."""
    kwargs: dict[str, Any] = (
        {} if cache_enabled is None else {"cache_enabled": cache_enabled}
    )
    return Fragment(
        name, autocast=(device_type, dtype, kwargs), autocast_off=device_type
    )


@factory()
def with_autocast(
    dtype: torch.dtype | str,
    device_type: str | None = None,
    *,
    cache_enabled: bool | None = None,
) -> Transform:
    """Run the step's forward pass under ``torch.autocast``.

    The wrapped step runs inside ``torch.autocast(device_type, dtype)``; ``ampfn.backward``,
    ``ampfn.step`` (and ``ampfn.grad``, ``ampfn.clip_grad_norm_``) inside it run with
    autocast off, as in hand-written code. Weights stay as they
    are (fp32): this is "mixed" precision. Combine with :func:`with_grad_scaling` for fp16.

    Args:
        dtype: ``torch.float16`` or ``torch.bfloat16``, or one of the strings
            "float16", "fp16", "16-mixed", "bfloat16", "bf16", "bf16-mixed".
        device_type: the autocast device type; "cuda" when CUDA is available, else "cpu".
        cache_enabled: passed to ``torch.autocast`` (its default when None).

    Returns:
        A transform.

    Raises:
        TypeError: ``dtype`` or ``device_type`` has the wrong type.
        ValueError: any other dtype, or one the device cannot autocast to (bf16 on a
            GPU without bf16, a device without autocast, CUDA absent).

    Example:
        >>> import torch, ampfn
        >>> lin = torch.nn.Linear(4, 4)
        >>> @ampfn.with_autocast("bf16", "cpu")
        ... def forward(x):
        ...     return lin(x)
        >>> forward(torch.randn(2, 4)).dtype
        torch.bfloat16
    """
    api = "with_autocast(dtype, device_type)"
    half = parse_half_dtype(dtype, api)
    if cache_enabled is not None and not isinstance(cache_enabled, bool):
        raise TypeError(
            f"{api}: cache_enabled must be a bool or None, got {type(cache_enabled).__name__}"
        )
    dev = check_autocast(
        default_device_type() if device_type is None else device_type, half, api
    )
    return Transform(
        "with_autocast",
        fragment=autocast_fragment("with_autocast", dev, half, cache_enabled),
        tags=("autocast", compute_tag(half)),
    )


# --------------------------------------------------------------------------- fp32 islands


def _run_fp32(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    devices: set[str],
) -> Any:
    args, kwargs = (
        cast_floating(args, torch.float32),
        cast_floating(kwargs, torch.float32),
    )
    floating_devices((args, kwargs), devices)
    return _autocast_disabled(sorted(devices), fn, args, kwargs)


def _autocast_disabled(
    devices: list[str],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``fn`` under nested ``torch.autocast(device, enabled=False)`` (which dynamo traces)."""
    if not devices:
        return fn(*args, **kwargs)
    with torch.autocast(devices[0], enabled=False):
        return _autocast_disabled(devices[1:], fn, args, kwargs)


class FP32Island(nn.Module):
    """A module that runs ``module`` in float32 with autocast off (see :func:`fp32`)."""

    _ampfn_fp32_island = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        devices = {p.device.type for p in self.module.parameters()}
        return _run_fp32(self.module, args, kwargs, devices)


@overload
def fp32(fn_or_module: nn.Module) -> FP32Island: ...
@overload
def fp32(fn_or_module: F) -> F: ...
def fp32(fn_or_module: Any) -> Any:
    """Mark an fp32 island: autocast off inside, floating tensor arguments cast to float32.

    Use it for the ops that must stay in float32 under mixed precision: scatter-style
    reductions (``scatter_add``, ``index_add``, segment sums, as in point-cloud
    libraries), losses, softmax over huge ranges. As a decorator it wraps a function;
    given an ``nn.Module`` it returns a module to use in its place (its parameters are
    left untouched, and ``with_apex`` O2/O3 and ``with_xla_bf16(mode="true")`` do not
    cast them). The result stays float32; autocast casts it again where needed.

    Raises:
        TypeError: the argument is neither a module nor a callable.

    Example:
        >>> import torch, ampfn
        >>> @ampfn.fp32
        ... def segment_sum(src, index, n):
        ...     return torch.zeros(n, src.shape[1], dtype=src.dtype).index_add_(0, index, src)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     segment_sum(torch.ones(4, 2, dtype=torch.bfloat16), torch.tensor([0, 0, 1, 1]), 2).dtype
        torch.float32
    """
    if isinstance(fn_or_module, nn.Module):
        return FP32Island(fn_or_module)
    if not callable(fn_or_module):
        raise TypeError(
            f"fp32(fn_or_module): expected a function or an nn.Module, got {type(fn_or_module).__name__}"
        )
    fn = fn_or_module

    @functools.wraps(fn)
    def island(*args: Any, **kwargs: Any) -> Any:
        return _run_fp32(fn, args, kwargs, set())

    return island
