"""Layer 4, building block: fp32 islands, the regions that stay float32 under mixed precision.

:func:`fp32` marks a function or a module: inside, autocast is off and floating tensor
arguments are cast to float32. Casts of a whole model (``with_apex`` O2/O3, the true
policies, ``with_xla_bf16(mode="true")``, ``with_float8``) leave an island's parameters as
they are (:func:`is_fp32_island`); :func:`return_in` makes the islands of such a cast
model hand their output back in the model's dtype, as ``compute_in_fp32`` does for the
modules it keeps, so the half layers after an island see half tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ampfn._runtime import without_autocast
from ampfn._tree import cast_floating, floating_devices

F = TypeVar("F", bound=Callable[..., Any])


def is_fp32_island(module: nn.Module) -> bool:
    return getattr(module, "_ampfn_fp32_island", False) is True


def _run_fp32(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    devices: set[str],
) -> Any:
    args = cast_floating(args, torch.float32)
    kwargs = cast_floating(kwargs, torch.float32)
    floating_devices((args, kwargs), devices)
    return without_autocast(tuple(sorted(devices)), _call, fn, args, kwargs, nest=True)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


def _input_dtype(args: Any) -> torch.dtype | None:
    for t in tree_leaves(args):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


class FP32Island(nn.Module):
    """A module that runs ``module`` in float32 with autocast off (see :func:`fp32`).

    Its output stays float32, unless the whole model was cast to half (``with_apex``
    O2/O3, the true policies, ``with_xla_bf16(mode="true")``; see :func:`return_in`):
    then it is cast back to its floating input's dtype (the model's dtype when it has no
    floating input), so the next half layer gets the dtype it computes in.
    """

    _ampfn_fp32_island = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.output_dtype: torch.dtype | None = None  # set by return_in

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        devices = {p.device.type for p in self.module.parameters()}
        out = _run_fp32(self.module, args, kwargs, devices)
        if self.output_dtype is None:
            return out
        dtype = _input_dtype((args, kwargs)) or self.output_dtype
        return out if dtype == torch.float32 else cast_floating(out, dtype)


def return_in(model: nn.Module, dtype: torch.dtype) -> None:
    """The outermost fp32 islands in ``model``, whose other modules were cast to
    ``dtype``, return their output in their input's dtype (``dtype`` without a floating
    input). Islands nested in an island see float32 and return it."""
    if isinstance(model, FP32Island):
        model.output_dtype = dtype
        return
    for child in model.children():
        return_in(child, dtype)


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
    cast them). The result stays float32 and autocast casts it again where needed; in a
    model cast to half (``with_apex`` O2/O3, the true policies), a module island's output
    is cast back to its input's dtype, so the next half layer can take it.

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
