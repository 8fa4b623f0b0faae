"""Layer 5, transform: ``with_xla_bf16``, bfloat16 on TPUs and other XLA devices, without environment variables."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ampfn._autocast_region import check_autocast
from ampfn._casting import cast_module, patch_forward
from ampfn._transform import Transform, factory, precision_tags
from ampfn._types import Autocast, Call, Fragment

MODES = ("mixed", "true")
_API = "with_xla_bf16(*, mode, model, sync)"


def _import_xla() -> tuple[ModuleType, ModuleType]:
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
    except ImportError as e:
        raise ImportError(
            f"{_API}: torch_xla is not installed ({e}); install it with the xla extra, "
            "pip install -e '.[xla]' in an ampfn checkout, with the torch release it matches"
        ) from e
    return torch_xla, xm


def _optimizer_step(xm: ModuleType) -> Callable[..., None]:
    def step_via_xm(optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError(
                "ampfn.step(optimizer, *args): under with_xla_bf16 the step is xm.optimizer_step, "
                "which takes keyword arguments only (passed on as optimizer_args)"
            )
        xm.optimizer_step(optimizer, optimizer_args=kwargs)

    return step_via_xm


def _cut(cut: Callable[[], None]) -> Callable[[Call, bool], None]:
    def end(call: Call, failed: bool) -> None:
        if not failed:
            cut()

    return end


@factory()
def with_xla_bf16(
    *, mode: str = "mixed", model: nn.Module | None = None, sync: bool = True
) -> Transform:
    """bfloat16 training on an XLA device (TPU, or XLA's CPU backend with ``PJRT_DEVICE=CPU``).

    ``mode="mixed"``: the forward runs under ``torch.autocast("xla", dtype=torch.bfloat16)``
    and weights stay fp32 (the recipe of Lightning's ``precision="bf16-mixed"``, which
    Lightning's own XLA plugin refuses). ``mode="true"``: ``model``'s parameters and buffers
    are cast to bf16 once, here (non-persistent buffers stay fp32), and its forward casts floating inputs to bf16, with no
    autocast (Lightning's ``"bf16-true"``, without the deprecated ``XLA_USE_BF16``).

    Inside the step ``ampfn.step(optimizer)`` is ``xm.optimizer_step(optimizer)`` (which
    also all-reduces gradients when several replicas run) and returns True: bf16 needs
    no loss scaling, so composing this with a loss-scaling transform is an error. With
    ``sync=True`` the lazy graph is cut once at the end of each call
    (``torch_xla.sync()``, ``xm.mark_step()`` on releases without it).

    Args:
        mode: "mixed" or "true".
        model: the model to cast, required by (and only used with) ``mode="true"``.
        sync: cut the graph at the end of each wrapped call.

    Raises:
        ImportError: torch_xla is not installed (install the ``xla`` extra).
        ValueError: a bad mode, or ``model`` missing for "true" / given for "mixed".
        TypeError: ``model`` is not a module or ``sync`` not a bool.

    Example:
        >>> import ampfn  # doctest: +SKIP
        >>> train_step = ampfn.with_xla_bf16()(train_step)  # doctest: +SKIP
    """
    if mode not in MODES:
        raise ValueError(
            f"{_API}: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
        )
    if not isinstance(sync, bool):
        raise TypeError(f"{_API}: sync must be a bool, got {type(sync).__name__}")
    if mode == "true" and model is None:
        raise ValueError(
            f"{_API}: mode='true' casts the model to bf16, so it needs it: with_xla_bf16(mode='true', model=model)"
        )
    if mode == "mixed" and model is not None:
        raise ValueError(
            f"{_API}: model= is only used with mode='true'; mode='mixed' leaves the weights fp32"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"{_API}: model must be an nn.Module, got {type(model).__name__}"
        )
    torch_xla, xm = _import_xla()
    cut: Callable[[], None] = getattr(torch_xla, "sync", None) or xm.mark_step
    autocast: Autocast | None = None
    if mode == "mixed":
        autocast = Autocast(check_autocast("xla", torch.bfloat16, _API), torch.bfloat16)
    else:
        assert model is not None
        cast_module(model, torch.bfloat16)
        patch_forward(model, torch.bfloat16, None)
    fragment = Fragment(
        "with_xla_bf16",
        autocast=autocast,
        autocast_off="xla" if autocast is not None else None,
        step_via=_optimizer_step(xm),
        end=_cut(cut) if sync else None,
    )
    return Transform(
        "with_xla_bf16",
        fragment=fragment,
        tags=("xla_bf16", *precision_tags(torch.bfloat16)),
    )
