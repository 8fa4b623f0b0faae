"""Layer 1, vocabulary: the one table of dtype names.

Every API that takes a dtype by name (``with_autocast``, ``get_policy`` and the
policies, the demo) reads it here, so a name means the same everywhere.
"""

from __future__ import annotations

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
HALF = (F16, BF16)

# name -> dtype; the names jmp, Lightning and torch use
DTYPES: dict[str, torch.dtype] = {
    "float16": F16,
    "f16": F16,
    "fp16": F16,
    "half": F16,
    "bfloat16": BF16,
    "bf16": BF16,
    "float32": F32,
    "f32": F32,
    "fp32": F32,
    "full": F32,
    "single": F32,
    "float64": F64,
    "f64": F64,
    "fp64": F64,
    "double": F64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def names_of(dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """The names in the table for ``dtypes``, in the table's order."""
    return [n for n, d in DTYPES.items() if d in dtypes]


def parse_dtype(
    value: object,
    api: str,
    allowed: tuple[torch.dtype, ...] = (F16, BF16, F32, F64),
    extra: dict[str, torch.dtype] | None = None,
) -> torch.dtype:
    """A ``torch.dtype`` given as itself or by name, one of ``allowed``.

    ``extra`` adds names only this API takes (``with_autocast``'s "16-mixed").

    Raises:
        ValueError: a dtype or name outside ``allowed`` (the message lists the valid ones).
        TypeError: neither a dtype nor a string.
    """
    names = {**DTYPES, **(extra or {})}
    wanted = [f"torch.{dtype_name(d)}" for d in allowed]
    valid = (
        (", ".join(wanted[:-1]) + " or " + wanted[-1] if len(wanted) > 1 else wanted[0])
        + " (or one of "
        + ", ".join(repr(n) for n, d in names.items() if d in allowed)
        + ")"
    )
    if isinstance(value, torch.dtype):
        if value in allowed:
            return value
        raise ValueError(f"{api}: expected {valid}, got {value}")
    if isinstance(value, str):
        dtype = names.get(value)
        if dtype is not None and dtype in allowed:
            return dtype
        raise ValueError(f"{api}: expected {valid}, got {value!r}")
    raise TypeError(
        f"{api}: expected {valid}, got {type(value).__name__} {value!r}"[:400]
    )
