"""Layer 5, transform: the real ``apex.amp`` behind ``with_apex(backend="apex")``.

Exercised only where NVIDIA Apex is installed (CUDA machines): the test that compares
it with the native levels skips elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from ampfn._scaling import check_scale, refuse_closure
from ampfn._transform import BOUND, Transform, precision_tags
from ampfn._types import Handler, Params

_HINT = (
    "NVIDIA Apex is not on PyPI (the 'apex' package there is an unrelated project): build it from "
    "https://github.com/NVIDIA/apex, or use backend='native', ampfn's implementation of the same levels"
)


def apex_amp(backend: str) -> ModuleType | None:
    """``apex.amp`` if ``backend`` asks for it and it can be used, else None (native)."""
    if backend == "native":
        return None
    try:
        from apex import amp
    except Exception as e:  # an unrelated 'apex' may fail in any way
        if backend == "apex":
            raise ImportError(
                f"with_apex(level, backend='apex'): apex.amp cannot be imported ({e}). {_HINT}"
            ) from e
        return None
    if backend == "auto" and not torch.cuda.is_available():
        return None
    return amp  # type: ignore[no-any-return]


class ApexAmp(Handler):
    """The effects through ``apex.amp``: ``scale_loss`` at backward, Apex's own skip."""

    def __init__(self, amp: ModuleType, optimizers: list[Any]) -> None:
        self.amp = amp
        self.optimizers = optimizers[0] if len(optimizers) == 1 else optimizers

    def backward(
        self, proceed: Callable[..., None], loss: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        loss_id = kwargs.pop("loss_id", 0)
        with self.amp.scale_loss(loss, self.optimizers, loss_id=loss_id) as scaled:
            proceed(scaled, kwargs)

    def step(
        self,
        proceed: Callable[..., Any],
        optimizer: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> bool:
        if args or kwargs:
            refuse_closure("with_apex", args, kwargs)
        # After an overflow Apex swaps optimizer.step for a one-shot skip_step.
        skipped = bool(
            getattr(getattr(optimizer, "_amp_stash", None), "already_patched", False)
        )
        optimizer.step(*args, **kwargs)
        return not skipped

    def clip_grad_norm_(
        self,
        proceed: Callable[..., torch.Tensor],
        parameters: Params,
        max_norm: float,
        optimizer: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        # apex.amp unscales when scale_loss exits; clip the master gradients, as Apex's docs do.
        return proceed(
            list(self.amp.master_params(optimizer)), max_norm, optimizer, kwargs
        )

    def state_dict(self) -> dict[str, Any]:
        return {"amp": self.amp.state_dict()}

    def check_state(self, state: object, /) -> None:
        """``{"amp": apex.amp.state_dict()}``: one ``loss_scalerN`` entry per loss, each
        with a loss scale Apex can use."""
        saved = state.get("amp") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise TypeError(
                f"expected {{'amp': apex.amp.state_dict()}}, got {state!r}"[:200]
            )
        expected = len(self.amp.state_dict())
        if len(saved) != expected:
            raise ValueError(
                f"{len(saved)} saved loss scalers, apex.amp has {expected}"
            )
        for name, entry in saved.items():
            if not isinstance(entry, dict) or "loss_scale" not in entry:
                raise TypeError(
                    f"{name}: expected {{'loss_scale': ..., 'unskipped': ...}}"
                )
            check_scale(entry["loss_scale"], "apex.amp", f"{name}'s loss_scale")

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.amp.load_state_dict(state["amp"])


def apex_transform(
    amp: ModuleType,
    level: str,
    models: list[Any],
    optimizers: list[Any],
    *,
    num_losses: int,
    keep_batchnorm_fp32: bool | None,
    master_weights: bool | None,
    loss_scale: float | str,
    bounds: tuple[float | None, float],
) -> Transform:
    if not models or not optimizers:
        raise ValueError(
            "with_apex(level, backend='apex'): apex.amp.initialize needs both: with_apex(level, model, optimizer)"
        )
    amp.initialize(
        models,
        optimizers,
        opt_level=level,
        keep_batchnorm_fp32=keep_batchnorm_fp32,
        master_weights=master_weights,
        loss_scale=loss_scale,
        min_loss_scale=bounds[0],
        max_loss_scale=bounds[1],
        num_losses=num_losses,
        verbosity=0,
    )
    handler = ApexAmp(amp, optimizers)
    return Transform(
        "with_apex",
        handler=handler,
        tags=(
            "loss_scaling",
            *precision_tags(torch.float32 if level == "O0" else torch.float16),
            BOUND,
        ),
        state=handler,
    )
