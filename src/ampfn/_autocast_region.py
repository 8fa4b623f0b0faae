"""Layer 4, building block: autocast regions, checked when a transform is built.

``torch.autocast`` only warns and disables itself for an unsupported dtype or an absent
device; :func:`check_autocast` turns that into an error when the transform is made.
:func:`autocast_fragment` is the forward under autocast with backward, grad, clipping
and the optimizer step outside it (PyTorch's advice), shared by ``with_autocast``, Apex
O1, the mixed policies and XLA's mixed bf16.
"""

from __future__ import annotations

import warnings

import torch

from ampfn._types import Autocast, Fragment


def check_autocast(device_type: object, dtype: torch.dtype, api: str) -> str:
    """Fail now, with the reason, if ``torch.autocast(device_type, dtype)`` cannot run here."""
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
            probe = torch.autocast(device_type, dtype=dtype)
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
    name: str, device_type: str, dtype: torch.dtype, cache_enabled: bool | None = None
) -> Fragment:
    """The forward under ``torch.autocast``; backward, grad, clipping and the optimizer step
    with autocast off."""
    return Fragment(
        name,
        autocast=Autocast(device_type, dtype, cache_enabled),
        autocast_off=device_type,
    )
