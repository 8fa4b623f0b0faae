"""Layer 5, transform: ``with_autocast``, the forward under ``torch.autocast``."""

from __future__ import annotations

import torch

from ampfn._args import check_bool
from ampfn._autocast_region import autocast_fragment, check_autocast
from ampfn._dtypes import BF16, F16, HALF, parse_dtype
from ampfn._runtime import default_device_type
from ampfn._transform import Transform, compute_tag, factory

# Lightning's names for the mixed precisions, which with_autocast also takes
_MIXED = {"16-mixed": F16, "bf16-mixed": BF16}


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
        dtype: ``torch.float16`` or ``torch.bfloat16``, or a name: "float16", "f16",
            "fp16", "half", "16-mixed", "bfloat16", "bf16", "bf16-mixed" (the names
            ``get_policy`` takes, and Lightning's mixed ones).
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
    half = parse_dtype(dtype, api, HALF, _MIXED)
    check_bool(cache_enabled, api, "cache_enabled", none=True)
    dev = check_autocast(
        default_device_type() if device_type is None else device_type, half, api
    )
    return Transform(
        "with_autocast",
        fragment=autocast_fragment("with_autocast", dev, half, cache_enabled),
        tags=("autocast", compute_tag(half)),
    )
