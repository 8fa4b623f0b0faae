"""Layer 5, transform: Apex's opt levels, O0-O3: the table of their properties, and the
overrides ``with_apex`` takes (as ``apex/amp/frontend.py``), validated."""

from __future__ import annotations

import dataclasses

import torch

from ampfn._scaling import check_scale

LEVELS = ("O0", "O1", "O2", "O3")
API = "with_apex(level)"


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
            f"{API}: level must be one of {', '.join(LEVELS)}, got {type(level).__name__} {level!r}"
        )
    props = (
        _DEFAULTS.get(level.upper())
        if level in (*LEVELS, *(x.lower() for x in LEVELS))
        else None
    )
    if props is None:
        hint = (
            f" (the level starts with the letter O, not the digit zero: {'O' + level[1:]!r})"
            if len(level) == 2 and level[0] == "0" and "O" + level[1:] in LEVELS
            else ""
        )
        raise ValueError(
            f"{API}: level must be one of {', '.join(LEVELS)}, got {level!r}{hint}"
        )
    if keep_batchnorm_fp32 is not None:
        if not isinstance(keep_batchnorm_fp32, bool):
            raise TypeError(
                f"{API}: keep_batchnorm_fp32 must be a bool or None, got {keep_batchnorm_fp32!r}"
            )
        if props.level == "O1":
            raise ValueError(
                f"{API}: with O1 batch norm already runs in fp32 under autocast, so keep_batchnorm_fp32 "
                "must be None (as in Apex)"
            )
        props = dataclasses.replace(props, keep_batchnorm_fp32=keep_batchnorm_fp32)
    if master_weights is not None:
        if not isinstance(master_weights, bool):
            raise TypeError(
                f"{API}: master_weights must be a bool or None, got {master_weights!r}"
            )
        if props.level == "O1":
            raise ValueError(
                f"{API}: master_weights makes no sense with O1, whose model weights stay fp32 (as in Apex); "
                "use O2 for fp16 weights with fp32 masters"
            )
        props = dataclasses.replace(props, master_weights=master_weights)
    if loss_scale is not None:
        if loss_scale != "dynamic":
            if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
                raise ValueError(
                    f"{API}: loss_scale must be 'dynamic' or a positive number, got {loss_scale!r}"
                )
            check_scale(loss_scale, API, "loss_scale (or 'dynamic')")
        props = dataclasses.replace(
            props,
            loss_scale=loss_scale if loss_scale == "dynamic" else float(loss_scale),
        )
    return props


def check_scale_bounds(
    min_loss_scale: object, max_loss_scale: object
) -> tuple[float | None, float]:
    def number(name: str, value: object, zero: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{API}: {name} must be a number, got {value!r}")
        return check_scale(value, API, name, zero=zero)

    if max_loss_scale is None:
        raise ValueError(
            f"{API}: max_loss_scale must be a number (Apex's default is 2.0**24)"
        )
    hi = number("max_loss_scale", max_loss_scale, zero=False)
    lo = (
        None
        if min_loss_scale is None
        else number("min_loss_scale", min_loss_scale, zero=True)
    )
    if lo is not None and lo > hi:
        raise ValueError(f"{API}: min_loss_scale ({lo}) is above max_loss_scale ({hi})")
    return lo, hi
