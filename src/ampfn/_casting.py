"""Layer 4, building block: casting a model once, and making it cast its inputs and outputs.

Shared by ``with_apex`` O2/O3, the true policies and ``with_xla_bf16(mode="true")``:
:func:`cast_module` casts parameters and buffers in place (fp32 islands and the modules a
``keep`` rule picks stay as they are, and so do non-persistent buffers), :func:`patch_forward` makes ``model.forward`` cast
floating inputs and outputs, :func:`compute_in_fp32` makes the kept modules compute in
fp32 between half layers, and :func:`fp32_checkpoints` makes ``model.state_dict()``
return fp32 tensors (the masters' values where there are masters).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ampfn._islands import is_fp32_island, return_in
from ampfn._tree import cast_floating

Keep = Callable[[nn.Module], bool]  # modules whose own tensors stay fp32


def affine_batchnorm(module: nn.Module) -> bool:
    """Apex's rule for ``keep_batchnorm_fp32``: affine batch norms stay fp32."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine


NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_NORM_NAME = re.compile(r"Norm(\d+d)?$")


def is_norm(module: nn.Module) -> bool:
    """The norm layers ``with_policy(keep_norm_fp32=True)`` keeps fp32.

    The rule: an instance of torch.nn's batch, instance, layer, group or RMS norm, or a
    module with no submodules whose class, or one of its base classes, has a name ending
    in ``Norm`` (``LayerNorm``, ``RMSNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``, nanoGPT's
    own ``LayerNorm``; ``Norm1d``-style suffixes too). A module with submodules is never
    picked by its name (a ``PreNorm`` wrapper holds half layers that must stay half).
    Name more with ``with_policy(keep_fp32=(MyNorm, ...))``, or wrap a module in
    ``ampfn.fp32``.
    """
    if isinstance(module, NORMS):
        return True
    if next(iter(module.children()), None) is not None:
        return False
    return any(
        _NORM_NAME.search(cls.__name__)
        for cls in type(module).__mro__
        if cls is not nn.Module and issubclass(cls, nn.Module)
    )


def check_keep_fp32(api: str, keep_fp32: object) -> tuple[type[nn.Module], ...]:
    """``keep_fp32`` as a tuple of module classes, or a TypeError that says what to pass."""
    if isinstance(keep_fp32, type):
        keep_fp32 = (keep_fp32,)
    if not isinstance(keep_fp32, (tuple, list)) or not all(
        isinstance(c, type) and issubclass(c, nn.Module) for c in keep_fp32
    ):
        raise TypeError(
            f"{api}: keep_fp32 must be a tuple of nn.Module subclasses (the classes whose "
            f"modules stay fp32), got {keep_fp32!r}"
        )
    return tuple(keep_fp32)


def keep_rule(base: Keep | None, classes: tuple[type[nn.Module], ...]) -> Keep | None:
    """``base`` (or nothing), and every module of one of ``classes`` too."""
    if not classes:
        return base
    return functools.partial(_keep_either, base, classes)


def _keep_either(
    base: Keep | None, classes: tuple[type[nn.Module], ...], module: nn.Module
) -> bool:
    return isinstance(module, classes) or (base is not None and base(module))


def _castable(module: nn.Module, keep: Keep | None) -> Iterator[nn.Module]:
    """Every module whose own tensors get cast: fp32 islands are skipped with their
    children, and the modules ``keep`` picks."""
    if is_fp32_island(module):
        return
    if keep is None or not keep(module):
        yield module
    for child in module.children():
        yield from _castable(child, keep)


def castable_parameters(
    model: nn.Module, *, keep: Keep | None = None
) -> list[nn.Parameter]:
    """The floating parameters that :func:`cast_module` casts."""
    return [
        p
        for m in _castable(model, keep)
        for p in m.parameters(recurse=False)
        if p.is_floating_point()
    ]


def cast_module(
    model: nn.Module, dtype: torch.dtype, *, keep: Keep | None = None
) -> None:
    """Cast ``model``'s floating parameters and buffers to ``dtype`` in place.

    Parameters keep their identity (``param.data`` is replaced), so references the user
    holds, and optimizers built on them, stay valid. Persistent floating buffers (batch
    norm's running statistics, a causal mask) are cast; non-persistent ones
    (``register_buffer(..., persistent=False)``: Llama's rotary ``inv_freq``, tables a
    model derives from its config) stay fp32, as Hugging Face computes RoPE in fp32: they
    are not part of the checkpoint, and casting them loses precision that grows with
    position.
    """
    for module in _castable(model, keep):
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad = param.grad.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if (
                buf.is_floating_point()
                and name not in module._non_persistent_buffers_set
            ):
                setattr(module, name, buf.to(dtype))
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()
    return_in(model, dtype)  # islands hand their fp32 output back in this dtype


def compute_in_fp32(model: nn.Module, keep: Keep) -> None:
    """The modules ``keep`` picks (left fp32 by :func:`cast_module`) compute in fp32:
    their floating input is cast to fp32 and their output back to the input's dtype, so
    the half layers around them see half tensors."""
    for module in model.modules():
        if keep(module) and not is_fp32_island(module):
            module.register_forward_pre_hook(_to_fp32, with_kwargs=True)
            module.register_forward_hook(_back, with_kwargs=True)


def _to_fp32(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    first = args[0] if args else None
    module._ampfn_in_dtype = first.dtype if isinstance(first, torch.Tensor) else None  # type: ignore[assignment]
    return cast_floating(args, torch.float32), cast_floating(kwargs, torch.float32)


def _back(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
    dtype = getattr(module, "_ampfn_in_dtype", None)
    return out if dtype is None or dtype == torch.float32 else cast_floating(out, dtype)


def patch_forward(
    model: nn.Module, input_dtype: torch.dtype, output_dtype: torch.dtype | None
) -> None:
    """Make ``model`` cast floating inputs to ``input_dtype`` and outputs to ``output_dtype``.

    Like Apex, this sets ``model.forward`` on the instance, so the user's data pipeline
    and loss code stay unchanged. Tensor arguments are cast in place of the general walk
    (the common case, in one frame); containers go through :func:`cast_floating`.
    """
    old: Callable[..., Any] = model.forward

    @functools.wraps(old)
    def forward(*args: Any, **kwargs: Any) -> Any:
        cast_args = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_floating_point() and a.dtype != input_dtype:
                    a = a.to(input_dtype)
            elif isinstance(a, (tuple, list, dict)):
                a = cast_floating(a, input_dtype)
            cast_args.append(a)
        out = old(
            *cast_args, **(cast_floating(kwargs, input_dtype) if kwargs else kwargs)
        )
        if output_dtype is None:
            return out
        if isinstance(out, torch.Tensor):
            return (
                out.to(output_dtype)
                if out.is_floating_point() and out.dtype != output_dtype
                else out
            )
        return cast_floating(out, output_dtype)

    model.forward = forward


def fp32_checkpoints(model: nn.Module, masters: dict[str, torch.Tensor]) -> None:
    """Make ``model.state_dict()`` return fp32 tensors, as Apex does at O2 and O3: the fp32
    masters' values where ``masters`` (by parameter name) has one, other half tensors
    upcast. ``model.load_state_dict`` keeps accepting fp32 or half tensors (the parameter
    copy casts), and sets the masters from what it loads, so a checkpoint moves freely
    between this model and an fp32 one."""
    model.register_state_dict_post_hook(_SaveFp32(masters))  # type: ignore[no-untyped-call]
    if masters:
        model.register_load_state_dict_pre_hook(_LoadMasters(masters))  # type: ignore[no-untyped-call]


class _SaveFp32:
    def __init__(self, masters: dict[str, torch.Tensor]) -> None:
        self.masters = masters

    def __call__(
        self, module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any
    ) -> None:
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dtype in (
                torch.float16,
                torch.bfloat16,
            ):
                master = (
                    self.masters.get(key[len(prefix) :])
                    if key.startswith(prefix)
                    else None
                )
                state[key] = (
                    master.detach().clone() if master is not None else value.float()
                )


class _LoadMasters:
    def __init__(self, masters: dict[str, torch.Tensor]) -> None:
        self.masters = masters

    @torch.no_grad()
    def __call__(
        self, module: nn.Module, state: dict[str, Any], prefix: str, *rest: Any
    ) -> None:
        for name, master in self.masters.items():
            value = state.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape == master.shape:
                master.copy_(value)
