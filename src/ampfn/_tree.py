"""Layer 4, building block: walks over the containers a step's inputs and outputs are.

:func:`cast_floating` casts every floating tensor nested in lists, tuples, namedtuples
and dicts; :func:`floating_devices` collects their device types.
"""

from __future__ import annotations

from typing import Any

import torch


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor in ``obj`` (nested tuples, lists and dicts) to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        items = [cast_floating(o, dtype) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [cast_floating(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    return obj


def floating_devices(obj: Any, found: set[str]) -> set[str]:
    """The device types of the floating tensors in ``obj`` (nested as for
    :func:`cast_floating`), added to ``found``."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            found.add(obj.device.type)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            floating_devices(o, found)
    elif isinstance(obj, dict):
        for o in obj.values():
            floating_devices(o, found)
    return found
